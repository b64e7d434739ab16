"""Planner CLI: JSON shape, closed-form rows, presets, local configs, offline Hub failures."""

import json
import time

import pytest
import torch

from hiermoe_hf.cost import auto
from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost import planner as planner
from hiermoe_hf.cost import routing_models as rm
from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.topology import Topology


def _run_json(capsys, *args):
    assert planner.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v3"])
def test_presets_json_shape_and_choice(capsys, model):
    out = _run_json(capsys, "--model", model, "--topology", "4x8", "--cost-model", "hiermoe-paper", "--tokens", "1024")
    assert set(out) == {"strategies", "duplication", "layouts", "fastest_layout", "layouts_notes"}  # layouts: issue 11
    names = [s["name"] for s in out["strategies"]]
    assert names == ["a2a", "2dh", "hd1", "hd2"]
    topo = Topology((4, 8))
    for s in out["strategies"]:
        assert set(s) == {"name", "predicted_ms", "speedup_vs_a2a", "stages"}
        assert [st["name"] for st in s["stages"]] == [st.name for st in topo.stages(s["name"])]
        for st in s["stages"]:
            assert set(st) == {"name", "rows_per_token", "bytes"}
    by = {s["name"]: s for s in out["strategies"]}
    assert by["a2a"]["speedup_vs_a2a"] == 1.0
    assert min(out["strategies"], key=lambda s: s["predicted_ms"])["name"] == "hd2"
    assert by["hd2"]["speedup_vs_a2a"] > 1.5
    # de-duplication cuts the rows on the inter-node links by more than half vs a2a's 6 of 7.75
    assert by["hd2"]["stages"][0]["rows_per_token"] < 3.0
    for d in out["duplication"]:
        assert set(d) == {"groups", "topk", "rate"} and 0.0 <= d["rate"] < 1.0


def test_uniform_rows_are_closed_form(capsys):
    out = _run_json(capsys, "--model", "qwen3-30b-a3b", "--topology", "2x4", "--routing", "uniform", "--tokens", "512")
    topo = Topology((2, 4))
    for s in out["strategies"]:
        closed = rm.expected_rows_per_token_uniform(topo, s["name"], 128, 8)
        assert [st["rows_per_token"] for st in s["stages"]] == pytest.approx(closed)
        assert [st["bytes"] for st in s["stages"]] == pytest.approx([r * 512 * 2048 * 2 for r in closed])
    dup = {(d["groups"], d["topk"]): d["rate"] for d in out["duplication"]}
    assert len(dup) == 16
    assert dup[(8, 8)] == pytest.approx(rm.duplication_rate_uniform(128, 8, 8))


def test_text_output(capsys):
    assert (
        planner.main(
            ["--model", "deepseek-v3", "--topology", "4x8", "--cost-model", "hiermoe-paper", "--tokens", "512"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "chosen: hd2 (depth 2)" in text
    assert "routing group-limited" in text and "groups R" in text and "K=8" in text
    assert "Fig. 9" in text  # the cost model's source is printed


def test_local_config_folder_and_trace(tmp_path, capsys):
    cfg = {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 4, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = planner.load_model_spec(str(tmp_path))
    assert (spec.experts, spec.topk, spec.hidden, spec.n_group) == (16, 4, 64, 1)
    trace = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 4, 8, 12]] * 50)
    torch.save(trace, tmp_path / "trace.pt")
    out = _run_json(capsys, "--model", str(tmp_path), "--topology", "2x2", "--routing", str(tmp_path / "trace.pt"))
    hd2 = next(s for s in out["strategies"] if s["name"] == "hd2")
    assert hd2["stages"][0]["rows_per_token"] >= 0
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="not a MoE config"):
        planner.load_model_spec(str(tmp_path))


def test_bad_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        planner.main(["--model", "qwen3-30b-a3b", "--routing", "zipfian"])
    assert e.value.code == 2 and "valid: auto, uniform, group-limited" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        planner.main(["--model", "qwen3-30b-a3b", "--topology", "3x8"])  # 128 experts over 24 ranks
    assert "cannot be split evenly over 24 ranks" in capsys.readouterr().err


def test_hub_name_offline_fails_fast(monkeypatch, capsys):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; is_offline_mode() answers from its constant
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t = time.time()
    with pytest.raises(SystemExit) as e:
        planner.main(["--model", "no-such-org/no-such-model"])
    assert e.value.code == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
    # network allowed but the Hub unreachable: a clear error within seconds
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="cannot load 'no-such-org/no-such-model'.*unreachable"):
        planner.load_model_spec("no-such-org/no-such-model")
    assert time.time() - t < 10


@pytest.mark.parametrize("seed", range(3))
def test_planner_prices_as_auto_does(seed, monkeypatch):
    """The planner's predicted times and choice are ``dispatch="auto"``'s on the same routing, for
    cost models whose latency/bandwidth balance varies (a different pricing would disagree on some)."""
    monkeypatch.setattr(planner, "duplication_table", lambda *args, **kwargs: [])  # not priced: skip sampling it
    spec = planner.MODEL_PRESETS["deepseek-v3"]
    topo = Topology((2, 4))
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        alpha = 10 ** (-6 + 3 * torch.rand((), generator=g).item())
        beta = 10 ** (-11 + 3 * torch.rand((), generator=g).item())
        model = cm.CostModel(str(topo), {st.name: cm.StageCost(alpha, beta) for st in topo.distinct_stages()})
        out = planner.plan(spec, topo, model, routing="group-limited", tokens=256, seed=seed)
        dests = planner.sample_dests(spec, topo, "group-limited", 256, seed)
        counts = {name: sr.stage_rows(dests, topo, name) for name in topo.strategies()}
        expected = auto.predicted_ms(topo, counts, spec.hidden * 2, model)
        for s in out["strategies"]:
            assert s["predicted_ms"] == pytest.approx(expected[s["name"]], rel=1e-12)
        assert planner.chosen(out) == min(topo.strategies(), key=lambda n: (expected[n], topo.strategies().index(n)))


@pytest.mark.parametrize("family,moe_layers,inter,groups", [
    ("mixtral", 2, 64, (1, 1)), ("gpt_oss", 2, 16, (1, 1)), ("nemotron_h", 1, 16, (1, 1)),
    ("deepseek_v3", 2, 16, (2, 1)), ("gemma4", 2, 16, (1, 1)), ("qwen3_vl_moe", 2, 16, (1, 1)),
])
def test_any_family_config_through_the_cli(tmp_path, capsys, family, moe_layers, inter, groups):
    """A local config.json / folder of a family the planner has no table for: E, K, hidden, intermediate,
    MoE layers and routing groups are the tiny config's (hiermoe_hf.tiny_families: 8 experts, top-2,
    hidden 32; Nemotron-H: one MoE layer of three; DeepSeek-V3: first layer dense, 2 groups, top-1 group;
    Gemma 4 and Qwen3-VL-MoE: image-text configs, Gemma 4's experts on the decoder layer)."""
    from hiermoe_hf.tiny_families import tiny_family_config

    tiny_family_config(family).save_pretrained(tmp_path)
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        spec = planner.load_model_spec(model)
        got = (spec.experts, spec.topk, spec.hidden, spec.moe_intermediate, spec.moe_layers)
        assert got == (8, 2, 32, inter, moe_layers) and (spec.n_group, spec.topk_group) == groups
    assert planner.main(["--model", str(tmp_path / "config.json"), "--topology", "2x2", "--tokens", "64"]) == 0
    assert "E=8 K=2 hidden=32" in capsys.readouterr().out
