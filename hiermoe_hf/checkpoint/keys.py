"""Checkpoint names of the routed experts, shared by saving and loading.

In memory each MoE block's experts are fused parameters ``experts.gate_up_proj`` [E, 2I, H] (gate
rows first, then up) and ``experts.down_proj`` [E, H, I]. On the Hub, and in what
``save_pretrained`` writes by default, each expert is its own set of keys:
``{block}.experts.{i}.gate_proj.weight`` [I, H], ``...up_proj.weight`` [I, H],
``...down_proj.weight`` [H, I]. This is Transformers' ``qwen2_moe`` conversion rule, shared by
Qwen3-MoE and DeepSeek-V3 (NOTES.md). Transformers itself never reads the expert id in a key when
loading (it sorts and stacks), so this module names and parses the ids explicitly.

The public entry points live in ``checkpoint_save`` (``save_pretrained``) and ``checkpoint_load``
(``from_pretrained``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Fused parameter -> the per-expert projections it concatenates along its row dimension, in order.
EXPERT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def fused_key(block: str, param: str) -> str:
    """``model.layers.3.mlp`` + ``gate_up_proj`` -> ``model.layers.3.mlp.experts.gate_up_proj``."""
    return f"{block}.experts.{param}"


def expert_key(block: str, expert: int, projection: str) -> str:
    """``model.layers.3.mlp``, 7, ``gate_proj`` -> ``model.layers.3.mlp.experts.7.gate_proj.weight``."""
    return f"{block}.experts.{expert}.{projection}.weight"


@dataclass(frozen=True)
class RowPart:
    """One per-expert projection inside a fused parameter's per-expert matrix: rows [lo, hi)."""

    projection: str
    lo: int
    hi: int


def row_parts(param: str, rows: int) -> list[RowPart]:
    """How the per-expert matrix of fused ``param`` (``rows`` rows) splits into checkpoint keys."""
    if param not in EXPERT_PROJECTIONS:
        raise ValueError(f"unknown fused experts parameter {param!r}; known: {', '.join(EXPERT_PROJECTIONS)}")
    names = EXPERT_PROJECTIONS[param]
    if rows % len(names):
        raise ValueError(f"{param} has {rows} rows per expert, not divisible into {', '.join(names)}")
    step = rows // len(names)
    return [RowPart(name, i * step, (i + 1) * step) for i, name in enumerate(names)]


def per_expert_key_pattern(block: str) -> re.Pattern:
    """Matches this block's per-expert keys; groups: expert id, projection."""
    projections = sorted({p for names in EXPERT_PROJECTIONS.values() for p in names})
    return re.compile(rf"^{re.escape(block)}\.experts\.(\d+)\.({'|'.join(projections)})\.weight$")
