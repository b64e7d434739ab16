#!/usr/bin/env python
"""Whole training steps (forward + backward) of one wide MoE layer, old code vs new (issue 13).

    scripts/emulate_cluster --nodes 2 --ranks-per-node 2 --rate 200mbit -- \\
        scripts/bench_step.py --old-repo /tmp/old --out docs/step_benchmark_200mbit

One Qwen3-MoE sparse block (H=1024, E=128, K=8, moe_intermediate 128, fp32, 1024 tokens per rank)
routed by its own router. Configurations: this checkout's ``a2a``/``hd1``/``hd2``/``auto`` with
``overlap_chunks`` 1 and 4; the code at ``--old-repo`` (e.g. ``git archive 0a8bf7e``) with
``a2a``/``hd1``/``hd2``/``auto``; Transformers' own expert parallelism (``AllToAllEP``: one row per
(token, expert); ``AllReduceEP``: every rank holds the same global batch of W*1024 tokens, the same
unique tokens, and all-reduces). Each group runs in its own subprocess per rank (its own process
group on the next port), so old and new code share the run and the link. Per configuration: median
over ``--reps`` steps (after one warm-up) of the slowest rank's step time, the inter-node bytes a
node's link carries per direction per step (from ``hiermoe_hf.stats``), and that traffic's time at
the link rate (the floor). Rank 0 writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# "defaults": HierMoEConfig() as a user gets it (today dispatch="auto", overlap_chunks="auto")
NEW = [(f"new {s} x{c}", "new", s, c) for c in (1, 4, 8) for s in ("a2a", "hd1", "hd2", "auto")] + [
    ("new defaults", "new", None, None)]
OLD = [(f"old {s}", "old", s, 1) for s in ("a2a", "hd1", "hd2", "auto")] + [("old defaults", "old", None, None)]
HF = [("transformers all_to_all", "hf", "all_to_all", 1), ("transformers all_reduce", "hf", "all_reduce", 1)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-repo", default=None, help="checkout of the old code (omit: new code only)")
    ap.add_argument("--out", default=None, help="results prefix (OUT.md, OUT.json), written by rank 0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching configurations")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- worker (one group)


def _model(args):
    from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

    H = args.hidden
    cfg = tiny_qwen3_moe_config(
        hidden_size=H, moe_intermediate_size=args.intermediate, num_experts=args.experts,
        num_experts_per_tok=args.topk, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
        head_dim=H // 8, intermediate_size=4 * H,
    )
    return build_model(cfg, seed=0).train()


def _block_out(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _hf_block(block, impl: str, W: int, rank: int):
    """Replace the block's experts by Transformers' EP implementation around this rank's slice."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import AllReduceEP, AllToAllEP

    full = block.experts
    E = full.gate_up_proj.shape[0]
    e = E // W
    local = copy.deepcopy(full)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            setattr(local, name, torch.nn.Parameter(getattr(full, name)[rank * e : (rank + 1) * e].clone()))
    local.num_experts = e
    local.config._experts_implementation = "grouped_mm"
    if hasattr(local, "_is_expert_parallel"):
        local._is_expert_parallel = True
    if impl == "all_to_all":
        mesh = init_device_mesh("cpu", (W, 1), mesh_dim_names=("ep", "tp"))
        ep = AllToAllEP(local, mesh["ep"], mesh["tp"])
    else:
        mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
        ep = AllReduceEP(local, mesh, mesh)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.local = local

        def forward(self, h, idx, w):
            return ep(h, idx, w)

    block.experts = Wrapped()


def worker(args, group: str) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    W, rank = dist.get_world_size(), dist.get_rank()
    import hiermoe_hf

    configs = [c for c in {"new": NEW, "old": OLD, "hf": HF}[group] if _wanted(args, c[0])]
    out = {}
    try:
        for label, _, strategy, chunks in configs:
            model = _model(args)
            block = model.model.layers[0].mlp
            T, H = args.tokens, args.hidden
            g = torch.Generator().manual_seed(100 + rank)
            if group == "hf":
                _hf_block(block, strategy, W, rank)
                if strategy == "all_reduce":  # the same global batch on every rank
                    g = torch.Generator().manual_seed(100)
                    T = T * W
            else:
                kw = {"overlap_chunks": chunks} if group == "new" and chunks is not None else {}
                kw.update({"dispatch": strategy, "kernels": "torch"} if strategy is not None else {})
                cfg = hiermoe_hf.HierMoEConfig(**kw)  # topology: launcher
                hiermoe_hf.patch(model, cfg)
            x = torch.randn(1, T, H, generator=g)
            grad = torch.randn(1, T, H, generator=g)
            times = []
            warmup = 1 if group == "hf" else _warmup_steps(model)
            for i in range(args.reps + warmup):
                dist.barrier()
                t0 = time.perf_counter()
                xi = x.clone().requires_grad_(True)
                _block_out(block, xi).backward(grad)
                t = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if i >= warmup:
                    times.append(float(t))
            entry = {"step_s": statistics.median(times), "steps_s": times}
            if group != "hf":
                st = hiermoe_hf.stats(model)
                layer = next(iter(st.values()))
                chunks = f" x{layer['overlap_chunks']}" if "overlap_chunks" in layer else ""
                entry["strategy"] = layer["strategy"] + chunks
                entry["measured_ms_by_chunks"] = layer.get("measured_ms_by_chunks")
                inter = [s for s in layer["stages"] if s["name"] in ("inter-node", "flat")]
                mine = torch.tensor([float(sum(s["bytes_sent"] for s in inter))])
                entry["stages"] = [s["name"] for s in layer["stages"]]
                entry["mine"] = float(mine)
            out[label] = entry
            del model, block
    finally:
        dist.destroy_process_group()
    return out


