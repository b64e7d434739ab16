#!/usr/bin/env python
"""Compile every Triton kernel specialisation the launchers produce for real GPUs, without a GPU.

Method (GPU_REVIEW.md section 1): the kernels are replaced in their modules by recorders and the
public ops run on CPU tensors with the launchers' CUDA block sizes; every recorded launch is
specialised as ``JITFunction.run`` does on a GPU (Triton's own binder: pointer dtypes, i32/i64 ints,
divisibility-16 hints, ints equal to 1 as constexprs, ``do_not_specialize`` honoured) and compiled by
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` down to cubin with the ptxas shipped in the
Triton wheel. Reports registers, spill bytes and shared memory per variant (ptxas -v), checks the
grids against CUDA limits and that every kernel in the modules was reached.

Shapes like real use: DeepSeek-V3 (H=7168, K=8, 256 experts), Qwen3-235B (H=4096, 128 experts),
gpt-oss (H=2880, not a multiple of 1024), fp32/bf16/fp16 rows (fp64 as a test-only dtype), int32
and int64 ids, 1-token decode, top-1, one local expert (S=1), a 64-rank flat stage, and a 40k-token
hot rank (Q*H > 2^31 elements; its big tensors are never touched).

    python scripts/aot_triton.py [--archs 90,80,100] [--json out.json]

Exit status 1 on a compile failure, a grid over the limits, an unreached kernel or a register spill
in a production (non-fp64) variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (JITFunction), not the interpreter
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="hiermoe-aot-cache-"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hiermoe_hf.kernels import (  # noqa: E402
    reference,
    triton_clock,
    triton_combine,
    triton_layout,
    triton_pack,
    triton_rows,
    triton_util,
)

MODULES = (triton_rows, triton_pack, triton_combine, triton_layout, triton_clock)
GRID_LIMITS = (2**31 - 1, 65535, 65535)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args)`` records the launch and runs nothing."""

    def __init__(self, name: str, kernel: JITFunction, log: list, scenario: list):
        self.name, self.kernel, self.log, self.scenario = name, kernel, log, scenario

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grid_t = tuple(grid) + (1,) * (3 - len(grid))
            self.log.append((self.name, self.kernel, grid_t, args, kwargs, self.scenario[0]))

        return launch


