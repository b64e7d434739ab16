"""Refusals and safety nets around ``patch``: what a patched model must not be wrapped in, which
module of a wrapper stack gets patched, what the patched forward checks (adapted or re-wrapped expert
slices, expert ids in range, a Trainer without the callback) and an optimizer that lost the expert
slices. Each check names the problem and the way out (DESIGN.md section 6)."""

from __future__ import annotations

import gc
import sys
import weakref

import torch
from accelerate.utils import extract_model_from_parallel
from torch.distributed.tensor import DTensor

_TRAINER_CHECKED: set[int] = set()  # id(Runtime) of models already checked for a Trainer without the callback


def _wrapper_name(module: torch.nn.Module) -> str | None:
    """The name of a wrapper that cannot keep expert slices rank-local, or None."""
    cls = type(module)
    if cls.__name__ == "DeepSpeedEngine" or cls.__module__.startswith("deepspeed"):
        return "DeepSpeed (ZeRO)"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch builds without distributed
        FullyShardedDataParallel = ()
    if isinstance(module, FullyShardedDataParallel):
        return "torch FullyShardedDataParallel (FSDP1)"
    return None


def refuse_wrappers(model: torch.nn.Module) -> None:
    """ValueError when ``model`` is (or contains) a wrapper whose sharding would mix expert slices,
    or is already inside DistributedDataParallel (which has registered the full experts)."""
    for module in model.modules():
        name = _wrapper_name(module)
        if name is not None:
            raise ValueError(
                f"hiermoe_hf cannot patch a model wrapped in {name}: it shards or flattens every parameter, "
                "expert slices included, so ranks would mix different experts. Patch the bare model and "
                "wrap it in DistributedDataParallel, or shard the dense part with hiermoe_hf.shard_dense"
            )
    chain = wrapper_chain(model)
    if any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in chain) or inside_ddp(chain[-1]):
        raise ValueError(
            "the model is already wrapped in DistributedDataParallel (directly, as ddp.module, or inside "
            "torch.compile(DDP(model))), which has registered the full experts and would average different "
            "ranks' expert slices; call hiermoe_hf.patch(model) first and wrap the patched model afterwards"
        )


