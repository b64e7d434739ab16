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
Which checkpoint keys hold which expert is the family's own Hub layout, read off Transformers'
conversion mapping (``keys.py``); quantized releases (fine-grained FP8, gpt-oss MXFP4) are
dequantized while read (``quantized.py``).
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedConfig
from transformers.models.auto.auto_factory import _get_model_class

from hiermoe_hf import patches
from hiermoe_hf.checkpoint.hub import resolve_on_all_ranks
from hiermoe_hf.checkpoint.keys import ForwardConversion, HubTensor, conversions, hub_layout, hub_views
from hiermoe_hf.checkpoint.quantized import QuantizedFormat, take_quantization
from hiermoe_hf.checkpoint.save import bind_collective_save
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.exchange.devices import comm_device, fsdp2_device_map
from hiermoe_hf.runtime.ep_layout import EPLayout, group_topology
from hiermoe_hf.runtime.fsdp import fully_shard_dense
from hiermoe_hf.runtime.patch import patch_experts
from hiermoe_hf.runtime.registry import world as _world

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
    overrides, ...). The checkpoint may be in the family's Hub layout (per-expert keys such as Qwen's
    ``...experts.7.gate_proj.weight`` or Mixtral's ``...block_sparse_moe.experts.7.w1.weight``; fused
    tensors for gpt-oss) or hold the model's fused tensors (``save_original_format=False``), and may be
    a fine-grained FP8 or gpt-oss MXFP4 release (dequantized while read; other quantizations: ValueError).
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
    quant = take_quantization(config)  # FP8 / MXFP4 weights are dequantized while read; the model is plain
    base = _model_class(config)
    layout = EPLayout.resolve(cfg.ep_size, world, rank, _num_experts(base, config))
    fsdp2 = dense_sharding == "fsdp2" and world > 1
    loader = _local_experts_class(base, layout.rank, layout.ep_size, quant, fsdp2)
    if fsdp2:  # under NCCL the weights go to this rank's GPU, where FSDP2's mesh is (not the CPU)
        backend = dist.get_backend() if dist.is_initialized() else None
        device = comm_device() if backend == "nccl" else None
        model_kwargs["device_map"] = fsdp2_device_map(model_kwargs.get("device_map"), backend, device)
    model = loader.from_pretrained(folder, config=config, **model_kwargs)
    if not fsdp2:
        model.__class__ = base  # the subclass only existed to swap the loading step (FSDP2: done before)
    model.config.name_or_path = os.fspath(name_or_path)  # as given (a repo id, not its cache folder)
    model = patch_experts(model, cfg, experts_are_local=True)  # the loader read only this rank's experts
    bind_collective_save(model)
    return model


