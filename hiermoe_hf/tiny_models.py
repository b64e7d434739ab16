"""Tiny models built from configs of the real architectures (tests, demo, the default fine-tune).

Shapes follow Qwen3-30B-A3B and DeepSeek-V3 (fused experts, top-k routing, group-limited routing,
shared experts, a leading dense layer), scaled down so a CPU runs them in milliseconds.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen3MoeConfig


def tiny_qwen3_moe_config(**overrides) -> Qwen3MoeConfig:
    """Qwen3-30B-A3B's layout (128 experts, top-8, normalised top-k) at toy size: 8 experts, top-2."""
    kw = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=256, output_router_logits=True,
        router_aux_loss_coef=0.01, tie_word_embeddings=False, initializer_range=0.1,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def tiny_deepseek_v3_config(**overrides) -> DeepseekV3Config:
    """DeepSeek-V3's layout (sigmoid router, n_group/topk_group, shared expert, dense first layer)."""
    kw = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.1,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A causal LM from ``config`` with weights drawn from ``seed`` (same on every rank)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # the router bias is a zero buffer at init; make selection depend on it
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model.eval()


def qwen3_30b_a3b_mini_config(**overrides) -> Qwen3MoeConfig:
    """Qwen3-30B-A3B scaled down for the default fine-tune (about 0.7 M parameters).

    Kept from the real model: hidden : moe_intermediate : intermediate = 2048 : 768 : 6144 (here
    64 : 24 : 192), grouped-query attention (32:4 heads there, 4:1 here), every layer MoE, normalised
    top-k routing, aux-loss coefficient 0.001, rope theta 1e6. Scaled: 48 -> 4 layers, top-8 of 128
    experts -> top-4 of 32, vocabulary 151936 -> 256 (bytes, see ``tiny_data.byte_tokenizer``).
    """
    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=192, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=1024, output_router_logits=True,
        router_aux_loss_coef=0.001, rope_theta=1_000_000.0, tie_word_embeddings=False,
        initializer_range=0.02, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)