def wrapper_chain(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model`` and what it wraps, through ``torch.compile`` (``_orig_mod``) and DDP (``.module``), read
    without Accelerate's unwrap (which, keeping the compile wrapper, re-points it past a DDP inside)."""
    chain = [model]
    while True:
        m = chain[-1]
        inner = m.__dict__.get("_orig_mod") or m._modules.get("_orig_mod")
        if inner is None and isinstance(m, torch.nn.parallel.DistributedDataParallel):
            inner = m.module
        if inner is None:
            return chain
        chain.append(inner)


def inside_ddp(module: torch.nn.Module) -> bool:
    """Whether a live ``DistributedDataParallel`` wraps ``module`` (``patch(ddp.module)``, or
    ``torch.compile(DDP(model))`` unwrapped to the model). DDP leaves no mark on the module it wraps, and
    its reducer keeps averaging the module's gradients as long as it lives, so the live objects are
    searched (once per ``patch``; a wrapper already dropped is collected first so it is not mistaken)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # no process group: no DDP can exist

    def found() -> bool:
        # Referrers, not a scan of every live object (gc.get_objects() costs seconds in a big process):
        # module <- DDP's ``_modules`` dict <- DDP's instance ``__dict__`` (or DDP itself) <- DDP.
        for holder in gc.get_referrers(module):
            if not (isinstance(holder, dict) and holder.get("module") is module):
                continue
            for owner in gc.get_referrers(holder):
                if isinstance(owner, ddp):
                    return True
                if isinstance(owner, dict) and owner.get("_modules") is holder and any(
                        isinstance(o, ddp) and getattr(o, "__dict__", None) is owner for o in gc.get_referrers(owner)):
                    return True
        return False

    if not found():
        return False
    gc.collect()
    return found()


def patch_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``patch`` acts on: the Transformers model inside Accelerate/``torch.compile``
    wrappers and inside a PEFT model (whose own ``save_pretrained`` and forward stay untouched)."""
    inner = extract_model_from_parallel(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def refuse_adapted_experts(experts: torch.nn.Module, name: str, parent: torch.nn.Module | None = None) -> None:
    """ValueError when PEFT adapts the routed experts' parameters (``target_parameters``): the experts
    module is parametrized, is a PEFT layer (``base_layer``), or is the ``base_layer`` of ``parent``."""
    wrapped = parent is not None and getattr(parent, "base_layer", None) is experts
    if wrapped or hasattr(experts, "base_layer") or torch.nn.utils.parametrize.is_parametrized(experts):
        raise ValueError(
            f"{name}: the routed experts carry a PEFT adapter (target_parameters); its weights "
            "would not follow the expert sharding and swaps, so hiermoe_hf refuses it: put LoRA on attention, "
            "shared experts or dense MLPs (target_modules), or unpatch the model first"
        )


def check_forward(experts, layer, topk_ids_TK: torch.Tensor) -> None:
    """What the patched forward checks on every call (cheap: dict look-ups and one small reduction),
    and the 1/W gradient hook for an expert slice unfrozen after ``patch``."""
    from hiermoe_hf.runtime.expert_grads import scale_grad_by_world

    if "parametrizations" in experts._modules:  # PEFT's target_parameters adapts experts only during its forward
        refuse_adapted_experts(experts, layer.name)
    for name in layer.param_names:
        check_expert_storage(experts, layer.name, name)
        scale_grad_by_world(experts._parameters[name], layer.runtime.global_world_size)
    check_expert_ids(topk_ids_TK, layer.placement.num_experts)
    if torch.is_grad_enabled() and id(layer.runtime) not in _TRAINER_CHECKED:
        _TRAINER_CHECKED.add(id(layer.runtime))
        weakref.finalize(layer.runtime, _TRAINER_CHECKED.discard, id(layer.runtime))  # ids are reused
        refuse_trainer_without_callback()


def refuse_trainer_without_callback() -> None:
    """ValueError when the first training forward runs inside ``transformers.Trainer`` without
    ``HierMoECallback`` and the Trainer would clip with a rank-local norm (``max_grad_norm > 0``: the
    ranks' clip factors, hence their dense weights, would differ) or save checkpoints (its model save
    runs on rank 0 only, and a patched model's save is collective: it would hang). Every rank runs
    that forward, so every rank raises, before any exchange. One walk up the stack per model."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "training_step" and frame.f_globals.get("__name__") == "transformers.trainer":
            trainer = frame.f_locals.get("self")
            break
        frame = frame.f_back
    else:
        return
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    if any(type(cb).__name__ == "HierMoECallback" for cb in callbacks):
        return
    args = trainer.args
    problems = []
    if (args.max_grad_norm or 0) > 0:
        problems.append(f"max_grad_norm={args.max_grad_norm} clips with a rank-local norm")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
        problems.append("its checkpoint save runs on rank 0 only but the patched model saves collectively (hang)")
    if problems:
        raise ValueError(
            "a HierMoE-patched model is training under transformers.Trainer without HierMoECallback: "
            + "; ".join(problems) + ". Pass callbacks=[hiermoe_hf.trainer.HierMoECallback()] to the Trainer "
            "(or set max_grad_norm=0 and save_strategy='no')"
        )


def check_expert_storage(experts: torch.nn.Module, layer_name: str, param_name: str) -> None:
    """ValueError when a wrapper built after ``patch`` has taken over the expert slices: torch FSDP1
    (flattened: the parameter is gone, a plain view of the flat parameter, or marked
    ``_fsdp_flattened``), FSDP2 without ignoring them (a DTensor) or DeepSpeed ZeRO-3 (``ds_id``).
    A few dict look-ups per layer, no device work."""
    p = experts._parameters.get(param_name)
    if p is None or not isinstance(p, torch.nn.Parameter) or "_fsdp_flattened" in p.__dict__:
        wrapper = "torch FullyShardedDataParallel (FSDP1)"
    elif "ds_id" in p.__dict__:
        wrapper = "DeepSpeed ZeRO-3"
    elif isinstance(p, DTensor):
        wrapper = "FSDP2 (fully_shard) over the expert slices"
    else:
        return
    raise ValueError(
        f"{layer_name}.experts.{param_name} is managed by {wrapper}, which shards or flattens the expert slices that "
        "expert parallelism keeps rank-local, so ranks would mix different experts. Wrap the patched model in "
        "DistributedDataParallel, or shard only the dense part with hiermoe_hf.shard_dense"
    )


def check_expert_ids(topk_ids_TK: torch.Tensor, num_experts: int) -> None:
    """RuntimeError when a router picked an id outside [0, E). One small reduction; on CUDA it is an
    asynchronous device assert (no host sync), on CPU it raises right here.

    A CUDA device assert is fatal for the process's CUDA context: the failing rank dies at its next
    sync and the other ranks wait in their next NCCL collective until the process group's timeout
    (GPU_REVIEW.md #15). Kept because it costs no sync on the hot path; to get a clean exception
    while developing a custom router, run a step on CPU (gloo) or set ``CUDA_LAUNCH_BLOCKING=1``."""
    ok = ((topk_ids_TK >= 0) & (topk_ids_TK < num_experts)).all()
    torch._assert_async(
        ok, f"hiermoe_hf: the router chose an expert id outside [0, {num_experts}); a custom router must return "
        f"ids in 0..{num_experts - 1}"
    )


def check_optimizer_holds_experts(model: torch.nn.Module, optimizer) -> None:
    """ValueError when ``optimizer`` (a plain torch optimizer) lacks a trainable expert slice of the
    patched ``model``: it was built before ``patch`` (or before an ``unpatch`` / ``patch`` cycle, which
    replaces the expert parameters) and would silently leave those experts untouched."""
    from hiermoe_hf.runtime.registry import moe_layers

    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for experts, layer in moe_layers(model).values():
        for name in layer.param_names:
            p = getattr(experts, name)
            if p.requires_grad and id(p) not in held:
                raise ValueError(
                    f"the optimizer does not hold {layer.name}.experts.{name}, this model's trainable expert slice: it "
                    "was built before patch (or before unpatch, which replaces the expert parameters). Build the "
                    "optimizer after hiermoe_hf.patch, or pass it to HierMoEPlugin.prepare, which re-points it"
                )
