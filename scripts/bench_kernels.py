#!/usr/bin/env python
"""Check, then time, the Triton dispatch kernels against the torch reference (issue 3).

GPU (default):  python scripts/bench_kernels.py [--out docs/bench_kernels_results.md]
  1. correctness on fresh random inputs (forward and backward): integers exact; floats within
     max|a - b| / max|b| <= 1e-6 (fp32), 1e-2 (bf16). Any failure exits 1 before timing.
  2. device copy bandwidth (median of ``triton.testing.do_bench`` over ``x.clone()`` of 1 GiB).
  3. every kernel, Triton and torch, median of ``do_bench``, at T=16384 tokens per rank, K=8,
     H in {2048, 7168}, E in {128, 256}, contiguous placements on 8 and 32 ranks, bf16.
     Table: GB/s (ideal bytes moved / time), fraction of copy bandwidth, speedup over torch.
  Sized to finish in well under 5 minutes on one H200.

CPU (``--small``): sets TRITON_INTERPRET=1, runs the same correctness phase on tiny sizes in
Triton's interpreter, and times tiny sizes with a plain timer (numbers say nothing about a GPU).

Compiling every kernel variant for real GPUs without one: ``scripts/aot_triton.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--small", action="store_true", help="tiny sizes in the Triton interpreter on CPU")
    ap.add_argument("--out", default=str(REPO / "docs" / "bench_kernels_results.md"), help="results file")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh inputs every run")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.small:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported: @triton.jit reads it
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from hiermoe_hf.kernels import reference, select_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = select_ops("triton", DEVICE)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12, torch.float16: 1e-2}


# ----------------------------------------------------------------------------- inputs


def routing(T: int, K: int, E: int, device, gen) -> torch.Tensor:
    """topk_ids_TK int64 [T, K]: K distinct uniformly random experts per token."""
    return torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices


def make_case(T, H, K, E, W, dtype, device, gen) -> dict:
    """One rank's inputs: its tokens, their flat-stage layout (torch), received rows and grads.

    Received rows are modelled by the rank's own packed rows (same count by symmetry), their
    carried ids giving local slots (id % e).
    """
    ids_TK = routing(T, K, E, device, gen)
    dest_TK = ids_TK // (E // W)  # contiguous placement
    lay = reference.stage_layout(dest_TK, 1, W, True)
    ids_PK, _ = reference.pack_route(ids_TK, torch.zeros(T, K, device=device), lay.src_row_P, lay.mask_PK)
    exp = reference.expand_layout(ids_PK, E // W)
    P, Q = lay.src_row_P.numel(), exp.src_row_Q.numel()

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    return dict(
        T=T, H=H, K=K, E=E, W=W, P=P, Q=Q, ids_TK=ids_TK, dest_TK=dest_TK, lay=lay, ids_PK=ids_PK, exp=exp,
        x_TH=randn(T, H), w_TK=torch.rand(T, K, device=device, generator=gen).to(dtype),
        y_PH=randn(P, H), y_QH=randn(Q, H), w_Q=torch.rand(Q, device=device, generator=gen).to(dtype),
        g_PH=randn(P, H), g_PK=randn(P, K), g_TH=randn(T, H),
    )


# ----------------------------------------------------------------------------- correctness


def run_all(ops, c: dict) -> dict:
    """Every kernel through ``ops`` with its backward; returns named outputs."""
    out = {}
    for name, divisor, size, dedup in (("flat", 1, c["W"], True), ("node", 8, c["W"] // 8 or 1, True),
                                       ("a2a", 1, c["W"], False)):
        lay = ops.stage_layout(c["dest_TK"], divisor, size, dedup)
        out |= {f"{name}.src_row": lay.src_row_P, f"{name}.mask": lay.mask_PK, f"{name}.counts": lay.send_counts_S}
    exp = ops.expand_layout(c["ids_PK"], c["E"] // c["W"])
    out |= {"expand.src_row": exp.src_row_Q, "expand.src_k": exp.src_k_Q, "expand.counts": exp.counts_e}
    lay = c["lay"]
    x = c["x_TH"].clone().requires_grad_()
    w = c["w_TK"].clone().requires_grad_()
    out["pack_rows"] = ops.pack_rows(x, lay.src_row_P)
    out["pack_route.ids"], out["pack_route.w"] = ops.pack_route(c["ids_TK"], w, lay.src_row_P, lay.mask_PK)
    out["pack_rows.bwd"], out["pack_route.bwd"] = torch.autograd.grad(
        [out["pack_rows"], out["pack_route.w"]], [x, w], [c["g_PH"], c["g_PK"]]
    )
    y = c["y_PH"].clone().requires_grad_()
    out["unpack_sum"] = ops.unpack_sum(y, lay.src_row_P, c["T"])
    (out["unpack_sum.bwd"],) = torch.autograd.grad(out["unpack_sum"], y, c["g_TH"])
    yq, wq = c["y_QH"].clone().requires_grad_(), c["w_Q"].clone().requires_grad_()
    out["combine_rows"] = ops.combine_rows(yq, wq, c["exp"].src_row_Q, c["P"])
    out["combine_rows.bwd_y"], out["combine_rows.bwd_w"] = torch.autograd.grad(out["combine_rows"], [yq, wq], c["g_PH"])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(shapes, dtypes, device, gen) -> list[str]:
    """Compare Triton with the reference on fresh inputs; returns failure messages."""
    failures = []
    for T, H, K, E, W in shapes:
        for dtype in dtypes:
            c = make_case(T, H, K, E, W, dtype, device, gen)
            got, want = run_all(TRITON, c), run_all(reference, c)
            worst = 0.0
            for key, b in want.items():
                a = got[key]
                if a.shape != b.shape or a.dtype != b.dtype:
                    failures.append(f"{key} T={T} H={H} E={E} W={W}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
                elif b.is_floating_point():
                    err = rel_err(a, b)
                    worst = max(worst, err)
                    if err > TOL[dtype]:
                        failures.append(f"{key} T={T} H={H} E={E} W={W} {dtype}: rel err {err:.2e} > {TOL[dtype]:g}")
                elif not torch.equal(a, b):
                    failures.append(f"{key} T={T} H={H} E={E} W={W} {dtype}: integer outputs differ")
            print(f"check T={T:6d} H={H:5d} K={K} E={E:3d} W={W:2d} {str(dtype):15s} worst rel err {worst:.1e}")
            del c, got, want
    return failures


# ----------------------------------------------------------------------------- timing


def timer(device):
    """Median milliseconds of fn: do_bench on a GPU, a plain timer in the interpreter."""
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def plain(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return plain


def copy_bandwidth(device, numel: int, bench) -> float:
    """GB/s of x.clone(): bytes read + bytes written over the median time."""
    x = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    ms = bench(lambda: x.clone())
    return 2 * x.numel() * x.element_size() / ms / 1e6


def bench_case(c: dict, bench) -> list[tuple[str, float, float, float]]:
    """(kernel, ideal bytes, triton ms, torch ms) for every kernel of one configuration."""
    T, H, K, W, P, Q = c["T"], c["H"], c["K"], c["W"], c["P"], c["Q"]
    el = c["x_TH"].element_size()
    lay, exp = c["lay"], c["exp"]
    yq, wq = c["y_QH"].clone().requires_grad_(), c["w_Q"].clone().requires_grad_()
    graphs = {n: ops.combine_rows(yq, wq, exp.src_row_Q, P) for n, ops in (("triton", TRITON), ("torch", reference))}
    jobs = [
        # (name, ideal bytes moved, fn(ops, impl name))
        ("stage_layout", T * K * 8 + P * (8 + K) + W * 8, lambda o, n: o.stage_layout(c["dest_TK"], 1, W, True)),
        ("expand_layout", P * K * 8 + Q * 16, lambda o, n: o.expand_layout(c["ids_PK"], c["E"] // W)),
        ("pack_rows", 2 * P * H * el + P * 8, lambda o, n: o.pack_rows(c["x_TH"], lay.src_row_P)),
        ("pack_route", P * K * (2 * (8 + el) + 1) + P * 8,
         lambda o, n: o.pack_route(c["ids_TK"], c["w_TK"], lay.src_row_P, lay.mask_PK)),
        ("unpack_sum", (P + T) * H * el + P * 8, lambda o, n: o.unpack_sum(c["y_PH"], lay.src_row_P, T)),
        ("combine_rows", (Q + P) * H * el + Q * (8 + el),
         lambda o, n: o.combine_rows(c["y_QH"], c["w_Q"], exp.src_row_Q, P)),
        # Backward through each implementation's own graph: grad_y (gather * w) and grad_w (row dots).
        ("combine_rows.bwd", 3 * Q * H * el + Q * (8 + 2 * el),
         lambda o, n: torch.autograd.grad(graphs[n], [yq, wq], c["g_PH"], retain_graph=True)),
    ]
    rows = []
    for name, nbytes, fn in jobs:
        ms_triton = bench(lambda: fn(TRITON, "triton"))  # noqa: B023  (called before fn changes)
        ms_torch = bench(lambda: fn(reference, "torch"))  # noqa: B023
        rows.append((name, nbytes, ms_triton, ms_torch))
    return rows


# ----------------------------------------------------------------------------- main


def main() -> int:
    small = ARGS.small
    device = torch.device("cpu" if small else "cuda")
    if not small and not torch.cuda.is_available():
        print("no CUDA device: run with --small for the interpreter check on CPU", file=sys.stderr)
        return 2
    seed = ARGS.seed if ARGS.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"device: {torch.cuda.get_device_name() if not small else 'cpu (Triton interpreter)'}, seed {seed}")

    # 1. correctness: odd sizes (prime T, odd H), then a full-width bench shape.
    if small:
        shapes = [(37, 33, 4, 16, 8), (64, 16, 8, 32, 16), (1, 7, 8, 8, 8), (0, 8, 2, 16, 8)]
    else:
        shapes = [(997, 2049, 8, 128, 8), (4096, 7168, 8, 256, 32), (1, 7168, 8, 256, 8), (0, 2048, 8, 128, 8)]
    failures = check(shapes, [torch.float32, torch.bfloat16], device, gen)
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print("correctness: all kernels match the reference (integers exact, fp32 <= 1e-6, bf16 <= 1e-2)")

    # 2. copy bandwidth, 3. kernels.
    bench = timer(device)
    copy_gbs = copy_bandwidth(device, 2**12 if small else 2**29, bench)
    print(f"copy bandwidth (x.clone(), bf16): {copy_gbs:.0f} GB/s")
    T, K = (64, 8) if small else (16384, 8)
    if small:
        configs = [(16, 32, 8), (33, 64, 32)]
    else:
        configs = [(H, E, W) for H in (2048, 7168) for E in (128, 256) for W in (8, 32)]
    header = "| H | E | ranks | kernel | rows P / Q | Triton ms | torch ms | Triton GB/s | frac copy BW | speedup |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header)
    for H, E, W in configs:
        c = make_case(T, H, K, E, W, torch.bfloat16, device, gen)
        for name, nbytes, ms_t, ms_r in bench_case(c, bench):
            gbs = nbytes / ms_t / 1e6
            line = (f"| {H} | {E} | {W} | {name} | {c['P']} / {c['Q']} | {ms_t:.3f} | {ms_r:.3f} | {gbs:.4g} | "
                    f"{gbs / copy_gbs:.2f} | {ms_r / ms_t:.1f}x |")
            lines.append(line)
            print(line, flush=True)
        del c
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "SMALL (CPU, Triton interpreter; timings meaningless for a GPU)" if small else "GPU"
    with out.open("w") as f:
        f.write(f"# bench_kernels results ({mode})\n\n")
        f.write(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n")
        f.write(f"- command: `python scripts/bench_kernels.py{' --small' if small else ''}`\n")
        f.write(f"- device: {torch.cuda.get_device_name() if not small else 'cpu'}; torch {torch.__version__}, "
                f"triton {triton.__version__}; seed {seed}\n")
        f.write(f"- T={T} tokens per rank, K={K}, bf16, contiguous placement; flat stage (dedup) layout\n")
        f.write(f"- copy bandwidth (x.clone()): {copy_gbs:.0f} GB/s; GB/s below = ideal bytes moved / median time\n")
        f.write("- correctness phase passed: integers exact, fp32 <= 1e-6, bf16 <= 1e-2 relative\n\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
