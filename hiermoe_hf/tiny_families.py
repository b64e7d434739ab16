"""Tiny models of every MoE family hiermoe_hf patches, built from each family's own Transformers
config class (tests and the family table in the README).

``tiny_family_config(model_type)`` shrinks the family's default config: 2-4 layers, hidden 32, 8
experts, top-2, a 256-token vocabulary; the family's own layout (layer patterns, shared experts,
latent widths, MLA) is kept. ``build_family_model`` draws weights from a seed and makes routing
non-trivial where the family initialises it to a constant (zero-initialised routers and biases).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

E, K = 8, 2
GENERIC = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    tie_word_embeddings=False, initializer_range=0.1, output_router_logits=True, router_aux_loss_coef=0.01,
    num_experts_per_tok=K, num_experts=E, num_local_experts=E, n_routed_experts=E, moe_num_experts=E,
    moe_k=K, top_k_experts=K, shared_expert_intermediate_size=16, moe_shared_expert_intermediate_size=16,
    router_jitter_noise=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, first_k_dense_replace=0,
    n_group=1, topk_group=1, mlp_only_layers=[], decoder_sparse_step=1, attn_implementation="eager",
)
MLA = dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8)
LINEAR_ATTENTION = dict(linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8,
                        linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention",
                        "full_attention"])

# What a family needs beyond GENERIC (its own layout at toy size), keyed by the config's model_type.
FAMILY: dict[str, dict] = {
    "qwen3_moe": {}, "mixtral": {}, "olmoe": {}, "minimax_m2": {}, "qwen2_moe": {},
    "ernie4_5_moe": dict(moe_layer_start_index=0, moe_num_shared_experts=1),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8, intermediate_size=16),
    "deepseek_v3": dict(MLA, first_k_dense_replace=1, num_hidden_layers=3, n_group=2, topk_group=1,
                        n_shared_experts=1, routed_scaling_factor=2.5),
    "glm4_moe": dict(first_k_dense_replace=1, num_hidden_layers=3, n_shared_experts=1, partial_rotary_factor=0.5),
    "glm4_moe_lite": dict(MLA, first_k_dense_replace=1, num_hidden_layers=3, n_shared_experts=1),
    "qwen3_next": dict(LINEAR_ATTENTION),
    "qwen3_5_moe_text": dict(LINEAR_ATTENTION),
    "qwen3_vl_moe_text": dict(),
    "nemotron_h": dict(num_hidden_layers=3, layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=4,
                       mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=16, moe_latent_size=None,
                       n_shared_experts=1),
    "gemma4_text": dict(enable_moe_block=True, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=256, num_kv_shared_layers=0,
                        global_head_dim=8),
    "deepseek_v32": dict(MLA, q_lora_rank=16, first_k_dense_replace=1, num_hidden_layers=3, n_shared_experts=1,
                         index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=8),
    "glm_moe_dsa": dict(MLA, q_lora_rank=16, first_k_dense_replace=1, num_hidden_layers=3, n_shared_experts=1,
                        index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=8),
    "deepseek_v4": dict(num_key_value_heads=1, head_dim=16, q_lora_rank=16, o_lora_rank=16, o_groups=2,
                        qk_rope_head_dim=8, index_topk=4, index_head_dim=8, index_n_heads=2, sliding_window=8,
                        n_shared_experts=1, num_nextn_predict_layers=0, mlp_layer_types=["hash_moe", "moe"],
                        layer_types=["sliding_attention", "compressed_sparse_attention"]),
}
# Image-text models: (their config model_type, text config model_type, vision config kwargs, extra).
_QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                    num_position_embeddings=16)
_QWEN_TOKENS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
IMAGE_TEXT: dict[str, tuple[str, dict, dict]] = {
    "qwen3_5_moe": ("qwen3_5_moe_text", _QWEN_VISION, _QWEN_TOKENS),
    "qwen3_vl_moe": ("qwen3_vl_moe_text", dict(_QWEN_VISION, deepstack_visual_indexes=[0]), _QWEN_TOKENS),
    "gemma4": ("gemma4_text", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64),
               dict(audio_config=None, boi_token_id=250, eoi_token_id=251, image_token_id=252, video_token_id=253,
                    boa_token_id=254, eoa_token_index=255, audio_token_id=249)),
}
TOKENS = (3, 240)  # the id range tests draw from: below every special token the tiny configs define


def _small(model_type: str, extra: dict) -> dict:
    """GENERIC restricted to what ``model_type``'s config knows, plus the family's own overrides."""
    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    kw = {k: v for k, v in GENERIC.items() if k in known}
    kw.update(extra)
    return kw


def available(model_type: str) -> bool:
    """Whether the installed Transformers has ``model_type`` (families differ between 5.17 and 5.24)."""
    name = IMAGE_TEXT[model_type][0] if model_type in IMAGE_TEXT else model_type
    return model_type in CONFIG_MAPPING_NAMES and name in CONFIG_MAPPING_NAMES


def tiny_family_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` (a key of FAMILY or IMAGE_TEXT) from the family's own config class."""
    if model_type in IMAGE_TEXT:
        text_type, vision, extra = IMAGE_TEXT[model_type]
        text = AutoConfig.for_model(text_type, **_small(text_type, {**FAMILY[text_type], **overrides}))
        config = AutoConfig.for_model(model_type, text_config=text.to_dict(), vision_config=vision, **extra)
    else:
        config = AutoConfig.for_model(model_type, **_small(model_type, {**FAMILY.get(model_type, {}), **overrides}))
    config._attn_implementation = "eager"
    return config


def model_class(config):
    """The family's causal-LM class, or its image-text class for an image-text config."""
    from transformers import AutoModelForImageTextToText

    if config.model_type in IMAGE_TEXT:
        return AutoModelForImageTextToText._model_mapping[type(config)]
    return AutoModelForCausalLM._model_mapping[type(config)]


def build_family_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model of ``config`` with weights from ``seed`` (same on every rank), in eval mode.

    Routers and expert biases that a family initialises to zero (or any constant) are redrawn, so
    tokens pick different experts and a missing bias gradient shows; jitter noise is off (GENERIC).
    """
    torch.manual_seed(seed)
    model = model_class(config)._from_config(config, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            constant = t.numel() > 1 and t.is_floating_point() and bool((t == t.flatten()[0]).all())
            routing = any(k in name for k in ("router", "gate.", "e_score_correction_bias", "_bias"))
            if constant and routing and "norm" not in name:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.1)
    return model.eval()
