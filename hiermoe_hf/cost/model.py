"""Alpha-beta cost model of the dispatch exchange (DESIGN.md section 7), and expected row counts.

One collective in a group of S ranks whose largest per-peer message is m bytes costs
``alpha + S * m * beta`` (every peer waits for the slowest pair); a group of one rank costs 0. A
strategy's time is the sum over its stages, each stage taking the largest message over all ranks.
Constants are per stage kind, keyed by the stage names of ``topology.py`` ("inter-node",
"intra-node", "flat", "level-1", ...), and come from a calibration JSON
(``python -m hiermoe_hf.calibrate``), a preset, or link-level defaults.

Row counts are ``exchange.stage_rows``'; turning them into seconds is ``pricing.py``; routing
models (closed forms, samplers, traces) are ``routing_models.py``.

Shapes: W ranks, S group members, T tokens, K selections per token, E experts, R rows.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from hiermoe_hf.topology import Stage, Topology, parse_levels

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCost:
    """Fitted constants of one stage kind: ``t = alpha + nbytes * beta`` (s, s/byte); r2 of the fit."""

    alpha: float
    beta: float
    r2: float | None = None

    def time(self, nbytes: float) -> float:
        return self.alpha + nbytes * self.beta


@dataclass(frozen=True)
class Link:
    """One level's uplink: a level-l subtree (a node for l = 0) reaches the rest through it.

    latency_s: per-collective start-up (s); bandwidth: bytes/s through the link, shared by every
    rank of the subtree (a node's NIC is shared by its GPUs; an innermost level is one rank's link).
    """

    latency_s: float
    bandwidth: float


def stage_costs_from_links(topology: Topology, links: Sequence[Link]) -> dict[str, StageCost]:
    """Per-stage constants implied by per-level links, for every stage of every strategy.

    A rank of a stage varying digits [lo, hi) sends m bytes to each of S peers. For each level
    l in [lo, hi), the ranks under one level-(l+1) subtree, P_l of them, all send to the peers of
    their group outside that subtree, through its uplink of bandwidth B_l: time P_l * out_l * m / B_l.
    Links work in parallel, so beta = max_l P_l * out_l / (S * B_l); alpha = the largest latency.
    links: one per level, outermost first (len == topology.depth).
    """
    if len(links) != topology.depth:
        raise ValueError(
            f"link model has {len(links)} levels but topology {topology} has {topology.depth}; "
            "give one Link per level, outermost first"
        )
    out: dict[str, StageCost] = {}
    for stage in topology.distinct_stages():
        S = topology.group_size(stage)
        alpha, beta = 0.0, 0.0
        for lvl in range(stage.lo, stage.hi):
            ranks_under = math.prod(topology.levels[lvl + 1 :])
            peers_outside = S - math.prod(topology.levels[lvl + 1 : stage.hi])
            beta = max(beta, ranks_under * peers_outside / (S * links[lvl].bandwidth))
            alpha = max(alpha, links[lvl].latency_s)
        out[stage.name] = StageCost(alpha, beta)
    return out


def home_stage(topology: Topology, stage: Stage) -> Stage:
    """The stage whose group is ``stage``'s group with the levels of size 1 left out.

    Levels of size 1 add no member and no link, so ``stage`` runs over exactly the links of the
    trimmed digit range: on ``1x8`` the "flat" stage [0, 2) is the "intra-node" stage [1, 2) and
    costs in-node constants. Returns ``stage`` itself when nothing trims (or the group is one rank).
    """
    lo, hi = stage.lo, stage.hi
    while lo < hi and topology.levels[lo] == 1:
        lo += 1
    while hi > lo and topology.levels[hi - 1] == 1:
        hi -= 1
    if (lo, hi) == (stage.lo, stage.hi) or lo == hi:
        return stage
    same = [st for st in topology.distinct_stages() if (st.lo, st.hi) == (lo, hi)]
    return same[0] if same else Stage(topology.stage_name(lo, hi), lo, hi, stage.dedup)


@functools.lru_cache(maxsize=64)
def _topology(spec: str) -> Topology:
    return Topology(parse_levels(spec))


# Generic defaults when no calibration is given: a GPU cluster with a 200 Gb/s uplink per node
# and ~100 GB/s per GPU inside it. Only their ratio matters much for the strategy choice.
DEFAULT_LINKS_OUTER = Link(latency_s=30e-6, bandwidth=25e9)
DEFAULT_LINKS_INNER = Link(latency_s=10e-6, bandwidth=100e9)

# Preset "hiermoe-paper": the HierMoE paper's own fitted constants (arXiv 2508.09591, Fig. 9),
# NCCL on 4 nodes x 8 RTX A6000 (NVLink pairs, PCIe 4.0, 200 Gb/s per node). The paper names the
# stages of hdD Inter-level-i (i = 1 .. d-1) and Intra-level-(d-1), and "standard" for the flat
# all-to-all; its n is group size x largest per-peer message, as here. Units as printed: alpha in
# ms, beta in ms per byte (startups of 0.1-0.7 ms; 1/beta from 1.9 GB/s across nodes to 61 GB/s
# on the innermost level).
PAPER_FIT_MS = {
    "standard": (7.22e-1, 5.70e-7),
    "inter-1": (4.97e-1, 5.29e-7),
    "intra-1": (5.71e-1, 1.27e-7),
    "inter-2": (3.01e-1, 1.17e-7),
    "intra-2": (1.14e-1, 2.63e-8),
    "inter-3": (1.49e-1, 2.06e-8),
    "intra-3": (2.04e-1, 1.64e-8),
}
PAPER_SOURCE = (
    "preset hiermoe-paper: the HierMoE paper's fitted alpha/beta (arXiv 2508.09591, Fig. 9; "
    "NCCL, 4 nodes x 8 RTX A6000, 200 Gb/s per node)"
)


def paper_stage_key(topology: Topology, stage: Stage) -> str:
    """The paper's name for ``stage``: flat = standard, last stage [l, D) = Intra-level-l, else Inter-level-(l+1)."""
    if stage.lo == 0 and stage.hi == topology.depth:
        return "standard"
    if stage.hi == topology.depth:
        return f"intra-{stage.lo}"
    return f"inter-{stage.lo + 1}"


