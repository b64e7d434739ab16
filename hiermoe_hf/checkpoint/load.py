"""``hiermoe_hf.from_pretrained``: load a Hub checkpoint reading only this rank's experts.

The result equals ``hiermoe_hf.patch(AutoModelForCausalLM.from_pretrained(...), cfg)``, but a rank's
peak memory is the dense parameters plus its E/W experts, never the whole model.

How: Transformers' own ``from_pretrained`` does everything (config, dtype, building the model on the
meta device, dense weights, tied weights, buffers such as rotary ``inv_freq`` recomputed by the
model's init, generation config, ``eval()``), except one step: its weight-loading step is
swapped, on a throw-away subclass of the model class, for one that first shrinks each experts
module's fused parameters (still on meta) to this rank's slots [E/W, ...], then hands Transformers
the dense tensors as lazy safetensors slices and, for the experts, stand-ins that read only experts
[rank*E/W, (rank+1)*E/W) when Transformers materialises them (rank and W of the rank's
expert-parallel group: with ``ep_size`` < W every replica of the group reads the same experts).
The model gets its own class back before ``patch`` shards nothing more (the slots already hold
the contiguous placement's experts).
"""

from __future__ import annotations

import copy
import functools
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.core_model_loading import WeightConverter
from transformers.models.auto.auto_factory import _get_model_class

from hiermoe_hf import patches
from hiermoe_hf.checkpoint.fp8 import Fp8Format, Fp8Reader
from hiermoe_hf.checkpoint.hub import resolve_on_all_ranks
from hiermoe_hf.checkpoint.keys import EXPERT_PROJECTIONS, expert_key, fused_key, per_expert_key_pattern, row_parts
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.runtime.devices import comm_device, fsdp2_device_map
from hiermoe_hf.runtime.ep_layout import EPLayout, group_topology
from hiermoe_hf.runtime.patch import patch_experts
from hiermoe_hf.runtime.registry import world as _world
from hiermoe_hf.training.fsdp import fully_shard_dense

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_UNSUPPORTED_KWARGS = (
    "state_dict", "distributed_config", "tp_plan", "tp_size", "device_mesh", "quantization_config",
    "gguf_file", "offload_folder", "max_memory", "use_safetensors", "output_loading_info",
)


