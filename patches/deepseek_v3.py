"""DeepSeek-V3 architecture: ``DeepseekV3MoE`` = router ``gate`` + fused ``experts`` + ``shared_experts``.

The router (sigmoid scores, correction bias, group-limited choice, routed_scaling_factor) and the
shared experts stay Transformers' code; the first ``first_k_dense_replace`` layers are dense MLPs.
"""

MODEL_TYPE = "deepseek_v3"
BLOCK_CLASS = "DeepseekV3MoE"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def num_experts(config) -> int:
    return config.n_routed_experts


def forward_with_side(block, hidden_states):
    """``DeepseekV3MoE.forward`` with the shared experts handed to the routed exchange as side work,
    so they run while the routed tokens are in flight (``overlap_chunks`` > 1). Same arithmetic as
    Transformers' forward: routed output (reshaped) + shared experts of the block's input.

    The patched experts module takes ``side=`` and then returns (routed_TH, side()).
    """
    residuals = hidden_states
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = block.gate(hidden_states)
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    routed, shared = block.experts(flat, topk_indices, topk_weights, side=lambda: block.shared_experts(residuals))
    return routed.view(*orig_shape) + shared
