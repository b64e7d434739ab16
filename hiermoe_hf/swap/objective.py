"""Expert-swap planner (DESIGN.md section 8): pure functions, identical inputs give identical plans.

Inputs are a global routing window (every rank's recent tokens: logical top-k ids ``ids_NK`` and
the rank each token started on, ``origin_N``) and the current placement as ``rank_of_E`` (int64
[E], the rank holding each logical expert).

Row counts. Every stage of a strategy is a set of cells ``(holder rank h, member m of h's group)``,
flattened as ``h * S + m`` (the layout of ``exchange.stage_rows``' ``[W, S]``, which also gives the
counts now and the cell ``cell_OD[o, d]`` a row of a token from rank ``o`` towards rank ``d`` lands
in). A de-duplicated stage sends one row per (token, distinct *key* ``d // key_divisor``), i.e. per
level-``hi`` subtree; a plain stage (``a2a``, ``2dh``) one per selection, whose key is then the rank.

Delta rule. Exchanging experts ``a`` (key Ga) and ``b`` (key Gb, Gb != Ga) changes a token only if
it selects exactly one of them. With ``c_t(G)`` the token's selections under key G, a token with
``a`` but not ``b`` loses its Ga row iff ``c_t(Ga) == 1`` and gains a Gb row iff ``c_t(Gb) == 0``
(symmetrically for ``b``). Summed per origin rank:

    at Ga:  -(lone[a, o] - lone_both[a, b, o]) + gain[b, Ga, o]
    at Gb:  -(lone[b, o] - lone_both[b, a, o]) + gain[a, Gb, o]

``lone[x, o]``: tokens from o selecting x alone under its key; ``gain[x, G, o]``: tokens from o
selecting x with nothing under G; ``lone_both[x, y, o]``: tokens from o selecting x and y with x
alone under its key (they keep their row: y moves in). Per origin rank, small dense matmuls over
the token-by-expert count matrix (built once per round) give ``lone``, ``gain`` and ``lone_both``
in O(N*E*(E+G)) (G <= E keys), so every pair's counts cost that in all, not a recount per pair.
Plain stages move ``sel[o, a] - sel[o, b]`` rows
from ``d = rank(a)`` to ``rank(b)``.

Objective (per forward, seconds): dispatch + combine of the current strategy, each stage
``latency_terms * alpha + exchanges * S * row_bytes * beta * smoothmax(off-diagonal cells)``
(4 latencies and 2 crossings of the rows per forward; gamma = 10; the
cost model's hard maximum is the limit gamma -> inf), plus the expert compute
``compute_s_per_row * smoothmax(rows per rank)``. ``hierd`` takes the pair with the largest
saving over the interval (objective difference times the passes recorded) if that exceeds the
modelled cost of moving both experts over the slowest link between their ranks. ``load``
(SmartMoE/EPLB-style) takes the pair that most lowers the largest raw selection count per rank.

Shapes: N tokens in the window, K top-k, E experts, W ranks, S group members, C = W*S cells,
G keys of a stage, P candidate pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost.pricing import FORWARD_EXCHANGES, FORWARD_LATENCIES
from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.topology import Stage, Topology

DEFAULT_GAMMA = 10.0
# Expert MLP throughput used to price one (token, expert) row when nothing better is known: a
# current GPU at a realistic fraction of its bf16 peak. Only the ratio to the link speeds matters.
DEFAULT_FLOPS = 1e14
PAIR_CHUNK = 4096  # pairs evaluated at once: bounds the [P, C] temporaries


@dataclass(frozen=True)
class RoutingWindow:
    """Every rank's recent routing for one layer, the same on every rank.

    ids_NK: int64 [N, K] logical expert ids (-1: no selection); origin_N: int64 [N] rank each token
    started on; rows_scale: factor turning window counts into one forward's counts; passes: forward
    and backward passes over the interval the window stands for (the saving accrues per pass).
    """

    ids_NK: torch.Tensor
    origin_N: torch.Tensor
    rows_scale: float = 1.0
    passes: float = 1.0


@dataclass(frozen=True)
class PlannerCosts:
    """What the objective prices: cost-model constants, bytes per row, compute per row, smoothness."""

    cost_model: cm.CostModel
    row_bytes: float
    compute_s_per_row: float = 0.0
    gamma: float = DEFAULT_GAMMA
    # Per stage and forward, as ``dispatch="auto"`` prices it (``cost.pricing``).
    latency_terms: float = FORWARD_LATENCIES
    exchanges: float = FORWARD_EXCHANGES


@dataclass(frozen=True)
class SwapChoice:
    """One planned exchange of logical experts ``a`` and ``b`` (held by ``rank_a`` != ``rank_b``)."""

    a: int
    b: int
    rank_a: int
    rank_b: int
    saving_s: float  # modelled objective saving over the interval (may be < 0 for the load policy)
    move_cost_s: float  # modelled time of moving both experts' weights, grads and optimizer state


def strategy_for(topology: Topology, dispatch: str, last_strategy: str | None = None) -> str:
    """The strategy whose stages the objective models: the one last used, else the configured
    one; ``auto`` without a last use models the deepest de-duplicated strategy ``hdD``."""
    if last_strategy and last_strategy in topology.strategies():
        return last_strategy
    if dispatch == "auto":
        return f"hd{topology.depth}"
    topology.stages(dispatch)  # raises for a strategy this topology lacks
    return dispatch


# ---------------------------------------------------------------------------------------------
# Cells and row counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCells:
    """One stage's cell map. cell_OG: int64 [W, G] cell of a row from origin o under key g;
    key_div: key = dest_rank // key_div; offdiag_C: bool [C], cells that leave the holder."""

    stage: Stage
    group_size: int
    key_div: int
    cell_OG: torch.Tensor
    offdiag_C: torch.Tensor

    @property
    def num_cells(self) -> int:
        return self.offdiag_C.numel()