@contextlib.contextmanager
def recording(log: list, scenario: list):
    """Kernels replaced by recorders, CUDA block sizes, tensor checks off (CPU tensors stand in)."""
    saved = []

    def put(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                put(module, name, Recorder(name, obj, log, scenario))
        if hasattr(module, "check_tensor"):
            put(module, "check_tensor", lambda t: None)
        if hasattr(module, "row_blocks"):
            orig = triton_util.row_blocks
            put(module, "row_blocks", lambda rows, width, device, _o=orig: _o(rows, width, torch.device("cuda")))
    orig_blocks = triton_layout._blocks
    put(triton_layout, "_blocks", lambda rows, S, device: orig_blocks(rows, S, torch.device("cuda")))
    put(torch, "_assert_async", lambda *a, **k: None)  # block counts are never computed here
    put(triton_util, "interpreting", lambda: False)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _ops_pass(R: int, K: int, H: int, S: int, divisor: int, e: int, dtype, id_dtype, dedup: bool, w_dtype=None):
    """Every public op forward and backward on one rank's rows, as the dispatcher calls them."""
    g = torch.Generator().manual_seed(R * 31 + K)
    dest = torch.randint(-1, S * divisor, (R, K), generator=g).to(id_dtype)
    # The recorded layouts run no kernel: their launches are recorded, the reference's indices used.
    lay = reference.stage_layout(dest.long(), divisor, S, dedup)
    triton_layout.stage_layout(dest, divisor, S, dedup, size=int(lay.send_counts_S.sum()))
    x = torch.empty(R, H, dtype=dtype, requires_grad=True)
    w = torch.empty(R, K, dtype=w_dtype or dtype, requires_grad=True)
    xp = triton_pack.pack_rows(x, lay.src_row_P)
    _, wp = triton_pack.pack_route(dest.long(), w, lay.src_row_P, lay.mask_PK)
    phys = torch.randint(-1, e, (R, K), generator=g).to(id_dtype)
    ex = reference.expand_layout(phys.long(), e)
    triton_layout.expand_layout(phys, e, size=int(ex.counts_e.sum()))
    Q = ex.src_row_Q.numel()
    y = torch.empty(Q, H, dtype=dtype, requires_grad=True)
    wq = torch.empty(Q, dtype=w_dtype or dtype, requires_grad=True)
    out = triton_combine.combine_rows(y, wq, ex.src_row_Q, R)
    back = triton_combine.unpack_sum(xp, lay.src_row_P, R)
    torch.autograd.backward([out, back, wp], [torch.empty_like(out), torch.empty_like(back), torch.empty_like(wp)])
    triton_combine.combine_backward(torch.empty(R, H, dtype=dtype), y.detach(), wq.detach(), ex.src_row_Q, True, False)
    triton_combine.combine_backward(torch.empty(R, H, dtype=dtype), y.detach(), wq.detach(), ex.src_row_Q, False, True)


def _hot_rank(H: int = 7168, tokens: int = 40000, K: int = 8, dtype=torch.bfloat16):
    """40k tokens x top-8 all on one rank: Q*H > 2^31 elements; big tensors allocated, never touched."""
    Q = tokens * K
    src = torch.randint(0, tokens, (Q,), generator=torch.Generator().manual_seed(7))
    y = torch.empty(Q, H, dtype=dtype)
    triton_rows.gather_rows(torch.empty(tokens, H, dtype=dtype), src)
    triton_rows.segment_sum(y, src, tokens, w_Q=torch.empty(Q, dtype=dtype))
    triton_combine.combine_backward(torch.empty(tokens, H, dtype=dtype), y, torch.empty(Q, dtype=dtype), src)


SCENARIOS = {
    # name: kwargs of _ops_pass (R rows, K, H, S group members, divisor, e local experts, dtypes, dedup)
    "dsv3_8x8_node_stage_bf16": dict(R=512, K=8, H=7168, S=8, divisor=8, e=32, dtype=torch.bfloat16,
                                     id_dtype=torch.int64, dedup=True, w_dtype=torch.float32),
    "dsv3_flat64_a2a_bf16": dict(R=256, K=8, H=7168, S=64, divisor=1, e=4, dtype=torch.bfloat16,
                                 id_dtype=torch.int64, dedup=False, w_dtype=torch.float32),
    "dsv3_flat64_hd1_bf16": dict(R=256, K=8, H=7168, S=64, divisor=1, e=4, dtype=torch.bfloat16,
                                 id_dtype=torch.int64, dedup=True, w_dtype=torch.float32),
    "qwen3_235b_2dh_bf16": dict(R=384, K=8, H=4096, S=8, divisor=1, e=16, dtype=torch.bfloat16,
                                id_dtype=torch.int64, dedup=False),
    "qwen3_30b_fp16_int32": dict(R=300, K=8, H=2048, S=4, divisor=2, e=32, dtype=torch.float16,
                                 id_dtype=torch.int32, dedup=True),
    "gpt_oss_fp32": dict(R=200, K=4, H=2880, S=8, divisor=1, e=4, dtype=torch.float32,
                         id_dtype=torch.int64, dedup=True),
    "mixtral_one_local_expert_S1": dict(R=128, K=2, H=4096, S=1, divisor=8, e=1, dtype=torch.bfloat16,
                                        id_dtype=torch.int64, dedup=True),
    "decode_one_token": dict(R=1, K=8, H=7168, S=8, divisor=1, e=32, dtype=torch.bfloat16,
                             id_dtype=torch.int64, dedup=True),
    "top1": dict(R=256, K=1, H=4096, S=8, divisor=1, e=16, dtype=torch.bfloat16, id_dtype=torch.int64,
                 dedup=False),
    "flat256_experts32": dict(R=64, K=8, H=1024, S=256, divisor=1, e=32, dtype=torch.bfloat16,
                              id_dtype=torch.int64, dedup=True),
    "fp64_test_only": dict(R=64, K=2, H=64, S=2, divisor=1, e=4, dtype=torch.float64, id_dtype=torch.int64,
                           dedup=True),
}


def record_launches() -> list:
    log, scenario = [], [""]
    with recording(log, scenario):
        for name, kw in SCENARIOS.items():
            scenario[0] = name
            _ops_pass(**kw)
        scenario[0] = "hot_rank_40k_tokens"
        _hot_rank()
        scenario[0] = "device_clock"
        triton_clock._stamp_kernel[(1,)](torch.empty(1, dtype=torch.int64))
    return log


def specialise(kernel: JITFunction, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _fp64(signature: dict) -> bool:
    return any("fp64" in str(v) for v in signature.values())


_LOG: list = []  # the recorded launches, inherited by the forked per-arch workers


def _compile_arch(arch: int) -> list[dict]:
    """Every distinct specialisation of the recorded launches compiled for sm_``arch``."""
    knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen, variants = {}, []
    for name, kernel, _grid, args, kwargs, sc in _LOG:
        sig, constexprs, attrs, options = specialise(kernel, args, kwargs, backend)
        key = (name, repr(sorted(sig.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
        if key in seen:
            seen[key]["scenarios"].add(sc)
            continue
        row = {"arch": arch, "kernel": name, "scenarios": {sc}, "fp64": _fp64(sig),
               "constexprs": {str(k): str(v) for k, v in constexprs.items()}}
        seen[key] = row
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target,
                                          options=options.__dict__)
            ptxas = out.getvalue()
            regs = [int(m) for m in re.findall(r"Used (\d+) registers", ptxas)]
            spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                              ptxas)]
            row.update(ok="cubin" in compiled.asm, regs=max(regs or [-1]), spill_bytes=max(spill or [0]),
                       shared=compiled.metadata.shared)
        except Exception as err:  # noqa: BLE001  (reported, then the run fails)
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:400]}")
        variants.append(row)
    for row in variants:
        row["scenarios"] = sorted(row["scenarios"])
    return variants


