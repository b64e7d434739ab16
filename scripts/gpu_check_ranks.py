"""The multi-rank parts of ``scripts/gpu_check`` (issue 18 item 4): exchanges through real collectives.

(a) ``world_exchange``: a one-rank process group (NCCL on the GPU, gloo with --cpu) in which every
    stage's group is the world instead of None, so each exchange stage is a real collective
    (a self-copy through ProcessGroupNCCL: its stream, ``Work.wait``, allocator stashing): hd1/hd2,
    ``overlap_chunks`` 1/2/4, forward and backward equal to the unpatched experts (no exchange); once
    more with a large async all_reduce queued on the same communicator first (a consumer that reads a
    receive buffer without waiting then reads garbage).
(b) ``shared_gpu_ranks``: 4 processes sharing the GPU over gloo with CUDA tensors (2x2 topology,
    Triton kernels, timed ``auto``, the traffic meter) with ``torch.cuda.set_sync_debug_mode("warn")``
    around one training step: only synchronisation warnings are counted (GPU_REVIEW.md #17).
(c) ``zero_token_grads``: experts that receive no token must get exactly zero weight gradients
    (pytorch#172439 on Blackwell's grouped GEMM); run on every GPU, the verdict names the capability.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SYNC_WORD = "synchroniz"  # torch's sync-debug warnings: "called a synchronizing CUDA operation"


def sync_warnings(caught) -> list[str]:
    """Only the sync-debug warnings among everything caught (a harmless UserWarning is not a sync)."""
    return [str(c.message) for c in caught if SYNC_WORD in str(c.message)]


class _WorldGroups:
    """StageGroups stand-in: every stage's group is the one-rank world (a real collective per stage)."""

    rank = 0

    def get(self, stage):
        return dist.group.WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_layer(x, ids, w, experts, E, strategy, chunks, ops, group, busy_elems: int = 0):
    """The pipelined layer through one-rank-world collectives -> (out, the busy all_reduce's Work or
    None). ``busy_elems`` > 0: an async all_reduce of that many floats is queued on the communicator
    after the count exchange (which the host waits for) and before the row exchanges, so those run
    after it and a read of a receive buffer that skips its wait sees unfinished data."""
    from hiermoe_hf.exchange.dispatcher import ExchangePlan
    from hiermoe_hf.exchange.experts import local_experts_forward
    from hiermoe_hf.exchange.layer_counts import Fixed, exchange_chunk_counts
    from hiermoe_hf.exchange.pipeline import pipelined_layer
    from hiermoe_hf.topology import Topology

    topo = Topology((1, 1))
    plan = ExchangePlan.build(topo, _WorldGroups(), strategy, E)
    counts = exchange_chunk_counts(topo, group, 0, Fixed(strategy), list(torch.tensor_split(ids // E, chunks)),
                                   x.shape[1] * x.element_size())
    busy = dist.all_reduce(torch.ones(busy_elems, device=x.device), async_op=True) if busy_elems else None

    def experts_fn(x_R, phys_R, w_R, arriving):
        return local_experts_forward(experts, x_R, phys_R, w_R, E, ops, arriving)[0]

    out, _, _ = pipelined_layer(x, ids, w, plan, ops, counts, experts_fn, None)
    return out, busy


def world_exchange(device, dtype, s: dict, kernels: str, busy_elems: int) -> dict:
    """(a): hd1/hd2 x overlap 1/2/4 through one-rank-world collectives vs the unpatched experts."""
    from gpu_check_common import experts_module, rel, routing

    from hiermoe_hf.kernels import select_ops

    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {}
    if device.type == "cuda":  # NCCL binds an indexed GPU: a bare torch.device("cuda") is refused
        kw["device_id"] = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kw)
    try:
        experts = experts_module(s["E"], s["H"], s["I"], s["K"], device, dtype)
        ops = select_ops(kernels, device)
        ids, w = routing(s["T"], s["E"], s["K"], device, dtype)
        x0 = torch.randn(s["T"], s["H"], device=device, dtype=dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        rows = []
        cases = [(b, st, c) for b in (False, True) for st in ("hd1", "hd2") for c in (1, 2, 4)]
        for i, (busy, strategy, chunks) in enumerate(cases):
            # inputs of their own per case: a receive buffer the allocator hands back still holds the
            # previous case's rows, which an unwaited read would otherwise take for correct ones
            x = x0 * (1 + i)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            ref = type(experts).forward(experts, xr, ids, wr)
            gy = torch.randn_like(ref)
            ref.backward(gy)
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            out, work = _one_rank_layer(xs, ids, ws, experts, s["E"], strategy, chunks, ops, dist.group.WORLD,
                                        busy_elems if busy else 0)
            out.backward(gy)
            if work is not None:
                work.wait()
            errs = {"out": rel(out.detach(), ref.detach()), "grad_x": rel(xs.grad, xr.grad),
                    "grad_w": rel(ws.grad, wr.grad)}
            rows.append({"busy": busy, "strategy": strategy, "chunks": chunks, **errs, "ok": max(errs.values()) <= tol})
        return {"backend": backend, "cases": rows, "ok": all(r["ok"] for r in rows)}
    finally:
        dist.destroy_process_group()


def _shared_rank(rank: int, world: int, init: str, cuda: bool, steps: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        import hiermoe_hf
        from hiermoe_hf.runtime.registry import moe_layers
        from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
        from hiermoe_hf.training.traffic import TrafficMeter

        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        torch.manual_seed(0)
        # bf16 on the GPU: the grouped GEMM runs (fp32 takes the per-slot loop and its extra read per
        # layer and chunk, outside this budget; check_layer's fp32 case has its own)
        dtype = torch.bfloat16 if cuda else torch.float32
        model = build_model(tiny_qwen3_moe_config(hidden_size=256, moe_intermediate_size=128), dtype=dtype)
        model = model.to(device).train()
        kernels = "triton" if cuda else "torch"
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", kernels=kernels, cost_model=None))
        meter = TrafficMeter(model)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, 256, (4, 64), generator=g).to(device)
        for _ in range(steps):  # through the timed auto's trials (and Triton's compiles)
            model(ids, labels=ids).loss.backward()
        model.zero_grad()
        syncs = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = model(ids, labels=ids).loss
                syncs["forward"] = sync_warnings(caught)
                n = len(caught)
                loss.backward()
                syncs["backward"] = sync_warnings(caught[n:])
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        layers = len(moe_layers(model))
        traffic = meter.pop(reduce=True)
        stats = hiermoe_hf.stats(model)
        queue.put((rank, {"layers": layers, "forward_syncs": len(syncs["forward"]),
                          "backward_syncs": len(syncs["backward"]), "messages": sorted(set(syncs["forward"]
                                                                                         + syncs["backward"]))[:5],
                          "strategies": [v["strategy"] for v in stats.values()], "tokens": traffic["tokens"]}))
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        queue.put((rank, {"error": f"{type(err).__name__}: {err}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def shared_gpu_ranks(cuda: bool, world: int = 4, steps: int = 8, timeout: float = 90) -> dict:
    """(b): 4 spawned ranks on one GPU over gloo; per MoE layer <= 1 forward sync, 0 backward."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="hiermoe-gpu-check-pg-")
    os.close(fd)
    os.unlink(path)
    procs = [ctx.Process(target=_shared_rank, args=(r, world, f"file://{path}", cuda, steps, queue))
             for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = {}
    try:
        while len(results) < world and time.perf_counter() - t0 < timeout:
            try:
                rank, res = queue.get(timeout=5)
                results[rank] = res
            except Exception:  # noqa: BLE001  (queue.Empty: keep waiting until the deadline)
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    per_rank = [results.get(r, {"error": "no result (timed out or crashed)"}) for r in range(world)]
    ok = all("error" not in r and r["forward_syncs"] <= r["layers"] and r["backward_syncs"] == 0 for r in per_rank)
    return {"ranks": per_rank, "seconds": round(time.perf_counter() - t0, 1), "ok": ok}


def zero_token_grads(device, s: dict) -> dict:
    """(c): bf16 experts on the grouped path with half the experts receiving no token: their weight
    gradients must be exactly zero; the others must match the per-slot loop."""
    from gpu_check_common import experts_module

    from hiermoe_hf.exchange.experts import can_group, local_experts_forward
    from hiermoe_hf.kernels import select_ops

    dtype = torch.bfloat16
    E = s["E"]
    ops = select_ops("torch", device)
    g = torch.Generator().manual_seed(3)
    T = s["T"] // 4
    ids = torch.randint(0, E // 2, (T, s["K"]), generator=g).to(device)  # experts E/2.. get nothing
    w = torch.rand(T, s["K"], generator=g).to(device, dtype)
    x = torch.randn(T, s["H"], generator=g).to(device, dtype)
    grads = {}
    for grouped in (True, False):
        experts = experts_module(E, s["H"], s["I"], s["K"], device, dtype)
        y, _ = local_experts_forward(experts, x, ids, w, E, ops, ids.numel(), grouped)
        y.float().sum().backward()
        grads[grouped] = [p.grad.float() for p in (experts.gate_up_proj, experts.down_proj)]
    idle = [float(gr[E // 2:].abs().max()) for gr in grads[True]]
    busy_err = max(float((a[: E // 2] - b[: E // 2]).abs().max() / b[: E // 2].abs().max().clamp(min=1e-30))
                   for a, b in zip(grads[True], grads[False]))
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return {"capability": cap, "grouped_fast_path": can_group(experts, x), "idle_expert_grad_max": max(idle),
            "busy_rel_diff_vs_loop": busy_err, "ok": max(idle) == 0.0 and busy_err <= 2e-2}


def as_namespace(d: dict) -> SimpleNamespace:
    return SimpleNamespace(**d)
