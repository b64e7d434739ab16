"""Expert-swap executor: move two experts between their owner ranks, with everything that trains them.

For each planned exchange of logical experts ``a`` (on rank ra, slot sa) and ``b`` (rb, sb), the
two owner ranks trade their slot's slice of every expert parameter, of its gradient when there is
one, and of every optimizer-state tensor shaped like the parameter (Adam's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``, ...); scalar state such as ``step`` stays, being the
same for every slice. Slices are written in place, so parameter objects (and the optimizer's and
DDP's references to them) stay valid. Each rank sends one byte buffer per peer it trades with
(one batched isend/irecv round); ranks not involved only update the placement, which every rank
changes identically, so the model's function never changes.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from hiermoe_hf.exchange.devices import comm_device
from hiermoe_hf.runtime.registry import moe_layers, runtime_of


def unwrap_optimizer(optimizer):
    """The torch.optim optimizer inside wrappers such as Accelerate's ``AcceleratedOptimizer``."""
    if optimizer is None:
        return None
    inner = optimizer
    while not _is_plain(inner) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not hasattr(inner, "state") or not hasattr(inner, "param_groups"):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer (or a wrapper exposing .optimizer), "
            f"got {type(optimizer).__name__}"
        )
    return inner


def _is_plain(opt) -> bool:
    return isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer")


def state_keys(optimizer, param: torch.Tensor) -> list[str]:
    """Names of ``param``'s optimizer-state tensors that have its shape (moved with the slices).

    Raises ValueError for a state tensor that is per-expert but not shaped like the parameter
    (e.g. factored second moments): it could not be moved slice by slice.
    """
    if optimizer is None or param not in optimizer.state:
        return []
    keys = []
    for key, value in optimizer.state[param].items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if value.shape == param.shape:
            keys.append(key)
        elif value.shape[0] == param.shape[0]:
            raise ValueError(
                f"optimizer state {key!r} has shape {tuple(value.shape)}, not the parameter's {tuple(param.shape)}: "
                "expert swaps move per-element state only (Adam, AdamW, SGD, ... from torch.optim)"
            )
    return sorted(keys)


def _layer_tensors(experts, layer, optimizer, with_grad: bool) -> list[torch.Tensor]:
    out = []
    for name in layer.param_names:
        p = getattr(experts, name)
        out.append(p.data)
        if with_grad:
            if p.grad is None:  # another rank has a gradient here: a missing one means zeros
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        out += [optimizer.state[p][k] for k in state_keys(optimizer, p)]
    return out


def _descriptor(experts, layer, optimizer) -> list[int]:
    """Per parameter: has a grad, and a checksum of its moving state keys (must agree between ranks)."""
    out = []
    for name in layer.param_names:
        p = getattr(experts, name)
        keys = ",".join(state_keys(optimizer, p))
        out += [int(p.grad is not None), zlib.crc32(keys.encode())]
    return out


def expert_bytes(experts, layer, optimizer=None) -> int:
    """Bytes that move with one expert: its parameter slices, grads and param-shaped optimizer state."""
    optimizer = unwrap_optimizer(optimizer)
    total = 0
    for name in layer.param_names:
        p = getattr(experts, name)
        per = p[0].numel()
        total += per * p.element_size() * (1 + (p.grad is not None))
        for k in state_keys(optimizer, p):
            total += per * optimizer.state[p][k].element_size()
    return total


