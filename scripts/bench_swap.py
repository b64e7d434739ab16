#!/usr/bin/env python
"""Expert-swap benchmark (issue 4): no swap vs ``load`` vs ``hierd`` under skewed routing.

    python scripts/bench_swap.py                      # both parts, writes docs/swap_benchmark.md
    python scripts/bench_swap.py --skip-measured      # modelled part only

Routings (fresh tokens every step, drawn from one stationary distribution, same draws for every policy):
- ``zipf``: expert popularity ~ 1/rank^1.2 over a random order of the experts.
- ``clustered``: co-activation: the experts are split at random into clusters of K/2; a token
  takes K/2 - 1 experts from each of two clusters (Zipf(1.0) popularity over clusters) and 2 more
  anywhere. With the initial contiguous placement a cluster's members sit on different ranks.

Modelled part (one process, the planner's pure functions): topologies 4x2 and 2x4, E=64, K=8,
hidden 2048, expert intermediate 768 (Qwen3-30B-A3B-like), bf16 rows, 32768 tokens per rank per
step (rows counted on 2048 drawn per rank and scaled up), hd2 dispatch, the library's default link
constants (25 GB/s per node uplink, 100 GB/s inside a node). Per step:
the modelled time of one MoE layer's exchanges in a training step (dispatch + combine, forward and
backward: the cost model's largest-message rule, hard maximum, recounted by ``cost_model.stage_rows``),
and its expert compute at 1e14 flop/s (forward + backward = 3x forward, the busiest rank). Every
``--interval`` steps the policy plans up to ``--pairs`` exchanges from the routing window
(``swap_stats.RoutingStats``: the last 4096 drawn tokens per rank); a swap costs its modelled move (bf16
weights and grads, fp32 Adam moments: 12 bytes per weight) over the slowest link between the ranks.

Measured part (4 forked gloo ranks on this machine as 2x2, the real ``swap_experts`` on a patched
one-layer Qwen3-MoE, E=16, K=4, hidden 256): the routing is fed straight to the patched experts
module; per step the wall time of its forward + backward (dispatch, experts, combine, slowest rank),
and the wall time of every ``swap_experts`` call (gather, plan, move). On one machine every "link"
is the same loopback, so this part shows the swap's overhead and that it runs end to end, not
network savings.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiermoe_hf.cost import model as cm  # noqa: E402
from hiermoe_hf.exchange import stage_rows as sr  # noqa: E402
from hiermoe_hf.runtime.routing import RoutingStats  # noqa: E402
from hiermoe_hf.swap import objective as sp  # noqa: E402
from hiermoe_hf.swap import policies as swap_policies  # noqa: E402
from hiermoe_hf.topology import Topology, parse_levels  # noqa: E402

POLICIES = ("none", "load", "hierd")
ROUTINGS = ("zipf", "clustered")


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def popularity_zipf(E: int, s: float, g: torch.Generator) -> torch.Tensor:
    p = torch.empty(E)
    p[torch.randperm(E, generator=g)] = 1.0 / torch.arange(1, E + 1, dtype=torch.float32).pow(s)
    return p / p.sum()


class Router:
    """Draws top-K expert ids [T, K] per step from a fixed skewed distribution (seeded).

    zipf: Gumbel-top-K over Zipf(1.2) popularity. clustered: the experts are split at random into
    clusters of K/2; a token picks two clusters (Zipf(1.0) over clusters), takes K/2 - 1 experts of
    each, and its last 2 anywhere (Zipf popularity within its draw's noise)."""

    def __init__(self, kind: str, E: int, K: int, seed: int = 0):
        if kind not in ROUTINGS:
            raise ValueError(f"unknown routing {kind!r}; valid: {', '.join(ROUTINGS)}")
        if kind == "clustered" and (K % 2 or K < 4 or E % (K // 2)):
            raise ValueError(f"clustered routing needs an even K >= 4 with K/2 dividing E; got E={E}, K={K}")
        self.kind, self.E, self.K = kind, E, K
        g = torch.Generator().manual_seed(seed)
        if kind == "zipf":
            self.log_p = popularity_zipf(E, 1.2, g).log()
        else:
            size = K // 2
            self.members = torch.randperm(E, generator=g).view(E // size, size)  # [clusters, K/2]
            self.cluster_p = popularity_zipf(E // size, 1.0, g)

    def draw(self, T: int, g: torch.Generator) -> torch.Tensor:
        gumbel = -torch.log(-torch.log(torch.rand(T, self.E, generator=g).clamp_min(1e-20)))
        if self.kind == "zipf":
            return (self.log_p + gumbel).topk(self.K, dim=1).indices
        size = self.K // 2
        clusters = torch.multinomial(self.cluster_p.expand(T, -1), 2, replacement=False, generator=g)  # [T, 2]
        pick = torch.rand(T, 2, size, generator=g).argsort(dim=2)[:, :, : size - 1]  # K/2 - 1 of each
        chosen = self.members[clusters].gather(2, pick).view(T, -1)
        bonus = torch.zeros(T, self.E).scatter_(1, chosen, 1e3)  # cluster picks first, then the best 2 others
        return (bonus + gumbel).topk(self.K, dim=1).indices


# ---------------------------------------------------------------------------------------------
# Modelled part
# ---------------------------------------------------------------------------------------------


def modelled_step_a2a(ids_per_rank, rank_of_E, topo, strategy, row_bytes, model, scale) -> float:
    """Seconds of one layer's exchanges in a training step: per stage 4 latencies and the rows
    crossing twice (dispatch + combine), forward and backward; largest message, hard maximum.
    The drawn tokens stand for ``scale`` times as many (counts scale linearly)."""
    dests = [rank_of_E[ids] for ids in ids_per_rank]
    total = 0.0
    for st, counts in zip(topo.stages(strategy), sr.stage_rows(dests, topo, strategy)):
        nbytes = sr.max_peer_rows(counts, topo, st) * row_bytes * scale
        total += model.collective_time(topo, st, nbytes, 4) + model.collective_time(topo, st, nbytes, 0)
    return 2 * total


def run_modelled(args) -> list[dict]:
    rows = []
    for spec in args.topology.split(","):
        rows += run_modelled_topology(args, Topology(parse_levels(spec)))
    return rows


def run_modelled_topology(args, topo: Topology) -> list[dict]:
    W, E, K, T, H, I = topo.world_size, args.experts, args.topk, args.sample, 2048, 768
    scale = args.tokens / args.sample  # the drawn tokens stand for this many times as many
    row_bytes = H * 2
    model = cm.default_cost_model(topo)
    strategy = f"hd{topo.depth}"
    flops_row = 6 * H * I
    costs = sp.PlannerCosts(model, row_bytes=row_bytes, compute_s_per_row=flops_row / sp.DEFAULT_FLOPS)
    expert_bytes = 3 * H * I * 12
    rows = []
    for kind in ROUTINGS:
        router = Router(kind, E, K, seed=1)
        for policy in POLICIES:
            g = torch.Generator().manual_seed(7)
            rank_of_E = torch.arange(E) // (E // W)
            stats = [RoutingStats(capacity=4096) for _ in range(W)]
            a2a, compute, move, plan_s, swaps, saving = [], [], 0.0, 0.0, 0, 0.0
            for step in range(args.steps):
                ids = [router.draw(T, g) for _ in range(W)]
                a2a.append(modelled_step_a2a(ids, rank_of_E, topo, strategy, row_bytes, model, scale))
                load = scale * torch.bincount(rank_of_E[torch.cat(ids).flatten()], minlength=W).max().item()
                compute.append(3 * load * flops_row / sp.DEFAULT_FLOPS)
                for r in range(W):
                    stats[r].record(ids[r], E, training=True)
                if policy == "none" or (step + 1) % args.interval:
                    continue
                window = torch.cat([s.window().long() for s in stats])
                origin = torch.cat([torch.full((s.filled,), r) for r, s in enumerate(stats)])
                tokens = scale * sum(s.tokens for s in stats) / stats[0].forwards  # per forward, all ranks
                win = sp.RoutingWindow(window, origin, tokens / window.shape[0], float(stats[0].passes))
                t0 = time.perf_counter()
                choices = swap_policies.plan(policy, win, rank_of_E, topo, strategy, costs,
                                  lambda ra, rb: sp.move_cost_s(topo, model, ra, rb, expert_bytes),
                                  max_pairs=args.pairs)
                plan_s += time.perf_counter() - t0
                for c in choices:
                    rank_of_E[c.a], rank_of_E[c.b] = c.rank_b, c.rank_a
                    move += c.move_cost_s
                    saving += c.saving_s
                swaps += len(choices)
                for s in stats:
                    s.end_interval()
            step_s = sum(a2a) + sum(compute)
            tail = args.steps // 5
            rows.append({
                "topology": str(topo), "routing": kind, "policy": policy,
                "a2a_ms": 1e3 * statistics.mean(a2a), "a2a_last_ms": 1e3 * statistics.mean(a2a[-tail:]),
                "compute_ms": 1e3 * statistics.mean(compute), "swaps": swaps,
                "move_pct": 100 * move / step_s, "plan_s": plan_s, "predicted_ms": 1e3 * saving,
            })
            a2a_ms = rows[-1]["a2a_ms"]
            print(f"  modelled {topo} {kind:9s} {policy:5s} a2a {a2a_ms:.3f} ms/step, swaps {swaps}", flush=True)
    for row in rows:
        key = (row["topology"], row["routing"], "none")
        base = next(r for r in rows if (r["topology"], r["routing"], r["policy"]) == key)
        row["vs_none_pct"] = 100 * (row["a2a_ms"] / base["a2a_ms"] - 1)
        row["last_vs_none_pct"] = 100 * (row["a2a_last_ms"] / base["a2a_last_ms"] - 1)
    return rows


# ---------------------------------------------------------------------------------------------
# Measured part (forked gloo ranks)
# ---------------------------------------------------------------------------------------------


def _measured_rank(rank, world, init_file, args, queue):
    import hiermoe_hf
    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        E, K, H, T = 16, 4, 256, args.measured_tokens
        out = []
        for kind in ROUTINGS:
            router = Router(kind, E, K, seed=1)
            for policy in POLICIES:
                cfg_model = tiny_qwen3_moe_config(hidden_size=H, moe_intermediate_size=128, num_experts=E,
                                                  num_experts_per_tok=K, num_hidden_layers=1)
                model = build_model(cfg_model).train()
                cfg = hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2", swap_interval=args.interval,
                                               swap_policy="hierd" if policy == "none" else policy,
                                               swap_pairs=args.pairs)
                hiermoe_hf.patch(model, cfg)
                experts, _ = next(iter(moe_layers(model).values()))
                opt = torch.optim.AdamW(experts.parameters(), lr=1e-4)
                g = torch.Generator().manual_seed(7)
                steps, swap_times, swaps = [], [], 0
                for step in range(args.steps):
                    ids_all = [router.draw(T, g) for _ in range(world)]
                    ids = ids_all[rank]
                    x = torch.randn(T, H, generator=torch.Generator().manual_seed(step * world + rank))
                    x.requires_grad_(True)
                    w = torch.full((T, K), 1.0 / K)
                    dist.barrier()
                    t0 = time.perf_counter()
                    experts(x, ids, w).sum().backward()
                    steps.append(time.perf_counter() - t0)
                    opt.step()
                    if policy != "none" and (step + 1) % args.interval == 0:
                        dist.barrier()
                        t0 = time.perf_counter()
                        swaps += len(hiermoe_hf.swap_experts(model, opt))
                        swap_times.append(time.perf_counter() - t0)
                    opt.zero_grad()
                worst = torch.tensor([sum(steps), sum(swap_times), statistics.median(steps)], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                out.append({"routing": kind, "policy": policy, "step_ms": 1e3 * worst[2].item(),
                            "swaps": swaps, "swap_ms": 1e3 * worst[1].item() / max(1, len(swap_times)),
                            "swap_pct": 100 * worst[1].item() / worst[0].item()})
                if rank == 0:
                    r = out[-1]
                    print(f"  measured {kind:9s} {policy:5s} step {r['step_ms']:.1f} ms, swaps {swaps}", flush=True)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def run_measured(args) -> list[dict]:
    import torch.multiprocessing as mp
    import transformers  # noqa: F401  (imported before forking: ranks start fast)

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="bench-swap-pg-")
    os.close(fd)
    os.unlink(init_file)
    mp.start_processes(_measured_rank, args=(4, init_file, args, queue), nprocs=4, start_method="fork")
    return queue.get(timeout=5)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def report(args, modelled, measured, wall_s) -> str:
    lines = [
        "# Expert swap benchmark",
        "",
        f"Command: `{' '.join(['python scripts/bench_swap.py'] + args.argv)}`",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, {platform.system()}, torch {torch.__version__}, "
        f"gloo, no GPU. Date: {datetime.date.today().isoformat()}. Wall time {wall_s:.0f} s.",
        "",
        f"## Modelled: topologies {args.topology}, E={args.experts}, K={args.topk}, {args.tokens} tokens/rank/step "
        f"(rows counted on {args.sample} drawn per rank and scaled), "
        f"{args.steps} steps, swap every {args.interval} steps, up to {args.pairs} pairs per round",
        "",
        "a2a = modelled exchange time of one MoE layer per training step (dispatch + combine, forward and "
        "backward, hd2, default link constants); last = mean of the last fifth of the steps; move = modelled "
        "cost of all swaps as a share of all step time (a2a + expert compute); plan = planner wall time "
        "on this CPU for all rounds.",
        "",
        "| topology | routing | policy | a2a ms/step | vs none | a2a last ms | vs none | compute ms | swaps "
        "| move % of step | plan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in modelled:
        lines.append(
            f"| {r['topology']} | {r['routing']} | {r['policy']} | {r['a2a_ms']:.3f} | {r['vs_none_pct']:+.1f}% | "
            f"{r['a2a_last_ms']:.3f} | "
            f"{r['last_vs_none_pct']:+.1f}% | {r['compute_ms']:.3f} | {r['swaps']} | {r['move_pct']:.2f} | "
            f"{r['plan_s']:.2f} |"
        )
    if measured:
        lines += [
            "",
            f"## Measured: 4 gloo ranks as 2x2 on this machine, one-layer Qwen3-MoE (E=16, K=4, hidden 256), "
            f"{args.measured_tokens} tokens/rank/step, {args.steps} steps, swap every {args.interval} steps",
            "",
            "step = median wall time of the experts module's forward + backward (slowest rank); swap = mean "
            "wall time of one `swap_experts` round (gather, plan, move); swap % = all swap time over all step time. "
            "All ranks share 2 cores and one loopback, so step times carry no network saving.",
            "",
            "| routing | policy | step ms | swaps | swap ms/round | swap % of step time |",
            "|---|---|---|---|---|---|",
        ]
        for r in measured:
            lines.append(f"| {r['routing']} | {r['policy']} | {r['step_ms']:.1f} | {r['swaps']} | "
                         f"{r['swap_ms']:.1f} | {r['swap_pct']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="4x2,2x4", help="modelled topologies, comma-separated")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per rank per step (modelled)")
    parser.add_argument("--sample", type=int, default=2048, help="tokens drawn per rank per step to count rows")
    parser.add_argument("--measured-tokens", type=int, default=512, help="tokens per rank per step (measured)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=8, help="swap_pairs: exchanges per planning round")
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "swap_benchmark.md"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    print("modelled part", flush=True)
    modelled = run_modelled(args)
    measured = []
    if not args.skip_measured:
        print("measured part (4 gloo ranks)", flush=True)
        measured = run_measured(args)
    text = report(args, modelled, measured, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
