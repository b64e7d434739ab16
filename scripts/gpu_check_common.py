"""Helpers shared by ``scripts/gpu_check`` and ``scripts/gpu_check_ranks.py``."""

from __future__ import annotations

import statistics
import time

import torch


def experts_module(E: int, H: int, I: int, K: int, device, dtype):
    """A Qwen3-MoE experts module holding all E experts (one rank holds every slot)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from hiermoe_hf.tiny_models import tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    m = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(device, dtype)


def timed(fn, device, reps: int) -> float:
    """Median ms of ``fn()`` over ``reps`` runs (CUDA events on the GPU)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def routing(T: int, E: int, K: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(device)
    w = torch.rand(T, K, generator=g).softmax(-1).to(device, dtype)
    return ids, w
