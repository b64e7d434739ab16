"""GPU-only paths checked on CPU (issue 18 item 1, GPU_REVIEW.md section 2).

No GPU has run the package: each finding is pinned by what CPU code can observe. The grouped GEMM's
choice is a rule on (capability, dtype) tested with the capability faked (#5); the experts' GEMM
dtype is read off the ATen calls (#2); every Triton launch must happen under its tensor's device
guard (#4, the guard recorded around each launch); a group of one launches no layout kernel (#11);
a count-exchange size the layout disagrees with fails on the device instead of writing past the
buffers (#13); data-dependent sizes are not specialised (#14); devices come from the data (#8, #9,
pure rules); the collective save runs without plain send/recv (#7, 2 gloo ranks); a priced ``auto``
launches no device kernel to price and the count exchange's kernels do not grow with the chunks (#3,
launches counted by ``sync_watch``).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from sync_watch import SyncWatch
from torch.utils._python_dispatch import TorchDispatchMode

import hiermoe_hf
from hiermoe_hf.cost.auto import Priced
from hiermoe_hf.cost.model import default_cost_model
from hiermoe_hf.exchange import experts as experts_mod
from hiermoe_hf.exchange.devices import choose_comm_device, fsdp2_device_map
from hiermoe_hf.exchange.layer_counts import exchange_chunk_counts
from hiermoe_hf.kernels import TORCH_OPS, reference, triton_combine, triton_layout, triton_pack, triton_rows
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
from hiermoe_hf.topology import Topology

KERNELS = {
    triton_rows: ("_gather_rows_kernel", "_segment_sum_kernel"),
    triton_pack: ("_pack_route_kernel",),
    triton_combine: ("_combine_bwd_kernel",),
    triton_layout: ("_layout_count_kernel", "_layout_write_kernel"),
}
DATA_SIZES = {"_gather_rows_kernel": "P", "_segment_sum_kernel": "num_rows", "_pack_route_kernel": "P",
              "_combine_bwd_kernel": "Q", "_layout_count_kernel": "R", "_layout_write_kernel": "R"}


def _fake_experts(dtype: torch.dtype, device: str):
    w = SimpleNamespace(device=torch.device(device), dtype=dtype)
    return SimpleNamespace(gate_up_proj=w, down_proj=w, config=None, has_gate=True, has_bias=False, is_transposed=False)


@pytest.mark.parametrize("cap,dtype,want", [
    ((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True), ((9, 0), torch.float32, False),
    ((9, 0), torch.float16, False), ((8, 0), torch.bfloat16, False), ((8, 9), torch.bfloat16, False),
    ((12, 0), torch.bfloat16, False),
])
def test_grouped_gemm_only_on_its_fast_path(monkeypatch, cap, dtype, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    x = torch.empty(2, 4, dtype=dtype)
    assert experts_mod.can_group(_fake_experts(dtype, "cuda"), x) is want


def test_grouped_gemm_on_cpu_as_before():
    for dtype in (torch.float32, torch.bfloat16):
        assert experts_mod.can_group(_fake_experts(dtype, "cpu"), torch.empty(2, 4, dtype=dtype))
    assert not experts_mod.can_group(_fake_experts(torch.float64, "cpu"), torch.empty(2, 4, dtype=torch.float64))


class _GemmDtypes(TorchDispatchMode):
    GEMMS = {"_grouped_mm", "mm", "addmm", "bmm", "linear", "matmul"}

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.GEMMS:
            self.seen.add(tuple(a.dtype for a in args[:2] if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouped", [True, False])
def test_bf16_rows_on_fp32_experts_run_bf16_gemms(grouped):
    """FSDP2 mixed precision: bf16 rows reach fp32 expert slices; the GEMMs run in bf16 (#2)."""
    model = build_model(tiny_qwen3_moe_config())
    experts = model.model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, experts.gate_up_proj.shape[-1], generator=g).to(torch.bfloat16)
    ids = torch.randint(0, E, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g).to(torch.bfloat16)
    with _GemmDtypes() as mode:
        y, _ = experts_mod.local_experts_forward(experts, x, ids, w, E, TORCH_OPS, grouped=grouped)
    assert mode.seen == {(torch.bfloat16, torch.bfloat16)}, mode.seen
    want = experts_mod.local_experts_forward(experts, x.float(), ids, w.float(), E, TORCH_OPS, grouped=grouped)[0]
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())  # bf16 GEMMs


class _Launches:
    """Replaces the kernels: records, per launch, whether it happened inside a device guard."""

    def __init__(self, monkeypatch, guarded: list):
        self.log: list[tuple[str, bool]] = []
        self.guarded = guarded
        for module, names in KERNELS.items():
            for name in names:
                monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))
            if hasattr(module, "device_guard"):
                monkeypatch.setattr(module, "device_guard", self._guard)

    @contextlib.contextmanager
    def _guard(self, t):
        self.guarded.append(t.device)
        try:
            yield
        finally:
            self.guarded.pop()

    def _wrap(self, name, kernel):
        log, guarded = self.log, self.guarded

        class Rec:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    log.append((name, bool(guarded) and guarded[-1] == tensors[0].device))
                    return kernel[grid](*args, **kwargs)
                return launch

        return Rec()


