"""Memory per rank of fine-tuning a patched model: will it fit before you rent the cluster?

Parameters, gradients and optimizer state are counted exactly from the model's own parameter
shapes (the Transformers model built on the meta device from its config): the routed experts are
split E/W per rank (expert parallelism over the whole world); the dense part is whole on every
rank under DDP, or sharded by FSDP2 (``hiermoe_hf.shard_dense``: dim 0 of every dense parameter in
W chunks of ceil(rows / W), as ``torch.chunk``; rank 0 holds the largest, and the figures are
rank 0's). Gradients: one per parameter element, in the parameter dtype. AdamW: two moments per
element in the parameter dtype plus one fp32 ``step`` per parameter tensor; SGD: none (no momentum).

Activations are an estimate of the tensors autograd keeps for the backward (the activation peak at
the end of the forward), per token of a micro-batch; with gradient checkpointing, every layer's
input plus one layer's activations (its recompute) plus the head. ``activation_breakdown`` gives
the terms; docs/memory.md states the measured accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hiermoe_hf.cost.moe_model import PRESET_CONFIGS, MoeModel, load_config  # noqa: F401  (re-exported)

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "sgd")
DENSE_SHARDINGS = ("ddp", "fsdp2")

@dataclass(frozen=True)
class ParamTable:
    """Every parameter as (shape, kept in fp32): dense ones, and the routed experts' fused ones
    ([E, ...], biases included), read off the model built on the meta device (``moe_model``), so it
    is right for any family. "Kept in fp32": Transformers' ``_keep_in_fp32_modules`` (DeepSeek-V3's
    router). ``moe``: the rest of what was read (top-k, widths, MoE layers) for the activations."""

    dense: tuple[tuple[tuple[int, ...], bool], ...]
    experts: tuple[tuple[tuple[int, ...], bool], ...]
    num_experts: int
    moe: MoeModel

    @staticmethod
    def of(config) -> ParamTable:
        moe = MoeModel.of(config)
        return ParamTable(moe.dense, moe.expert_params, moe.experts, moe)


def rank0_bytes(params, world: int, sharded: bool, dtype_bytes: int, experts: bool = False) -> int:
    """Bytes rank 0 holds of ``params`` ((shape, fp32) pairs): whole; experts E/W of dim 0; or (FSDP2)
    dim 0 in chunks of ceil(rows / W)."""
    total = 0
    for shape, fp32 in params:
        rows = shape[0] // world if experts else (math.ceil(shape[0] / world) if sharded else shape[0])
        total += rows * math.prod(shape[1:]) * (4 if fp32 else dtype_bytes)
    return total


def activation_breakdown(
    config, tokens: int, dtype_bytes: int, checkpointing: bool, world: int, moe: MoeModel | None = None
) -> dict:
    """Bytes autograd keeps for the backward on one rank, by term (``tokens`` = micro-batch x seq len);
    the MoE terms from ``moe`` (read off the model: ``MoeModel.of(config)`` when not given)."""
    moe = moe or MoeModel.of(config)
    config = config.get_text_config()
    H, V = config.hidden_size, config.vocab_size
    nh = config.num_attention_heads
    kv_lora = getattr(config, "kv_lora_rank", None)
    if kv_lora:  # DeepSeek MLA: low-rank q/kv, then per-head nope+rope queries/keys and values
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_dim, k_dim, v_dim = nh * qk, nh * qk, nh * config.v_head_dim
        o_dim = v_dim
        lora = 2 * ((config.q_lora_rank or 0) + kv_lora + config.qk_rope_head_dim)
    else:
        hd = getattr(config, "head_dim", None) or H // nh
        q_dim, k_dim, v_dim = nh * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd
        o_dim, lora = nh * hd, 0
    # Two RMSNorms (input and output kept) and the projections' input, q/k before and after norm and
    # rope, v, the attention output twice (kernel output, o_proj input), an fp32 log-sum-exp per head.
    attention = 5 * H + 3 * (q_dim + k_dim) + v_dim + 2 * o_dim + lora + nh * 4 // dtype_bytes
    E, K, I_moe = moe.experts, moe.topk, moe.intermediate
    # Router logits and scores; per (token, expert) row: its input, gate/up output, the activation's
    # input, output and product, the down input, the weighted output and the combine's two sums, and
    # about four int64 indices (dispatch and expand layouts). Balanced routing: E/W experts per rank.
    moe_row = 2 * E + K * (4 * H + 5 * I_moe + 32 // dtype_bytes)
    shared = getattr(config, "n_shared_experts", 0) or 0
    moe_row += shared * (H + 4 * I_moe) if shared else 0
    dense_mlp = H + 4 * (getattr(config, "intermediate_size", None) or I_moe)
    L = config.num_hidden_layers
    per_layer = [attention + (moe_row if i < moe.moe_layers else dense_mlp) for i in range(L)]
    # The head: final norm (in, out) and the loss's fp32 log-softmax.
    head = 2 * H + V * 4 // dtype_bytes
    if checkpointing:
        layers = L * H + max(per_layer)  # every layer's input, plus the layer being recomputed
    else:
        layers = sum(per_layer)
    return {
        "layers_bytes": int(tokens * layers * dtype_bytes),
        "head_bytes": int(tokens * head * dtype_bytes),
        "activations_bytes": int(tokens * (layers + head) * dtype_bytes),
    }


def memory_plan(
    config, world: int, dtype: str = "bf16", optimizer: str = "adamw", dense_sharding: str = "ddp",
    gradient_checkpointing: bool = False, seq_len: int = 4096, micro_batch: int = 1,
    gpu_memory_gib: float = 80.0, table: ParamTable | None = None, ep_size: int | None = None,
) -> dict:
    """Per-rank bytes (rank 0, the largest) of fine-tuning ``config`` on ``world`` ranks; the routed
    experts split E/ep_size per rank (``HierMoEConfig.ep_size``; None = the world)."""
    _check(dtype, DTYPE_BYTES, "dtype")
    _check(optimizer, OPTIMIZERS, "optimizer")
    _check(dense_sharding, DENSE_SHARDINGS, "dense_sharding")
    table = table or ParamTable.of(config)
    ep = world if ep_size is None else ep_size
    if world % ep or table.num_experts % ep:
        raise ValueError(f"{table.num_experts} experts cannot be split over expert-parallel groups of {ep} "
                         f"ranks on {world} ranks")
    b = DTYPE_BYTES[dtype]
    dense = rank0_bytes(table.dense, world, dense_sharding == "fsdp2", b)
    experts = rank0_bytes(table.experts, ep, False, b, experts=True)
    params = dense + experts  # bytes; gradients and AdamW moments are in the parameters' dtype
    tensors = len(table.dense) + len(table.experts)
    optimizer_bytes = (2 * params + 4 * tensors) if optimizer == "adamw" else 0
    tokens = seq_len * micro_batch
    acts = activation_breakdown(config, tokens, b, gradient_checkpointing, world, table.moe)
    # Alive beside the saved activations at the loss: the returned logits and their fp32 gradient.
    logits = tokens * config.get_text_config().vocab_size * (b + 4)
    total = 2 * params + optimizer_bytes + acts["activations_bytes"] + logits
    budget = int(gpu_memory_gib * 2**30)
    return {
        "dense_params_bytes": dense,
        "expert_params_bytes": experts,
        "grads_bytes": params,
        "optimizer_bytes": optimizer_bytes,
        "activations_bytes": acts["activations_bytes"],
        "total_bytes": total,
        "fits": total <= budget,
        "budget_bytes": budget,
        "logits_transient_bytes": logits,
        "activation_terms": {k: v for k, v in acts.items() if k != "activations_bytes"},
        "world_size": world,
        "ep_size": ep,
        "dense_sharding": dense_sharding,
    }


def smallest_fitting(config, per_node: int, max_nodes: int = 1024, **kwargs) -> str | None:
    """The smallest ``NxG`` topology (G = ``per_node``, N a power of two) on which the plan fits, or None."""
    table = ParamTable.of(config)
    nodes = 1
    while nodes <= max_nodes:
        world = nodes * per_node
        if table.num_experts % world == 0 and memory_plan(config, world, table=table, **kwargs)["fits"]:
            return f"{nodes}x{per_node}"
        nodes *= 2
    return None


def add_arguments(parser) -> None:
    """The planner's ``--memory`` options."""
    g = parser.add_argument_group("memory (--memory)")
    g.add_argument("--memory", action="store_true", help="add per-rank memory of full fine-tuning")
    g.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="parameter dtype (default bf16)")
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="default adamw")
    g.add_argument("--dense-sharding", default="ddp", choices=list(DENSE_SHARDINGS), help="default ddp")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    g.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-step (default 1)")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")


