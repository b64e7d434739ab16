"""``model.save_pretrained(path)`` on a patched model: a Hub checkpoint in logical expert order.

Collective: every rank calls it; rank 0 writes. The result is what plain Transformers'
``save_pretrained`` writes for the unpatched model (same keys, dtypes, shard files, index JSON and
config), so a plain single-process ``from_pretrained`` reloads it, whatever the placement.

Memory: rank 0 streams each shard file tensor by tensor. Expert bytes are moved to rank 0 in rounds
of at most ``GATHER_BYTES`` (one message per owning rank per round), written, and dropped, so a
rank's extra memory during a save is bounded by the round size, not by the model or by
``max_shard_size`` (which, as in Transformers, only decides how the files are cut).

Atomicity: everything is written into a hidden sibling folder, which replaces ``path`` only once
complete (``atomic_folder``); a crash before that leaves the old checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import traceback
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from huggingface_hub import get_torch_storage_id, get_torch_storage_size, split_state_dict_into_shards_factory
from torch.distributed.tensor import DTensor
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from hiermoe_hf.checkpoint import safetensors_layout
from hiermoe_hf.checkpoint.atomic_folder import partial_folder, publish
from hiermoe_hf.checkpoint.keys import check_complete, conversions, experts_to_hub, hub_layout
from hiermoe_hf.exchange import bounded
from hiermoe_hf.exchange.devices import comm_device as comm_device_of
from hiermoe_hf.runtime.registry import LAYER_ATTR, moe_layers, runtime_of

GATHER_BYTES = 64 * 2**20  # bytes moved to rank 0 per round; bounds rank 0's extra memory during a save


@dataclass(frozen=True)
class Piece:
    """Contiguous bytes of one checkpoint tensor, held by rank ``owner``.

    A dense tensor is one piece named by its state-dict key (read on rank 0). An expert piece is
    logical expert ``expert``'s part of fused parameter ``source`` (attribute ``param`` of the experts
    module ``module``): the expert's whole slice when ``template`` is None, else the checkpoint
    tensor named ``template`` that Transformers' reverse conversion makes of that slice
    (``keys.experts_to_hub``). It is owned by its holder in the first replica of the expert-parallel
    group (group rank = global rank).
    """

    owner: int
    nbytes: int
    dense_key: str | None = None
    source: str = ""
    module: str = ""
    param: str = ""
    expert: int = -1
    template: str | None = None


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: its bytes are its pieces, concatenated."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    storage_id: object  # tensors sharing storage in the unpatched model share a shard (as in plain saves)
    storage_nbytes: int



def bind_collective_save(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` this module's collective save (on the instance; ``unpatch``
    removes it). ``hiermoe_hf.patch`` and ``hiermoe_hf.from_pretrained`` call it."""
    model.save_pretrained = types.MethodType(save_pretrained, model)  # collective, logical expert order


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "50GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    save_original_format: bool = True,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    save_function=None,
    distributed_checkpoint: bool = False,
) -> None:
    """Write ``model`` (patched) as a Hub checkpoint; every rank calls it, rank 0 writes.

    Args mirror ``PreTrainedModel.save_pretrained``: ``max_shard_size`` (e.g. ``"5GB"``), ``variant``
    (``model.<variant>.safetensors``), ``save_original_format`` (True: per-expert keys as on the Hub;
    False: fused ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I]).
    ``is_main_process`` and ``save_function`` are accepted for Accelerate-style calls and ignored:
    the save is collective and rank 0 writes.
    """
    del is_main_process, save_function  # collective: every rank takes part, rank 0 writes
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: hiermoe_hf writes safetensors only (valid: True)")
    if state_dict is not None:
        raise ValueError("state_dict= is not supported on a patched model: the experts are sharded over the ranks")
    if push_to_hub:
        raise ValueError("push_to_hub=True is not supported: save, then upload with huggingface_hub.upload_folder")
    if distributed_checkpoint:
        raise ValueError("distributed_checkpoint=True is not supported: hiermoe_hf writes one Hub-layout checkpoint")
    runtime = runtime_of(model)
    # Global ranks: piece owners are group ranks of replica 0 (global ranks 0 .. ep_size-1), so with
    # replicas of the expert-parallel group each expert is sent once, by replica 0's holder.
    world, rank = runtime.global_world_size, runtime.global_rank
    target = os.path.realpath(os.fspath(save_directory))  # a symlinked folder is written where it points
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory")

    # The two config edits a plain save makes (on every rank) before writing config.json.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    entries = _checkpoint_entries(model, save_original_format)
    weights_name = _with_variant(SAFE_WEIGHTS_NAME, variant)
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    split = split_state_dict_into_shards_factory(
        entries,
        get_storage_size=lambda entry: entry.storage_nbytes,
        get_storage_id=lambda entry: entry.storage_id,
        filename_pattern=pattern,
        max_shard_size=max_shard_size,
    )
    files = {name: _data_order([entries[k] for k in keys]) for name, keys in split.filename_to_tensors.items()}
    _check_same_plan(files, world, runtime.collective_timeout_s, comm_device_of(model))

    error = None
    partial = partial_folder(target)
    if rank == 0:
        try:
            if os.path.lexists(partial):  # left by a save that crashed
                shutil.rmtree(partial)
            os.makedirs(partial)
        except Exception:  # noqa: BLE001  (reported to every rank below, after the collective part)
            error = traceback.format_exc()
    comm_device = comm_device_of(model)  # the model's GPU under NCCL, not the current device (#9)
    for name, ordered in files.items():
        error = _write_file(model, os.path.join(partial, name), ordered, world, rank, comm_device, error)
    if rank == 0 and error is None:
        try:
            _write_index_and_configs(model, partial, split, variant)
            publish(partial, target)
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
    if rank == 0 and error is not None:
        shutil.rmtree(partial, ignore_errors=True)  # the old checkpoint, if any, was never touched
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RuntimeError(f"hiermoe_hf.save_pretrained failed on rank 0 writing {target!r}:\n{error}")


