#!/usr/bin/env python
"""Layout benchmark (issue 11): one MoE layer's training step for ep_size = G (a group per node,
experts replicated across nodes) vs ep_size = W (one group over the nodes) with a2a and hd2, measured,
and the planner's prediction for each.

    sudo scripts/emulate_cluster --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        scripts/bench_ep_layouts.py --out docs/ep_layouts_benchmark_1gbit

The layer: a Qwen3-MoE experts module patched by ``hiermoe_hf.patch`` (E=32 experts, top-8, hidden
1024, expert intermediate 128, fp32), 256 tokens per rank per step with uniform routing. One step:
forward (dispatch, local experts, combine) and backward of the experts module, the expert-gradient
average (``all_reduce_gradients``: with ep_size = G it sums the replicas across nodes), and an SGD
update. Median over ``--reps`` steps of the slowest rank. Prediction: ``cost/layouts.compare_layouts``
for the same layer (one MoE layer, fp32 rows and grads), with link constants from the emulated rate
(inter-node) and a 2 GB/s in-node path, compute not modelled (identical work in every layout).
Rank 0 writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hiermoe_hf  # noqa: E402
from hiermoe_hf.cost import layouts as lay  # noqa: E402
from hiermoe_hf.cost import model as cm  # noqa: E402
from hiermoe_hf.cost import planner as pl  # noqa: E402
from hiermoe_hf.cost import routing_models as rm  # noqa: E402
from hiermoe_hf.runtime.registry import moe_layers  # noqa: E402
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config  # noqa: E402
from hiermoe_hf.topology import Topology  # noqa: E402

E, K, H, INTER, TOKENS = 32, 8, 1024, 128, 256
RATES = {"1gbit": 125e6, "200mbit": 25e6}


def _experts(ep_size: int, group: str, strategy: str):
    cfg = tiny_qwen3_moe_config(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=K,
                                num_hidden_layers=1, intermediate_size=64, vocab_size=64)
    model = build_model(cfg).train()
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=group, dispatch=strategy, ep_size=ep_size,
                                                     kernels="torch"))
    experts, _ = next(iter(moe_layers(model).values()))
    return model, experts


def measure(ep_size: int, group: str, strategy: str, reps: int) -> float:
    """Median seconds of one training step of the layer, slowest rank."""
    model, experts = _experts(ep_size, group, strategy)
    params = [getattr(experts, n) for n in ("gate_up_proj", "down_proj")]
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(TOKENS, H, generator=g, requires_grad=True)
    ids = rm.sample_uniform(TOKENS, E, K, g)
    w = torch.full((TOKENS, K), 1.0 / K)
    times = []
    for rep in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        experts(x, ids, w).sum().backward()
        hiermoe_hf.all_reduce_gradients(model)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None
        t = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rep:  # the first step builds buffers and process groups' connections
            times.append(float(t))
    return statistics.median(times)


def predict(cluster: Topology, rate: float) -> dict:
    spec = pl.ModelSpec("bench layer", E, K, H, moe_intermediate=INTER, moe_layers=1)
    links = [cm.Link(latency_s=200e-6, bandwidth=rate), cm.Link(latency_s=50e-6, bandwidth=2e9)]

    def model_for(t: Topology) -> cm.CostModel:
        return cm.links_cost_model(t, links, f"links: {rate / 1e6:.0f} MB/s between nodes, 2 GB/s inside")

    def times(group, model):
        return pl.strategy_times(spec, group, model, "uniform", TOKENS, 4, 0)

    return {(r["ep_size"], r["strategy"]): r for r in lay.compare_layouts(spec, cluster, model_for, times, 4, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rate", default=None, help="inter-node rate, e.g. 1gbit (default: from EMULATE_CLUSTER)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json (rank 0)")
    p.add_argument("--node-size", type=int, default=None, help="ranks per node (default: LOCAL_WORLD_SIZE)")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        W = dist.get_world_size()
        G = args.node_size or int(os.environ.get("LOCAL_WORLD_SIZE", W))
        cluster = Topology((W // G, G))
        rate_name = args.rate or (os.environ.get("EMULATE_CLUSTER", "").split("rate=") + ["1gbit"])[1].split(" ")[0]
        layouts = [(G, f"1x{G}", "hd1"), (W, str(cluster), "a2a"), (W, str(cluster), "hd2")]
        predicted = predict(cluster, RATES.get(rate_name, 125e6))
        rows = []
        for ep, group, strategy in layouts:
            measured = measure(ep, group, strategy, args.reps)
            pr = predicted[(ep, strategy)]
            rows.append({"ep_size": ep, "group": group, "strategy": strategy, "measured_s": measured,
                         "predicted_comm_s": pr["total_ms"] / 1e3,
                         "predicted_exchange_s": pr["exchange_ms"] / 1e3,
                         "predicted_allreduce_s": pr["expert_grad_allreduce_ms"] / 1e3})
        if dist.get_rank() == 0:
            _report(rows, cluster, rate_name, args)
    finally:
        dist.destroy_process_group()
    return 0


def _report(rows, cluster, rate_name, args) -> None:
    measured_order = sorted(range(len(rows)), key=lambda i: rows[i]["measured_s"])
    predicted_order = sorted(range(len(rows)), key=lambda i: rows[i]["predicted_comm_s"])
    lines = [
        f"# ep_size layouts, one MoE layer's training step ({cluster}, {rate_name})",
        "",
        f"- command: `scripts/emulate_cluster --nodes {cluster.levels[0]} --ranks-per-node {cluster.levels[1]} "
        f"--rate {rate_name} -- scripts/bench_ep_layouts.py --reps {args.reps}`",
        f"- cluster: {os.environ.get('EMULATE_CLUSTER', 'not emulated')}; machine: {platform.node()}, "
        f"{os.cpu_count()} CPUs, gloo; date {datetime.date.today()}",
        f"- layer: E={E}, K={K}, hidden {H}, expert intermediate {INTER}, fp32, {TOKENS} tokens/rank, uniform",
        "",
        "| ep_size | group | strategy | measured step (s) | predicted comm (s) | = exchange | + all-reduce |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['ep_size']} | {r['group']} | {r['strategy']} | {r['measured_s']:.3f} | "
                     f"{r['predicted_comm_s']:.3f} | {r['predicted_exchange_s']:.3f} | "
                     f"{r['predicted_allreduce_s']:.3f} |")
    same = measured_order == predicted_order
    lines += ["", f"planner ranks them as measured: {same}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps({"rows": rows, "same_ranking": same}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