def stage_cells(topology: Topology, strategy: str) -> list[StageCells]:
    """Cell maps of every stage of ``strategy`` (``exchange.stage_rows.cells``, one column per key)."""
    W = topology.world_size
    out = []
    for st, cell_OD in zip(topology.stages(strategy), sr.cells(topology, strategy)):
        S, key_div = topology.group_size(st), sr.key_divisor(topology, st)
        cell_OG = cell_OD[:, torch.arange(0, W, key_div)].contiguous()  # a row's cell depends on its key only
        offdiag = torch.ones(W, S, dtype=torch.bool)
        offdiag[torch.arange(W), sr.own_member(topology, st)] = False
        out.append(StageCells(st, S, key_div, cell_OG, offdiag.view(-1)))
    return out


def _valid(ids_NK: torch.Tensor, rank_of_E: torch.Tensor):
    valid_NK = ids_NK >= 0
    x_NK = ids_NK.clamp(min=0)
    return valid_NK, x_NK, rank_of_E[x_NK]


def stage_counts(
    ids_NK: torch.Tensor, origin_N: torch.Tensor, rank_of_E: torch.Tensor, topology: Topology, strategy: str
) -> list[torch.Tensor]:
    """Rows per cell for every stage: one int64 [C] (= [W, S] flattened) per stage (``stage_rows``)."""
    valid_NK, _, d_NK = _valid(ids_NK, rank_of_E)
    dest_NK = torch.where(valid_NK, d_NK, -1)
    per_origin = [dest_NK[origin_N == o] for o in range(topology.world_size)]
    return [c.reshape(-1) for c in sr.stage_rows(per_origin, topology, strategy)]


@dataclass
class _Summary:
    """Per-stage sufficient statistics of the delta rule (see the module docstring)."""

    cells: StageCells
    base_C: torch.Tensor  # int64 [C] rows per cell now
    key_E: torch.Tensor  # int64 [E] key of each expert's rank
    lone_EW: torch.Tensor | None = None  # dedup: int64 [E, W]
    gain_EGW: torch.Tensor | None = None  # dedup: int64 [E, G, W]
    both_EEW: torch.Tensor | None = None  # dedup: int64 [E, E, W]
    sel_EW: torch.Tensor | None = None  # plain: int64 [E, W] selections per (expert, origin)


