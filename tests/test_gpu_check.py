"""scripts/gpu_check runs its CPU-checkable parts (grouped GEMM vs loop, the one-rank layer path vs
Transformers' experts, fp32 experts, the one-rank world exchange on gloo) so the GPU script cannot
rot between GPU runs; without a GPU and without --cpu it refuses with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check"), *args, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def test_gpu_check_cpu_parts(tmp_path):
    p = _run("--cpu", out=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["ok"] and res["grouped_vs_loop"]["grouped_available"]
    assert res["grouped_vs_loop"]["rel_diff"] <= 1e-5
    assert res["layer_torch"]["rel_diff_vs_transformers"] <= 1e-5
    assert res["layer_fp32_experts"]["ok"]
    # the one-rank world (gloo here): every stage a real collective, hd1/hd2 x 1/2/4 chunks, idle and busy
    cases = res["world_exchange"]["cases"]
    assert len(cases) == 12 and all(c["ok"] for c in cases), cases
    assert {(c["strategy"], c["chunks"], c["busy"]) for c in cases} == {
        (s, c, b) for s in ("hd1", "hd2") for c in (1, 2, 4) for b in (False, True)}


def test_only_sync_warnings_count():
    """GPU_REVIEW.md #17: a harmless UserWarning is not a synchronisation."""
    import warnings

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check_ranks import sync_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("some deprecation", UserWarning, stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
    assert sync_warnings(caught) == ["called a synchronizing CUDA operation"]


class _Stop(Exception):
    pass


def test_one_rank_nccl_world_binds_an_indexed_gpu(monkeypatch):
    """gpu_check passes ``torch.device("cuda")``; ``init_process_group(device_id=...)`` refuses a GPU
    without an index ("Please use a device_id with index."), which would fail phase (a) on the GPU."""
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check_ranks import world_exchange

    seen = {}

    def init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        world_exchange(torch.device("cuda"), torch.bfloat16, {}, "triton", 1)
    except _Stop:
        pass
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 0), seen


def test_gpu_check_refuses_without_gpu(tmp_path):
    if torch.cuda.is_available():
        return
    p = _run(out=tmp_path)
    assert p.returncode == 2 and "--cpu" in p.stderr