def compile_all(archs: list[int]) -> dict:
    """Record once, then compile each arch in its own forked process (they run side by side)."""
    import multiprocessing as mp

    started = time.time()
    _LOG[:] = record_launches()
    reached = {name for name, *_ in _LOG}
    defined = {n for m in MODULES for n, o in vars(m).items() if isinstance(o, JITFunction) and n.endswith("_kernel")}
    grid_bad = [(name, grid, sc) for name, _, grid, _, _, sc in _LOG
                if not all(0 < g <= lim for g, lim in zip(grid, GRID_LIMITS))]
    max_grid = {}
    for name, _, grid, *_ in _LOG:
        max_grid[name] = tuple(max(a, b) for a, b in zip(max_grid.get(name, (0, 0, 0)), grid))
    with mp.get_context("fork").Pool(len(archs)) as pool:
        variants = [row for rows in pool.map(_compile_arch, archs) for row in rows]
    return {
        "archs": archs, "launches": len(_LOG), "variants": variants,
        "failures": [r for r in variants if not r.get("ok")],
        "unreached": sorted(defined - reached), "grid_over_limits": grid_bad, "max_grid": max_grid,
        "production_spills": [r for r in variants if r.get("spill_bytes") and not r["fp64"]],
        "seconds": round(time.time() - started, 1),
        "ptxas": {a: get_ptxas_path(a) for a in archs},
    }


def get_ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def table(result: dict) -> str:
    lines = [f"{'arch':>4} {'kernel':<22} {'regs':>4} {'spill':>5} {'smem':>6} {'ok':>3}  constexprs / scenarios"]
    for r in sorted(result["variants"], key=lambda r: (r["arch"], r["kernel"], -r.get("regs", 0))):
        ce = ",".join(f"{v}" for v in r["constexprs"].values())
        lines.append(f"{r['arch']:>4} {r['kernel']:<22} {r.get('regs', -1):>4} {r.get('spill_bytes', -1):>5} "
                     f"{r.get('shared', -1):>6} {'yes' if r.get('ok') else 'NO':>3}  [{ce}] {r['scenarios'][0]}"
                     + (" (fp64)" if r["fp64"] else ""))
    lines.append(f"{len(result['variants'])} variants from {result['launches']} launches in {result['seconds']} s; "
                 f"failures {len(result['failures'])}, production spills {len(result['production_spills'])}, "
                 f"unreached {result['unreached']}, grids over limits {len(result['grid_over_limits'])}; "
                 f"largest grids {result['max_grid']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="90,80,100", help="comma-separated compute capabilities (x10)")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args()
    for arch in (int(x) for x in a.archs.split(",")):
        path = get_ptxas_path(arch)
        if not os.path.exists(path):
            print(f"ptxas for sm_{arch} missing from the Triton wheel: {path}")
            return 2
    result = compile_all([int(x) for x in a.archs.split(",")])
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    bad = result["failures"] or result["unreached"] or result["grid_over_limits"] or result["production_spills"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