def _exchange(send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor], to_global=lambda r: r) -> None:
    """One batched round of point-to-point messages: send[peer] -> peer, recv[peer] <- peer (peers are
    group ranks; ``to_global`` names them in the default group)."""
    ops = []
    for peer in sorted(set(send) | set(recv)):
        ops.append(dist.P2POp(dist.isend, send[peer], to_global(peer)))
        ops.append(dist.P2POp(dist.irecv, recv[peer], to_global(peer)))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def execute_swaps(model: torch.nn.Module, swaps: Sequence[tuple[str, int, int]], optimizer=None) -> None:
    """Exchange logical experts ``a`` and ``b`` of layer ``name`` for each ``(name, a, b)``.

    Collective: every rank calls it with the same list (ranks are group ranks: with replicas of the
    expert-parallel group, each replica makes the same exchanges inside itself). Within one call a
    layer may move each expert at most once (call again for chained exchanges). The two experts may
    sit on the same rank (a local exchange of slots), on one node or on different nodes.
    """
    rt = runtime_of(model)
    optimizer = unwrap_optimizer(optimizer)
    layers = moe_layers(model)
    names = list(layers)
    moved: dict[str, set[int]] = {}
    for name, a, b in swaps:
        if name not in layers:
            raise ValueError(f"no MoE layer {name!r}; layers: {', '.join(names)}")
        E = layers[name][1].placement.num_experts
        for x in (a, b):
            if not (isinstance(x, int) and 0 <= x < E):
                raise ValueError(f"layer {name}: expert {x!r} is not a logical expert id in 0..{E - 1}")
        if a == b or moved.setdefault(name, set()) & {a, b}:
            raise ValueError(f"layer {name}: swap ({a}, {b}) repeats an expert already moved in this call")
        moved[name] |= {a, b}
    if not swaps:
        return
    involved = sorted(moved, key=names.index)
    W, me = rt.world_size, rt.rank
    with_grad = {}
    if W > 1:
        # Ranks must agree on what travels (grads, which state tensors), or buffer sizes would differ.
        desc = torch.tensor(
            [v for n in involved for v in _descriptor(*layers[n][:2], optimizer)], dtype=torch.int64,
            device=getattr(layers[involved[0]][0], layers[involved[0]][1].param_names[0]).device,
        )
        parts = [torch.empty_like(desc) for _ in range(W)]
        dist.all_gather(parts, desc, group=rt.ep_group)
        all_RD = torch.stack(parts).cpu()
        pos = 0
        for n in involved:
            width = 2 * len(layers[n][1].param_names)
            block = all_RD[:, pos : pos + width]
            if not torch.equal(block[:, 1::2].min(0).values, block[:, 1::2].max(0).values):
                raise ValueError(
                    f"layer {n}: ranks hold different optimizer state for the experts (some have not stepped?); "
                    "swap after the same optimizer steps on every rank"
                )
            with_grad[n] = bool(block[:, 0::2].max())
            pos += width
    else:
        with_grad = {n: any(getattr(layers[n][0], p).grad is not None for p in layers[n][1].param_names)
                     for n in involved}
    tensors = {n: _layer_tensors(*layers[n][:2], optimizer, with_grad[n]) for n in involved}
    send: dict[int, list[torch.Tensor]] = {}
    targets: dict[int, list[tuple[torch.Tensor, int]]] = {}  # peer -> (tensor, slot) to fill, in send order
    with torch.no_grad():
        for name, a, b in swaps:
            placement = layers[name][1].placement
            ra, sa = placement.rank_of(a), placement.slot_of(a)
            rb, sb = placement.rank_of(b), placement.slot_of(b)
            if ra == rb:
                if ra == me:
                    for t in tensors[name]:
                        t[[sa, sb]] = t[[sb, sa]]
                continue
            if me not in (ra, rb):
                continue
            slot, peer = (sa, rb) if me == ra else (sb, ra)
            for t in tensors[name]:
                send.setdefault(peer, []).append(_as_bytes(t[slot]))
                targets.setdefault(peer, []).append((t, slot))
        # gloo's send/recv read host memory only: CUDA experts under gloo travel through the CPU; under
        # NCCL the buffers stay on the experts' GPU (comm_device)
        send_buf = {peer: torch.cat(parts).to(comm_device(parts[0])) for peer, parts in send.items()}
        recv_buf = {peer: torch.empty_like(buf) for peer, buf in send_buf.items()}
        _exchange(send_buf, recv_buf, rt.global_of)
        for peer, fills in targets.items():
            offset = 0
            for t, slot in fills:
                n = t[slot].numel() * t.element_size()
                # clone: a fresh buffer at offset 0, as view(dtype) needs whatever the byte offset is
                t[slot].copy_(recv_buf[peer][offset : offset + n].clone().view(t.dtype).view(t[slot].shape))
                offset += n
    for name, a, b in swaps:
        layers[name][1].placement.swap(a, b)