@dataclass(frozen=True)
class _Incidence:
    """A window's placement-independent part, built once per planning round.

    M_NE: float [N, E] how often token t selected expert e (small exact integers; float32 while every
    sum stays below 2**24, else float64), rows grouped by origin rank; bounds: W + 1 row offsets,
    origin o's tokens are rows ``bounds[o]:bounds[o + 1]``.
    """

    M_NE: torch.Tensor
    bounds: tuple[int, ...]


def _incidence(ids_NK: torch.Tensor, origin_N: torch.Tensor, E: int, W: int) -> _Incidence:
    N, K = ids_NK.shape
    dtype = torch.float32 if K * max(N, 1) < 2**24 else torch.float64
    order = torch.argsort(origin_N, stable=True)
    ids = ids_NK[order]
    M = torch.zeros(N, E, dtype=dtype, device=ids_NK.device).scatter_add_(1, ids.clamp(min=0), (ids >= 0).to(dtype))
    bounds = [0]
    for n in torch.bincount(origin_N, minlength=W).tolist():
        bounds.append(bounds[-1] + n)
    return _Incidence(M, tuple(bounds))


def _summarise(ids_NK, origin_N, rank_of_E, sc: StageCells, W: int, base_C: torch.Tensor,
               inc: _Incidence | None = None) -> _Summary:
    """The delta rule's statistics of one stage whose rows per cell now are ``base_C`` (int64 [C]).

    De-duplicated stages work per origin rank on the incidence ``M`` [n, E]: ``c = M @ onehot(key)``
    [n, G] (selections per key), ``A = M * (c[:, key] == 1)`` (selections alone under their key),
    ``lone = A.sum(0)``, ``gain = M.T @ (c == 0)`` [E, G], ``both = A.T @ M`` [E, E] without its
    diagonal (a selection never pairs with itself). All sums are of small integers, hence exact.
    """
    E = rank_of_E.numel()
    N, K = ids_NK.shape
    dev = ids_NK.device
    cell_OG = sc.cell_OG.to(dev)
    G = cell_OG.shape[1]
    key_E = rank_of_E // sc.key_div
    summary = _Summary(sc, base_C, key_E)
    if not sc.stage.dedup:
        valid_NK, x_NK, _ = _valid(ids_NK, rank_of_E)
        o_NK = origin_N.view(N, 1).expand(N, K)
        summary.sel_EW = torch.bincount(x_NK[valid_NK] * W + o_NK[valid_NK], minlength=E * W).view(E, W)
        return summary
    if inc is None:
        inc = _incidence(ids_NK, origin_N, E, W)
    dtype = inc.M_NE.dtype
    onehot_EG = (key_E.view(E, 1) == torch.arange(G, device=dev).view(1, G)).to(dtype)
    lone, gain, both = [], [], []
    for o in range(W):
        M = inc.M_NE[inc.bounds[o] : inc.bounds[o + 1]]
        c = M @ onehot_EG  # [n, G] selections per key
        A = M * (c[:, key_E] == 1)
        lone.append(A.sum(0))
        gain.append(M.T @ (c == 0).to(dtype))
        both.append(A.T @ M)
    summary.lone_EW = torch.stack(lone, dim=1).to(torch.int64)
    summary.gain_EGW = torch.stack(gain, dim=2).to(torch.int64)
    both_EEW = torch.stack(both, dim=2).to(torch.int64)
    both_EEW.diagonal(dim1=0, dim2=1).zero_()
    summary.both_EEW = both_EEW
    return summary