def from_pretrained(
    name_or_path: str | os.PathLike, cfg: HierMoEConfig | None = None, dense_sharding: str = "ddp", **hf_kwargs
) -> torch.nn.Module:
    """A patched causal LM from a local folder or Hub repo id, holding only this rank's experts.

    Collective over the default process group (like ``patch``). ``hf_kwargs`` are
    ``AutoModelForCausalLM.from_pretrained``'s (``dtype``, ``revision``, ``cache_dir``, ``token``,
    ``local_files_only``, ``subfolder``, ``attn_implementation``, ``device_map`` = one device, config
    overrides, ...). The checkpoint may hold per-expert keys (``...experts.7.gate_proj.weight``, the Hub
    layout) or fused ones (``...experts.gate_up_proj`` [E, 2I, H], ``...experts.down_proj`` [E, H, I]).
    ``dense_sharding="fsdp2"``: the result is ``shard_dense``-ed, and each rank reads only its chunk of
    every dense tensor (FSDP2 is applied on the meta device, Transformers reads shards on read).
    """
    cfg = cfg if cfg is not None else HierMoEConfig()
    if not isinstance(cfg, HierMoEConfig):
        raise TypeError(f"cfg must be a hiermoe_hf.HierMoEConfig or None, got {type(cfg).__name__}")
    if dense_sharding not in ("ddp", "fsdp2"):
        raise ValueError(f"dense_sharding={dense_sharding!r} is not valid; choose one of ddp, fsdp2")
    unsupported = sorted(set(hf_kwargs) & set(_UNSUPPORTED_KWARGS))
    if unsupported:
        raise ValueError(
            f"hiermoe_hf.from_pretrained does not support {', '.join(unsupported)}; it reads safetensors "
            "checkpoints and shards the experts itself (load with transformers and call hiermoe_hf.patch instead)"
        )
    _check_device_map(hf_kwargs.get("device_map"))
    world, rank = _world()
    # bad settings fail before any weight is read; experts are held per expert-parallel group (ep_size)
    topology = group_topology(cfg.topology, EPLayout.resolve(cfg.ep_size, world, rank))
    if cfg.dispatch != "auto":
        topology.stages(cfg.dispatch)
    hub = {k: hf_kwargs.pop(k) for k in _HUB_KWARGS if k in hf_kwargs}
    subfolder = hf_kwargs.pop("subfolder", "")
    folder = resolve_on_all_ranks(name_or_path, hub, world, rank)
    folder = os.path.join(folder, subfolder) if subfolder else folder

    config = hf_kwargs.pop("config", None)
    if not isinstance(config, PreTrainedConfig):
        # As AutoModelForCausalLM does: the config takes what it knows, "auto" dtypes are the model's.
        config_kwargs = {k: v for k, v in hf_kwargs.items() if not (k in ("dtype", "torch_dtype") and v == "auto")}
        config, model_kwargs = AutoConfig.from_pretrained(config or folder, return_unused_kwargs=True, **config_kwargs)
        for k in ("torch_dtype", "dtype"):
            if hf_kwargs.get(k) is not None:
                model_kwargs[k] = hf_kwargs[k]
    else:
        config, model_kwargs = copy.deepcopy(config), hf_kwargs
    fp8 = Fp8Format.take_from(config)  # FP8 weights are dequantized while read; the model is plain
    base = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    layout = EPLayout.resolve(cfg.ep_size, world, rank, _num_experts(base, config))
    fsdp2 = dense_sharding == "fsdp2" and world > 1
    loader = _local_experts_class(base, layout.rank, layout.ep_size, fp8, fsdp2)
    if fsdp2:  # under NCCL the weights go to this rank's GPU, where FSDP2's mesh is (not the CPU)
        backend = dist.get_backend() if dist.is_initialized() else None
        device = comm_device() if backend == "nccl" else None
        model_kwargs["device_map"] = fsdp2_device_map(model_kwargs.get("device_map"), backend, device)
    model = loader.from_pretrained(folder, config=config, **model_kwargs)
    if not fsdp2:
        model.__class__ = base  # the subclass only existed to swap the loading step (FSDP2: done before)
    model.config.name_or_path = os.fspath(name_or_path)  # as given (a repo id, not its cache folder)
    return patch_experts(model, cfg, experts_are_local=True)  # the loader read only this rank's experts


def _num_experts(model_class: type, config) -> int:
    """E of ``config``'s model, from its experts modules (``patches.find_experts``) on a meta-device
    build: no weights are allocated, and no per-family table of config attributes is needed."""
    with torch.device("meta"):
        model = model_class._from_config(copy.deepcopy(config))
    return patches.find_experts(model)[0][0].num_experts