def experts_modules(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, object]]:
    """Qualified name (in ``model.state_dict()``) of each patched experts module -> (module, LayerState)."""
    return {name: (m, getattr(m, LAYER_ATTR)) for name, m in model.named_modules() if hasattr(m, LAYER_ATTR)}


def _checkpoint_entries(model: torch.nn.Module, original_format: bool) -> dict[str, Entry]:
    """Every tensor the unpatched model's plain save would write, in the order it would write them.

    The keys, their order and the per-expert names come from Transformers' own reverse conversion
    (``keys.hub_layout``), run on meta tensors of the unpatched model's shapes.
    """
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    modules = experts_modules(model)
    fused = {f"{name}.{p}": (name, layer, p) for name, (_, layer) in modules.items() for p in layer.param_names}
    absent = sorted(set(fused) - set(state))
    if absent:
        raise RuntimeError(f"patched experts missing from the state dict: {absent[:4]}")
    shapes, experts = {}, {}
    for key, tensor in state.items():
        shape = tuple(tensor.shape)
        if key in fused:
            experts[key] = fused[key][1].placement.num_experts
            shape = (experts[key], *shape[1:])  # the unpatched model's: all E experts
        shapes[key] = (shape, tensor.dtype)
    layout = hub_layout(model, shapes, experts, original_format)
    check_complete(layout, experts)
    out: dict[str, Entry] = {}
    for t in layout:
        if not t.experts:
            tensor = state[t.source]
            piece = Piece(owner=0, nbytes=tensor.numel() * tensor.element_size(), dense_key=t.source)
            storage = (get_torch_storage_id(tensor), get_torch_storage_size(tensor))
            out[t.key] = Entry(t.key, t.dtype, t.shape, (piece,), *storage)
            continue
        module, layer, param = fused[t.source]
        ids = range(t.experts) if t.expert is None else [t.expert]
        each = math.prod(t.shape[1:] if t.expert is None else t.shape) * t.dtype.itemsize
        pieces = tuple(
            Piece(layer.placement.rank_of(g), each, None, t.source, module, param, g, t.template) for g in ids
        )
        out[t.key] = Entry(t.key, t.dtype, t.shape, pieces, t.storage, t.storage_nbytes)
    return out


def _data_order(entries: list[Entry]) -> list[tuple[Entry, str]]:
    """These entries in the order safetensors lays them out in a file, with safetensors' dtype names."""
    by_key = {e.key: e for e in entries}
    return [(by_key[k], dtype) for k, dtype in safetensors_layout.data_order({e.key: e.dtype for e in entries})]


def _check_same_plan(
    files: dict[str, list[tuple[Entry, str]]], world: int, timeout_s: float, device: torch.device
) -> None:
    """Every rank must walk the same files and pieces, or the exchange would hang; check it once. The
    save's first collective: it waits at most ``timeout_s`` for ranks that never called the save."""
    if world == 1:
        return
    digest = hashlib.sha256()
    for name, ordered in files.items():
        digest.update(name.encode())
        for entry, _ in ordered:
            digest.update(repr((entry.key, entry.shape, [(p.owner, p.nbytes) for p in entry.pieces])).encode())
    mine = torch.tensor(list(digest.digest()), dtype=torch.int64, device=device)
    seen = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(seen, mine, async_op=True)
    bounded.wait(work, timeout_s, "save_pretrained (a collective save: every rank calls it, rank 0 writes)", device)
    if not all(torch.equal(s, mine) for s in seen):
        raise ValueError("ranks disagree on the checkpoint layout (different models or placements on different ranks)")




def _gather_sharded(model: torch.nn.Module, round_: list[Piece]) -> dict[str, torch.Tensor]:
    """Full tensors of this round's FSDP2-sharded dense pieces (``shard_dense``). Collective: every
    rank walks the same rounds, so the all-gathers match; only rank 0 keeps them (for one round)."""
    out = {}
    for piece in round_:
        if piece.dense_key is not None:
            tensor = model.get_parameter_or_buffer(piece.dense_key)
            if isinstance(tensor, DTensor):
                out[piece.dense_key] = tensor.detach().full_tensor()
    return out


