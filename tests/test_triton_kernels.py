"""Triton dispatch kernels vs their torch references, in Triton's CPU interpreter (issue 3).

Integers must match exactly (order included); floats within max|a - b| / max|b| <= 1e-6 (fp32),
1e-12 (fp64), 1e-2 (bf16, fp16); backward grads are compared with the reference's autograd grads.
Sizes are tiny and blocks large: interpreter time grows with programs x loop steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any hiermoe_hf.kernels.triton_* import

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hiermoe_hf.kernels import reference, select_ops, triton_ops, triton_util  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TRITON = select_ops("triton", torch.device("cpu"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if b.numel() == 0:
        return 0.0
    scale = b.double().abs().max().clamp_min(1e-30)
    return ((a.double() - b.double()).abs().max() / scale).item()


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key], want[key]
        if b.is_floating_point():
            assert rel_err(a, b) <= TOL[b.dtype], f"{key}: rel err {rel_err(a, b):.2e} ({b.dtype})"
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), f"{key} differs:\n{a}\n{b}"


def routing(T: int, K: int, E: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """topk_ids_TK int64: distinct experts per token; 'one' forces every token onto expert 3."""
    scores_TE = torch.rand(T, E, generator=gen)
    if mode == "one":
        scores_TE[:, 3] += 2.0
    return scores_TE.topk(K, dim=1).indices


# (T, H, K, E, W, mode): empty, one token, K=E, prime T + odd H, K=1, all on one expert (so most
# members receive nothing), and a bigger one that spans several programs under BLOCK_ROWS_OVERRIDE.
CASES = [
    (0, 8, 2, 8, 4, "rand"),
    (1, 5, 8, 8, 8, "rand"),
    (13, 7, 16, 16, 4, "rand"),
    (37, 33, 4, 16, 8, "rand"),
    (53, 64, 1, 16, 4, "rand"),
    (31, 17, 1, 16, 8, "one"),
    (29, 9, 3, 32, 8, "one"),
]
DTYPES = [torch.float32, torch.bfloat16]


def pipeline(ops, ids_TK: torch.Tensor, W: int, E: int, dedup: bool, inputs: dict) -> dict:
    """One rank's dispatch -> expert -> combine path through ``ops``, with all grads taken."""
    T, K = ids_TK.shape
    dest_TK = ids_TK // (E // W)
    dest_TK[inputs["drop_TK"]] = -1  # selections an earlier stage already served
    out = {}
    # Two-level placement [2, W/2]: stage 1 between halves (divisor W/2), stage 2 inside (divisor 1).
    for name, divisor, size in (("flat", 1, W), ("node", W // 2, 2), ("local", 1, W // 2)):
        lay = ops.stage_layout(dest_TK, divisor, size, dedup)
        out |= {f"{name}.src_row": lay.src_row_P, f"{name}.mask": lay.mask_PK, f"{name}.counts": lay.send_counts_S}
    lay = ops.stage_layout(dest_TK, 1, W, dedup)
    x_TH = inputs["x_TH"].clone().requires_grad_()
    w_TK = inputs["w_TK"].clone().requires_grad_()
    x_PH = ops.pack_rows(x_TH, lay.src_row_P)
    ids_PK, w_PK = ops.pack_route(ids_TK, w_TK, lay.src_row_P, lay.mask_PK)
    P = x_PH.shape[0]
    gen = torch.Generator().manual_seed(P)
    g_PH = torch.randn(P, x_TH.shape[1], generator=gen).to(x_TH.dtype)
    g_PK = torch.randn(P, K, generator=gen).to(w_TK.dtype)
    out["x_PH"], out["ids_PK"], out["w_PK"] = x_PH, ids_PK, w_PK
    out["grad_x"], out["grad_w"] = torch.autograd.grad([x_PH, w_PK], [x_TH, w_TK], [g_PH, g_PK])

    # Received rows: the packed rows themselves; local experts e = E / W, slot = id % e.
    exp = ops.expand_layout(ids_PK, E // W)
    out |= {"src_row_Q": exp.src_row_Q, "src_k_Q": exp.src_k_Q, "counts_e": exp.counts_e}
    Q = exp.src_row_Q.shape[0]
    y_QH = torch.randn(Q, x_TH.shape[1], generator=gen).to(x_TH.dtype).requires_grad_()
    wq_Q = torch.rand(Q, generator=gen).to(w_TK.dtype).requires_grad_()
    back_PH = ops.combine_rows(y_QH, wq_Q, exp.src_row_Q, P)
    g_back = torch.randn(back_PH.shape, generator=gen).to(back_PH.dtype)
    out["combined"] = back_PH
    out["grad_yq"], out["grad_wq"] = torch.autograd.grad(back_PH, [y_QH, wq_Q], g_back)

    y_PH = torch.randn(P, x_TH.shape[1], generator=gen).to(x_TH.dtype).requires_grad_()
    out["unpacked"] = ops.unpack_sum(y_PH, lay.src_row_P, T)
    g_TH = torch.randn(out["unpacked"].shape, generator=gen).to(x_TH.dtype)
    (out["grad_yp"],) = torch.autograd.grad(out["unpacked"], y_PH, g_TH)
    return out


def make_inputs(T, H, K, dtype, gen):
    return {
        "x_TH": torch.randn(T, H, generator=gen).to(dtype),
        "w_TK": torch.rand(T, K, generator=gen).to(dtype),
        "drop_TK": torch.rand(T, K, generator=gen) < 0.15,
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "per_sel"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_H{}_K{}_E{}_W{}_{}".format(*c))
def test_pipeline_matches_reference(case, dedup, dtype):
    T, H, K, E, W, mode = case
    gen = torch.Generator().manual_seed(100 * CASES.index(case) + dedup)
    ids_TK = routing(T, K, E, mode, gen)
    inputs = make_inputs(T, H, K, dtype, gen)
    assert_same(pipeline(TRITON, ids_TK, W, E, dedup, inputs), pipeline(reference, ids_TK, W, E, dedup, inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(7)
    ids_TK = routing(23, 4, 16, "rand", gen)
    inputs = make_inputs(23, 19, 4, dtype, gen)
    assert_same(pipeline(TRITON, ids_TK, 8, 16, True, inputs), pipeline(reference, ids_TK, 8, 16, True, inputs))


@pytest.mark.parametrize("block_rows,block_w,T,H", [(4, 8, 23, 21), (16, 16, 61, 40)])
def test_many_programs(monkeypatch, block_rows, block_w, T, H):
    """Small blocks: offsets carried across programs, partial last blocks, H split over programs."""
    monkeypatch.setattr(triton_util, "BLOCK_ROWS_OVERRIDE", block_rows)
    monkeypatch.setattr(triton_util, "BLOCK_W_OVERRIDE", block_w)
    gen = torch.Generator().manual_seed(block_rows)
    ids_TK = routing(T, 4, 32, "rand", gen)
    inputs = make_inputs(T, H, 4, torch.float32, gen)
    for dedup in (True, False):
        want = pipeline(reference, ids_TK, 8, 32, dedup, inputs)
        assert_same(pipeline(TRITON, ids_TK, 8, 32, dedup, inputs), want)


def test_mixed_dtypes_combine():
    """bf16 expert outputs with fp32 routing weights: grads come back in each input's dtype."""
    gen = torch.Generator().manual_seed(3)
    y_QH = torch.randn(40, 12, generator=gen).bfloat16()
    w_Q = torch.rand(40, generator=gen)
    dst_Q = torch.randint(0, 9, (40,), generator=gen)
    g = torch.randn(11, 12, generator=gen).bfloat16()
    res = []
    for ops in (TRITON, reference):
        y, w = y_QH.clone().requires_grad_(), w_Q.clone().requires_grad_()
        out = ops.combine_rows(y, w, dst_Q, 11)
        res.append({"out": out, **dict(zip(("gy", "gw"), torch.autograd.grad(out, [y, w], g)))})
    assert_same(*res)


def test_nothing_received():
    """A rank that receives no rows still returns zero rows for its tokens, and zero grads."""
    res = []
    for ops in (TRITON, reference):
        y, w = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, requires_grad=True)
        idx = torch.zeros(0, dtype=torch.int64)
        out = {"combined": ops.combine_rows(y, w, idx, 3), "unpacked": ops.unpack_sum(y, idx, 4)}
        gy, gw = torch.autograd.grad(out["combined"].sum() + out["unpacked"].sum(), [y, w])
        res.append(out | {"gy": gy, "gw": gw})
    assert_same(*res)


def test_layout_edges():
    """All selections absent (-1), a single member."""
    for dest_TK, div, S in [
        (torch.full((5, 3), -1), 1, 4),
        (torch.tensor([[0, 1], [1, 0], [0, 0]]), 2, 1),
    ]:
        for dedup in (True, False):
            a, b = TRITON.stage_layout(dest_TK, div, S, dedup), reference.stage_layout(dest_TK, div, S, dedup)
            for name in ("src_row_P", "mask_PK", "send_counts_S"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (name, dest_TK, dedup)
                assert getattr(a, name).shape == getattr(b, name).shape
        a, b = TRITON.expand_layout(dest_TK, S), reference.expand_layout(dest_TK, S)
        for name in ("src_row_Q", "src_k_Q", "counts_e"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_selection():
    assert TRITON.name == "triton"
    assert select_ops("triton", torch.device("cpu")).name == "triton"
    assert select_ops("auto", torch.device("cpu")).name == "torch"
    assert select_ops("torch", torch.device("cpu")).name == "torch"


def test_require_fails_clearly_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(triton_util, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_ops.ops() is None
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        select_ops("triton", torch.device("cpu"))
    assert select_ops("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(RuntimeError, match="compiled for CUDA"):
        TRITON.pack_rows(torch.zeros(2, 2), torch.zeros(1, dtype=torch.int64))


def test_bench_small_runs(tmp_path):
    out = tmp_path / "bench.md"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_kernels.py"), "--small", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "pack_rows" in text and "combine_rows" in text and "GB/s" in text