def _warmup_steps(model) -> int:
    """One warm-up step, plus the forwards in which ``auto`` (and ``overlap_chunks="auto"``) time
    their candidates (cost/trials.py; checkouts before it have none, before issue 18 no chunk phase)."""
    from hiermoe_hf.runtime.registry import runtime_of

    trials = getattr(runtime_of(model), "trials", None)
    deciding = getattr(trials, "deciding", trials is not None and trials.chosen is None)
    return 1 + (trials.trial_forwards if trials is not None and deciding else 0)


def _wanted(args, label: str) -> bool:
    return not args.only or any(w.strip() and w.strip() in label for w in args.only.split(","))


# ----------------------------------------------------------------------------- driver (under torchrun)


def run_group(args, group: str, repo: Path, port: int) -> dict:
    # its own store on the next port: rank 0's child hosts it (torchrun's agent store serves only the parent)
    env = dict(os.environ, MASTER_PORT=str(port), PYTHONPATH=str(repo), OMP_NUM_THREADS="1",
               TORCHELASTIC_USE_AGENT_STORE="False")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", group] + _passthrough(args)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(repo))
    if p.returncode != 0:
        return {"_error": f"{group}: exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    out = []
    for k in ("reps", "tokens", "hidden", "experts", "topk", "intermediate", "only"):
        out += [f"--{k}", str(getattr(args, k))]
    return out


def link_rate_bytes() -> float | None:
    """Bytes/s of the emulated link from EMULATE_CLUSTER ("2x2 rate=200mbit ...")."""
    text = os.environ.get("EMULATE_CLUSTER", "")
    for part in text.split():
        if part.startswith("rate="):
            v = part[5:].lower()
            for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
                if v.endswith(unit):
                    return float(v[: -len(unit)]) * mult / 8
    return None


def report(args, results: dict, W: int, rate: float | None, seconds: float) -> str:
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", W))
    lines = [
        f"# One MoE layer, whole training step (forward + backward), {W} ranks "
        f"({W // ranks_per_node} nodes x {ranks_per_node})",
        "",
        f"Command: `scripts/emulate_cluster ... -- scripts/bench_step.py {' '.join(sys.argv[1:])}`  ",
        f"Link: {os.environ.get('EMULATE_CLUSTER', 'not emulated')}; machine: {platform.node()} "
        f"({os.cpu_count()} CPUs, shared), gloo, fp32; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; "
        f"H={args.hidden}, E={args.experts}, K={args.topk}, moe_intermediate={args.intermediate}, "
        f"{args.tokens} tokens/rank, median of {args.reps} steps after 1 warm-up (new auto: and its trial steps); "
        f"total {seconds:.0f} s.",
        "",
        "| configuration | strategy run | step s (slowest rank) | inter-node MB per node and direction | floor s |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if label.startswith("_"):
            lines.append(f"| {label} | error | {r} | | |")
            continue
        mb = floor = ""
        if "node_bytes" in r:
            mb = f"{r['node_bytes'] / 1e6:.1f}"
            floor = f"{r['node_bytes'] / rate:.2f}" if rate else ""
        lines.append(f"| {label} | {r.get('strategy', '')} | {r['step_s']:.2f} | {mb} | {floor} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return 0
    W, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    port = int(os.environ.get("MASTER_PORT", 29400))
    t0 = time.perf_counter()
    results = {}
    groups = [("new", REPO)] + ([("old", Path(args.old_repo).resolve())] if args.old_repo else []) + [("hf", REPO)]
    for i, (group, repo) in enumerate(groups):
        results.update(run_group(args, group, repo, port + 1 + i))
    rate = link_rate_bytes()
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", W))
    for r in results.values():
        if isinstance(r, dict) and "mine" in r:
            # the stage's bytes sent by this rank that leave its node, times the node's ranks (every rank
            # sends about the same), times 4 crossings per step: dispatch, combine and their backwards
            r["node_bytes"] = 4 * r.pop("mine") * ranks_per_node * _cross_fraction(r, W, ranks_per_node)
    if rank == 0:
        text = report(args, results, W, rate, time.perf_counter() - t0)
        print(text)
        if args.out:
            Path(args.out + ".md").write_text(text)
            Path(args.out + ".json").write_text(json.dumps(results, indent=2))
    return 0


def _cross_fraction(r: dict, W: int, G: int) -> float:
    """Share of a stage's off-rank rows that leave the node: all for the inter-node stage; for a flat
    stage the peers on other nodes, (W - G) of the W - 1 (uniform routing)."""
    return 1.0 if "inter-node" in r.get("stages", []) else (W - G) / max(W - 1, 1)


if __name__ == "__main__":
    sys.exit(main())
