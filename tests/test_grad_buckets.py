"""Gradient all-reduces in bounded buckets (issue 18 item 6, GPU_REVIEW.md #6), on 2 gloo ranks.

``all_reduce_gradients`` (dense grads over the world) and ``sync_expert_grads`` (expert grads over
the replicas, ep_size=1 here) used to flatten every gradient of a dtype into one new buffer: a
transient copy the size of the gradients. The meter below sees every tensor storage ATen allocates
during the call (outputs of non-aliasing ops, freed when their storage dies) and keeps the peak of
the live bytes: with a bucket many times smaller than the gradients it must stay within one bucket.
The oracle of the values is a plain ``dist.all_reduce`` of each gradient's copy.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import hiermoe_hf
from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
from hiermoe_hf.training import buckets

BUCKET = 4096  # bytes; the model's gradients are many times this


def _tensors(items) -> list[torch.Tensor]:
    out = []
    for a in items:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out += _tensors(a)
    return out


class PeakNewBytes(TorchDispatchMode):
    """Peak of the bytes held by storages ATen allocated since entering (views and in-place results
    alias existing storage and are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, o in zip(func._schema.returns, outs):
            if ret.alias_info is not None:
                continue
            for t in _tensors([o]):
                if t.untyped_storage().data_ptr() not in inputs:  # c10d ops return their inputs unannotated
                    storage = t.untyped_storage()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.nbytes())
        return out


def reduce_and_measure() -> dict:
    torch.manual_seed(0)
    model = build_model(tiny_qwen3_moe_config(vocab_size=512, hidden_size=64, intermediate_size=128))
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(ep_size=1))  # replicas = 2: expert grads summed too
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(ids, labels=ids).loss.backward()
    experts = {id(p) for p in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    want = []
    for p in model.parameters():
        if p.grad is None:
            continue
        w = p.grad.clone()
        dist.all_reduce(w)
        want.append(w if id(p) in experts else w / dist.get_world_size())
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    old, buckets.BUCKET_BYTES = buckets.BUCKET_BYTES, BUCKET
    try:
        with PeakNewBytes() as meter:
            hiermoe_hf.all_reduce_gradients(model)
    finally:
        buckets.BUCKET_BYTES = old
    err = max(float((g - w).abs().max() / w.abs().max().clamp(min=1e-30)) for g, w in zip(grads, want))
    return {"peak": meter.peak, "grad_bytes": grad_bytes, "largest": max(g.numel() * g.element_size() for g in grads),
            "err": err, "expert_grads": sum(id(p) in experts for p in model.parameters() if p.grad is not None)}


def test_buckets_cut_in_order_and_keep_big_tensors_alone():
    ts = [torch.zeros(n) for n in (100, 100, 2000, 10, 10, 600)]  # bytes: 400, 400, 8000, 40, 40, 2400
    got = [[t.numel() for t in b] for b in buckets.buckets(ts, limit=4096)]
    assert got == [[100, 100], [2000], [10, 10, 600]]


def test_transient_memory_is_one_bucket_not_the_gradients(ranks):
    for r in ranks(2).run(reduce_and_measure):
        assert r["expert_grads"] > 0
        assert r["grad_bytes"] >= 50 * BUCKET, r  # the gradients are many buckets
        assert r["largest"] > BUCKET  # some gradient is reduced in place, alone
        assert r["peak"] <= BUCKET + 64, r  # one bucket (+ the 4-byte flag's scalars)
        assert r["err"] <= 1e-6, r  # fp32: the bucketed sums equal the per-tensor ones (same ring order)
