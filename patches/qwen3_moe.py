"""Qwen3-MoE (e.g. Qwen3-30B-A3B): ``Qwen3MoeSparseMoeBlock`` = router ``gate`` + fused ``experts``.

No shared experts; dense layers (``mlp_only_layers``) use another class and are left alone.
"""

MODEL_TYPE = "qwen3_moe"
BLOCK_CLASS = "Qwen3MoeSparseMoeBlock"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def num_experts(config) -> int:
    return config.num_experts