def _kwargs(args) -> dict:
    if args.seq_len < 1 or args.micro_batch < 1 or args.gpu_memory <= 0:
        raise ValueError("--seq-len and --micro-batch must be >= 1 and --gpu-memory > 0")
    return dict(
        dtype=args.dtype, optimizer=args.optimizer, dense_sharding=args.dense_sharding,
        gradient_checkpointing=args.gradient_checkpointing, seq_len=args.seq_len, micro_batch=args.micro_batch,
        gpu_memory_gib=args.gpu_memory,
    )


def fits_from_args(args, world: int):
    """ep_size -> whether a layout with expert-parallel groups of that size fits (the planner's layouts)."""
    config, kwargs = load_config(args.model), _kwargs(args)
    table = ParamTable.of(config)
    return lambda ep: memory_plan(config, world, table=table, ep_size=ep, **kwargs)["fits"]


def plan_from_args(args, levels: tuple[int, ...]) -> dict:
    """``memory_plan`` for the CLI arguments, plus the smallest fitting ``N x G`` topology."""
    config, kwargs = load_config(args.model), _kwargs(args)
    out = memory_plan(config, math.prod(levels), **kwargs)
    out["smallest_fitting_topology"] = smallest_fitting(config, levels[-1], **kwargs)
    if not out["fits"]:
        out["advice"] = _advice(config, levels, kwargs)
    return out


