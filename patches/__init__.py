"""Where a model's routed experts are, from Transformers' experts interface. Shipped as ``hiermoe_hf.patches``.

Transformers 5.x gives most MoE families one experts interface: a module class decorated with
``use_experts_implementation`` (instances carry ``has_gate``, ``has_bias``, ``is_transposed``; the
class has ``_apply_gate``), called as ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``
by its parent (the MoE block, or the decoder layer for Gemma 4), with per-expert parameters of a
leading expert dimension E. ``find_experts`` reads that description off a model instance, whatever
its ``model_type``; the router, aux loss, shared experts and scaling stay Transformers' own code.

Per-family knowledge lives in small modules beside this one, and only where a family needs it:
``refusals.py`` (families this design cannot serve, and why), ``deepseek_v3.py`` (a block forward
that overlaps the shared experts with the routed exchange).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from . import deepseek_v3, refusals

HOOKS: tuple[ModuleType, ...] = (deepseek_v3,)  # families with a hook; everything else needs none


@dataclass(frozen=True)
class ExpertsSite:
    """One routed-experts module of a model (what ``patch``, the loader and the planner need)."""

    name: str  # qualified name of the experts module, e.g. "model.layers.1.mlp.experts"
    block_name: str  # qualified name of the module whose forward calls it (MoE block; Gemma 4: decoder layer)
    param_names: tuple[str, ...]  # per-expert parameters (leading E dim), biases included, fixed order
    num_experts: int

    @property
    def attr(self) -> str:
        """The experts module's attribute name on its block (``experts``)."""
        return self.name.rpartition(".")[2]


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a class decorated with ``use_experts_implementation``
    (the decorator sets these flags on every instance and ``_apply_gate`` on the class; 5.17+)."""
    flags = ("has_gate", "has_bias", "is_transposed")
    return all(isinstance(getattr(module, f, None), bool) for f in flags) and hasattr(type(module), "_apply_gate")


def interface_param_names(experts: nn.Module) -> tuple[str, ...]:
    """The per-expert parameters the interface's flags name: ``gate_up_proj`` (or ``up_proj`` without a
    gate) and ``down_proj``, each followed by its ``*_bias`` when ``has_bias``."""
    names = ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
    return tuple(n for base in names for n in ((base, f"{base}_bias") if experts.has_bias else (base,)))


def _plan_param_names(config, module_name: str) -> tuple[str, ...]:
    """Per-expert parameters the config's ``base_model_ep_plan`` names for the module ``module_name``
    ("grouped_gemm" entries; the plan's keys are relative to the base model, with ``*`` for a layer)."""
    plan = getattr(config, "base_model_ep_plan", None) or {}
    out = []
    for key, how in plan.items():
        owner, _, param = key.rpartition(".")
        matches = fnmatch.fnmatch(module_name, owner) or fnmatch.fnmatch(module_name, "*." + owner)
        if how == "grouped_gemm" and matches:
            out.append(param)
    return tuple(out)


def _param_names(experts: nn.Module, name: str, config) -> tuple[str, ...]:
    """Interface names first, then any further per-expert parameter the ep plan names; ValueError for a
    direct parameter neither describes (it could be per-expert: sharding it or not would be a guess)."""
    names = interface_param_names(experts)
    names += tuple(p for p in _plan_param_names(config, name) if p not in names)
    direct = dict(experts.named_parameters(recurse=False))
    missing = [n for n in names if n not in direct]
    unknown = [n for n in direct if n not in names]
    if missing or unknown:
        raise ValueError(
            f"{name} ({type(experts).__name__}) does not match Transformers' experts interface: "
            f"missing per-expert parameters {missing}, undescribed parameters {unknown}; hiermoe_hf cannot "
            "tell which of its parameters are per-expert"
        )
    return names


def _site(model: nn.Module, name: str, experts: nn.Module) -> ExpertsSite:
    """E is the module's ``num_experts`` (the interface's own count, which Transformers' experts
    implementations use), else the parameters' leading dimension. The parameters may hold fewer rows
    (a loader that read only this rank's experts); all of them the same number."""
    config = getattr(model, "config", None)
    names = _param_names(experts, name, config)
    rows = {p: direct_param(experts, p).shape[0] for p in names}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{name}: its per-expert parameters have different expert dimensions {rows}")
    E = int(getattr(experts, "num_experts", None) or rows[names[0]])
    return ExpertsSite(name, name.rpartition(".")[0], names, E)


def direct_param(module: nn.Module, name: str) -> torch.Tensor:
    return module._parameters[name]


def find_experts(model: nn.Module) -> list[tuple[ExpertsSite, nn.Module]]:
    """(site, experts module) of every routed-experts module in ``model``, in module order.

    Works on any model instance (meta device included). ValueError, naming the family and the reason,
    for a model this design cannot serve (``refusals.py``), a model without any experts module of the
    interface, or experts whose layers have different expert counts.
    """
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    refusals.check(model, family)
    found = [(_site(model, n, m), m) for n, m in model.named_modules() if is_experts_module(m)]
    if not found:
        raise ValueError(
            f"{family}: no routed-experts module using Transformers' experts interface "
            "(use_experts_implementation) in this model; hiermoe_hf patches only such MoE models"
        )
    counts = sorted({site.num_experts for site, _ in found})
    if len(counts) > 1:
        raise ValueError(
            f"{family}: layers have different expert counts {counts}; hiermoe_hf shards one expert count "
            "over the ranks for every layer"
        )
    return found


def family_hooks(config) -> ModuleType | None:
    """The small per-family module of ``patches/`` for ``config``'s family, or None when it needs none.

    A hook module names ``MODEL_TYPES`` (aliases included) and ``BLOCK_CLASSES`` (the block classes its
    hooks apply to: a hook is used only on blocks of those classes, whatever the config says).
    """
    model_type = getattr(config, "model_type", None)
    return next((h for h in HOOKS if model_type in h.MODEL_TYPES), None)


def block_hooks(block: nn.Module) -> ModuleType | None:
    """The hook module whose ``BLOCK_CLASSES`` holds ``block``'s class, or None (most blocks)."""
    return next((h for h in HOOKS if type(block).__name__ in h.BLOCK_CLASSES), None)
