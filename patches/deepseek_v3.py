"""DeepSeek-V3 architecture (also Kimi K2 / K2.5, whose configs wrap DeepSeek-V3):
``DeepseekV3MoE`` = router ``gate`` + fused ``experts`` + ``shared_experts``.

The hook: a block forward that hands the shared experts to the routed exchange as side work, so they
run while the routed tokens are in flight (``overlap_chunks`` > 1). Everything else is generic.
"""

MODEL_TYPES = ("deepseek_v3", "kimi_k2", "kimi_k25")
BLOCK_CLASSES = ("DeepseekV3MoE",)


def forward_with_side(block, hidden_states):
    """``DeepseekV3MoE.forward`` with the shared experts run as side work. Same arithmetic as
    Transformers' forward: routed output (reshaped) + shared experts of the block's input.

    The patched experts module takes ``side=`` and then returns (routed_TH, side()).
    """
    residuals = hidden_states
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = block.gate(hidden_states)
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    routed, shared = block.experts(flat, topk_indices, topk_weights, side=lambda: block.shared_experts(residuals))
    return routed.view(*orig_shape) + shared