def _pair_counts(s: _Summary, rank_of_E: torch.Tensor, a_P: torch.Tensor, b_P: torch.Tensor) -> torch.Tensor:
    """int64 [P, C]: the stage's rows per cell after exchanging each pair (a_P[i], b_P[i])."""
    ka, kb = s.key_E[a_P], s.key_E[b_P]
    if s.cells.stage.dedup:
        d_a = -(s.lone_EW[a_P] - s.both_EEW[a_P, b_P]) + s.gain_EGW[b_P, ka]
        d_b = -(s.lone_EW[b_P] - s.both_EEW[b_P, a_P]) + s.gain_EGW[a_P, kb]
    else:
        d_a = s.sel_EW[b_P] - s.sel_EW[a_P]
        d_b = -d_a
    same = (ka == kb).view(-1, 1)  # both under one key: nothing changes in this stage
    d_a, d_b = d_a.masked_fill(same, 0), d_b.masked_fill(same, 0)
    cell_OG = s.cells.cell_OG.to(a_P.device)
    out = s.base_C.view(1, -1).repeat(a_P.numel(), 1)
    out.scatter_add_(1, cell_OG[:, ka].T, d_a)
    out.scatter_add_(1, cell_OG[:, kb].T, d_b)
    return out


def summaries(
    ids_NK: torch.Tensor,
    origin_N: torch.Tensor,
    rank_of_E: torch.Tensor,
    topology: Topology,
    strategy: str,
    inc: _Incidence | None = None,
) -> list[_Summary]:
    """The delta rule's statistics of every stage of ``strategy`` (see ``_summarise``)."""
    W = topology.world_size
    base = stage_counts(ids_NK, origin_N, rank_of_E, topology, strategy)
    cells = list(zip(stage_cells(topology, strategy), base))
    if inc is None and any(sc.stage.dedup for sc, _ in cells):
        inc = _incidence(ids_NK, origin_N, rank_of_E.numel(), W)
    return [_summarise(ids_NK, origin_N, rank_of_E, sc, W, b, inc=inc) for sc, b in cells]


def pair_stage_counts(stats: list[_Summary], rank_of_E: torch.Tensor, pairs_P2: torch.Tensor) -> list[torch.Tensor]:
    """Rows per cell after exchanging each pair, by the delta rule: one int64 [P, C] per summary."""
    pairs_P2 = pairs_P2.to(rank_of_E.device)
    return [_pair_counts(s, rank_of_E, pairs_P2[:, 0], pairs_P2[:, 1]) for s in stats]


def candidate_pairs(rank_of_E: torch.Tensor, exclude: set[int] | frozenset = frozenset()) -> torch.Tensor:
    """int64 [P, 2]: every pair a < b of experts on different ranks, lexicographic, none in ``exclude``."""
    E = rank_of_E.numel()
    a, b = torch.triu_indices(E, E, offset=1, device=rank_of_E.device)
    keep = rank_of_E[a] != rank_of_E[b]
    if exclude:
        ex = torch.zeros(E, dtype=torch.bool, device=rank_of_E.device)
        ex[list(exclude)] = True
        keep &= ~ex[a] & ~ex[b]
    return torch.stack([a[keep], b[keep]], dim=1)


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------


def smooth_max(x_PC: torch.Tensor, gamma: float, scale: float) -> torch.Tensor:
    """Smooth maximum over the last dim: ``scale/gamma * log(mean(exp(gamma * x / scale)))``.

    Lies between the mean and the maximum and tends to the maximum as gamma grows; ``scale`` (a
    typical value, e.g. the mean now) makes gamma unit-free. Unlike the hard maximum it rewards
    lowering the second-largest value too, so greedy swaps do not stall on plateaus.
    """
    x = x_PC.to(torch.float64)
    C = x.shape[-1]
    if C == 0:
        return x.new_zeros(x.shape[:-1])
    if scale <= 0:
        return x.max(dim=-1).values
    return scale / gamma * (torch.logsumexp(gamma * x / scale, dim=-1) - math.log(C))


def loads_per_rank(sel_E: torch.Tensor, rank_of_E: torch.Tensor, W: int) -> torch.Tensor:
    """int64 [W]: (token, expert) rows each rank computes, from selections per expert sel_E [E]."""
    return torch.zeros(W, dtype=torch.int64, device=sel_E.device).index_add_(0, rank_of_E, sel_E)


def selections_per_expert(ids_NK: torch.Tensor, E: int) -> torch.Tensor:
    """int64 [E]: how often each logical expert was selected in the window."""
    return torch.bincount(ids_NK[ids_NK >= 0], minlength=E)