def _model_class(config) -> type:
    """The class ``AutoModelForCausalLM`` builds for ``config``; for an image-text family without a
    causal-LM class (Qwen3-VL-MoE), the one ``AutoModelForImageTextToText`` builds."""
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return _get_model_class(config, auto._model_mapping)
    raise ValueError(f"{type(config).__name__} ({config.model_type}) has no causal-LM or image-text model class")


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
    base: type, ep_rank: int, ep_size: int, quant: QuantizedFormat | None = None, fsdp2: bool = False
) -> type:
    """``base`` with only its weight-loading step replaced (same name and module, so Transformers'
    source-inspecting checks behave as for ``base``); it reads the experts of group rank ``ep_rank``
    of an expert-parallel group of ``ep_size`` ranks; ``quant``: the checkpoint's quantized format
    (dequantized while read); ``fsdp2``: shard the dense part over the world (on meta) before any
    weight is read."""

    def load(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        return _load_with_local_experts(
            base, model, state_dict, checkpoint_files, load_config, expected_keys, ep_rank, ep_size, quant, fsdp2
        )

    attrs = {"__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), {**attrs, "_load_pretrained_model": staticmethod(load)})


def _load_with_local_experts(
    base, model, state_dict, checkpoint_files, load_config, expected_keys, rank, world, quant=None, fsdp2=False
):
    files = [os.fspath(f) for f in checkpoint_files or []]
    if state_dict is not None or not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError(f"hiermoe_hf.from_pretrained reads safetensors checkpoints only; found {files or 'none'}")
    sites = [site for site, _ in patches.find_experts(model)]  # on meta, still with all E experts
    reader = _ShardReader(files) if quant is None else quant.reader(_ShardReader(files))
    try:
        folder = os.path.dirname(files[0])
        plan = _experts_plan(model, sites, reader, folder)
        fwd = ForwardConversion(load_config.weight_mapping, model)
        weights, consumed = {}, set()
        for fused, (tensors, full) in plan.items():
            count = full[0] // world
            key, stand_in = _stand_in(reader, fwd, fused, tensors, rank * count, count, full)
            weights[key] = stand_in
            consumed.update(t.key for t in tensors)
            module, _, param = fused.rpartition(".")
            experts = model.get_submodule(module)
            old = getattr(experts, param)  # still on meta: only the shape changes
            setattr(experts, param, torch.nn.Parameter(
                torch.empty((count, *full[1:]), dtype=old.dtype, device="meta"), requires_grad=old.requires_grad
            ))
        weights.update({key: reader.slice(key) for key in reader.keys() if key not in consumed})
        if fsdp2:  # dense parameters become meta DTensors: Transformers then reads only this rank's chunk
            model.__class__ = base  # before FSDP2 derives its wrapper class from the model's class
            ignored = {model.get_parameter(fused) for fused in plan}
            device = comm_device().type
            fully_shard_dense(model, ignored, _world()[0], device)  # the dense part: over the whole world
        return base._load_pretrained_model(model, weights, files, load_config, expected_keys)
    finally:
        reader.close()


def _experts_plan(model, sites, reader, folder) -> dict[str, tuple[list[HubTensor], tuple[int, ...]]]:
    """Fused parameter key -> (the checkpoint tensors it is read from, its full shape [E, ...]).

    The expected tensors are the family's Hub layout (Transformers' reverse conversion of the model,
    ``keys.hub_layout``); a checkpoint written with ``save_original_format=False`` holds the fused
    parameter itself. ValueError when the checkpoint holds another number of experts or other shapes.
    """
    experts, shapes = {}, {}
    for site in sites:
        for p in site.param_names:
            full = getattr(model.get_submodule(site.name), p)
            experts[f"{site.name}.{p}"], shapes[f"{site.name}.{p}"] = site.num_experts, (tuple(full.shape), full.dtype)
    layout = hub_layout(model, shapes, experts)
    present = set(reader.keys())
    ids = _expert_ids_present(layout, present)
    plan = {}
    for fused, num_experts in experts.items():
        tensors = [t for t in layout if t.source == fused]
        module = fused.rpartition(".")[0]
        if not all(t.key in present for t in tensors) and fused in present:
            shape, dtype = shapes[fused]  # save_original_format=False: the model's own fused tensor
            tensors = [HubTensor(fused, shape, dtype, fused, num_experts, None, None, None, 0)]
        for t in tensors:
            found = ids.get((t.source, t.template), set()) if t.expert is not None else None
            if found is not None and found != set(range(num_experts)):
                raise ValueError(_count_error(folder, module, len(found), num_experts, t.template, found))
            if t.key not in present:
                raise ValueError(
                    f"checkpoint {folder} has no {t.key} (expert weights of {module}, per-expert or fused)"
                )
            on_disk = tuple(reader.slice(t.key).get_shape())
            if t.expert is None and on_disk[:1] != (num_experts,):
                raise ValueError(_count_error(folder, module, on_disk[0] if on_disk else 0, num_experts))
            if on_disk != t.shape:
                raise ValueError(_shape_error(folder, t.key, on_disk, t.shape))
        plan[fused] = (tensors, shapes[fused][0])
    return plan


def _expert_ids_present(layout: list[HubTensor], present: set[str]) -> dict[tuple[str, str], set[int]]:
    """(fused key, template) -> the expert ids the checkpoint holds under that per-expert name (any count)."""
    where: dict[tuple[str, ...], tuple[str, str, int]] = {}
    for t in layout:
        if t.expert == 1:  # expert 1's name differs from the template in the expert's name part only
            parts, tparts = t.key.split("."), t.template.split(".")
            at = next(i for i, (a, b) in enumerate(zip(parts, tparts)) if a != b)
            where[tuple(parts[:at] + ["*"] + parts[at + 1 :])] = (t.source, t.template, at)
    positions = {at for _, _, at in where.values()}
    found: dict[tuple[str, str], set[int]] = {}
    for key in present:
        parts = key.split(".")
        for at in positions:
            if at < len(parts) and parts[at].isdigit():
                hit = where.get(tuple(parts[:at] + ["*"] + parts[at + 1 :]))
                if hit is not None and hit[2] == at:
                    found.setdefault(hit[:2], set()).add(int(parts[at]))
    return found


def _stand_in(reader, fwd, fused: str, tensors: list[HubTensor], lo: int, count: int, full: tuple[int, ...]):
    """(key, stand-in) handed to Transformers' loader for experts [lo, lo + count) of ``fused``.

    Stacked on disk (one tensor, experts on dim 0): the checkpoint key itself, read rows
    [lo, lo + count) only; Transformers applies its own conversion (e.g. a transpose) to them.
    Per-expert keys: the model's fused key, filled expert by expert (``_LocalExperts``), so one
    expert's tensors at a time are in flight.
    """
    if len(tensors) == 1 and tensors[0].expert is None:
        key = tensors[0].key
        return key, _LocalRows(reader.slice(key), lo, count)
    by_expert: dict[int, list[tuple[str, str]]] = {}
    for t in tensors:
        by_expert.setdefault(t.expert, []).append((t.key, t.template))
    fwd.mark([key for key, _ in by_expert[lo]])  # used, as in Transformers' own load (a plain save reverts them)
    slots = [by_expert[g] for g in range(lo, lo + count)]
    return fused, _LocalExperts(reader, fwd, fused, (count, *full[1:]), slots)


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


class _LocalRows:
    """Rows [lo, lo + count) (this rank's experts) of a tensor stacked over experts, read when
    Transformers materialises it with ``[...]``."""

    def __init__(self, stacked, lo: int, count: int):
        self.stacked, self.lo, self.count = stacked, lo, count
        self.shape = (count, *stacked.get_shape()[1:])

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("the local experts stand-in is read whole, with [...]")
        return self.stacked[self.lo : self.lo + self.count]


class _LocalExperts:
    """Stands for one fused experts parameter in the weights handed to Transformers' loader.

    Transformers materialises it with ``[...]``: that reads only this rank's experts (``slots[j]``:
    the (checkpoint key, template name) pairs of slot j's expert) into [count, ...], slot by slot.
    Where Transformers' reverse conversion cuts a slot into views (``keys.hub_views``), each
    checkpoint tensor is read straight into its view, one tensor at a time in flight; otherwise the
    expert's tensors go through Transformers' forward conversion (``keys.ForwardConversion``).
    """

    def __init__(self, reader, fwd: ForwardConversion, fused: str, shape: tuple[int, ...], slots: list):
        self.reader, self.fwd, self.fused, self.shape, self.slots = reader, fwd, fused, shape, slots

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("the local experts stand-in is read whole, with [...]")
        conv = conversions(self.fwd.model)
        first = self.reader.slice(self.slots[0][0][0])[:]  # its dtype is the buffer's (as Transformers would)
        out = torch.empty(self.shape, dtype=first.dtype)

        def read(key: str) -> torch.Tensor:
            nonlocal first
            if first is not None and key == self.slots[0][0][0]:
                tensor, first = first, None
                return tensor
            return self.reader.slice(key)[:]

        for slot, pairs in enumerate(self.slots):
            views = hub_views(conv, self.fused, out[slot : slot + 1])
            if views is not None:
                for key, template in pairs:
                    views[template].copy_(read(key))
                continue
            converted = self.fwd({key: read(key) for key, _ in pairs})
            if set(converted) != {self.fused}:
                raise ValueError(
                    f"Transformers' conversion of {[k for k, _ in pairs]} gives {sorted(converted)}, not "
                    f"{self.fused}; the checkpoint's expert keys do not match this model's layout"
                )
            out[slot] = converted[self.fused][0]
        return out


def _shape_error(folder, key, found, want) -> str:
    return f"checkpoint {folder}: {key} has shape {list(found)}, but the model config gives {list(want)}"


def _count_error(folder, module, found, expected, template=None, ids=None) -> str:
    what = f"{found} experts" + (f" (keys like {template}, ids {min(ids)}..{max(ids)})" if ids else "")
    return (
        f"checkpoint {folder} holds {what} for {module}, but the model config says {expected} experts "
        "per layer; the checkpoint and config do not match"
    )
