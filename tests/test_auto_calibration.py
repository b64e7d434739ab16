"""``cost_model="calibrate"`` calibrates this cluster's links when the model is patched (issue 13
item 6): stats name that source and every rank holds the same constants (LAPACK's fit differs in
the last bit between processes: rank 0's is broadcast); None times the candidates instead and
"default" prices with the default constants."""

from __future__ import annotations

import torch
import torch.distributed as dist

import hiermoe_hf
from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config


def _patched(dispatch: str, cost_model=None) -> dict:
    model = build_model(tiny_qwen3_moe_config())
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch=dispatch, cost_model=cost_model))
    cm = runtime_of(model).cost_model
    consts = sorted((k, v.alpha, v.beta) for k, v in cm.stages.items())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, consts)
    model(torch.randint(0, 256, (1, 6)))
    entry = next(iter(hiermoe_hf.stats(model).values()))
    return {"source": cm.source, "defaults": cm.defaults_used, "same_everywhere": all(g == consts for g in gathered),
            "stats_source": entry["cost_model"], "has_local": cm.local is not None}


def test_auto_calibrates_at_patch_time(ranks):
    pool = ranks(4)
    for r in pool.run(_patched, "auto", "calibrate"):
        assert r["source"].startswith("calibrated at patch time") and not r["defaults"], r
        assert r["stats_source"] == r["source"] and r["same_everywhere"] and r["has_local"]
    for r in pool.run(_patched, "auto"):  # no cost model: auto times its candidates (test_auto_trials.py)
        assert r["defaults"] and r["stats_source"].startswith("measured")
    for r in pool.run(_patched, "auto", "default"):
        assert r["defaults"] and r["stats_source"].startswith("defaults")
    for r in pool.run(_patched, "auto", "hiermoe-paper"):
        assert r["stats_source"].startswith("preset hiermoe-paper")
