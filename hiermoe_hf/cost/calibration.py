"""Calibrate the cost model: time ``all_to_all_single`` in every stage group, fit alpha and beta.

Under any launcher (torchrun, accelerate, scripts/emulate_cluster)::

    torchrun --nproc-per-node 4 -m hiermoe_hf.calibrate --topology 2x2 --out cost_2x2.json

gloo on CPU, NCCL on GPU. For every stage kind of every strategy (flat, inter-node, intra-node,
...), all groups of that kind run their exchange at once (as in a real dispatch), at several
per-peer message sizes; the time of one size is the slowest rank's mean over ``reps`` back-to-back
exchanges (best of ``trials``). ``t = alpha + S*m*beta`` is fitted by least squares on relative
error (so small and large sizes both count), alpha clamped at >= 0. Rank 0 prints alpha, beta and
r^2 and writes the JSON that ``HierMoEConfig(cost_model=path)`` loads.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist

from hiermoe_hf.cost.model import CostModel, StageCost
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.exchange.devices import comm_device
from hiermoe_hf.topology import Stage, Topology

DEFAULT_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
DEFAULT_LOCAL_ROWS = (2048, 8192, 16384)


def stage_kinds(topology: Topology) -> list[Stage]:
    """One Stage per distinct digit range over all strategies, groups of one rank left out."""
    return [st for st in topology.distinct_stages() if topology.group_size(st) > 1]


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> StageCost:
    """Least squares on relative error of ``t = alpha + n*beta``; alpha >= 0, beta >= 0; r^2 on t.

    nbytes, seconds: [N] samples (N >= 2, at least two distinct sizes).
    """
    x = torch.tensor(nbytes, dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    if x.numel() < 2 or x.unique().numel() < 2:
        raise ValueError(f"need samples at two or more distinct sizes to fit alpha and beta, got sizes {list(nbytes)}")
    w = 1.0 / y.clamp_min(1e-12)
    A = torch.stack([torch.ones_like(x), x], dim=1) * w[:, None]
    sol = torch.linalg.lstsq(A, (y * w)[:, None]).solution.squeeze(1)
    alpha, beta = float(sol[0]), float(sol[1])
    if alpha < 0:  # latency cannot be negative: refit through the origin
        alpha, beta = 0.0, float(((x * w) @ (y * w)) / ((x * w) @ (x * w)))
    beta = max(beta, 0.0)
    pred = alpha + beta * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return StageCost(alpha, beta, r2)


def _default_device() -> torch.device:
    return comm_device()  # the group's bound GPU under NCCL (exchange.devices), else the CPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(group, x: torch.Tensor, out: torch.Tensor, reps: int, device: torch.device) -> float:
    """Mean seconds of ``reps`` back-to-back exchanges, slowest rank. Collective over the default group."""
    dist.barrier()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_to_all_single(out, x, group=group)
    _sync(device)
    dt = torch.tensor([(time.perf_counter() - t0) / reps], dtype=torch.float64, device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def _buffers(group_size: int, per_peer_bytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones(group_size * max(per_peer_bytes // 4, 1), dtype=torch.float32, device=device)
    return x, torch.empty_like(x)


def measure(
    topology: Topology,
    sizes: Sequence[int] = DEFAULT_SIZES,
    reps: int = 5,
    trials: int = 3,
    device: torch.device | None = None,
    groups: StageGroups | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Samples per stage name: [(S * per-peer bytes, seconds)], one per size. Collective.

    Sizes are visited round-robin ``trials`` times and each keeps its best time, so a burst of
    load from other processes hits every size alike instead of bending the fitted line.
    """
    if device is None:
        device = _default_device()
    kinds = stage_kinds(topology)
    if groups is None:
        groups = StageGroups(topology, dist.get_rank())
    samples: dict[str, list[tuple[int, float]]] = {}
    for st in kinds:
        S, group = topology.group_size(st), groups.get(st)
        bufs = [_buffers(S, int(m), device) for m in sizes]
        for x, out in bufs:  # warm-up: connections, allocations
            dist.all_to_all_single(out, x, group=group)
        best = [float("inf")] * len(sizes)
        for _ in range(trials):
            for i, (x, out) in enumerate(bufs):
                best[i] = min(best[i], _time_once(group, x, out, reps, device))
        samples[st.name] = [(bufs[i][0].numel() * 4, best[i]) for i in range(len(sizes))]
    return samples