def paper_cost_model(topology: Topology) -> CostModel:
    """The paper's constants by stage; topologies of 2 to 4 levels (the paper fitted up to Intra-level-3)."""
    if not 2 <= topology.depth <= 4:
        raise ValueError(
            f"preset 'hiermoe-paper' has constants for topologies of 2 to 4 levels; {topology} has {topology.depth}"
        )
    stages = {}
    for stage in topology.distinct_stages():
        alpha_ms, beta_ms = PAPER_FIT_MS[paper_stage_key(topology, stage)]
        stages[stage.name] = StageCost(alpha_ms * 1e-3, beta_ms * 1e-3)
    return CostModel(str(topology), stages, PAPER_SOURCE, False)


PRESETS = ("default", "hiermoe-paper")


@dataclass
class CostModel:
    """Per-stage constants for one topology.

    topology: "NxG" it applies to; stages: stage name (or "lo:hi") -> StageCost; source: where the
    constants came from; defaults_used: True when no calibration was given (``stats`` reports it);
    local: optional cost of the local work per stage, ``beta`` = seconds per byte of rows packed
    and unpacked once (gather + fp32 scatter-add); None = free (GPU kernels: negligible next to
    the network). Calibration measures it; it matters on CPU ranks.
    """

    topology: str
    stages: dict[str, StageCost]
    source: str = "defaults"
    defaults_used: bool = False
    meta: dict = field(default_factory=dict)
    local: StageCost | None = None

    def stage_cost(self, stage: Stage) -> StageCost:
        """The constants of ``stage``, priced by where its group lives (``home_stage``): a stage whose
        group is the group of another stage (levels of size 1 add no link) takes that stage's
        constants, so a2a's "flat" stage on a 1xG topology costs the in-node constants."""
        home = home_stage(_topology(self.topology), stage)
        for st in (home, stage) if home != stage else (stage,):
            for key in (st.name, f"{st.lo}:{st.hi}"):
                if key in self.stages:
                    return self.stages[key]
        raise ValueError(
            f"cost model ({self.source}) has no constants for stage {stage.name!r} (digits {stage.lo}:{stage.hi}); "
            f"it has: {', '.join(sorted(self.stages)) or 'none'}"
        )

    def collective_time(self, topology: Topology, stage: Stage, max_peer_bytes: float, latency_terms: int = 1) -> float:
        """Seconds for one stage whose largest per-peer message is ``max_peer_bytes``; 0 for groups of one."""
        S = topology.group_size(stage)
        if S == 1:
            return 0.0
        c = self.stage_cost(stage)
        return latency_terms * c.alpha + S * max_peer_bytes * c.beta

    def local_time(self, nbytes: float) -> float:
        """Seconds to pack and unpack ``nbytes`` of rows once on one rank (0 without a local term)."""
        return 0.0 if self.local is None else self.local.time(nbytes)

    def to_json(self) -> dict:
        def entry(c: StageCost) -> dict:
            return {"alpha": c.alpha, "beta": c.beta, **({"r2": c.r2} if c.r2 is not None else {})}

        out = {"topology": self.topology, "source": self.source, **self.meta}
        out["stages"] = {name: entry(c) for name, c in self.stages.items()}
        if self.local is not None:
            out["local"] = entry(self.local)
        return out

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_json(cls, data: dict, source: str = "json") -> "CostModel":
        if not isinstance(data, dict) or "stages" not in data or "topology" not in data:
            raise ValueError(f"cost model {source} must be a JSON object with 'topology' and 'stages' keys")

        def parse(name: str, entry) -> StageCost:
            try:
                return StageCost(float(entry["alpha"]), float(entry["beta"]), entry.get("r2"))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"cost model {source}: stage {name!r} needs numeric 'alpha' and 'beta' ({err})"
                ) from err

        stages = {name: parse(name, entry) for name, entry in data["stages"].items()}
        local = parse("local", data["local"]) if data.get("local") is not None else None
        meta = {k: v for k, v in data.items() if k not in ("topology", "stages", "source", "local")}
        return cls(str(data["topology"]), stages, data.get("source", source), False, meta, local)


