"""What the planners need of a model, read off the model itself: any family Transformers builds.

``load_config`` turns ``--model`` (a preset, a ``config.json``, a model folder, or a Hub id resolved
through the Hugging Face cache, failing fast offline) into a Transformers config. ``MoeModel.of``
builds that config's model on the meta device (no memory) and reads, through ``patches``'
discovery of the experts modules: E, the per-expert parameters and every other parameter (dense),
the experts' hidden and intermediate widths (from ``down_proj``'s shape and the experts class's
``is_transposed``), the number of routed-MoE layers, and top-k from the router module. Only the
routing groups (``n_group``/``topk_group``, DeepSeek-style group-limited routing) come from the
config, where every family that has them names them so. No table per family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hiermoe_hf import patches
from hiermoe_hf.checkpoint.hub import resolve_checkpoint

# config.json of the two presets (the fields that shape parameters and activations).
PRESET_CONFIGS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=40960,
    ),
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, tie_word_embeddings=False, max_position_embeddings=163840,
    ),
}
Params = tuple[tuple[tuple[int, ...], bool], ...]  # (shape, kept in fp32) per parameter


def load_config(model: str):
    """A Transformers config from a preset name, a ``config.json``, a model folder, or a Hub id.

    A Hub id is read from the Hugging Face cache first (only the cache with ``HF_HUB_OFFLINE=1``); a
    Hub that cannot be reached fails fast with a ValueError naming the alternatives.
    """
    if model in PRESET_CONFIGS:
        spec = dict(PRESET_CONFIGS[model])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    if os.path.isfile(model):
        with open(model) as f:
            if "model_type" not in json.load(f):
                raise ValueError(f"{model!r} has no model_type; it is not a Transformers config.json")
        return AutoConfig.from_pretrained(model)  # Transformers' own reader (its encoded inf/nan floats)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"folder {model!r} has no config.json")
        return AutoConfig.from_pretrained(model)
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ValueError(
            f"model {model!r} is not a preset ({', '.join(PRESET_CONFIGS)}), an existing config.json/folder, "
            "or a Hub id of the form 'org/name'"
        )
    try:  # the local cache first; with HF_HUB_OFFLINE=1 only the cache
        folder = resolve_checkpoint(model, patterns=["config.json"])
    except OSError as err:
        raise ValueError(
            f"{err}; without a network pass a local config.json or a preset ({', '.join(PRESET_CONFIGS)})"
        ) from err
    return AutoConfig.from_pretrained(folder)


def meta_model(config, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``config``'s model on the meta device (built in bf16 so that Transformers applies its fp32
    exceptions, e.g. DeepSeek-V3's router); a causal LM, or the base model when there is none."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # no causal-LM class for this config (e.g. an image-text model)
            return AutoModel.from_config(config, dtype=dtype)


@dataclass(frozen=True)
class MoeModel:
    """A MoE model's shape as the planners see it (one experts module per routed-MoE layer).

    ``hidden``/``intermediate``: the width of the rows the experts take (what the exchange moves)
    and one expert's intermediate width. ``dense``/``expert_params``: every parameter as (shape,
    kept in fp32); the experts' are the fused [E, ...] ones (biases included).
    """

    experts: int
    topk: int
    hidden: int
    intermediate: int
    moe_layers: int
    n_group: int
    topk_group: int
    dense: Params
    expert_params: Params

    @staticmethod
    def of(config, name: str = "") -> MoeModel:
        """Read from ``config``'s model built on the meta device; ValueError for a model without experts."""
        model = meta_model(config)
        try:
            sites = patches.find_experts(model)
        except ValueError as err:
            what = name or config.model_type
            raise ValueError(f"config of {what!r} is not a MoE config this planner can read: {err}") from err
        site, experts = sites[0]
        down = experts.down_proj  # [E, H, I], or [E, I, H] for a transposed experts class
        hidden, inter = (down.shape[2], down.shape[1]) if experts.is_transposed else (down.shape[1], down.shape[2])
        ids = {id(getattr(m, p)) for s, m in sites for p in s.param_names}
        dense, expert_params = [], []
        for _, p in model.named_parameters():
            (expert_params if id(p) in ids else dense).append((tuple(p.shape), p.dtype == torch.float32))
        text = config.get_text_config()
        n_group = int(getattr(text, "n_group", None) or 1)
        return MoeModel(
            site.num_experts, _topk(model.get_submodule(site.block_name), text, name), int(hidden), int(inter),
            len(sites), n_group, int(getattr(text, "topk_group", None) or n_group), tuple(dense), tuple(expert_params),
        )


TOPK_NAMES = ("num_experts_per_tok", "top_k_experts", "moe_k")  # config names routers read k from


def _topk(block: torch.nn.Module, config, name: str) -> int:
    """Experts per token: the router module's ``top_k`` (most families' routers keep it), else the
    config attribute the router reads (``num_experts_per_tok``; Gemma 4 ``top_k_experts``; ERNIE ``moe_k``)."""
    for module in block.modules():
        k = getattr(module, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    k = next((getattr(config, n) for n in TOPK_NAMES if getattr(config, n, None)), None)
    if not k:
        what = name or config.model_type
        raise ValueError(f"config of {what!r}: cannot find top-k (no router top_k, none of {', '.join(TOPK_NAMES)})")
    return int(k)
