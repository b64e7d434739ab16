"""Per-model adapters, keyed by ``config.model_type``. Shipped as ``hiermoe_hf.patches``.

An adapter names the MoE block class to look for and the experts' parameter names; everything
else (router, aux loss, shared experts, scaling) stays Transformers' own code.
"""

from __future__ import annotations

from types import ModuleType

from . import deepseek_v3, qwen3_moe

ADAPTERS: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (qwen3_moe, deepseek_v3)}


def adapter_for(config) -> ModuleType:
    """The adapter for ``config.model_type``; ValueError listing the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported by hiermoe_hf; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def find_moe_blocks(model, adapter: ModuleType) -> list[tuple[str, object]]:
    """(qualified name, block) of every routed-MoE block in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == adapter.BLOCK_CLASS]
