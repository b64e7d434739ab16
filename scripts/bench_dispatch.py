#!/usr/bin/env python
"""Dispatch benchmark: forward+backward of dispatch and combine for every strategy (issue 6).

Runs under any launcher, one process per rank (gloo on CPU, NCCL on GPU)::

    scripts/emulate_cluster --nodes 2 --ranks-per-node 2 --rate 1gbit -- \\
        scripts/bench_dispatch.py --out docs/dispatch_benchmark
    torchrun --nproc-per-node 8 scripts/bench_dispatch.py --topology 2x4 --out /tmp/bench

Workloads (hidden H=2048, bf16 rows, 2048 tokens per rank): E=128, K=8 (Qwen3-30B-A3B-like) and
E=256, K=8 with DeepSeek-V3 group-limited routing (n_group=8, topk_group=4), each under uniform
and Zipf-skewed (s=1.2) expert popularity. Strategies: a2a, 2dh, hd1, hd2, ... (every one the
topology has), auto, and Transformers' own expert parallelism, isolated to its token exchange
(``AllToAllEP`` with the experts replaced by the same trivial stand-in every strategy uses;
``AllReduceEP`` too, which needs every rank to hold the whole global batch). The experts are a
stand-in that passes rows through (and gives the weights a zero gradient) so that only the
exchange is measured.

Per workload and strategy: rows per token and MB per rank on each stage's links, the measured time
of one training step's exchanges (dispatch, combine, and both backwards; median over repetitions
of the slowest rank), the time predicted by the cost model (calibrated first on the same cluster,
unless --cost-model is given), speed-up over a2a, each stage's own row exchange replayed and timed
alone, and for the inter-node stage the rate reached on a node's link. Rank 0 writes
``OUT.md`` (table, command, machine, date), ``OUT.json`` and ``OUT.png``.
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

from hiermoe_hf.cost import calibration as cal  # noqa: E402
from hiermoe_hf.cost import model as cm  # noqa: E402
from hiermoe_hf.cost import pricing as pr  # noqa: E402
from hiermoe_hf.cost import routing_models as rm  # noqa: E402
from hiermoe_hf.cost.auto import pick_strategy  # noqa: E402
from hiermoe_hf.exchange import stage_rows as sr  # noqa: E402
from hiermoe_hf.exchange.comm import StageGroups  # noqa: E402
from hiermoe_hf.exchange.dispatcher import ExchangePlan, combine, dispatch  # noqa: E402
from hiermoe_hf.kernels import select_ops  # noqa: E402
from hiermoe_hf.topology import Topology  # noqa: E402

WORKLOADS = {
    # name: (experts, top-k, routing, (n_group, topk_group))
    "E128-K8 uniform": (128, 8, "uniform", None),
    "E128-K8 zipf": (128, 8, "zipf", None),
    "E256-K8 group-limited": (256, 8, "uniform", (8, 4)),
    "E256-K8 group-limited zipf": (256, 8, "zipf", (8, 4)),
}
ZIPF_S = 1.2
# Collectives per stage in one training step: the forward's (dispatch: rows with their route in one
# buffer; combine: rows) and as many in the backward. The layer's one count exchange is not per stage.
LATENCIES_PER_STAGE = 2 * pr.FORWARD_LATENCIES


def parse_rate(text: str | None) -> float | None:
    """'1gbit' / '200mbit' -> bytes/s (tc units: bit-based)."""
    if not text:
        return None
    t = text.lower().strip()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult / 8
    raise ValueError(f"cannot read link rate {text!r}; use e.g. 1gbit or 200mbit")


def routing_for(workload: str, rank: int, tokens: int, seed: int) -> torch.Tensor:
    """int64 [T, K] logical expert ids of ``rank``'s tokens (any rank can draw any other's)."""
    E, K, kind, groups = WORKLOADS[workload]
    g_pop = torch.Generator().manual_seed(seed)  # popularity shared by all ranks
    pop = rm.zipf_popularity(E, ZIPF_S, g_pop) if kind == "zipf" else None
    g = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    if pop is None and groups is None:
        return rm.sample_uniform(tokens, E, K, g)
    n_group, topk_group = groups or (1, 1)  # one group: plain top-K of the popularity-skewed scores
    return rm.sample_group_limited(tokens, E, K, n_group, topk_group, g, pop)


def timed(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per call, slowest rank, for each repetition (all ranks call in lockstep)."""
    out = []
    for i in range(warmup + reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= warmup:
            out.append(float(dt))
    return out


class _PassThrough(torch.autograd.Function):
    """Stand-in experts that cost nothing: rows pass unchanged; the weights get a zero gradient, so
    the weight-gradient exchange of the backward still runs as in training."""

    @staticmethod
    def forward(ctx, x_RH, w_RK):
        ctx.w_shape, ctx.w_dtype = w_RK.shape, w_RK.dtype
        return x_RH.view_as(x_RH)

    @staticmethod
    def backward(ctx, g_RH):
        return g_RH, torch.zeros(ctx.w_shape, dtype=ctx.w_dtype, device=g_RH.device)


def hiermoe_step(x_TH, phys_TK, w_TK, plan, ops):
    """One training step's exchanges: dispatch, stand-in experts, combine, backward of all of it."""
    x = x_TH.detach().requires_grad_(True)
    w = w_TK.detach().requires_grad_(True)
    x_RH, phys_RK, w_RK, handle = dispatch(x, phys_TK, w, plan, ops)
    out = combine(_PassThrough.apply(x_RH, w_RK), handle, ops)
    out.backward(torch.ones_like(out))
    return handle


class _StandInExperts(torch.nn.Module):
    """What Transformers' EP implementations call: forward(rows, local ids, weights) -> weighted rows."""

    def __init__(self, local_experts: int):
        super().__init__()
        self.num_experts = local_experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return _PassThrough.apply(hidden, top_k_weights)


def hf_implementations(local_experts: int, device: torch.device) -> dict:
    """Transformers' AllToAllEP (ranks hold different batches) and AllReduceEP (shared batch), if installed."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from transformers.distributed.expert_parallel import AllReduceEP, AllToAllEP
    except ImportError as err:
        return {"_missing": f"transformers has no expert_parallel implementations ({err})"}
    W = dist.get_world_size()
    mesh = init_device_mesh(device.type, (W, 1), mesh_dim_names=("ep", "tp"))
    shared = init_device_mesh(device.type, (W,), mesh_dim_names=("ep",))
    experts = _StandInExperts(local_experts)
    return {
        "hf-all_to_all": AllToAllEP(experts, mesh["ep"], mesh["tp"]),
        "hf-all_reduce": AllReduceEP(experts, shared, shared),
    }


def hf_step(impl, x_TH, ids_TK, w_TK):
    x = x_TH.detach().requires_grad_(True)
    w = w_TK.detach().requires_grad_(True)
    out = impl(x, ids_TK, w)
    out.backward(torch.ones_like(out))


def replay_stages(handle, H: int, dtype, device, reps: int = 3) -> list[float]:
    """Each stage's row exchange alone, with the split sizes it had: best seconds, slowest rank."""
    times = []
    for rec in handle.records:
        if rec.group is None:
            times.append(0.0)
            continue
        x = torch.zeros(sum(rec.send), H, dtype=dtype, device=device)
        out = torch.empty(sum(rec.recv), H, dtype=dtype, device=device)

        def run(x=x, out=out, rec=rec):
            dist.all_to_all_single(out, x, output_split_sizes=rec.recv, input_split_sizes=rec.send, group=rec.group)

        times.append(min(timed(run, device, reps, 1)))
    return times


def node_out_rows(counts_WS: torch.Tensor, topology: Topology, stage) -> float:
    """Largest number of rows leaving one node (level-0 subtree) in this stage."""
    W = topology.world_size
    G = topology.stride(1)
    rows = torch.zeros(topology.levels[0], dtype=torch.float64)
    for r in range(W):
        for m, dst in enumerate(topology.group_ranks(r, stage)):
            if dst // G != r // G:
                rows[r // G] += float(counts_WS[r, m])
    return float(rows.max())


def predict_step(counts, topology: Topology, strategy: str, row_bytes: int, meta_bytes: int, wgrad_bytes: int, model):
    """Predicted seconds of one step's exchanges, per stage: every collective's latency, every
    exchange's bytes (rows 4 times, route metadata, weight gradients), and the local pack + unpack
    of the stage's rows twice (forward and backward)."""
    per_row = 4 * row_bytes + meta_bytes + wgrad_bytes
    comm = pr.predict_stage_times(counts, topology, strategy, per_row, model, latency_terms=LATENCIES_PER_STAGE)
    local = [2 * model.local_time(sr.packed_rows(c) * row_bytes) for c in counts]
    return [a + b for a, b in zip(comm, local)]


def run(args) -> dict | None:
    rank, W = dist.get_rank(), dist.get_world_size()
    topology = Topology.resolve(args.topology, W)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16
    H, T = args.hidden, args.tokens
    row_bytes = H * torch.finfo(dtype).bits // 8
    groups = StageGroups(topology, rank)
    ops = select_ops("auto", device)

    if args.cost_model:
        model = cm.load_cost_model(args.cost_model, topology)
    else:
        sizes = [int(s) for s in args.calib_sizes.split(",")]
        model = cal.calibrate(topology, sizes, reps=3, trials=3, device=device)
    if rank == 0:
        print(cal.format_table(model), flush=True)

    strategies = [s for s in args.strategies.split(",") if s]
    results = []
    hf_cache: dict[int, dict] = {}
    for workload in args.workloads.split(","):
        E, K, _, _ = WORKLOADS[workload]
        e = E // W
        all_ids = [routing_for(workload, r, T, args.seed) for r in range(W)]
        dests = [rm.dest_ranks(i, E, W) for i in all_ids]
        ids_TK = all_ids[rank].to(device)
        g = torch.Generator().manual_seed(rank)
        x_TH = torch.randn(T, H, generator=g).to(device, dtype)
        w_TK = torch.rand(T, K, generator=g).to(device)
        meta_bytes, wgrad_bytes = K * 8, K * 4
        if e not in hf_cache and any(s.startswith("hf-") for s in strategies):
            hf_cache[e] = hf_implementations(e, device)
        for strategy in strategies:
            entry = {"workload": workload, "strategy": strategy}
            if strategy.startswith("hf-"):
                impls = hf_cache[e]
                if strategy not in impls:
                    entry["skipped"] = impls.get("_missing", f"{strategy} unavailable")
                    results.append(entry)
                    continue
                if strategy == "hf-all_reduce":
                    # shared batch: every rank holds all W*T tokens (the same ones)
                    xs = torch.cat([torch.randn(T, H, generator=torch.Generator().manual_seed(r)) for r in range(W)])
                    args_ = (xs.to(device, dtype), torch.cat(all_ids).to(device), w_TK.repeat(W, 1))
                else:
                    args_ = (x_TH, ids_TK, w_TK)
                times = timed(lambda f=impls[strategy], a=args_: hf_step(f, *a), device, args.reps, args.warmup)
                entry["measured_ms"] = statistics.median(times) * 1e3
                entry["measured_all_ms"] = [t * 1e3 for t in times]
                if strategy == "hf-all_to_all":  # same rows as a2a: one per (token, expert)
                    counts = sr.stage_rows(dests, topology, "a2a")
                    st = topology.stages("a2a")[0]
                    entry["stages"] = [
                        {
                            "name": "flat",
                            "rows_per_token": float(sr.sent_rows(counts[0], topology, st).sum()) / (T * W),
                            "mb_per_rank": float(sr.sent_rows(counts[0], topology, st).double().mean())
                            * row_bytes
                            / 1e6,
                        }
                    ]
                results.append(entry)
                continue

            name = strategy
            dest_local = dests[rank].to(device)
            if strategy == "auto":
                name, pred = pick_strategy(topology, topology.strategies(), dest_local, row_bytes, model)
                entry["auto_choice"] = name
                entry["auto_predicted_ms"] = pred
            plan = ExchangePlan.build(topology, groups, name, e)

            def step(plan=plan, auto=strategy == "auto", dest=dest_local, inputs=(x_TH, ids_TK, w_TK)):
                if auto:  # the choice itself (count + one all_reduce) is part of auto's cost
                    pick_strategy(topology, topology.strategies(), dest, row_bytes, model)
                return hiermoe_step(*inputs, plan, ops)

            times = timed(step, device, args.reps, args.warmup)
            handle = hiermoe_step(x_TH, ids_TK, w_TK, plan, ops)
            replay = replay_stages(handle, H, dtype, device)
            counts = sr.stage_rows(dests, topology, name)
            pred = predict_step(counts, topology, name, row_bytes, meta_bytes, wgrad_bytes, model)
            stages = []
            for st, c, t_replay in zip(topology.stages(name), counts, replay):
                sent = sr.sent_rows(c, topology, st)
                s = {
                    "name": st.name,
                    "rows_per_token": float(sent.sum()) / (T * W),
                    "mb_per_rank": float(sent.double().mean()) * row_bytes / 1e6,
                    "max_peer_rows": sr.max_peer_rows(c, topology, st),
                    "replay_ms": t_replay * 1e3,
                    "replay_predicted_ms": model.collective_time(
                        topology, st, sr.max_peer_rows(c, topology, st) * row_bytes
                    )
                    * 1e3,
                }
                if topology.depth >= 2 and t_replay > 0:
                    out_rows = node_out_rows(c, topology, st)
                    if out_rows:
                        s["node_link_MBps"] = out_rows * row_bytes / t_replay / 1e6
                stages.append(s)
            entry.update(
                executed=name,
                measured_ms=statistics.median(times) * 1e3,
                measured_all_ms=[t * 1e3 for t in times],
                predicted_ms=sum(pred) * 1e3,
                stages=stages,
            )
            results.append(entry)
            if rank == 0:
                print(f"{workload:<28}{strategy:<15}{entry['measured_ms']:>10.1f} ms", flush=True)
    return {"model": model, "results": results, "topology": str(topology)}


def finish(res: dict, args, link_rate: float | None) -> str:
    """Speed-ups, the markdown report, the JSON and the plot (rank 0)."""
    results = res["results"]
    by = {(r["workload"], r["strategy"]): r for r in results}
    for r in results:
        base = by.get((r["workload"], "a2a"))
        if base and "measured_ms" in r and "measured_ms" in base:
            r["speedup_vs_a2a"] = base["measured_ms"] / r["measured_ms"]
        if "predicted_ms" in r:
            r["prediction_error"] = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
    lines = [
        "# Dispatch benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `{args.command_line}`",
        f"- cluster: topology {res['topology']}, {os.environ.get('EMULATE_CLUSTER', 'real (not emulated)')}",
        f"- machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"torch {torch.__version__}, backend {dist.get_backend()}",
        f"- workload: hidden {args.hidden}, bf16 rows, {args.tokens} tokens per rank; experts are a stand-in "
        "(only the exchange is measured); one training step = dispatch + combine forward and backward",
        f"- cost model: {res['model'].source}",
        "",
        "| workload | strategy | rows/token per stage | MB/rank per stage | measured ms | predicted ms | "
        "pred. error | speed-up vs a2a | inter-node link MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['workload']} | {r['strategy']} | skipped: {r['skipped']} | | | | | | |")
            continue
        stages = r.get("stages", [])
        rows = ", ".join(f"{s['name']} {s['rows_per_token']:.2f}" for s in stages) or "-"
        mb = ", ".join(f"{s['mb_per_rank']:.1f}" for s in stages) or "-"
        name = r["strategy"] + (f" -> {r['auto_choice']}" if "auto_choice" in r else "")
        pred = f"{r['predicted_ms']:.1f}" if "predicted_ms" in r else "-"
        err = f"{r['prediction_error'] * 100:+.0f}%" if "prediction_error" in r else "-"
        sp = f"{r['speedup_vs_a2a']:.2f}x" if "speedup_vs_a2a" in r else "-"
        link = [s["node_link_MBps"] for s in stages if s["name"] in ("inter-node", "flat") and "node_link_MBps" in s]
        lk = f"{link[0]:.0f}" + (f" ({link[0] * 1e6 / link_rate * 100:.0f}%)" if link_rate else "") if link else "-"
        lines.append(
            f"| {r['workload']} | {name} | {rows} | {mb} | {r['measured_ms']:.1f} | {pred} | {err} | {sp} | {lk} |"
        )
    lines += [
        "",
        "Measured: median over repetitions of the slowest rank's time. Predicted: the cost model "
        f"({LATENCIES_PER_STAGE} latencies per stage, every exchange's bytes, and the local pack + unpack of "
        "every stage's rows in forward and backward, all calibrated on this cluster). Inter-node link: rows leaving "
        "the busiest node in the inter-node (or flat) stage divided by that stage's replayed time"
        + (f", and its share of the configured {link_rate * 8 / 1e9:g} Gbit/s" if link_rate else "")
        + ".",
        "",
        "Per-stage replay (each stage's row exchange alone, measured vs predicted ms):",
        "",
        "| workload | strategy | stage | replay ms | predicted ms |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for s in r.get("stages", []):
            if "replay_ms" in s:
                lines.append(
                    f"| {r['workload']} | {r['strategy']} | {s['name']} | {s['replay_ms']:.1f} | "
                    f"{s['replay_predicted_ms']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    strategies = list(dict.fromkeys(r["strategy"] for r in results if "measured_ms" in r))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        rs = {r["strategy"]: r for r in results if r["workload"] == wl and "measured_ms" in r}
        xs = range(len(strategies))
        ax.bar(
            [x - 0.2 for x in xs], [rs[s]["measured_ms"] if s in rs else 0 for s in strategies], 0.4, label="measured"
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [rs[s].get("predicted_ms", 0) if s in rs else 0 for s in strategies],
            0.4,
            label="predicted",
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(strategies, rotation=45, ha="right", fontsize=8)
        ax.set_title(wl, fontsize=9)
        ax.set_ylabel("ms per training step (exchange only)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default=None, help="default: nodes x LOCAL_WORLD_SIZE from the launcher")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--strategies", default="a2a,2dh,hd1,hd2,auto,hf-all_to_all,hf-all_reduce")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-model", default=None, help="calibration JSON or preset; default: calibrate now")
    p.add_argument("--calib-sizes", default=str(",".join(str(s) for s in (256 << 10, 1 << 20, 4 << 20, 8 << 20))))
    p.add_argument(
        "--link-rate",
        default=None,
        help="inter-node rate for the link-use column, e.g. 1gbit (default: from EMULATE_CLUSTER)",
    )
    p.add_argument("--out", default=None, help="write OUT.md, OUT.json, OUT.png (rank 0)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in seconds")
    args = p.parse_args(argv)
    args.command_line = " ".join([os.environ.get("BENCH_COMMAND", "scripts/bench_dispatch.py")] + sys.argv[1:])
    if args.quick:
        args.tokens, args.hidden, args.reps, args.warmup = 128, 256, 2, 1
        args.calib_sizes = "16384,65536,262144"
    for wl in args.workloads.split(","):
        if wl not in WORKLOADS:
            p.error(f"unknown workload {wl!r}; valid: {', '.join(WORKLOADS)}")
    if "RANK" not in os.environ:
        p.error("run one process per rank: torchrun ... scripts/bench_dispatch.py, or scripts/emulate_cluster")
    env_rate = (os.environ.get("EMULATE_CLUSTER", "").split("rate=") + [""])[1].split(" ")[0]
    link_rate = parse_rate(args.link_rate or env_rate or None)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        res = run(args)
        if dist.get_rank() == 0:
            report = finish(res, args, link_rate)
            print(report, flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out + ".md").write_text(report)
                data = {"topology": res["topology"], "cost_model": res["model"].to_json(), "results": res["results"]}
                Path(args.out + ".json").write_text(json.dumps(data, indent=2) + "\n")
                plot(res["results"], args.out + ".png")
                print(f"wrote {args.out}.md/.json/.png", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
