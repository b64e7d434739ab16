"""Discovery of routed experts from Transformers' experts interface, and refusals (issue 17 items 1, 3).

One process, models built on the meta device (no weights): ``patches.find_experts`` finds every
family's experts modules whatever its model_type (aliases included), takes E from the module, names
the per-expert parameters (biases, ``up_proj`` without a gate) in the interface's order, leaves the
vision tower of image-text models alone, and refuses what this design cannot serve with a
ValueError naming the family and the reason.
"""

from __future__ import annotations

import pytest
import torch
from test_families import FAMILIES, _config, _skip_missing
from transformers import AutoConfig, AutoModel

import hiermoe_hf
from hiermoe_hf import patches
from hiermoe_hf.tiny_families import CONFIG_MAPPING_NAMES, IMAGE_TEXT, E, _small, model_class, tiny_family_config


def _meta(config):
    with torch.device("meta"):
        return model_class(config)._from_config(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_experts_from_the_interface(family):
    _skip_missing(family)
    model = _meta(_config(family))
    found = patches.find_experts(model)
    modules = dict(model.named_modules())
    for site, experts in found:
        assert modules[site.name] is experts and site.block_name == site.name.rpartition(".")[0]
        assert site.num_experts == E
        up = "gate_up_proj" if experts.has_gate else "up_proj"
        expected = (up, f"{up}_bias", "down_proj", "down_proj_bias") if experts.has_bias else (up, "down_proj")
        assert site.param_names == expected
        assert all(getattr(experts, p).shape[0] == E for p in site.param_names)
    # every interface experts module is found, and only those: a hand count over the module tree
    assert [s.name for s, _ in found] == [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]
    if family in IMAGE_TEXT:  # the language model's experts only; the vision tower has none patched
        assert all(".language_model." in f".{s.name}" for s, _ in found)


def test_interface_flags_decide_the_parameters():
    gpt = patches.find_experts(_meta(tiny_family_config("gpt_oss")))[0][0]
    assert gpt.param_names == ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    nemo = patches.find_experts(_meta(tiny_family_config("nemotron_h")))[0][0]
    assert nemo.param_names == ("up_proj", "down_proj")
    gemma = patches.find_experts(_meta(tiny_family_config("gemma4_text")))[0][0]
    assert gemma.block_name == "model.layers.0" and gemma.attr == "experts"  # on the decoder layer


def test_alias_of_a_known_architecture():
    """Kimi K2's configs name DeepSeek-V3's architecture under model_type "kimi_k2"."""
    config = _config("kimi_k2")
    assert config.model_type == "kimi_k2"
    assert patches.family_hooks(config) is patches.family_hooks(tiny_family_config("deepseek_v3")) is not None
    assert len(patches.find_experts(_meta(config))) == 2
    assert patches.family_hooks(tiny_family_config("mixtral")) is None


def test_undescribed_parameter_is_refused():
    model = _meta(tiny_family_config("mixtral"))
    site, experts = patches.find_experts(model)[0]
    experts.scale = torch.nn.Parameter(torch.ones(E, device="meta"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts .*undescribed parameters \['scale'\]"):
        patches.find_experts(model)


def _tiny(model_type: str, **kw):
    return AutoConfig.for_model(model_type, **{**_small(model_type, {}), **kw})


def _omni_talker():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe

    text = AutoConfig.for_model("qwen3_omni_moe").talker_config.text_config
    text.shared_expert_intermediate_size = 16  # Transformers 5.24's default talker config lacks it
    return modeling_qwen3_omni_moe.Qwen3OmniMoeTalkerModel(text)


# (family, builder of a model on the meta device, words the refusal must contain)
REFUSALS = [
    ("llama4_text", lambda: AutoModel.from_config(_tiny("llama4_text")), "scales each expert's input"),
    ("longcat_flash", lambda: AutoModel.from_config(_tiny("longcat_flash")), "zero-compute"),
    ("dbrx", lambda: AutoModel.from_config(AutoConfig.for_model(
        "dbrx", d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=256,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=1))), "flattened expert weights"),
    ("jetmoe", lambda: AutoModel.from_config(_tiny("jetmoe")), "attention experts"),
    ("switch_transformers", lambda: AutoModel.from_config(_tiny("switch_transformers")), "capacity"),
    ("nllb-moe", lambda: AutoModel.from_config(AutoConfig.for_model(
        "nllb-moe", d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4, vocab_size=256,
        encoder_sparse_step=1, decoder_sparse_step=1)), "capacity"),
    ("ernie4_5_vl_moe", lambda: AutoModel.from_config(_tiny("ernie4_5_vl_moe")), "only on the ranks"),
    ("qwen3_omni_moe_talker_text", _omni_talker, "only on the ranks"),
    ("dots3_note", lambda: AutoModel.from_config(_tiny("dots3_note")), "only on the ranks"),
    ("qwen3", lambda: AutoModel.from_config(_tiny("qwen3")), "no routed-experts module"),
]


@pytest.mark.parametrize("family,build,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_with_family_and_reason(family, build, reason):
    if family not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this Transformers has no {family}")
    with torch.device("meta"):
        model = build()
    with pytest.raises(ValueError, match=rf"{family}.*{reason}|{reason}.*{family}"):
        patches.find_experts(model)
    with pytest.raises(ValueError, match=reason):  # patch refuses before any collective or change
        hiermoe_hf.patch(model)
    assert not hiermoe_hf.is_patched(model)
