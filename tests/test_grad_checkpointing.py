"""Gradient checkpointing on a patched model (issue 10, item 2): exact, and the recompute counted once.

With ``model.gradient_checkpointing_enable()`` (reentrant or not, before or after ``patch``) every MoE
block's exchange runs a second time inside the backward. Checked on gloo ranks for both model
families: loss and gradients equal the unpatched model's (per-rank loss, gradients averaged over
ranks, as DDP gives); the traffic meter's forward counters equal the same step without
checkpointing (hand count: tokens = T x MoE layers) and the recompute's traffic appears under the
``recompute_`` names, equal to one more forward's; the swap's routing window holds each routing once
(same ids, tokens, forwards as without checkpointing) and counts the recompute as one more pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import hiermoe_hf
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config
from hiermoe_hf.training.traffic import FORWARD_FIELDS, TrafficMeter

CONFIGS = {"qwen3_moe": tiny_qwen3_moe_config, "deepseek_v3": tiny_deepseek_v3_config}
T = 16  # tokens per rank


def _step(model, ids) -> tuple[torch.Tensor, dict, list]:
    meter = TrafficMeter(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    hiermoe_hf.all_reduce_gradients(model)
    counts = meter.pop()
    meter.remove()
    routing = [
        (layer.routing.window().tolist(), layer.routing.tokens, layer.routing.forwards, layer.routing.passes)
        for _, layer in moe_layers(model).values()
    ]
    return loss.detach(), counts, routing


def _rank_case(kind, reentrant, before_patch, topology, fsdp2=False, chunks=1):
    W, r = dist.get_world_size(), dist.get_rank()
    config = CONFIGS[kind]()
    ids = torch.randint(0, 256, (2, T // 2), generator=torch.Generator().manual_seed(100 + r))
    cfg = hiermoe_hf.HierMoEConfig(
        topology=topology, dispatch="hd2" if "x" in topology else "hd1", swap_interval=1, overlap_chunks=chunks
    )

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    # The unpatched model, same checkpointing, on this rank's batch; grads averaged. (Same checkpointing:
    # with use_reentrant=True Transformers' Qwen3-MoE aux loss gets no gradient, patched or not.)
    ref = build_model(config).train()
    ref.gradient_checkpointing_enable(**kwargs)
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {}
    for n, p in ref.named_parameters():
        dist.all_reduce(p.grad)
        ref_grads[n] = p.grad / W

    plain = hiermoe_hf.patch(build_model(config).train(), cfg)
    _, plain_counts, plain_routing = _step(plain, ids)

    model = build_model(config).train()
    if before_patch:
        model.gradient_checkpointing_enable(**kwargs)
    model = hiermoe_hf.patch(model, cfg)
    if not before_patch:
        model.gradient_checkpointing_enable(**kwargs)
    if fsdp2:
        hiermoe_hf.shard_dense(model)
    assert model.is_gradient_checkpointing
    loss, counts, routing = _step(model, ids)

    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), (loss, ref_loss)
    experts = {id(getattr(e, n)): layer for e, layer in moe_layers(model).values() for n in layer.param_names}
    for n, p in model.named_parameters():
        want = ref_grads[n]
        if id(p) in experts:
            want = want[experts[id(p)].local_logical()]
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        err = float((got - want).norm() / want.norm())
        assert err <= 1e-5, (n, err)
    return plain_counts, counts, plain_routing, routing


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("before_patch", [True, False])
def test_recompute_counted_once(ranks, kind, reentrant, before_patch):
    _check(ranks(2).run(_rank_case, kind, reentrant, before_patch, "2x1"), kind)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_recompute_counted_once_2x2(ranks, kind):
    _check(ranks(4).run(_rank_case, kind, False, False, "2x2"), kind)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("reentrant", [True, False])
def test_recompute_with_fsdp2(ranks, kind, reentrant):
    """The same with the dense part sharded by FSDP2 (hiermoe_hf.shard_dense)."""
    _check(ranks(2).run(_rank_case, kind, reentrant, False, "2x1", fsdp2=True), kind)


@pytest.mark.parametrize("reentrant", [True, False])
def test_recompute_counted_with_overlap_chunks(ranks, reentrant):
    """overlap_chunks > 1 (the pipelined path): the recompute's exchange is counted too (issue 19 item 7;
    before, a non-reentrant recompute stopped early inside the pipeline left every recompute_* at 0)."""
    _check(ranks(2).run(_rank_case, "deepseek_v3", reentrant, False, "2x1", chunks=2), "deepseek_v3")


def _check(results, kind):
    moe_layers_n = 2  # both tiny models have two MoE layers (DeepSeek-V3's first layer is dense)
    for rank, (plain_counts, counts, plain_routing, routing) in enumerate(results):
        assert plain_counts["tokens"] == T * moe_layers_n  # hand count
        for field in FORWARD_FIELDS:
            assert counts[field] == plain_counts[field], (rank, field)
            assert counts[f"recompute_{field}"] == plain_counts[field], (rank, field)  # one more forward's exchange
        assert plain_counts["recompute_tokens"] == 0
        assert counts["rows_sent"] > 0 and counts["strategies"] == plain_counts["strategies"]
        for (p_win, p_tok, p_fwd, p_pass), (win, tok, fwd, passes) in zip(plain_routing, routing):
            assert (win, tok, fwd) == (p_win, p_tok, p_fwd) and fwd == 1 and tok == T
            assert (p_pass, passes) == (2, 3), kind  # forward + backward; + the recompute's exchange
