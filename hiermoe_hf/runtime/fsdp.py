"""``hiermoe_hf.shard_dense``: FSDP2 on the dense part; the routed experts stay expert-parallel.

Every rank otherwise holds the whole dense part (attention, embeddings, shared experts, dense MLPs,
routers) with its optimizer state: about 17 B parameters for DeepSeek-V3. ``shard_dense`` applies
``torch.distributed.fsdp.fully_shard`` to each decoder layer and then to the root over all ranks (a
1-D mesh of all W ranks, whatever ``ep_size``), with the expert slices in ``ignored_params``: they
stay plain rank-local Parameters, exchanged by the patched forward as before. Dense parameters
become DTensors sharded on dim 0; FSDP2 all-gathers a layer's dense weights for its forward and
backward and reduce-scatters their gradients (averaged over ranks), which is DDP's semantics
(DESIGN.md section 6). Expert gradients already sum every rank's tokens and are divided by W by
``all_reduce_gradients`` (hand-written loops) or the plugin's gradient hooks.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.runtime.registry import runtime_of, unwrap

DENSE_SHARDINGS = ("ddp", "fsdp2")


def is_sharded(tensor: torch.Tensor) -> bool:
    """A dense parameter (or its gradient) sharded by FSDP2: each rank holds one part of it."""
    return isinstance(tensor, DTensor)


def dense_is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(unwrap(model), FSDPModule)


def shard_dense(model: torch.nn.Module, mixed_precision: MixedPrecisionPolicy | None = None) -> torch.nn.Module:
    """Shard the dense part of a patched model with FSDP2 over all ranks; returns ``model``.

    Collective. Call after ``hiermoe_hf.patch`` (or ``hiermoe_hf.from_pretrained``) and before
    creating the optimizer (dense parameters are replaced by sharded ones). ``mixed_precision``: an
    FSDP2 ``MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16, reduce_dtype=torch.float32``)
    for the dense part; the expert slices keep their dtype (and fp32 master weights) and are cast to the
    rows' bf16/fp16 for the GEMMs (as FSDP2's param_dtype would; torch's fast grouped GEMM is bf16-only).
    Not with DDP: use one or the other for the dense part.
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("shard_dense got a DDP-wrapped model; pass the patched model itself (FSDP2 replaces DDP)")
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecisionPolicy):
        raise TypeError(
            f"mixed_precision must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, "
            f"got {type(mixed_precision).__name__}"
        )
    runtime = runtime_of(model)  # ValueError on an unpatched model
    base = unwrap(model)
    if isinstance(base, FSDPModule):
        return model  # already sharded: a second call is a no-op
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_dense needs an initialised default process group (FSDP2 shards over its ranks)")
    if dist.get_world_size() != runtime.global_world_size:
        raise ValueError(
            f"shard_dense shards over the default group ({dist.get_world_size()} ranks), but the model is "
            f"patched for {runtime.global_world_size}; use the same ranks for both"
        )
    device = next(base.parameters()).device
    # Over the whole world, also with ep_size < W: dense grads are averaged over every rank's tokens.
    fully_shard_dense(base, set(expert_parameters(model)), runtime.global_world_size, device.type, mixed_precision)
    return model


def fully_shard_dense(base, ignored: set, world: int, device_type: str, mixed_precision=None) -> None:
    """``fully_shard`` each decoder layer, then the root, over a 1-D mesh of all ranks; ``ignored``
    (the expert slices) stay out. Works on a model still on the meta device (loading shards on read)."""
    kwargs = {"mesh": init_device_mesh(device_type, (world,)), "ignored_params": ignored}
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for layer in decoder_layers(base):
        _shard_other_dtypes(layer, kwargs)
        fully_shard(layer, **kwargs)
    _shard_other_dtypes(base, kwargs)
    fully_shard(base, **kwargs)


def _shard_other_dtypes(module: torch.nn.Module, kwargs: dict) -> None:
    """FSDP2 needs one dtype per group: submodules whose parameters differ from the module's main dtype
    (DeepSeek-V3 keeps its router in fp32 in a bf16 model) get their own group, uncast by the policy."""
    ignored = kwargs["ignored_params"]
    sizes: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p not in ignored and not isinstance(p, DTensor):
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if len(sizes) < 2:
        return
    main = max(sizes, key=sizes.get)
    policy = kwargs.get("mp_policy")
    own = {**kwargs, "mp_policy": MixedPrecisionPolicy(reduce_dtype=policy.reduce_dtype)} if policy else kwargs
    for sub in module.modules():
        direct = [p for p in sub.parameters(recurse=False) if p not in ignored and not isinstance(p, DTensor)]
        if direct and any(p.dtype != main for p in direct):
            fully_shard(sub, **own)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers`` in Qwen3-MoE and DeepSeek-V3)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list at .{model.base_model_prefix}.layers")
    return layers


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def dense_sharding_from_env(value: str | None) -> str:
    """The plugin/callback field: the argument, else ``HIERMOE_DENSE_SHARDING``, else "ddp"; validated."""
    source = "dense_sharding"
    if value is None:
        raw = os.environ.get("HIERMOE_DENSE_SHARDING", "").strip()
        value, source = (raw or "ddp"), ("HIERMOE_DENSE_SHARDING" if raw else source)
    if value not in DENSE_SHARDINGS:
        raise ValueError(f"{source}={value!r} is not valid; choose one of {', '.join(DENSE_SHARDINGS)}")
    return value


def shard_dense_repointing(model: torch.nn.Module, optimizers=(), mixed_precision=None) -> None:
    """``shard_dense``, then point optimizers made before it at the sharded dense parameters.

    An optimizer that has already stepped cannot be re-pointed (its state is for the full tensors).
    """
    before = dict(unwrap(model).named_parameters())
    for opt in optimizers:
        if any(opt.state.get(p) for group in opt.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer has already stepped; with dense_sharding='fsdp2' create it before any step "
                "(or after sharding) and pass it to prepare"
            )
    shard_dense(model, mixed_precision)
    replaced = {id(before[n]): p for n, p in unwrap(model).named_parameters() if n in before and before[n] is not p}
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