def _check_device_map(device_map) -> None:
    """Every rank holds a whole model minus experts: one device per rank, or none (CPU)."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    try:  # "auto", "balanced", ... spread one model over devices: not a single device
        one_device = device_map is None or torch.device(device_map) is not None
    except (RuntimeError, TypeError):
        one_device = False
    if not one_device:
        raise ValueError(
            f"device_map={device_map!r} is not supported; valid: None, one device ('cpu', 'cuda:0', 0) or "
            "{'': device} (each rank holds the whole dense model)"
        )


@functools.cache
def _local_experts_class(
    base: type, ep_rank: int, ep_size: int, fp8: Fp8Format | None = None, fsdp2: bool = False
) -> type:
    """``base`` with only its weight-loading step replaced (same name and module, so Transformers'
    source-inspecting checks behave as for ``base``); it reads the experts of group rank ``ep_rank``
    of an expert-parallel group of ``ep_size`` ranks; ``fp8``: the checkpoint's FP8 block format;
    ``fsdp2``: shard the dense part over the world (on meta) before any weight is read."""

    def load(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        return _load_with_local_experts(
            base, model, state_dict, checkpoint_files, load_config, expected_keys, ep_rank, ep_size, fp8, fsdp2
        )

    attrs = {"__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), {**attrs, "_load_pretrained_model": staticmethod(load)})


def _load_with_local_experts(
    base, model, state_dict, checkpoint_files, load_config, expected_keys, rank, world, fp8=None, fsdp2=False
):
    files = [os.fspath(f) for f in checkpoint_files or []]
    if state_dict is not None or not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError(f"hiermoe_hf.from_pretrained reads safetensors checkpoints only; found {files or 'none'}")
    sites = patches.find_experts(model)
    num_experts = sites[0][0].num_experts
    local = num_experts // world
    reader = _ShardReader(files) if fp8 is None else Fp8Reader(_ShardReader(files), fp8)
    try:
        weights, by_block = {}, {}
        for key in reader.keys():  # expert keys, grouped by block, are replaced by the stand-ins
            block, sep, _ = key.partition(".experts.")
            if sep:
                by_block.setdefault(block, []).append(key)
            else:
                weights[key] = reader.slice(key)
        folder = os.path.dirname(files[0])
        for site, experts in sites:
            block = site.block_name
            stand_ins = _expert_stand_ins(
                reader, by_block.pop(block, []), block, experts, site.param_names, num_experts,
                rank * local, local, folder,
            )
            weights.update(stand_ins)
            if any(s.per_expert for s in stand_ins.values()):
                _mark_expert_conversions_used(load_config.weight_mapping, block)
            for param in site.param_names:  # still on meta: only the shape changes
                full = getattr(experts, param)
                shape = (local, *full.shape[1:])
                setattr(experts, param, torch.nn.Parameter(
                    torch.empty(shape, dtype=full.dtype, device="meta"), requires_grad=full.requires_grad
                ))
        for keys in by_block.values():  # ".experts." keys outside any routed-MoE block load as usual
            weights.update({key: reader.slice(key) for key in keys})
        if fsdp2:  # dense parameters become meta DTensors: Transformers then reads only this rank's chunk
            model.__class__ = base  # before FSDP2 derives its wrapper class from the model's class
            ignored = {getattr(m, p) for site, m in sites for p in site.param_names}
            device = comm_device().type
            fully_shard_dense(model, ignored, _world()[0], device)  # the dense part: over the whole world
        return base._load_pretrained_model(model, weights, files, load_config, expected_keys)
    finally:
        reader.close()


def _mark_expert_conversions_used(weight_mapping, block: str) -> None:
    """Record, as Transformers' loader would, that per-expert keys went through its expert converters.

    The model keeps the converters that matched (``model._weight_conversions``) to write per-expert
    keys again in a plain ``save_pretrained``; the stand-ins bypass them, so mark them here.
    """
    for conversion in weight_mapping or []:
        if isinstance(conversion, WeightConverter):
            for projections in EXPERT_PROJECTIONS.values():
                for projection in projections:
                    conversion.rename_source_key(expert_key(block, 0, projection))


class _ShardReader:
    """Lazy access to every tensor of a checkpoint's safetensors files.

    ``pread`` rather than ``mmap``: mapped file pages count in a process's resident memory, and only
    the bytes of this rank's slices should.
    """

    def __init__(self, files: list[str]):
        self._handles, self._where = [], {}
        for path in files:
            try:
                handle = safe_open(path, framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors without the backend option
                handle = safe_open(path, framework="pt", device="cpu")
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle

    def keys(self):
        return self._where.keys()

    def slice(self, key: str):
        return self._where[key].get_slice(key)

    def close(self) -> None:
        for handle in self._handles:
            handle.__exit__(None, None, None)


class _LocalExperts:
    """Stands for one fused experts parameter in the weights handed to Transformers' loader.

    Transformers materialises it with ``[...]``: that reads only this rank's experts, giving
    [count, rows, ...] in the checkpoint's dtype, either one slice of a fused tensor
    (``fused = (key, lo)``) or filled expert by expert from per-expert keys (``slots[j]`` = the
    (key, row lo, row hi) parts of slot j), so one expert's matrix at a time is in flight.
    """

    def __init__(self, reader: _ShardReader, shape: tuple[int, ...], fused=None, slots=None):
        self.reader, self.shape, self.fused, self.slots = reader, shape, fused, slots
        self.per_expert = slots is not None

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("the local experts stand-in is read whole, with [...]")
        if not self.per_expert:
            key, lo = self.fused
            return self.reader.slice(key)[lo : lo + self.shape[0]]
        out = None
        for slot, parts in enumerate(self.slots):
            for key, lo, hi in parts:
                matrix = self.reader.slice(key)[:]
                if out is None:
                    out = torch.empty(self.shape, dtype=matrix.dtype)
                out[slot, lo:hi] = matrix
        return out


def _expert_stand_ins(reader, keys, block, experts, params, num_experts, lo, count, folder) -> dict[str, _LocalExperts]:
    """Fused key -> stand-in reading experts [lo, lo + count) of ``block``; ValueError if the checkpoint's
    experts do not fit the config (count, shapes) or are missing."""
    pattern = per_expert_key_pattern(block)
    ids: dict[str, set[int]] = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            ids.setdefault(match.group(2), set()).add(int(match.group(1)))
    fused_present = [p for p in params if fused_key(block, p) in reader.keys()]
    if ids and fused_present:
        raise ValueError(f"checkpoint {folder} holds both per-expert and fused expert tensors for {block}.experts")
    if not ids and len(fused_present) != len(params):
        raise ValueError(f"checkpoint {folder} has no expert weights for {block}.experts (per-expert or fused)")
    out = {}
    for param in params:
        full = tuple(getattr(experts, param).shape)  # [E, rows, ...] from the config, still on meta
        shape = (count, *full[1:])
        if not ids:
            key = fused_key(block, param)
            found = tuple(reader.slice(key).get_shape())
            if found[:1] != (num_experts,):
                raise ValueError(_count_error(folder, block, found[0] if found else 0, num_experts))
            if found != full:
                raise ValueError(_shape_error(folder, key, found, full))
            out[key] = _LocalExperts(reader, shape, fused=(key, lo))
            continue
        parts = row_parts(param, full[1])
        for part in parts:
            got = ids.get(part.projection, set())
            if got != set(range(num_experts)):
                raise ValueError(_count_error(folder, block, len(got), num_experts, part.projection, got))
        slots = []
        for expert in range(lo, lo + count):
            slot = []
            for part in parts:
                key = expert_key(block, expert, part.projection)
                found, want = tuple(reader.slice(key).get_shape()), (part.hi - part.lo, *full[2:])
                if found != want:
                    raise ValueError(_shape_error(folder, key, found, want))
                slot.append((key, part.lo, part.hi))
            slots.append(slot)
        out[fused_key(block, param)] = _LocalExperts(reader, shape, slots=slots)
    return out


def _shape_error(folder, key, found, want) -> str:
    return f"checkpoint {folder}: {key} has shape {list(found)}, but the model config gives {list(want)}"


def _count_error(folder, block, found, expected, projection=None, ids=None) -> str:
    what = f"{found} experts" + (f" ({projection}, ids {min(ids)}..{max(ids)})" if ids else "")
    return (
        f"checkpoint {folder} holds {what} for {block}.experts, but the model config says {expected} experts "
        "per layer; the checkpoint and config do not match"
    )
