"""``hiermoe_hf.stats``: the last forward of every MoE block on this rank, read back to the host."""

from __future__ import annotations

import dataclasses

import torch

from hiermoe_hf.cost.pricing import ring_allreduce_bytes
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.runtime.state import Elapsed, ForwardRecord


def _host(value):
    """A stats value as plain Python: tensors to numbers/lists, timings to milliseconds."""
    if isinstance(value, Elapsed):
        return value.ms()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [dict(v) if isinstance(v, dict) else v for v in value]
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    return value


def record_dict(record: ForwardRecord | None) -> dict:
    """The stats entry of one forward (the exchange fields only when an exchange ran)."""
    if record is None:
        return {}
    keep = {"strategy", "tokens", "kernels", "stages", "load_per_rank"}
    return {
        f.name: _host(getattr(record, f.name))
        for f in dataclasses.fields(record)
        if record.exchanged or f.name in keep
    }


def stats(model: torch.nn.Module) -> dict[str, dict]:
    """Per MoE block (keyed by module name): the last forward on this rank and the swaps done.

    Each value: ``strategy``, ``tokens``, ``kernels``, ``stages`` (list of dicts: ``name``,
    ``group_size``, ``rows_sent``, ``rows_received``, ``bytes_sent``, ``meta_bytes_sent``,
    ``max_peer_rows`` — rows to/from *other* ranks), ``load_per_rank`` (this rank's selections per
    destination rank), ``swaps``, and with an exchange the cost model's view: ``predicted_ms``
    (chosen strategy; ``dispatch="auto"`` only, else None), ``predicted_ms_by_strategy``,
    ``measured_ms`` (forward dispatch + combine wall time; with chunks, the whole pipelined layer),
    ``cost_model`` (where its constants came from; ``measured: ...`` when ``auto`` times its
    candidates), ``cost_model_defaults``, ``measured_ms_by_strategy`` (that timing's kept ms per
    candidate: one pass over the MoE layers, exchange and experts; else None), ``overlap_chunks``
    (the token chunks this forward ran in), ``measured_ms_by_chunks`` (``overlap_chunks="auto"``
    only: chunk count -> its kept ms, else None) and ``expert_rows``; always ``replicas`` (copies of the
    expert-parallel group, W / ep_size) and ``expert_grad_allreduce_bytes`` (bytes this rank sends per
    optimizer step summing this layer's expert grads over the replicas: a ring all-reduce, 0 without).
    """
    out = {}
    for name, (experts, layer) in moe_layers(model).items():
        entry = record_dict(layer.last)
        entry["swaps"] = list(layer.swaps)
        # expert data parallelism's price: this layer's expert grads summed over the replicas, per step
        nbytes = sum(getattr(experts, p).numel() * getattr(experts, p).element_size() for p in layer.param_names)
        entry["replicas"] = layer.runtime.replicas
        entry["expert_grad_allreduce_bytes"] = ring_allreduce_bytes(nbytes, layer.runtime.replicas)
        out[name] = entry
    return out
