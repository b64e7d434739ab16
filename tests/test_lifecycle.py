"""Patch lifecycle, stats against a hand count, and bad input (issue 2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from stage_oracle import count_rows

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config


def lifecycle() -> dict:
    W, r = dist.get_world_size(), dist.get_rank()
    cfg = tiny_deepseek_v3_config()
    model = build_model(cfg)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(r))
    before = model(ids).logits
    dense_before = {n: p for n, p in model.named_parameters() if ".experts." not in n}
    types_before = {n: type(m) for n, m in model.named_modules()}

    same = hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2"))
    assert same is model
    assert hiermoe_hf.patch(model) is model  # twice: a no-op, experts stay sharded once
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    for n, p in model.named_parameters():
        if ".experts." in n:
            assert p.shape[0] == cfg.n_routed_experts // W, n  # only this rank's experts are kept
        else:
            assert p is dense_before[n], n  # dense parameters are the same objects
    dense_mlp = model.model.layers[0].mlp  # first_k_dense_replace: untouched
    assert "forward" not in vars(dense_mlp)
    text = repr(model)
    assert "DeepseekV3MoE" in text

    later = build_model(cfg)  # a model built afterwards is untouched
    assert not hiermoe_hf.is_patched(later)
    assert all("forward" not in vars(m) for m in later.modules())
    assert torch.equal(later(ids).logits, before)

    hiermoe_hf.unpatch(model)
    assert not hiermoe_hf.is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules())
    after = model(ids).logits
    assert torch.equal(after, before)  # bit-identical after unpatch
    fresh = build_model(cfg)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    return True


def stats_vs_hand_count(strategy: str) -> list:
    """``stats`` rows per stage equal the rows counted by hand from the router's own choices."""
    W, r = dist.get_world_size(), dist.get_rank()
    cfg = tiny_qwen3_moe_config(num_experts=16, num_experts_per_tok=4)
    model = build_model(cfg)
    picked = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Qwen3MoeSparseMoeBlock":
            module.gate.register_forward_hook(lambda m, i, o, name=name: picked.__setitem__(name, o[2].clone()))
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch=strategy))
    ids = torch.randint(0, 256, (2 + r, 5), generator=torch.Generator().manual_seed(10 + r))  # uneven T
    with torch.no_grad():
        model(ids)
    stats = hiermoe_hf.stats(model)
    e = 16 // W
    for name, topk_TK in picked.items():
        parts = [None] * W
        dist.all_gather_object(parts, topk_TK.tolist())
        dests = [[[i // e for i in tok] for tok in p] for p in parts]  # contiguous placement
        sent, received, _ = count_rows(strategy, [2, 2], dests)
        got = stats[name]
        assert got["strategy"] == strategy and got["tokens"] == topk_TK.shape[0]
        assert [s["rows_sent"] for s in got["stages"]] == [row[r] for row in sent]
        assert [s["rows_received"] for s in got["stages"]] == [row[r] for row in received]
        assert all(s["bytes_sent"] == s["rows_sent"] * cfg.hidden_size * 4 for s in got["stages"])
        assert sum(got["load_per_rank"]) == topk_TK.numel()
    return [s["rows_sent"] for s in stats[next(iter(stats))]["stages"]]


def bad_input() -> list[str]:
    msgs = []
    cfg = tiny_qwen3_moe_config(num_experts=6)  # 6 experts over 4 ranks
    with pytest.raises(ValueError, match="6 experts .* 4 ranks") as e:
        hiermoe_hf.patch(build_model(cfg), hiermoe_hf.HierMoEConfig(topology="2x2"))
    msgs.append(str(e.value))
    with pytest.raises(ValueError, match="2x4 has 8 ranks but the world size is 4") as e:
        hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="2x4"))
    msgs.append(str(e.value))
    with pytest.raises(ValueError, match="'hd3' is not available on topology 2x2; valid: a2a, 2dh, hd1, hd2"):
        hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd3"))
    # a rank with zero tokens, and every token on one expert: both must work
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="2x2"))
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(0 if dist.get_rank() == 1 else 7, 32)
    ids = torch.zeros(x.shape[0], 2, dtype=torch.int64)
    ids[:, 1] = 5
    out = experts(x, ids, torch.full((x.shape[0], 2), 0.5))
    assert out.shape == x.shape and torch.isfinite(out).all()
    return msgs


def test_lifecycle(ranks):
    assert all(ranks(4).run(lifecycle))


@pytest.mark.parametrize("strategy", ["a2a", "2dh", "hd1", "hd2"])
def test_stats_equal_hand_count(ranks, strategy):
    rows = ranks(4).run(stats_vs_hand_count, strategy)
    assert any(sum(r) > 0 for r in rows)


def test_bad_input_on_ranks(ranks):
    ranks(4).run(bad_input)


def test_bad_input_single_process():
    with pytest.raises(ValueError, match="llama: no routed-experts module using Transformers' experts interface"):
        from transformers import LlamaConfig, LlamaForCausalLM

        hiermoe_hf.patch(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=32)))
    with pytest.raises(ValueError, match="unknown dispatch strategy 'hd0'"):
        hiermoe_hf.HierMoEConfig(dispatch="hd0")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'; valid: auto, triton, torch"):
        hiermoe_hf.HierMoEConfig(kernels="cuda")
    with pytest.raises(ValueError, match="swap_interval must be an integer >= 0"):
        hiermoe_hf.HierMoEConfig(swap_interval=-1)
    with pytest.raises(ValueError, match="topology '2y2' is not of the form"):
        hiermoe_hf.HierMoEConfig(topology="2y2")
    with pytest.raises(ValueError, match="not patched"):
        hiermoe_hf.stats(build_model(tiny_qwen3_moe_config()))
    with pytest.raises(ValueError, match="not patched"):
        hiermoe_hf.unpatch(build_model(tiny_qwen3_moe_config()))


def auto_choice_in_stats(cost_model) -> list:
    model = build_model(tiny_qwen3_moe_config(num_experts=16, num_experts_per_tok=4))
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="auto", cost_model=cost_model))
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(dist.get_rank())))
    out = []
    for layer in hiermoe_hf.stats(model).values():
        by = layer["predicted_ms_by_strategy"]
        if cost_model is None:  # timed, not priced (cost/trials.py): the first forward runs the first candidate
            assert by == {} and layer["predicted_ms"] is None and layer["strategy"] == "hd1"
            assert layer["measured_ms_by_strategy"] == {}
        else:
            assert set(by) == {"a2a", "2dh", "hd1", "hd2"} and layer["measured_ms_by_strategy"] is None
            assert layer["strategy"] == min(by, key=by.get) and layer["predicted_ms"] == by[layer["strategy"]]
        assert layer["measured_ms"] > 0
        out.append((layer["strategy"], layer["cost_model"], layer["cost_model_defaults"]))
    return out


@pytest.mark.parametrize("cost_model", [None, "hiermoe-paper"])
def test_auto_reports_choice_cost_model_and_times(ranks, cost_model):
    results = ranks(4).run(auto_choice_in_stats, cost_model)
    assert all(r == results[0] for r in results)  # every rank made the same choice per layer
    for _, source, defaults in results[0]:
        assert defaults is False
        assert source.startswith("measured" if cost_model is None else "preset hiermoe-paper")
