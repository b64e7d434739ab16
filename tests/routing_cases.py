"""Hand-made routings for dispatcher tests, identical on every rank (drawn from a shared seed).

Each case returns ``ids_WTK`` int64 [W, T, K] logical expert ids (distinct per token) and
``w_WTK`` float64 [W, T, K]; rank r routes ``ids_WTK[r]``. A rank may have T = 0 tokens
(case "empty": a list of per-rank tensors is returned instead).
"""

from __future__ import annotations

import torch

CASES = ("random", "one_rank", "every_rank", "silent_rank", "zero_weight", "hot_expert", "empty")


def _distinct(gen, T, E, K, allowed=None):
    scores = torch.rand(T, E, generator=gen, dtype=torch.float64)
    if allowed is not None:
        scores[:, ~allowed] = -1.0
    return scores.topk(K, dim=1).indices


def routing(case: str, W: int, T: int, E: int, K: int, seed: int = 0):
    """Returns (ids per rank: list of int64 [T_r, K], weights per rank: list of float64 [T_r, K])."""
    gen = torch.Generator().manual_seed(seed)
    e = E // W
    ids, ws = [], []
    for r in range(W):
        Tr = 0 if (case == "empty" and r == 1) else T
        if case == "one_rank":  # every selection of a token on one (random) rank
            owner = torch.randint(0, W, (Tr,), generator=gen)
            local = torch.rand(Tr, e, generator=gen).topk(K, dim=1).indices
            tok = owner[:, None] * e + local
        elif case == "every_rank":  # a token touching every rank (K >= W)
            first = torch.arange(W)[None, :] * e + torch.randint(0, e, (Tr, W), generator=gen)
            rest = []
            for t in range(Tr):
                allowed = torch.ones(E, dtype=torch.bool)
                allowed[first[t]] = False
                rest.append(_distinct(gen, 1, E, K - W, allowed))
            tok = torch.cat([first, torch.cat(rest)], dim=1) if Tr else first
        elif case == "silent_rank":  # nobody selects an expert of the last rank
            allowed = torch.ones(E, dtype=torch.bool)
            allowed[(W - 1) * e :] = False
            tok = _distinct(gen, Tr, E, K, allowed)
        elif case == "hot_expert":  # expert 0 in every token
            allowed = torch.ones(E, dtype=torch.bool)
            allowed[0] = False
            tok = torch.cat([torch.zeros(Tr, 1, dtype=torch.int64), _distinct(gen, Tr, E, K - 1, allowed)], dim=1)
        else:
            tok = _distinct(gen, Tr, E, K)
        w = torch.rand(Tr, K, generator=gen, dtype=torch.float64) + 0.1
        if case == "zero_weight":
            w[torch.rand(Tr, K, generator=gen) < 0.5] = 0.0
        ids.append(tok.to(torch.int64).reshape(Tr, K))
        ws.append(w)
    return ids, ws


def applicable(case: str, W: int, E: int, K: int) -> bool:
    e = E // W
    return {
        "one_rank": K <= e,
        "every_rank": W <= K,
        "silent_rank": K <= E - e,
    }.get(case, True)
