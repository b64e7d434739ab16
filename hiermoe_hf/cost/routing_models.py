"""Routing models and the rows they put on each stage (DESIGN.md section 7, issue 6).

Closed forms for uniform top-K routing (E[distinct groups] = R(1 - C(E - E/R, K)/C(E, K))), and
samplers for the cases without one: DeepSeek-V3 group-limited routing, Zipf popularity, recorded
traces. Shapes: T tokens, K selections, E experts, R equal expert groups.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch

from hiermoe_hf.exchange.stage_rows import sent_rows
from hiermoe_hf.topology import Topology


def _check_groups(E: int, K: int, R: int) -> None:
    if R < 1 or E % R:
        raise ValueError(f"{E} experts cannot be split into {R} equal groups; use a group count dividing {E}")
    if not 1 <= K <= E:
        raise ValueError(f"top-k {K} must lie in 1..{E} (the number of experts)")


def distinct_groups_uniform(E: int, K: int, R: int) -> float:
    """E[distinct groups among K of E experts chosen uniformly without replacement], R equal groups.

    = R * (1 - C(E - E/R, K) / C(E, K)) (each group is missed with that probability).
    """
    _check_groups(E, K, R)
    return R * (1.0 - math.comb(E - E // R, K) / math.comb(E, K))


def duplication_rate_uniform(E: int, K: int, R: int) -> float:
    """Fraction of redundant copies, 1 - E[distinct groups] / K, under uniform top-K routing."""
    return 1.0 - distinct_groups_uniform(E, K, R) / K


def hit_probability_uniform(E: int, K: int, experts_in_group: int) -> float:
    """P(a token has at least one of its K uniform experts in a given group of that many experts)."""
    return 1.0 - math.comb(E - experts_in_group, K) / math.comb(E, K)


def expected_rows_per_token_uniform(topology: Topology, strategy: str, E: int, K: int) -> list[float]:
    """Closed form: rows a token puts on each stage's links (kept rows excluded), uniform top-K routing.

    Non-dedup stage: K selections, each kept when its digits [lo, hi) are the holder's: K (1 - 1/S).
    Dedup stage [lo, hi): a row per hit level-hi subtree, P(hit) = q; the row kept is the one per hit
    level-lo subtree whose target is the holder's own: prod(levels[:hi]) q - prod(levels[:lo]) q.
    Placement is contiguous (E/W experts per rank).
    """
    W = topology.world_size
    _check_groups(E, K, W)
    out = []
    for stage in topology.stages(strategy):
        S = topology.group_size(stage)
        if not stage.dedup:
            out.append(K * (1.0 - 1.0 / S))
            continue
        targets_hi = math.prod(topology.levels[: stage.hi])
        targets_lo = math.prod(topology.levels[: stage.lo])
        q = hit_probability_uniform(E, K, E // targets_hi)
        out.append((targets_hi - targets_lo) * q)
    return out


def rows_per_token(counts: Sequence[torch.Tensor], topology: Topology, strategy: str, num_tokens: int) -> list[float]:
    """Measured rows per token on each stage's links (kept rows excluded) from simulated counts."""
    return [
        float(sent_rows(c, topology, st).sum()) / max(num_tokens, 1) for st, c in zip(topology.stages(strategy), counts)
    ]


def sample_uniform(T: int, E: int, K: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [T, K]: K distinct experts per token, uniformly (top-K of iid scores)."""
    _check_groups(E, K, 1)
    return torch.rand(T, E, generator=generator).topk(K, dim=1).indices


def zipf_popularity(E: int, s: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """float [E]: expert popularity ~ 1/rank^s, ranks in a random order (hot experts spread out)."""
    order = torch.randperm(E, generator=generator)
    p = torch.empty(E)
    p[order] = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(s).float()
    return p / p.sum()


def _scores(T: int, E: int, popularity: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """iid scores whose top-K is a draw without replacement proportional to ``popularity``
    (Gumbel-top-k); uniform scores when it is None."""
    u = torch.rand(T, E, generator=generator)
    if popularity is None:
        return u
    return popularity.log() - torch.log(-torch.log(u.clamp_min(1e-20)))


def sample_group_limited(
    T: int,
    E: int,
    K: int,
    n_group: int,
    topk_group: int,
    generator: torch.Generator | None = None,
    popularity: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [T, K]: DeepSeek-V3's group-limited choice on random scores.

    As Transformers' ``DeepseekV3TopkRouter``: group score = sum of its top-2 expert scores, keep
    the ``topk_group`` best of ``n_group`` groups, then top-K experts among the kept groups.
    popularity: optional float [E] skew (e.g. ``zipf_popularity``); None = iid uniform scores.
    """
    _check_groups(E, K, n_group)
    if not 1 <= topk_group <= n_group or K > topk_group * (E // n_group):
        raise ValueError(
            f"topk_group={topk_group} must lie in 1..n_group={n_group} and keep at least K={K} experts "
            f"({E // n_group} per group)"
        )
    scores = _scores(T, E, popularity, generator)
    per_group = scores.view(T, n_group, E // n_group)
    group_score = per_group.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros(T, n_group, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_group, dim=1).indices, True)
    masked = torch.where(keep.repeat_interleave(E // n_group, dim=1), scores, float("-inf"))
    return masked.topk(K, dim=1).indices


def distinct_groups(ids_TK: torch.Tensor, E: int, R: int) -> float:
    """Mean number of distinct groups (R contiguous groups of E/R experts) among each token's experts."""
    _check_groups(E, ids_TK.shape[1], R)
    g = ids_TK // (E // R)
    hit = torch.zeros(ids_TK.shape[0], R, dtype=torch.bool).scatter_(1, g, True)
    return float(hit.sum(1).double().mean())


def duplication_rate(ids_TK: torch.Tensor, E: int, R: int) -> float:
    """1 - mean distinct groups / K, from routing samples or a trace."""
    return 1.0 - distinct_groups(ids_TK, E, R) / ids_TK.shape[1]


def dest_ranks(ids_TK: torch.Tensor, E: int, world_size: int) -> torch.Tensor:
    """Contiguous placement: expert i lives on rank i // (E / W). -1 ids stay -1."""
    if E % world_size:
        raise ValueError(f"{E} experts cannot be split evenly over {world_size} ranks")
    return torch.where(ids_TK >= 0, ids_TK // (E // world_size), -1)


def load_trace(path: str | os.PathLike) -> torch.Tensor:
    """A recorded routing trace: int64 [T, K] expert ids (``torch.save`` of a tensor, or of a dict
    with "topk_ids"; or JSON: a list of lists or {"topk_ids": [...]}). Leading dims are flattened."""
    spec = os.fspath(path)
    if spec.endswith(".json"):
        with open(spec) as f:
            data = json.load(f)
        data = data.get("topk_ids") if isinstance(data, dict) else data
        ids = torch.tensor(data, dtype=torch.int64)
    else:
        data = torch.load(spec, map_location="cpu", weights_only=True)
        ids = data.get("topk_ids") if isinstance(data, dict) else data
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"trace {spec!r} must hold an int tensor [T, K] or a dict with 'topk_ids'")
        ids = ids.to(torch.int64)
    if ids.dim() < 2:
        raise ValueError(f"trace {spec!r} must have shape [..., K], got {tuple(ids.shape)}")
    return ids.reshape(-1, ids.shape[-1])
