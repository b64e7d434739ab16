"""The Hub key layout of a model's checkpoint, from Transformers' own weight-conversion mapping.

In memory each experts module holds fused parameters with a leading expert dimension
(``experts.gate_up_proj`` [E, ...], ``experts.down_proj`` [E, ...], biases ``*_bias`` [E, ...]). On
the Hub each family has its own layout: per-expert keys (Qwen ``experts.7.gate_proj.weight``,
Mixtral ``block_sparse_moe.experts.7.w1.weight``), fused tensors (gpt-oss), transposed fused
tensors (Qwen3-VL-MoE), and renamed dense keys (Mixtral's ``block_sparse_moe.gate``). Transformers
describes every family's layout as data (``transformers.conversion_mapping``: WeightRenaming /
WeightConverter ops) and applies it on load and, reversed, on save. This module asks Transformers
for that layout instead of writing a rule per family:

- ``hub_layout`` runs Transformers' own reverse conversion (``revert_weight_conversion``, what a plain
  ``save_pretrained`` runs) on meta tensors of the model's full shapes: the checkpoint's keys, shapes,
  order and shard grouping, each key traced to the model tensor it comes from and, for experts, the
  expert it holds.
- ``experts_to_hub`` / ``hub_to_experts`` convert ONE expert's matrices at a time with the same
  Transformers ops (reverse for saving, forward for loading), so a rank only ever touches its own
  experts and never relies on Transformers' sort-and-stack of expert keys (NOTES.md: gaps or
  duplicates there silently shift experts; here every key is named with its expert id).
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    rename_source_key,
    revert_weight_conversion,
)


@dataclass(frozen=True)
class HubTensor:
    """One tensor of the checkpoint as a plain ``save_pretrained`` writes it.

    ``source``: the model state-dict key it is made of; ``experts``: E when that is a fused experts
    parameter, else 0. ``expert``: for a per-expert key, the logical expert it holds; None for a dense
    tensor or for experts stacked on dim 0 (one row block per expert). ``template``: None when the
    source tensor is written as it is; else the key's name when one expert's slice [1, ...] of the
    source is converted alone (``experts_to_hub``).
    ``storage``/``storage_nbytes``: tensors of one storage group share a shard file, as in a plain save.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    experts: int
    expert: int | None
    template: str | None
    storage: object
    storage_nbytes: int

    @property
    def stacked(self) -> bool:
        """Every expert of the source, one after another along dim 0 (a fused tensor on disk)."""
        return self.experts > 0 and self.expert is None


def conversions(model) -> types.SimpleNamespace:
    """What ``revert_weight_conversion`` needs of ``model``, with the conversion list worked out once:
    the converters the load used (``model._weight_conversions``), else the family's default mapping
    without prefix changes (Transformers' rule for a model built from a config); None when there is no
    mapping at all (then Transformers writes the state dict unchanged, in its own order)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    found = getattr(model, "_weight_conversions", None)
    if found is None:
        found = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        found = found or None
    return types.SimpleNamespace(_weight_conversions=found, config=model.config)


def _revert(conv, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers' reverse conversion of ``state``. Ops that look at the model's parameter
    (``Transpose(check_dims=True)``: transpose only what is not already in the model's layout) see
    the tensors being converted, which are in the unpatched model's layout: the model's own slices."""

    def get_parameter(name: str) -> torch.Tensor:
        if name not in state:
            raise AttributeError(f"no parameter {name} among the tensors being converted")
        return state[name]

    view = types.SimpleNamespace(**vars(conv), get_parameter=get_parameter)
    return revert_weight_conversion(view, dict(state))


def hub_layout(model, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], experts: dict[str, int],
               original_format: bool = True) -> list[HubTensor]:
    """The checkpoint tensors of a model whose state dict has ``shapes`` (key -> (full shape, dtype);
    experts parameters with all E experts), in a plain save's order.

    ``experts``: fused experts parameter key -> E. ``original_format=False``: the model's own keys
    (``save_pretrained(save_original_format=False)``). ValueError when a checkpoint tensor mixes
    several model tensors or experts in a way this loader and saver cannot stream expert by expert.
    """
    probes = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
    conv = conversions(model)
    if not original_format or conv._weight_conversions is None:
        return [_as_is(k, t, experts) for k, t in probes.items()]
    out = _revert(conv, probes)
    by_id = {id(t): k for k, t in probes.items()}
    origin = _origins(conv, probes, [k for k, t in out.items() if id(t) not in by_id], experts)
    one_expert: dict[str, dict[str, tuple[int, ...]]] = {}  # source -> its one-expert conversion's shapes
    layout = []
    for key, tensor in out.items():
        source = by_id.get(id(tensor))
        if source is not None:
            layout.append(_as_is(source, tensor, experts, key))
            continue
        source = origin[key]
        if source not in experts:
            raise ValueError(
                f"checkpoint key {key} is converted from {source} by Transformers' mapping; hiermoe_hf writes "
                "dense tensors only as they are (save with save_original_format=False)"
            )
        if source not in one_expert:
            one = _revert(conv, {source: probes[source][:1]})
            one_expert[source] = {k: tuple(t.shape) for k, t in one.items()}
        layout.append(_expert_tensor(key, tensor, source, one_expert[source], experts[source]))
    return layout


def _as_is(source: str, tensor: torch.Tensor, experts: dict[str, int], key: str | None = None) -> HubTensor:
    """A model tensor written unchanged (a dense tensor, or a fused experts parameter, stacked)."""
    nbytes = tensor.numel() * tensor.element_size()
    shape = tuple(tensor.shape)
    num = experts.get(source, 0)
    return HubTensor(key or source, shape, tensor.dtype, source, num, None, None, ("as-is", source), nbytes)