# The settings that shrink a rank's memory most: dense part sharded over all ranks, activations recomputed.
_SAVING = {"dense_sharding": "fsdp2", "gradient_checkpointing": True}
_SAVING_FLAGS = "--dense-sharding fsdp2 --gradient-checkpointing"


def _advice(config, levels: tuple[int, ...], kwargs: dict) -> str | None:
    """What to change when the plan does not fit: the memory-saving settings not yet given, and where
    they fit (this topology, or the smallest one); None when they are already on."""
    if all(kwargs.get(k) == v for k, v in _SAVING.items()):
        return None
    saving = {**kwargs, **_SAVING}
    here = memory_plan(config, math.prod(levels), **saving)
    shape = "x".join(map(str, levels))
    if here["fits"]:
        where = f"fits on {shape} ({here['total_bytes'] / 2**30:.1f} GiB per rank)"
    else:
        smallest = smallest_fitting(config, levels[-1], **saving)
        where = f"smallest topology that fits: {smallest}" if smallest else "still none up to 1024 nodes"
    return f"with {_SAVING_FLAGS}: {where}"


def format_text(plan: dict) -> str:
    gib = 2**30
    rows = [("dense parameters", "dense_params_bytes"), ("expert parameters", "expert_params_bytes"),
            ("gradients", "grads_bytes"), ("optimizer state", "optimizer_bytes"),
            ("activations (estimate)", "activations_bytes"), ("logits + their grad", "logits_transient_bytes"),
            ("total", "total_bytes")]
    lines = [f"memory per rank (rank 0, the largest), dense part {plan['dense_sharding']}, {plan['world_size']} ranks"]
    lines += [f"  {label:<24}{plan[key] / gib:>10.2f} GiB" for label, key in rows]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  {verdict} in {plan['budget_bytes'] / gib:.0f} GiB; smallest topology that fits: "
                 f"{plan.get('smallest_fitting_topology') or 'none up to 1024 nodes'}")
    if plan.get("advice"):
        lines.append(f"  {plan['advice']}")
    return "\n".join(lines)


def _check(value, valid, name: str) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")