def _piece_bytes(model: torch.nn.Module, piece: Piece, modules: dict, gathered: dict | None = None,
                 converted: dict | None = None) -> torch.Tensor:
    """This rank's bytes of ``piece``, as a flat uint8 tensor. ``converted``: per file, Transformers'
    conversion list (``conv``) and the last expert's reverse conversion (its gate and up keys come
    from one conversion)."""
    if piece.dense_key is not None:
        tensor = (gathered or {}).get(piece.dense_key)
        if tensor is None:
            tensor = model.get_parameter_or_buffer(piece.dense_key)
    else:
        experts, layer = modules[piece.module]
        slot = layer.placement.slot_of(piece.expert)
        tensor = getattr(experts, piece.param)[slot : slot + 1].detach()
        if piece.template is not None:
            cache = converted if converted is not None else {}
            if "conv" not in cache:
                cache["conv"] = conversions(model)
            if cache.get("at") != (piece.source, piece.expert):
                cache.update(at=(piece.source, piece.expert), out=experts_to_hub(cache["conv"], piece.source, tensor))
            tensor = cache["out"][piece.template]
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _rounds(pieces: list[Piece]) -> list[list[Piece]]:
    """Consecutive pieces grouped into rounds of at most GATHER_BYTES (a bigger piece travels alone)."""
    rounds, current, size = [], [], 0
    for piece in pieces:
        if current and size + piece.nbytes > GATHER_BYTES:
            rounds.append(current)
            current, size = [], 0
        current.append(piece)
        size += piece.nbytes
    if current:
        rounds.append(current)
    return rounds


def _batched_p2p(ops: list) -> None:
    """Run point-to-point ops through ``batch_isend_irecv`` and wait: on NCCL a batch uses the group's
    communicator, where plain ``send``/``recv`` would open one 2-rank communicator per rank pair
    (GPU_REVIEW.md #7). The save's plan check (an all_gather) ran first, so a batch may involve only some
    ranks (NCCL requires every rank only in a group's first collective)."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _write_file(model, path, ordered, world, rank, comm_device, error) -> str | None:
    """Stream one safetensors file: header, then each round's bytes as rank 0 receives them.

    Once rank 0 has an error it keeps taking part in the exchange (so no rank hangs) but writes no
    more; the error is returned and reported to every rank at the end.
    """
    modules = experts_modules(model)
    converted: dict = {}
    handle = None
    if rank == 0 and error is None:
        try:
            handle = open(path, "wb")
            handle.write(_header(ordered))
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
    pieces = [p for entry, _ in ordered for p in entry.pieces]
    for round_ in _rounds(pieces):
        gathered = _gather_sharded(model, round_)
        if rank != 0:
            mine = [_piece_bytes(model, p, modules, None, converted) for p in round_ if p.owner == rank]
            if mine:
                _batched_p2p([dist.P2POp(dist.isend, torch.cat(mine).to(comm_device), 0)])
            continue
        received, ops = {}, []
        for src in range(1, world):
            size = sum(p.nbytes for p in round_ if p.owner == src)
            if size:
                buf = torch.empty(size, dtype=torch.uint8, device=comm_device)
                ops.append(dist.P2POp(dist.irecv, buf, src))
                received[src] = buf
        _batched_p2p(ops)
        received = {src: (buf.cpu(), 0) for src, buf in received.items()}
        if error is not None:
            continue
        try:
            for piece in round_:
                if piece.owner == 0:
                    data = _piece_bytes(model, piece, modules, gathered, converted).cpu()
                else:
                    buf, at = received[piece.owner]
                    data, received[piece.owner] = buf[at : at + piece.nbytes], (buf, at + piece.nbytes)
                handle.write(memoryview(data.numpy()))
        except Exception:  # noqa: BLE001
            error = traceback.format_exc()
    if handle is not None:
        try:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        except Exception:  # noqa: BLE001
            error = error or traceback.format_exc()
    return error


def _header(ordered: list[tuple[Entry, str]]) -> bytes:
    return safetensors_layout.header(
        [(e.key, dtype, e.shape, sum(p.nbytes for p in e.pieces)) for e, dtype in ordered], {"format": "pt"}
    )


def _write_index_and_configs(model, folder, split, variant) -> None:
    """The index JSON (sharded saves only), config.json and generation_config.json, as a plain save writes them."""
    if split.is_sharded:
        # The unpatched model's parameter count: each fused expert tensor holds E, not E/W, experts.
        hidden = sum(
            getattr(ex, p).numel() // layer.local_experts * (layer.placement.num_experts - layer.local_experts)
            for ex, layer in moe_layers(model).values()
            for p in layer.param_names
        )
        index = {
            "metadata": {"total_parameters": model.num_parameters() + hidden, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        index_name = _with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def _with_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.<variant>.safetensors``, as Transformers names variants."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"
