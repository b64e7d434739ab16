"""Planner: predict every strategy's exchange time for a model on a cluster you may not have yet.

    python -m hiermoe_hf.plan --model deepseek-v3 --topology 4x8 --cost-model hiermoe-paper
    python -m hiermoe_hf.plan --model ./my_model/config.json --topology 2x8 --cost-model cost.json --json
    python -m hiermoe_hf.plan --model mistralai/Mixtral-8x7B-v0.1 --topology 2x8 --memory   # Hub id (or HF cache)

``--model``: a preset, or a config of any MoE family Transformers builds (its model is built on the
meta device and E, top-k, hidden width, MoE layers and routing groups are read off it).

Per strategy: rows each token puts on every stage's links (rows kept on the sending rank
excluded), bytes per rank, predicted time of one layer's forward exchange (dispatch + combine,
priced by ``pricing.forward_exchange_times``, the function ``dispatch="auto"`` uses), speed-up
over ``a2a``; the strategy with the lowest predicted time (what ``dispatch="auto"`` picks for this
routing), and a duplication-rate table like Table II of the HierMoE paper: 1 - E[distinct
groups]/K for R groups of E/R experts.

Routing models: ``uniform`` (top-K of E uniformly; rows in closed form), ``group-limited``
(DeepSeek-V3's n_group/topk_group choice on random scores; sampled), or a trace path (int ids
[T, K], ``torch.save`` or JSON; see ``cost_model.load_trace``). Predicted times use sampled routing
on every rank (the slowest rank's largest message sets each stage's time), seeded for repeatability.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from hiermoe_hf.cost import memory as mem
from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost import routing_models as rm
from hiermoe_hf.cost.layouts import add_layout_args, format_layouts, layouts_result
from hiermoe_hf.cost.moe_model import MoeModel, load_config
from hiermoe_hf.cost.pricing import forward_exchange_times
from hiermoe_hf.exchange.stage_rows import stage_rows
from hiermoe_hf.topology import Topology, parse_levels


@dataclass(frozen=True)
class ModelSpec:
    """What the exchange depends on: experts E, top-k K, hidden H, and DeepSeek's group limit."""

    name: str
    experts: int
    topk: int
    hidden: int
    n_group: int = 1
    topk_group: int = 1
    moe_intermediate: int = 0  # one expert's intermediate size (about 3 * hidden * this parameters); 0 = unknown
    moe_layers: int = 0  # routed-MoE layers; 0 = unknown (layouts need both: cost/layouts.py)


MODEL_PRESETS = {
    "qwen3-30b-a3b": ModelSpec(
        "Qwen/Qwen3-30B-A3B", experts=128, topk=8, hidden=2048, moe_intermediate=768, moe_layers=48
    ),
    "deepseek-v3": ModelSpec(  # 61 layers, the first 3 dense
        "deepseek-ai/DeepSeek-V3", experts=256, topk=8, hidden=7168, n_group=8, topk_group=4,
        moe_intermediate=2048, moe_layers=58,
    ),
}
DUP_GROUPS = (4, 8, 16, 32)
DUP_TOPK = (2, 4, 6, 8)


def spec_from_config(config, name: str) -> ModelSpec:
    """ModelSpec of a Transformers config of any MoE family: read off its model built on the meta
    device (``moe_model.MoeModel``: E, widths and MoE layers from the experts modules, top-k from
    the router, routing groups from the config); ValueError for a config without routed experts."""
    moe = MoeModel.of(config, name)
    return ModelSpec(
        name, moe.experts, moe.topk, moe.hidden, moe.n_group, moe.topk_group, moe.intermediate, moe.moe_layers
    )


def load_model_spec(model: str) -> ModelSpec:
    """A preset name, a local config.json or model folder (any supported family), or a Hub id
    (cache first, then network).

    Never hangs without a network (``moe_model.load_config``): with HF_HUB_OFFLINE=1 only the local
    cache is read, and a failed download raises a ValueError that names the alternatives.
    """
    if model in MODEL_PRESETS:
        return MODEL_PRESETS[model]
    return spec_from_config(load_config(model), model)


def resolve_routing(routing: str, spec: ModelSpec) -> str:
    """ "auto" -> group-limited for models with a group limit, else uniform; validates the rest."""
    if routing == "auto":
        return "group-limited" if 1 < spec.n_group and spec.topk_group < spec.n_group else "uniform"
    if routing in ("uniform", "group-limited") or os.path.isfile(routing):
        return routing
    raise ValueError(f"unknown routing {routing!r}; valid: auto, uniform, group-limited, or a trace file path")