def measure_local(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    hidden: int = 2048,
    rows: Sequence[int] = DEFAULT_LOCAL_ROWS,
    trials: int = 3,
    kernels: str = "auto",
) -> list[tuple[int, float]]:
    """[(bytes, seconds)] of one pack (row gather) + unpack (fp32 scatter-add) of that many bytes of
    rows with the dispatcher's kernels, best of ``trials``. Collective: ranks measure one at a time
    (on a GPU each rank has its own device; on CPU ranks sharing cores would otherwise measure each
    other), and the slowest rank's times are kept so every rank's model is identical, which
    ``dispatch="auto"`` needs."""
    from hiermoe_hf.kernels import select_ops

    ops = select_ops(kernels, device)
    times = torch.zeros(len(rows), dtype=torch.float64, device=device)
    for turn in range(dist.get_world_size()):
        dist.barrier()
        if turn != dist.get_rank():
            continue
        g = torch.Generator().manual_seed(0)
        for i, P in enumerate(rows):
            x = torch.randn(P, hidden, generator=g).to(device, dtype)
            idx = torch.randperm(P, generator=g).to(device)
            best = float("inf")
            for _ in range(trials + 1):  # the first run warms up the allocator
                _sync(device)
                t0 = time.perf_counter()
                ops.unpack_sum(ops.pack_rows(x, idx), idx, P)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            times[i] = best
    dist.barrier()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    nbytes = [P * hidden * torch.finfo(dtype).bits // 8 for P in rows]
    return list(zip(nbytes, times.tolist()))


def calibrate(
    topology: Topology,
    sizes: Sequence[int] = DEFAULT_SIZES,
    reps: int = 5,
    trials: int = 3,
    device: torch.device | None = None,
    groups: dict | None = None,
    local_rows: Sequence[int] | None = DEFAULT_LOCAL_ROWS,
) -> CostModel:
    """Measure every stage kind and fit it; the same CostModel on every rank. Collective.

    Needs an initialised default process group whose world size is ``topology.world_size``.
    local_rows: row counts (of hidden 2048) at which to time the local pack + unpack
        (``CostModel.local``); None or empty: no local term.
    """
    if not dist.is_initialized():
        raise RuntimeError("calibrate needs an initialised process group (launch with torchrun)")
    if dist.get_world_size() != topology.world_size:
        raise ValueError(
            f"topology {topology} has {topology.world_size} ranks but the world size is {dist.get_world_size()}"
        )
    if device is None:
        device = _default_device()
    samples = measure(topology, sizes, reps, trials, device, groups)
    stages = {name: fit_alpha_beta([n for n, _ in s], [t for _, t in s]) for name, s in samples.items()}
    local_samples = measure_local(device, rows=local_rows) if local_rows else []
    meta = {
        "backend": dist.get_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": {name: [[n, t] for n, t in s] for name, s in samples.items()},
    }
    local_fit = None
    if local_samples:
        meta["local_samples"] = [[n, t] for n, t in local_samples]
        local_fit = fit_alpha_beta([n for n, _ in local_samples], [t for _, t in local_samples])
    source = f"calibration ({dist.get_backend()}, {topology})"
    return CostModel(str(topology), stages, source, False, meta, local_fit)


def format_table(model: CostModel) -> str:
    lines = [
        f"cost model for topology {model.topology} ({model.source})",
        f"{'stage':<14}{'alpha (us)':>12}{'beta (ns/B)':>13}{'GB/s':>9}{'r^2':>8}",
    ]
    for name, c in model.stages.items():
        bw = 1e-9 / c.beta if c.beta > 0 else float("inf")
        r2 = f"{c.r2:.4f}" if c.r2 is not None else "-"
        lines.append(f"{name:<14}{c.alpha * 1e6:>12.1f}{c.beta * 1e9:>13.4f}{bw:>9.2f}{r2:>8}")
    if model.local is not None:
        c = model.local
        bw = 1e-9 / c.beta if c.beta > 0 else float("inf")
        r2 = f"{c.r2:.4f}" if c.r2 is not None else "-"
        lines.append(f"{'local pack':<14}{c.alpha * 1e6:>12.1f}{c.beta * 1e9:>13.4f}{bw:>9.2f}{r2:>8}")
    return "\n".join(lines)


def _parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use bytes or 64K, 1M, ...") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hiermoe_hf.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default=None, help="e.g. 2x4; default: nodes x LOCAL_WORLD_SIZE from the launcher")
    p.add_argument("--out", default="hiermoe_cost_model.json", help="JSON written by rank 0")
    p.add_argument(
        "--sizes", default=",".join(str(s) for s in DEFAULT_SIZES), help="per-peer message sizes, e.g. 64K,256K,1M,4M"
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args(argv)
    sizes = [_parse_size(s) for s in args.sizes.split(",") if s.strip()]

    if "RANK" not in os.environ:
        raise SystemExit("calibrate runs one process per rank: launch it with torchrun (or scripts/emulate_cluster)")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        topology = Topology.resolve(args.topology, dist.get_world_size())
        model = calibrate(topology, sizes, args.reps, args.trials)
        if dist.get_rank() == 0:
            print(format_table(model))
            model.save(args.out)
            print(f"wrote {args.out}")
    finally:
        dist.destroy_process_group()
    return 0




PATCH_CALIBRATION = "calibrate"  # HierMoEConfig(cost_model="calibrate"): calibrate_at_patch
PATCH_SIZES = (64 << 10, 1 << 20)  # per-peer bytes: one latency-bound and one bandwidth-bound point
PATCH_LOCAL_ROWS = (1024, 4096)


def calibrate_at_patch(topology: Topology, groups: StageGroups, device: torch.device | None = None) -> CostModel:
    """A short calibration when a model is patched with ``cost_model="calibrate"`` (so ``auto``
    prices this cluster's links, not defaults): every stage kind at two sizes, 2 exchanges
    each, plus the local pack/unpack at two row counts; well under a second on a 200 Mbit/s link.
    The same CostModel on every rank (slowest rank's times). Collective."""
    if device is None:
        device = _default_device()
    samples = measure(topology, PATCH_SIZES, reps=2, trials=1, device=device, groups=groups)
    stages = {name: fit_alpha_beta([n for n, _ in s], [t for _, t in s]) for name, s in samples.items()}
    local_samples = measure_local(device, dtype=torch.float32, hidden=1024, rows=PATCH_LOCAL_ROWS, trials=1)
    local = fit_alpha_beta([n for n, _ in local_samples], [t for _, t in local_samples])
    # LAPACK's least squares can differ in the last bit between processes (SIMD paths depend on
    # memory alignment) and auto needs identical constants everywhere: take rank 0's fit.
    names = sorted(stages)
    fitted = torch.tensor([[stages[n].alpha, stages[n].beta] for n in names] + [[local.alpha, local.beta]],
                          dtype=torch.float64, device=device)
    dist.broadcast(fitted, src=0)
    rows = fitted.tolist()
    stages = {n: StageCost(a, b, stages[n].r2) for n, (a, b) in zip(names, rows)}
    local = StageCost(rows[-1][0], rows[-1][1], local.r2)
    meta = {"samples": {name: [[n, t] for n, t in s] for name, s in samples.items()}}
    source = f"calibrated at patch time ({dist.get_backend()}, {topology})"
    return CostModel(str(topology), stages, source, False, meta, local)
