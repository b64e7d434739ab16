"""Local experts as grouped GEMMs (issue 13 item 4): same outputs and gradients as the per-slot
loop and as Transformers' unpatched experts, and no host read on the grouped path."""

from __future__ import annotations

import pytest
import torch

from hiermoe_hf.exchange import experts as ex
from hiermoe_hf.kernels import TORCH_OPS
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

CONFIGS = {"qwen3_moe": tiny_qwen3_moe_config, "deepseek_v3": tiny_deepseek_v3_config}


def _experts(name: str):
    model = build_model(CONFIGS[name](), seed=3).train()
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))


def _rows(E: int, K: int, R: int, H: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    phys = torch.rand(R, E, generator=g).topk(K, dim=1).indices
    phys[torch.rand(R, K, generator=g) < 0.3] = -1  # selections a row does not carry
    w = torch.rand(R, K, generator=g, dtype=torch.float32)
    x = torch.randn(R, H, generator=g)
    return x, phys, torch.where(phys >= 0, w, 0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grouped_equals_loop_and_transformers(name):
    experts = _experts(name)
    E, H = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    assert ex.can_group(experts, torch.zeros(4, H))  # torch 2.13 has a CPU grouped_mm kernel
    x, phys, w = _rows(E, 3, 37, H, seed=1)
    outs = {}
    for grouped in (True, False):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        experts.zero_grad()
        y, counts = ex.local_experts_forward(experts, xg, phys, wg, E, TORCH_OPS, int((phys >= 0).sum()), grouped)
        (y * torch.linspace(-1, 1, H)).sum().backward()
        grads = (experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
        outs[grouped] = (y.detach(), xg.grad, wg.grad) + grads
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Transformers' own forward on the same routing (-1 selections: weight 0 on expert 0)
    ref = type(experts).forward(experts, x, phys.clamp(min=0), w)
    torch.testing.assert_close(outs[True][0], ref, rtol=1e-5, atol=1e-6)


def test_grouped_path_reads_nothing_back(monkeypatch):
    experts = _experts("qwen3_moe")
    E, H = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    x, phys, w = _rows(E, 2, 20, H, seed=2)
    reads = []
    for name in ("tolist", "item", "cpu"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _o=orig, _n=name, **k):
            reads.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    ex.local_experts_forward(experts, x, phys, w, E, TORCH_OPS, int((phys >= 0).sum()), grouped=True)
    assert reads == []
    ex.local_experts_forward(experts, x, phys, w, E, TORCH_OPS, int((phys >= 0).sum()), grouped=False)
    assert reads == ["tolist"]  # the loop fallback needs the slot sizes on the host


def test_eager_implementation_falls_back_to_loop():
    experts = _experts("qwen3_moe")
    experts.config._experts_implementation = "eager"
    assert not ex.can_group(experts, torch.zeros(1, experts.gate_up_proj.shape[2]))


def _family_experts(family: str):
    """One experts module of ``family`` (fp32) with every parameter redrawn (biases, norm weights too:
    a zero bias would hide a missing bias gradient), and its per-expert parameter names."""
    from hiermoe_hf import patches
    from hiermoe_hf.tiny_families import available, build_family_model, tiny_family_config

    if not available(family):
        pytest.skip(f"this Transformers has no {family}")
    if family == "muse_spark_text":  # the one class with a post-expert norm; its model needs a vision stack
        from transformers import AutoConfig
        from transformers.models.muse_spark import modeling_muse_spark

        config = AutoConfig.for_model(family, num_local_experts=8, moe_hidden_size=16, moe_intermediate_size=8,
                                      hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        experts = modeling_muse_spark.MuseSparkExperts(config)
        names = patches.interface_param_names(experts)
    else:
        site, experts = patches.find_experts(build_family_model(tiny_family_config(family), seed=3))[0]
        names = site.param_names
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return experts.train(), names


# gpt-oss: biases, transposed, interleaved clamped SwiGLU (_apply_gate); Nemotron-H: no gate (up_proj
# + relu2); DeepSeek-V4: clamped SwiGLU (_apply_gate); Muse Spark: post-expert norm (a dense module).
FLAGGED = ["gpt_oss", "nemotron_h", "deepseek_v4", "muse_spark_text"]


@pytest.mark.parametrize("family", FLAGGED)
def test_experts_class_flags_match_transformers(family):
    """Outputs and every gradient (rows, routing weights, each per-expert parameter and bias, the dense
    norm inside the experts) of the grouped path and of the loop equal Transformers' own experts."""
    experts, names = _family_experts(family)
    E = getattr(experts, names[0]).shape[0]
    H = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
    x, phys, w = _rows(E, 2, 29, H, seed=4)
    probe = torch.linspace(-1, 1, H)

    def run(fn):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        experts.zero_grad()
        (fn(xg, wg) * probe).sum().backward()
        grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
        # a selection a row does not carry (-1) is expert 0 with weight 0 for Transformers: its weight's
        # gradient is that expert's output there, and nothing here (it is not carried)
        return fn(x, w).detach(), xg.grad, torch.where(phys >= 0, wg.grad, 0), grads

    ref = run(lambda xg, wg: type(experts).forward(experts, xg, phys.clamp(min=0), wg))
    assert set(ref[3]) >= set(names) and all(ref[3][n].abs().max() > 0 for n in ref[3])
    for grouped in (True, False):
        got = run(lambda xg, wg, grouped=grouped: ex.local_experts_forward(
            experts, xg, phys, wg, E, TORCH_OPS, int((phys >= 0).sum()), grouped)[0])
        for a, b in zip(got[:3], ref[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert got[3].keys() == ref[3].keys()
        for n in ref[3]:
            torch.testing.assert_close(got[3][n], ref[3][n], rtol=1e-5, atol=1e-5,
                                       msg=f"{family} {n} grouped={grouped}")