def sample_routing(
    routing: str, spec: ModelSpec, tokens: int, generator: torch.Generator, topk: int | None = None
) -> torch.Tensor:
    """int64 [tokens, K] expert ids under the routing model (a trace is resampled with replacement)."""
    K = topk or spec.topk
    if routing == "uniform":
        return rm.sample_uniform(tokens, spec.experts, K, generator)
    if routing == "group-limited":
        return rm.sample_group_limited(tokens, spec.experts, K, spec.n_group, spec.topk_group, generator)
    trace = rm.load_trace(routing)
    if int(trace.max()) >= spec.experts:
        raise ValueError(f"trace {routing!r} has expert id {int(trace.max())} but the model has {spec.experts} experts")
    if K > trace.shape[1]:
        raise ValueError(f"trace {routing!r} records top-{trace.shape[1]}, fewer than the {K} asked for")
    idx = torch.randint(trace.shape[0], (tokens,), generator=generator)
    return trace[idx, :K]


def duplication_table(spec: ModelSpec, routing: str, samples: int = 20000, seed: int = 0) -> list[dict]:
    """[{"groups": R, "topk": K, "rate": 1 - E[distinct groups]/K}] for R in 4..32, K in 2..8 where defined."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for R in DUP_GROUPS:
        if spec.experts % R:
            continue
        for K in DUP_TOPK:
            if K > spec.experts:
                continue
            if routing == "uniform":
                rate = rm.duplication_rate_uniform(spec.experts, K, R)
            else:
                try:
                    ids = sample_routing(routing, spec, samples, g, topk=K)
                except ValueError:
                    continue  # K not reachable under this routing (e.g. a trace of a smaller top-k)
                rate = rm.duplication_rate(ids, spec.experts, R)
            out.append({"groups": R, "topk": K, "rate": rate})
    return out


def sample_dests(spec: ModelSpec, topology: Topology, routing: str, tokens: int, seed: int) -> list[torch.Tensor]:
    """Per rank, int64 [tokens, K] destination ranks of routing sampled for every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    W = topology.world_size
    return [rm.dest_ranks(sample_routing(routing, spec, tokens, g), spec.experts, W) for _ in range(W)]


def plan(
    spec: ModelSpec,
    topology: Topology,
    cost_model: cm.CostModel,
    routing: str = "auto",
    tokens: int = 4096,
    dtype_bytes: int = 2,
    seed: int = 0,
    max_samples: int = 4096,
) -> dict:
    """The planner's JSON: {"strategies": [...], "duplication": [...]} (see module docstring)."""
    routing = resolve_routing(routing, spec)
    W = topology.world_size
    if spec.experts % W:
        raise ValueError(f"{spec.experts} experts cannot be split evenly over {W} ranks (topology {topology})")
    if tokens < 1:
        raise ValueError(f"tokens per rank must be >= 1, got {tokens}")
    row_bytes = spec.hidden * dtype_bytes
    strategies = []
    for name, counts, times in strategy_times(spec, topology, cost_model, routing, tokens, dtype_bytes, seed,
                                               max_samples):
        if routing == "uniform":
            rpt = rm.expected_rows_per_token_uniform(topology, name, spec.experts, spec.topk)
        else:
            rpt = rm.rows_per_token(counts, topology, name, tokens * W)
        stages = [
            {"name": st.name, "rows_per_token": r, "bytes": r * tokens * row_bytes}
            for st, r in zip(topology.stages(name), rpt)
        ]
        strategies.append({"name": name, "predicted_ms": sum(times) * 1e3, "stages": stages})
    base = next(s["predicted_ms"] for s in strategies if s["name"] == "a2a")
    for s in strategies:
        s["speedup_vs_a2a"] = base / s["predicted_ms"] if s["predicted_ms"] > 0 else float("inf")
    strategies = [{k: s[k] for k in ("name", "predicted_ms", "speedup_vs_a2a", "stages")} for s in strategies]
    return {"strategies": strategies, "duplication": duplication_table(spec, routing, seed=seed)}


def strategy_times(
    spec: ModelSpec, topology: Topology, cost_model: cm.CostModel, routing: str, tokens: int, dtype_bytes: int,
    seed: int, max_samples: int = 4096,
) -> list[tuple[str, list[torch.Tensor], list[float]]]:
    """Per strategy: (name, per-stage counts scaled to ``tokens`` per rank, seconds per stage of one
    layer's forward exchange), from routing sampled on every rank of ``topology`` (seeded)."""
    n = min(tokens, max_samples)
    dests = sample_dests(spec, topology, routing, n, seed)
    out = []
    for name in topology.strategies():
        counts = [c.double() * (tokens / n) for c in stage_rows(dests, topology, name)]
        times = forward_exchange_times(counts, topology, name, spec.hidden * dtype_bytes, cost_model)
        out.append((name, counts, times))
    return out