def _all_ops():
    g = torch.Generator().manual_seed(1)
    dest = torch.randint(-1, 4, (7, 3), generator=g)
    lay = triton_layout.stage_layout(dest, 1, 4, True)
    x = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.rand(7, 3, generator=g, requires_grad=True)
    xp = triton_pack.pack_rows(x, lay.src_row_P)
    _, wp = triton_pack.pack_route(dest, w, lay.src_row_P, lay.mask_PK)
    ex = triton_layout.expand_layout(dest.clamp(min=-1), 2)
    y = triton_combine.combine_rows(torch.randn(ex.src_row_Q.numel(), 5, generator=g, requires_grad=True),
                                    torch.rand(ex.src_row_Q.numel(), generator=g, requires_grad=True), ex.src_row_Q, 7)
    out = triton_combine.unpack_sum(xp, lay.src_row_P, 7)
    (out.sum() + wp.sum() + y.sum()).backward()


def test_every_triton_launch_is_under_its_tensors_device(monkeypatch):
    launches = _Launches(monkeypatch, [])
    _all_ops()
    names = {n for n, _ in launches.log}
    assert names == set(DATA_SIZES), names  # every kernel launched
    assert all(ok for _, ok in launches.log), [n for n, ok in launches.log if not ok]


def test_one_member_layouts_launch_no_kernel_and_equal_the_reference(monkeypatch):
    launches = _Launches(monkeypatch, [])
    dest = torch.randint(-1, 8, (9, 3), generator=torch.Generator().manual_seed(2))
    for dedup in (True, False):
        got, want = triton_layout.stage_layout(dest, 8, 1, dedup), reference.stage_layout(dest, 8, 1, dedup)
        assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in got.__dataclass_fields__)
    got, want = triton_layout.expand_layout(dest.clamp(max=0), 1), reference.expand_layout(dest.clamp(max=0), 1)
    assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in got.__dataclass_fields__)
    assert launches.log == []


@pytest.mark.parametrize("S,dedup", [(1, True), (4, True), (4, False)])
def test_layout_size_disagreeing_with_the_count_exchange_fails_on_device(S, dedup):
    dest = torch.randint(-1, 4, (9, 3), generator=torch.Generator().manual_seed(3))
    P = int(reference.stage_layout(dest, 1, S, dedup).send_counts_S.sum())
    triton_layout.stage_layout(dest, 1, S, dedup, size=P)  # the right size passes
    with pytest.raises(RuntimeError, match="count exchange"):
        triton_layout.stage_layout(dest, 1, S, dedup, size=P + 1)


def test_data_dependent_sizes_are_not_specialised():
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name)
            dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
            assert DATA_SIZES[name] in (dns or ()), (name, dns)


def test_comm_device_comes_from_the_data():
    cuda3, cuda1 = torch.device("cuda", 3), torch.device("cuda", 1)
    assert choose_comm_device("gloo", cuda3, None, 0) == torch.device("cpu")
    assert choose_comm_device("nccl", cuda3, cuda1, 0) == cuda3  # the model's GPU first
    assert choose_comm_device("nccl", torch.device("cpu"), cuda1, 0) == cuda1  # then the group's bound device
    assert choose_comm_device("nccl", None, None, 2) == torch.device("cuda", 2)
    assert fsdp2_device_map(None, "nccl", cuda3) == {"": cuda3}  # weights land on this rank's GPU
    assert fsdp2_device_map("cpu", "nccl", cuda3) == "cpu" and fsdp2_device_map(None, "gloo", None) is None


def _rank_save_without_plain_p2p(folder: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("plain send/recv: one NCCL communicator per rank pair")

    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig())
    saved = dist.send, dist.recv
    dist.send = dist.recv = refuse
    try:
        model.save_pretrained(folder, max_shard_size="40KB")
    finally:
        dist.send, dist.recv = saved


def test_collective_save_batches_its_point_to_point(ranks, tmp_path):
    ranks(2).run(_rank_save_without_plain_p2p, str(tmp_path / "ours"))
    build_model(tiny_qwen3_moe_config()).save_pretrained(str(tmp_path / "plain"), max_shard_size="40KB")
    ours, theirs = (sorted(os.listdir(tmp_path / d)) for d in ("ours", "plain"))
    assert ours == theirs
    for f in ours:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f


class _CountOnly:
    """A choice that counts ``Priced``'s candidates and prices nothing: the launches of counting alone."""

    def __init__(self, candidates: tuple[str, ...]):
        self.counting = candidates

    def extra(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=device)

    def pick(self, summed_extra, counted):
        return self.counting[0], None


def _count_exchange(choice, topo: Topology, dest_TK: torch.Tensor, chunks: int):
    """(launches, reads, syncs, strategy) of one layer's count exchange on one rank (no group)."""
    watch = SyncWatch()
    with watch.installed(), watch.counting():
        out = exchange_chunk_counts(topo, None, 0, choice, list(torch.tensor_split(dest_TK, chunks)), 4096)
    return watch.launches, watch.total("read"), watch.total("sync"), out[0].strategy


def test_priced_auto_launches_nothing_to_price_and_chunks_count_in_one_pass():
    """GPU_REVIEW #3: pricing every candidate on the device launched hundreds of small kernels per
    layer before its one read, and every chunk counted its rows apart. The counts come back in the
    read anyway: pricing them on the host adds no device launch, and the chunks share one pass."""
    topo = Topology((8, 8))
    dest_TK = torch.randint(-1, topo.world_size, (512, 8), generator=torch.Generator().manual_seed(0))
    candidates = tuple(topo.strategies())
    priced = Priced(candidates, default_cost_model(topo))
    launches = {}
    for chunks in (1, 4):
        counting = _count_exchange(_CountOnly(candidates), topo, dest_TK, chunks)[0]
        launches[chunks], reads, syncs, strategy = _count_exchange(priced, topo, dest_TK, chunks)
        assert (launches[chunks], reads, syncs) == (counting, 1, 0), (chunks, launches, counting, reads, syncs)
        assert strategy in candidates
    assert launches[4] < 1.5 * launches[1], launches  # 4 chunks counted apart: about 4x
