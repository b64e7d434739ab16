"""Rows per stage counted by hand from DESIGN.md section 5, independently of hiermoe_hf's layout code.

A token's copies are simulated as (location, source, token, carried selections); each stage moves a
copy to the rank that has the destination's digits in the stage's range and the copy's own digits
elsewhere: once per distinct next rank (de-duplicating stages) or once per selection.
"""

from __future__ import annotations


def digits(rank: int, levels: list[int]) -> list[int]:
    out = []
    for size in reversed(levels):
        rank, d = divmod(rank, size)
        out.append(d)
    return out[::-1]


def undigits(ds: list[int], levels: list[int]) -> int:
    rank = 0
    for d, size in zip(ds, levels):
        rank = rank * size + d
    return rank


def stages_by_hand(strategy: str, levels: list[int]) -> list[tuple[int, int, bool]]:
    """(lo, hi, dedup) digit ranges, written from the design text."""
    D = len(levels)
    if strategy == "a2a":
        return [(0, D, False)]
    if strategy == "2dh":
        return [(1, D, False), (0, 1, False)]
    depth = int(strategy[2:])
    return [(l, l + 1, True) for l in range(depth - 1)] + [(depth - 1, D, True)]


def count_rows(strategy, levels, dest_ranks_per_rank):
    """dest_ranks_per_rank[r][t] = list of destination ranks of token t's selections on rank r.

    Returns (sent[s][q], received[s][q], final copies as a list of (rank, src, token, k)).
    """
    W = len(dest_ranks_per_rank)
    stages = stages_by_hand(strategy, levels)
    copies = [
        (r, r, t, tuple(range(len(dests))))
        for r in range(W)
        for t, dests in enumerate(dest_ranks_per_rank[r])
        if len(dests)
    ]
    sent = [[0] * W for _ in stages]
    received = [[0] * W for _ in stages]
    for s, (lo, hi, dedup) in enumerate(stages):
        moved = []
        for loc, src, t, ks in copies:
            here = digits(loc, levels)
            by_next: dict[int, list[int]] = {}
            for k in ks:
                there = digits(dest_ranks_per_rank[src][t][k], levels)
                nxt = undigits(here[:lo] + there[lo:hi] + here[hi:], levels)
                by_next.setdefault(nxt, []).append(k)
            groups = [(n, tuple(v)) for n, v in by_next.items()]
            if not dedup:
                groups = [(n, (k,)) for n, v in groups for k in v]
            for nxt, kk in groups:
                if nxt != loc:
                    sent[s][loc] += 1
                    received[s][nxt] += 1
                moved.append((nxt, src, t, kk))
        copies = moved
    final = [(loc, src, t, k) for loc, src, t, ks in copies for k in ks]
    return sent, received, final
