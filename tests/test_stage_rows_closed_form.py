"""``stage_rows``' closed form (no compaction, no host sync) against the hand simulation of
DESIGN.md section 5 (tests/stage_oracle.py), on random routings with -1 gaps, every strategy of
2x2, 1x4, 4x1, 2x2x2 and 3x2."""

from __future__ import annotations

import pytest
import torch
from stage_oracle import count_rows

from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.topology import Topology


@pytest.mark.parametrize("levels", [(2, 2), (1, 4), (4, 1), (2, 2, 2), (3, 2)])
def test_closed_form_matches_hand_simulation(levels):
    topo = Topology(levels)
    W, K, T = topo.world_size, 4, 40
    g = torch.Generator().manual_seed(sum(levels))
    dests = []
    for _ in range(W):
        d = torch.randint(0, W, (T, K), generator=g)
        d[torch.rand(T, K, generator=g) < 0.2] = -1  # selections a token does not make (sentinels)
        dests.append(d)
    hand_dests = [[[int(x) for x in row if x >= 0] for row in d] for d in dests]
    for strategy in topo.strategies():
        counts = sr.stage_rows(dests, topo, strategy)
        sent, received, _ = count_rows(strategy, list(levels), hand_dests)
        for s, (st, c) in enumerate(zip(topo.stages(strategy), counts)):
            assert sr.sent_rows(c, topo, st).tolist() == sent[s], (levels, strategy, s)
            got_recv = [
                sum(int(c[q, topo.member_of(r, st)]) for q in topo.group_ranks(r, st) if q != r) for r in range(W)
            ]
            assert got_recv == received[s], (levels, strategy, s)