def _origins(conv, probes: dict[str, torch.Tensor], keys: list[str], experts: dict[str, int]) -> dict[str, str]:
    """Checkpoint key -> the one model key it is converted from, for the converted ``keys``."""
    wanted, origin = set(keys), {}
    for source, probe in sorted(probes.items(), key=lambda kv: kv[0] not in experts):  # experts first
        if not wanted:
            break
        produced = set(_revert(conv, {source: probe})) & wanted
        for key in produced:
            origin[key] = source
        wanted -= produced
    if wanted:
        raise ValueError(f"checkpoint keys {sorted(wanted)[:4]} are built from several model tensors; not supported")
    return origin


def _expert_tensor(key: str, tensor: torch.Tensor, source: str, one: dict[str, tuple[int, ...]],
                   num_experts: int) -> HubTensor:
    """A converted checkpoint tensor of a fused experts parameter: which expert, and its one-expert
    name (``one``: key -> shape of the conversion of one expert's slice [1, ...] of ``source``)."""
    shape = tuple(tensor.shape)
    storage = ("converted", id(tensor._base if tensor._base is not None else tensor))
    base = tensor._base if tensor._base is not None else tensor
    nbytes = base.numel() * base.element_size()
    if key in one and shape[:1] == (num_experts,) and one[key] == (1, *shape[1:]):
        return HubTensor(key, shape, tensor.dtype, source, num_experts, None, key, storage, nbytes)
    for template, template_shape in one.items():
        expert = _expert_of(key, template)
        if expert is not None and template_shape == shape:
            return HubTensor(key, shape, tensor.dtype, source, num_experts, expert, template, storage, nbytes)
    raise ValueError(
        f"checkpoint key {key} (from {source}) is neither one expert's tensor nor all experts stacked on dim 0; "
        "hiermoe_hf cannot read or write it expert by expert"
    )


def _expert_of(key: str, template: str) -> int | None:
    """The expert id of ``key`` when it is ``template`` (expert 0's name) with one name part changed
    from ``0`` to a number: ``...experts.5.w1.weight`` vs ``...experts.0.w1.weight`` -> 5."""
    a, b = key.split("."), template.split(".")
    if len(a) != len(b):
        return None
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    if not diff:
        return 0
    if len(diff) == 1 and diff[0][1] == "0" and diff[0][0].isdigit():
        return int(diff[0][0])
    return None


def experts_to_hub(conv, source: str, one_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """Template name -> checkpoint tensor of one expert: ``one_expert`` [1, ...] is the expert's slice of
    fused parameter ``source``, converted by Transformers' reverse ops (what a plain save writes)."""
    if conv._weight_conversions is None:
        return {source: one_expert}
    return _revert(conv, {source: one_expert})


def hub_views(conv, source: str, slot: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Template name -> the part of ``slot`` (one expert's [1, ...] slice of ``source``, contiguous) that
    the checkpoint tensor of that name is, when Transformers' reverse conversion only cuts ``slot``
    into disjoint contiguous views covering it (split experts, chunked gate/up: Qwen, Mixtral, ...).
    Then loading is copying each checkpoint tensor into its view, with no temporary beyond the read.
    None when an op copies (a transpose, an interleave): load through ``ForwardConversion`` instead."""
    views = experts_to_hub(conv, source, slot)
    base = slot.untyped_storage().data_ptr()
    spans = []
    for t in views.values():
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != base:
            return None
        spans.append((t.storage_offset(), t.storage_offset() + t.numel()))
    spans.sort()
    at = slot.storage_offset()
    for lo, hi in spans:
        if lo != at:
            return None
        at = hi
    return views if at == slot.storage_offset() + slot.numel() else None


def check_complete(layout: list[HubTensor], experts: dict[str, int]) -> None:
    """Every expert of every fused parameter appears once per template (or the parameter is stacked)."""
    seen: dict[tuple[str, str], list[int]] = {}
    for t in layout:
        if t.expert is not None:
            seen.setdefault((t.source, t.template), []).append(t.expert)
    for (source, template), ids in seen.items():
        if sorted(ids) != list(range(experts[source])):
            raise ValueError(f"{source}: checkpoint keys like {template} cover experts {sorted(ids)[:8]}..., "
                             f"not 0..{experts[source] - 1}")


class ForwardConversion:
    """Transformers' forward (load) conversion of one expert's checkpoint tensors into the model's
    fused layout [1, ...], from the weight mapping Transformers' loader is using.

    Matching a key marks the converter as used, as Transformers' loader would, so the loaded model
    remembers it (``model._weight_conversions``) and a plain ``save_pretrained`` writes the same layout.
    """

    def __init__(self, weight_mapping, model):
        mapping = list(weight_mapping or [])
        self.renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
        self.converters = [c for c in mapping if isinstance(c, WeightConverter)]
        self.model = model

    def mark(self, keys: list[str]) -> None:
        """Match ``keys`` (one expert's) against the mapping, marking the converters they use as used."""
        for key in keys:
            rename_source_key(key, self.renamings, self.converters)

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint key -> tensor (one expert's) => model key -> tensor [1, ...]."""
        out, pending = {}, {}
        for key, tensor in tensors.items():
            renamed, pattern = rename_source_key(key, self.renamings, self.converters)
            if pattern is None:
                out[renamed] = tensor
                continue
            if renamed not in pending:
                matched = next(c for c in self.converters if pattern in c.source_patterns)
                pending[renamed] = copy.deepcopy(matched)
            pending[renamed].add_tensor(renamed, key, pattern, tensor)
        for renamed, converter in pending.items():
            converted = converter.convert(renamed, model=self.model, config=self.model.config)
            out.update({k: v[0] if isinstance(v, list) else v for k, v in converted.items()})
        return out