def links_cost_model(topology: Topology, links: Sequence[Link], source: str, defaults_used: bool = False) -> CostModel:
    return CostModel(str(topology), stage_costs_from_links(topology, links), source, defaults_used)


def default_cost_model(topology: Topology) -> CostModel:
    """Generic link defaults (outermost level = inter-node uplink, inner levels = intra-node)."""
    links = [DEFAULT_LINKS_OUTER] + [DEFAULT_LINKS_INNER] * (topology.depth - 1)
    source = "defaults (no calibration: 25 GB/s inter-node uplink, 100 GB/s intra-node)"
    return links_cost_model(topology, links, source, defaults_used=True)


def preset_cost_model(name: str, topology: Topology) -> CostModel:
    """A named preset for ``topology``; ValueError for unknown names or a preset that cannot apply."""
    if name == "default":
        return default_cost_model(topology)
    if name == "hiermoe-paper":
        return paper_cost_model(topology)
    raise ValueError(f"unknown cost-model preset {name!r}; valid: {', '.join(PRESETS)} (or a calibration JSON path)")


def load_cost_model(path_or_none: str | os.PathLike | None, topology: Topology) -> CostModel:
    """``HierMoEConfig.cost_model`` -> CostModel: None = defaults (``defaults_used``), a preset name, or a JSON path.

    A JSON must be keyed by the same topology and hold every stage with more than one rank.
    """
    if path_or_none is None:
        return default_cost_model(topology)
    spec = os.fspath(path_or_none)
    if not os.path.exists(spec) and spec in PRESETS:
        return preset_cost_model(spec, topology)
    if not os.path.exists(spec):
        raise ValueError(
            f"cost model {spec!r} is neither a file nor a preset; presets: {', '.join(PRESETS)}, "
            "or 'calibrate' (measured when the model is patched)"
        )
    with open(spec) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"cost model {spec!r} is not valid JSON: {err}") from err
    model = CostModel.from_json(data, source=spec)
    if model.topology != str(topology):
        raise ValueError(
            f"cost model {spec!r} was calibrated on topology {model.topology} but this run's topology is {topology}; "
            "run `python -m hiermoe_hf.calibrate` on this topology or use cost_model=None"
        )
    missing = sorted({s.name for s in topology.distinct_stages() if topology.group_size(s) > 1 and not _has(model, s)})
    if missing:
        raise ValueError(
            f"cost model {spec!r} lacks constants for stage(s) {', '.join(missing)} of topology {topology}"
        )
    return model


def _has(model: CostModel, stage: Stage) -> bool:
    try:
        model.stage_cost(stage)
    except ValueError:
        return False
    return True