def chosen(result: dict) -> str:
    """Cheapest strategy; ties go to the earlier (simpler) one, as in ``dispatch="auto"``."""
    return min(result["strategies"], key=lambda s: s["predicted_ms"])["name"]


def strategy_depth(name: str) -> int:
    return int(name[2:]) if name.startswith("hd") else (2 if name == "2dh" else 1)


def format_text(
    result: dict, spec: ModelSpec, topology: Topology, model: cm.CostModel, routing: str, tokens: int
) -> str:
    lines = [
        f"model {spec.name}: E={spec.experts} K={spec.topk} hidden={spec.hidden}"
        + (f" n_group={spec.n_group} topk_group={spec.topk_group}" if spec.n_group > 1 else ""),
        f"topology {topology} ({topology.world_size} ranks), {tokens} tokens/rank, routing {routing}",
        f"cost model: {model.source}",
        "",
        f"{'strategy':<9}{'stage':<13}{'rows/token':>11}{'MB/rank':>10}{'pred. ms':>10}{'vs a2a':>8}",
    ]
    for s in result["strategies"]:
        for i, st in enumerate(s["stages"]):
            head = (s["name"], f"{s['predicted_ms']:.3f}", f"{s['speedup_vs_a2a']:.2f}x") if i == 0 else ("", "", "")
            rows, mb = st["rows_per_token"], st["bytes"] / 1e6
            lines.append(f"{head[0]:<9}{st['name']:<13}{rows:>11.3f}{mb:>10.2f}{head[1]:>10}{head[2]:>8}")
    best = chosen(result)
    lines += [
        "",
        f"chosen: {best} (depth {strategy_depth(best)}), predicted forward exchange (dispatch + combine) per layer",
        "",
    ]
    lines.append(f"duplication rate 1 - E[distinct groups]/K, E={spec.experts}, routing {routing}")
    ks = sorted({d["topk"] for d in result["duplication"]})
    lines.append("groups R " + "".join(f"{'K=' + str(k):>9}" for k in ks))
    for R in sorted({d["groups"] for d in result["duplication"]}):
        row = {d["topk"]: d["rate"] for d in result["duplication"] if d["groups"] == R}
        lines.append(f"{R:<9}" + "".join(f"{row[k] * 100:>8.2f}%" if k in row else f"{'-':>9}" for k in ks))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hiermoe_hf.plan", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help=f"preset ({', '.join(MODEL_PRESETS)}), config.json or folder, or Hub id"
    )
    p.add_argument("--topology", default="4x8", help="level sizes outermost first, e.g. 4x8 (default)")
    p.add_argument("--cost-model", default="default", help=f"calibration JSON or preset ({', '.join(cm.PRESETS)})")
    p.add_argument("--routing", default="auto", help="auto | uniform | group-limited | path of a routing trace")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per MoE layer (default 4096)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per hidden element on the wire (bf16: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON only")
    mem.add_arguments(p)
    add_layout_args(p)
    args = p.parse_args(argv)
    for flag, value in (("--dtype-bytes", args.dtype_bytes), ("--tokens", args.tokens)):
        if value < 1:  # 0 or negative would print zero or negative times
            p.error(f"{flag} must be a whole number >= 1 (bf16: --dtype-bytes 2), got {value}")
    try:
        spec = load_model_spec(args.model)
        topology = Topology(parse_levels(args.topology))
        model = cm.load_cost_model(args.cost_model, topology)
        routing = resolve_routing(args.routing, spec)
        result = plan(spec, topology, model, routing, args.tokens, args.dtype_bytes, args.seed)
        if args.memory:
            result["memory"] = mem.plan_from_args(args, topology.levels)
        args.resolved_routing = routing
        layouts = layouts_result(args, spec, topology, strategy_times) if topology.depth == 2 else None
    except ValueError as err:
        p.exit(2, f"plan: error: {err}\n")
    if layouts is not None:  # issue 11: every ep_size x strategy on this cluster
        result.update(layouts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_text(result, spec, topology, model, routing, args.tokens))
        if args.memory:
            print("\n" + mem.format_text(result["memory"]))
        if layouts is not None:
            print("\n" + format_layouts(layouts["layouts"], args.micro_batches, layouts["layouts_notes"]))
    return 0