class Objective:
    """The hierd objective for one layer's window under one placement (rebuild after each swap).

    ``incidence`` (``window_incidence(window, E, W)``) and ``sel_E`` (int64 [E],
    ``selections_per_expert``) do not depend on the placement: pass them to reuse them across
    rebuilds within a round.
    """

    def __init__(self, window: RoutingWindow, rank_of_E: torch.Tensor, topology: Topology, strategy: str,
                 costs: PlannerCosts, incidence: _Incidence | None = None, sel_E: torch.Tensor | None = None):
        self.window, self.rank_of_E, self.topology, self.costs = window, rank_of_E, topology, costs
        W = topology.world_size
        every = summaries(window.ids_NK, window.origin_N, rank_of_E, topology, strategy, incidence)
        self.summaries = [s for s in every if s.cells.group_size > 1]  # groups of one cost nothing
        self.sel_E = selections_per_expert(window.ids_NK, rank_of_E.numel()) if sel_E is None else sel_E
        self.load_W = loads_per_rank(self.sel_E, rank_of_E, W)
        f = window.rows_scale
        # Smooth-max scales fixed by the current placement, so every pair is priced by one function.
        self._scales = [f * s.base_C[s.cells.offdiag_C.to(s.base_C.device)].double().mean().item()
                        for s in self.summaries]
        self._load_scale = f * self.load_W.double().mean().item()
        self.now_s = self._price([s.base_C.view(1, -1) for s in self.summaries], self.load_W.view(1, -1)).item()

    def _price(self, counts: list[torch.Tensor], load_PW: torch.Tensor) -> torch.Tensor:
        c, f, t = self.costs, self.window.rows_scale, 0.0
        for s, counts_PC, scale in zip(self.summaries, counts, self._scales):
            sc = c.cost_model.stage_cost(s.cells.stage)
            off = counts_PC[:, s.cells.offdiag_C.to(counts_PC.device)]
            peer_rows = smooth_max(f * off, c.gamma, scale)
            t = t + c.latency_terms * sc.alpha + c.exchanges * s.cells.group_size * c.row_bytes * sc.beta * peer_rows
        return t + c.compute_s_per_row * smooth_max(f * load_PW, c.gamma, self._load_scale)

    def after(self, pairs_P2: torch.Tensor) -> torch.Tensor:
        """float64 [P]: the objective (s per forward) after exchanging each pair."""
        out = []
        for chunk in pairs_P2.split(PAIR_CHUNK):
            a, b = chunk[:, 0], chunk[:, 1]
            counts = pair_stage_counts(self.summaries, self.rank_of_E, chunk)
            load = self.load_W.view(1, -1).repeat(chunk.shape[0], 1)
            moved = self.sel_E[a] - self.sel_E[b]
            load.scatter_add_(1, self.rank_of_E[a].view(-1, 1), -moved.view(-1, 1))
            load.scatter_add_(1, self.rank_of_E[b].view(-1, 1), moved.view(-1, 1))
            out.append(self._price(counts, load))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def savings(self, pairs_P2: torch.Tensor) -> torch.Tensor:
        """float64 [P]: modelled seconds saved over the interval by each exchange."""
        return (self.now_s - self.after(pairs_P2)) * self.window.passes


def window_incidence(window: RoutingWindow, E: int, W: int) -> _Incidence:
    """The window's per-token expert counts grouped by origin (placement-independent; see ``Objective``)."""
    return _incidence(window.ids_NK, window.origin_N, E, W)


def move_cost_s(topology: Topology, cost_model: cm.CostModel, rank_a: int, rank_b: int, nbytes: float) -> float:
    """Modelled seconds to exchange ``nbytes`` each way between two ranks, over the slowest link
    between them: the stage of the outermost digit where they differ, priced as that stage's
    collective with every member sending ``nbytes`` (conservative for a single pair)."""
    if rank_a == rank_b:
        return 0.0
    da, db = topology.digits(rank_a), topology.digits(rank_b)
    level = next(i for i, (x, y) in enumerate(zip(da, db)) if x != y)
    stage = topology.stages(f"hd{topology.depth}")[level]
    return cost_model.collective_time(topology, stage, nbytes)
