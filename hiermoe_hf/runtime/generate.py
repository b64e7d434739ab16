"""``generate`` on a patched model at world size > 1: every forward is collective, so a rank that has
finished must keep calling forward until all ranks have (Transformers' ``synced_gpus``). Cost per
generated token: one 1-element all-reduce, and a finished rank's forwards (docs/generate_benchmark.md)."""

from __future__ import annotations

import types

import torch

_GENERATE_ATTR = "_hiermoe_generate"


def install_synced_generate(model: torch.nn.Module) -> None:
    """``model.generate`` (this instance) defaults to ``synced_gpus=True``: a rank that has finished
    keeps running forwards until every rank has, as the expert exchange needs all ranks."""
    if _GENERATE_ATTR in model.__dict__ or not hasattr(model, "generate"):
        return
    original = model.generate

    def generate(self, *args, **kwargs):
        positional = len(args) > 5  # synced_gpus is generate's 6th parameter
        if (args[5] if positional else kwargs.get("synced_gpus")) is False:
            raise ValueError(
                "generate(synced_gpus=False) on an expert-parallel model hangs as soon as one rank stops "
                "before the others (every forward is collective); leave synced_gpus unset (True)"
            )
        if not positional:
            kwargs["synced_gpus"] = True
        return original(*args, **kwargs)

    model.generate = types.MethodType(generate, model)
    model.__dict__[_GENERATE_ATTR] = original


def remove_synced_generate(model: torch.nn.Module) -> None:
    if model.__dict__.pop(_GENERATE_ATTR, None) is not None:
        model.__dict__.pop("generate", None)
