"""DeepSeek-V3 architecture: ``DeepseekV3MoE`` = router ``gate`` + fused ``experts`` + ``shared_experts``.

The router (sigmoid scores, correction bias, group-limited choice, routed_scaling_factor) and the
shared experts stay Transformers' code; the first ``first_k_dense_replace`` layers are dense MLPs.
"""

MODEL_TYPE = "deepseek_v3"
BLOCK_CLASS = "DeepseekV3MoE"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def num_experts(config) -> int:
    return config.n_routed_experts
