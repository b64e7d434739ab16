"""``HierMoEPlugin``: HierMoE expert parallelism in an ordinary Accelerate training loop (DESIGN.md section 10).

Accelerate has no generic plugin slot (``kwargs_handlers`` accepts only its own classes), so the
plugin wraps ``accelerator.prepare``. The lines a user changes in an Accelerate loop::

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plugin = HierMoEPlugin(dispatch="auto", swap_interval=50)      # or HIERMOE_* environment variables
    model, optimizer, dataloader, scheduler = plugin.prepare(       # instead of accelerator.prepare(...)
        accelerator, model, optimizer, dataloader, scheduler)
    ...  # the loop is unchanged: accelerator.backward, accelerator.clip_grad_norm_, optimizer.step(),
    ...  # accelerator.save_state / load_state all do the right thing
    accelerator.unwrap_model(model).save_pretrained(out_dir)        # on every rank: it is collective

What ``prepare`` does, in order: patches the model (sharding the experts over the launch's ranks,
topology = nodes x processes per node unless given), re-points the optimizer at the expert slices,
keeps the expert slices out of DDP and scales their gradients by 1/W (section 6), calls
``accelerator.prepare``, then hooks the optimizer (expert swap every ``swap_interval`` steps, metrics
to ``accelerator.log``), ``save_state``/``load_state`` (per-rank expert files) and
``accelerator.clip_grad_norm_`` (the global norm, expert part reduced over ranks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from hiermoe_hf.api import patch
from hiermoe_hf.checkpoint.manifest import new_save_id
from hiermoe_hf.checkpoint.rank_state import RankStateStore
from hiermoe_hf.config import HierMoEConfig, naming_env
from hiermoe_hf.runtime.ep_layout import EPLayout, group_topology
from hiermoe_hf.runtime.expert_grads import (
    divide_expert_grads_by_world,
    expert_parameter_names,
    keep_experts_out_of_ddp,
)
from hiermoe_hf.runtime.fsdp import dense_sharding_from_env, is_sharded, shard_dense_repointing
from hiermoe_hf.runtime.registry import is_patched, runtime_of
from hiermoe_hf.topology import Topology, levels_from_launcher, parse_levels
from hiermoe_hf.training import grad_clip
from hiermoe_hf.training.ddp import broadcast_dense_state, dense_requires_grad
from hiermoe_hf.training.expert_dp import ExpertGradSync
from hiermoe_hf.training.loss_scaling import agree_before_unscale
from hiermoe_hf.training.safe_save import crash_safe_save_state
from hiermoe_hf.training.step_hook import after_optimizer_step
from hiermoe_hf.training.traffic import TrafficMeter

# DDP-style launches: one full replica of the dense model per process, gradients averaged by DDP.
_SUPPORTED = tuple(
    getattr(DistributedType, n)
    for n in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
              "MULTI_HPU")
    if hasattr(DistributedType, n)
)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class HierMoEPlugin:
    """HierMoE settings for an Accelerate run; every field left as None is read from ``HIERMOE_<FIELD>``.

    Precedence: an argument given here > the environment variable (``HIERMOE_TOPOLOGY=2x2``,
    ``HIERMOE_DISPATCH=hd2``, ``HIERMOE_SWAP_INTERVAL=50``, ...) > the ``HierMoEConfig`` default.
    """

    topology: str | Sequence[int] | None = field(
        default=None, metadata=_help("level sizes outermost first, e.g. '2x4'; None: nodes x processes per node")
    )
    dispatch: str | None = field(default=None, metadata=_help("'auto', 'a2a', '2dh' or 'hd1'..'hdD'"))
    kernels: str | None = field(default=None, metadata=_help("'auto', 'triton' or 'torch'"))
    swap_interval: int | None = field(default=None, metadata=_help("optimizer steps between expert swaps; 0 = never"))
    swap_policy: str | None = field(default=None, metadata=_help("'hierd' (dedup-aware) or 'load'"))
    cost_model: str | None = field(
        default=None, metadata=_help("calibration JSON, preset or 'calibrate'; unset: auto times its candidates")
    )
    swap_pairs: int | None = field(default=None, metadata=_help("expert pairs exchanged per swap round"))
    overlap_chunks: int | str | None = field(
        default=None, metadata=_help("token chunks pipelined per MoE layer; 1 = none; 'auto' = timed (default)")
    )
    ep_size: int | None = field(
        default=None, metadata=_help("ranks per expert-parallel group; unset = the world (HIERMOE_EP_SIZE)")
    )
    dense_sharding: str | None = field(
        default=None, metadata=_help("'ddp' (dense part replicated, default) or 'fsdp2' (hiermoe_hf.shard_dense)")
    )
    collective_timeout_s: float | None = field(
        default=None,
        metadata=_help("seconds a rank waits for the others in a package collective (HIERMOE_COLLECTIVE_TIMEOUT)"),
    )

    def __post_init__(self) -> None:
        self.dense_sharding = dense_sharding_from_env(self.dense_sharding)
        # HierMoEConfig's rule (config.py): the arguments given here > HIERMOE_<FIELD> > the default;
        # it raises a ValueError naming the bad value (and the variable, for one from the environment).
        resolved = HierMoEConfig(**{f.name: getattr(self, f.name) for f in fields(HierMoEConfig)
                                    if getattr(self, f.name) is not None})
        for f in fields(HierMoEConfig):
            setattr(self, f.name, getattr(resolved, f.name))
        self.step = 0  # optimizer steps taken under this plugin (restored by load_state)
        self.swaps_done = 0
        self.metrics: dict[str, float] = {}
        self.accelerator = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._store: RankStateStore | None = None
        self._meter: TrafficMeter | None = None
        self._expert_sync: ExpertGradSync | None = None
        self._save_id: str | None = None

    # ---- configuration ---------------------------------------------------------------------------------------

    def config(self, topology: Topology | None = None) -> HierMoEConfig:
        """The ``HierMoEConfig`` these fields describe (with ``topology`` resolved, when given)."""
        return HierMoEConfig(
            topology=list(topology.levels) if topology is not None else self.topology,
            dispatch=self.dispatch,
            kernels=self.kernels,
            swap_interval=self.swap_interval,
            swap_policy=self.swap_policy,
            cost_model=self.cost_model,
            swap_pairs=self.swap_pairs,
            overlap_chunks=self.overlap_chunks,
            ep_size=self.ep_size,
            collective_timeout_s=self.collective_timeout_s,
        )

    def resolve_topology(self, world_size: int) -> Topology:
        """The topology for a launch of ``world_size`` processes (LOCAL_WORLD_SIZE per node).

        A given topology must cover exactly the launched processes, and its nodes must nest with the
        launcher's (a topology node may hold several real nodes or split one, e.g. 2x2 emulated on
        one machine of 4 processes, but may not straddle a real node boundary).
        """
        with naming_env(self, "topology", "ep_size"):  # a value from HIERMOE_* is named in the error
            return self._resolve_topology(world_size)

    def _resolve_topology(self, world_size: int) -> Topology:
        nodes, per_node = levels_from_launcher(world_size)
        launch = f"{nodes} node(s) x {per_node} process(es) per node"
        if self.ep_size is not None and self.ep_size != world_size:
            return self._group_topology(world_size, per_node, launch)
        if self.topology is None:
            return Topology((nodes, per_node))
        levels = parse_levels(self.topology)
        shape = "x".join(map(str, levels))
        if math.prod(levels) != world_size:
            raise ValueError(
                f"HierMoEPlugin topology {shape} has {math.prod(levels)} ranks but this launch started "
                f"{world_size} processes ({launch}); give a topology whose level sizes multiply to {world_size} "
                f"(e.g. '{nodes}x{per_node}'), or leave it unset to take {nodes}x{per_node} from the launcher"
            )
        if len(levels) >= 2:
            node_size = math.prod(levels[1:])
            if node_size % per_node and per_node % node_size:
                raise ValueError(
                    f"HierMoEPlugin topology {shape} groups ranks into nodes of {node_size}, which straddle this "
                    f"launch's nodes of {per_node} processes ({launch}); use a topology whose node size divides or "
                    f"is a multiple of {per_node}, e.g. '{nodes}x{per_node}'"
                )
        return Topology(levels)

    def _group_topology(self, world_size: int, per_node: int, launch: str) -> Topology:
        """With ``ep_size`` < the launch: one expert-parallel group's topology (``runtime/ep_layout.py``);
        a group is a block of consecutive ranks, so it must fit in a node or cover whole nodes."""
        layout = EPLayout.resolve(self.ep_size, world_size, 0)
        ep = layout.ep_size
        if not (per_node % ep == 0 or ep % per_node == 0):
            raise ValueError(
                f"HierMoEPlugin ep_size={ep} neither divides nor is a multiple of this launch's {per_node} processes "
                f"per node ({launch}): a group would straddle a node; use an ep_size that divides {per_node} or is a "
                "multiple of it"
            )
        return group_topology(self.topology, layout)

    # ---- prepare -----------------------------------------------------------------------------------------------

    def prepare(self, accelerator, *objects, **prepare_kwargs):
        """``accelerator.prepare(*objects)`` for a HierMoE model: patch, exclude experts from DDP, hook.

        Exactly one of ``objects`` must be the model (a Qwen3-MoE or DeepSeek-V3 ``PreTrainedModel``,
        patched or not). Create the optimizer before or after patching: an optimizer passed here that
        still holds the full expert tensors is re-pointed at the local slices (it must not have stepped).
        Returns what ``accelerator.prepare`` returns.
        """
        modules = [o for o in objects if isinstance(o, torch.nn.Module)]
        if len(modules) != 1:
            raise ValueError(f"HierMoEPlugin.prepare needs exactly one model among its objects, got {len(modules)}")
        model = modules[0]
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if len(optimizers) > 1:
            raise ValueError(f"HierMoEPlugin.prepare supports one optimizer, got {len(optimizers)}")
        world = self._check_launch(accelerator)
        topology = self.resolve_topology(world)
        if self.swap_interval:
            from hiermoe_hf.swap.round import swap_experts  # noqa: F401  (fail now, not at the first swap)
        if is_patched(model):
            patched_topology = runtime_of(model).topology
            if patched_topology != topology:
                raise ValueError(
                    f"the model is already patched with topology {patched_topology}, but HierMoEPlugin resolved "
                    f"{topology} for this launch; patch it with the same topology or leave the patching to prepare()"
                )
        else:
            before = dict(model.named_parameters())
            patch(model, self.config(topology))
            after = dict(model.named_parameters())
            replaced = {id(before[n]): p for n, p in after.items() if n in before and before[n] is not p}
            for opt in optimizers:
                _repoint(opt, replaced)
        fsdp2 = self.dense_sharding == "fsdp2" and world > 1
        self._experts_only = world > 1 and not fsdp2 and not dense_requires_grad(model)
        if fsdp2:
            shard_dense_repointing(model, optimizers)
        elif world > 1:
            keep_experts_out_of_ddp(model)
        if self._experts_only:  # DDP would refuse a model with no dense gradient: do what its constructor does
            broadcast_dense_state(model)
        if world > 1:
            divide_expert_grads_by_world(model)
        self._expert_sync = ExpertGradSync(model)  # replicas of the expert-parallel group (ep_size < W)
        if fsdp2 or self._experts_only:  # Accelerate would wrap the model in DDP: register it unwrapped
            # FSDP2 placed the shards already; an experts-only model moves to the accelerator's device as usual
            prepared = _prepare_without_ddp(accelerator, model, objects, prepare_kwargs, place=not fsdp2)
        else:
            prepared = accelerator.prepare(*objects, **prepare_kwargs)
        as_tuple = prepared if isinstance(prepared, tuple) else (prepared,)
        accelerated = [o for o in as_tuple if isinstance(o, AcceleratedOptimizer)]
        self._attach(accelerator, model, accelerated[0] if accelerated else None)
        return prepared

    def _check_launch(self, accelerator) -> int:
        dtype = accelerator.distributed_type
        if dtype not in _SUPPORTED:
            raise ValueError(
                f"HierMoEPlugin supports DDP-style launches ({', '.join(str(t) for t in _SUPPORTED)}), not {dtype}: "
                "experts are already sharded by expert parallelism; drop FSDP/DeepSpeed/Megatron from the config "
                "(for FSDP2 on the dense part use HierMoEPlugin(dense_sharding='fsdp2'))"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        world = accelerator.num_processes
        if launched != world:
            raise ValueError(
                f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this Accelerator sees "
                f"{world} ({dtype}); on a machine without GPUs create it with Accelerator(cpu=True)"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world:
            raise ValueError(
                f"the default process group has {dist.get_world_size()} ranks but the Accelerator has {world}"
            )
        return world

    def _attach(self, accelerator, model: torch.nn.Module, optimizer: AcceleratedOptimizer | None) -> None:
        if self.accelerator is not None:
            raise ValueError("this HierMoEPlugin already prepared a model; create one plugin per model")
        self.accelerator, self.model = accelerator, model
        self.optimizer = optimizer.optimizer if optimizer is not None else None
        self._meter = TrafficMeter(model)
        self._store = RankStateStore(model, self.optimizer)
        if self.optimizer is not None:
            # Expert grads summed over the replicas before the step (if the clip has not done it).
            self.optimizer.register_step_pre_hook(lambda *_: self._before_optimizer_step())
            # Fires only when the wrapped optimizer really steps: not on accumulation micro-steps, not when
            # a GradScaler skips a step with inf/nan grads, which agree_before_unscale makes the same on all ranks.
            agree_before_unscale(optimizer.scaler, model)
            self.optimizer.register_step_post_hook(self._after_optimizer_step)
        accelerator.register_save_state_pre_hook(self._save_state_hook)
        accelerator.register_load_state_pre_hook(self._load_state_hook)
        accelerator.clip_grad_norm_ = self.clip_grad_norm_  # this instance only; the loop's call stays the same
        accelerator.save_state = crash_safe_save_state(accelerator, self._begin_save, self._store.seal)

    # ---- per step ----------------------------------------------------------------------------------------------

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``accelerator.clip_grad_norm_`` with the global norm (expert part summed over ranks). Collective."""
        self.accelerator.unscale_gradients()
        self._expert_sync()  # the norm of the replica-summed expert grads, as the step will see them
        return grad_clip.clip_grad_norm_(parameters, max_norm, norm_type, model=self.model)

    def _before_optimizer_step(self) -> None:
        if self._experts_only and dense_requires_grad(self.model):
            raise ValueError(
                "HierMoEPlugin: a parameter outside the expert slices was unfrozen after prepare(); only expert "
                "slices trained then, so no DDP wrapper averages dense gradients. Set requires_grad before prepare()"
            )
        self._expert_sync()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        self.swaps_done, self.metrics = after_optimizer_step(
            self.model, self.optimizer, self.step, self.swap_interval, self._meter, self.swaps_done
        )
        self.accelerator.log(self.metrics, step=self.step)

    # ---- save_state / load_state -------------------------------------------------------------------------------

    def _save_state_hook(self, models, weights, output_dir) -> None:
        for wrapped, state in zip(models, weights):
            if self.accelerator.unwrap_model(wrapped) is self.model:
                # Rank 0's expert slices mean nothing to other ranks: the per-rank files carry all of them.
                for name in expert_parameter_names(wrapped):
                    state.pop(name, None)
                for name in [k for k, v in state.items() if is_sharded(v)]:  # FSDP2 shards: per-rank files
                    state.pop(name)
        self._store.save(output_dir, {"step": self.step, "swaps_done": self.swaps_done}, self._save_id)

    def _begin_save(self) -> None:
        """Before ``save_state`` writes anything: the save's id, from rank 0 (collective, bounded: a
        save_state called on some ranks only raises instead of hanging)."""
        self._save_id = new_save_id(runtime_of(self.model).collective_timeout_s)

    def _load_state_hook(self, models, input_dir) -> None:
        extra = self._store.begin_load(input_dir)
        self.step = int(extra.get("step", 0))
        self.swaps_done = int(extra.get("swaps_done", 0))


def _prepare_without_ddp(accelerator, model, objects, prepare_kwargs, place: bool):
    """``accelerator.prepare(*objects)`` with the model registered but not wrapped (FSDP2-sharded, or
    only expert slices train); ``place``: move it to the accelerator's device."""
    registered = accelerator.prepare_model(model, device_placement=None if place else False, evaluation_mode=True)
    rest = [o for o in objects if o is not model]
    others = accelerator.prepare(*rest, **prepare_kwargs) if rest else ()
    others = iter(others if isinstance(others, tuple) else (others,))
    out = tuple(registered if o is model else next(others) for o in objects)
    return out if len(out) > 1 else out[0]


def _repoint(optimizer: torch.optim.Optimizer, replaced: dict[int, torch.nn.Parameter]) -> None:
    """Swap the full expert tensors an optimizer was built with for the rank-local slices."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) in replaced:
                if optimizer.state.get(p):
                    raise ValueError(
                        "the optimizer has already stepped on the full expert tensors; create it before any step "
                        "(or after patching) and pass it to HierMoEPlugin.prepare"
                    )
                group["params"][i] = replaced[id(p)]
