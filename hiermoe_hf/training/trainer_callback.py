"""``HierMoECallback``: HierMoE expert parallelism under ``transformers.Trainer`` (DESIGN.md section 10).

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HierMoECallback(dispatch="auto", swap_interval=50)])
    trainer.train()
    trainer.model.save_pretrained(out_dir)   # on every rank: a patched model saves collectively

A callback sees the model and optimizer but not the Trainer, so each duty hangs on an event (the
Trainer instance itself is taken once, in ``on_init_end``, from its running ``__init__``):
- ``on_init_end`` (end of ``Trainer.__init__``, before the optimizer and DDP exist): patch the model,
  keep the expert slices out of DDP (no DDP at all when only expert slices train: it would have
  nothing to average and refuses that), scale their grads by 1/W, and make this Trainer instance's
  gradient norm the global one: its ``accelerator.clip_grad_norm_`` (which the Trainer calls to clip
  with ``max_grad_norm``, and with ``inf`` just to log the norm when ``max_grad_norm=0``) sums the
  expert part over the ranks, so the clip and the logged ``grad_norm`` are single-process values.
- ``on_optimizer_step``: the expert swap every ``swap_interval`` steps, and the traffic counters.
- checkpoints: the Trainer writes the model from rank 0 alone, which would deadlock a collective
  save. That rank-0 call is deferred and ``on_save`` (reached by every rank) does the real save.
- logs: this Trainer instance's ``log`` merges the HierMoE metrics into the training logs before
  ``Trainer.log`` records them, so they reach ``log_history``, ``trainer_state.json`` and every
  ``report_to`` integration (``on_log`` would come after the Trainer copied its logs).
- resume: ``on_save`` also writes this rank's expert slices, their optimizer state, the placements and
  the routing window (``checkpoint/rank_state.py``) into the checkpoint folder; ``on_train_begin`` of
  ``trainer.train(resume_from_checkpoint=...)`` puts them back over what the Trainer loaded (rank 0's
  copies, or nothing for the experts), or refuses a checkpoint without them.
- fp16: the scaler waits for every rank's verdict on non-finite expert grads (``loss_scaling.py``).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from hiermoe_hf.api import patch
from hiermoe_hf.checkpoint.rank_state import RankStateStore
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.runtime.expert_grads import divide_expert_grads_by_world, keep_experts_out_of_ddp
from hiermoe_hf.runtime.fsdp import shard_dense
from hiermoe_hf.runtime.registry import is_patched, patched_module, runtime_of
from hiermoe_hf.runtime.registry import world as world_and_rank
from hiermoe_hf.training import grad_clip
from hiermoe_hf.training.accelerate_plugin import HierMoEPlugin
from hiermoe_hf.training.ddp import broadcast_dense_state, dense_requires_grad
from hiermoe_hf.training.expert_dp import ExpertGradSync
from hiermoe_hf.training.loss_scaling import agree_before_unscale
from hiermoe_hf.training.step_hook import after_optimizer_step
from hiermoe_hf.training.traffic import TrafficMeter

_TRAINER_MODULE = "transformers.trainer"  # Trainer._save lives here; its model save runs on rank 0 only


class HierMoECallback(TrainerCallback):
    """Patches the Trainer's model and keeps training semantics equal to single-process training.

    Args:
        config: a ``HierMoEConfig``; or leave it None and give ``HierMoEPlugin`` fields as keywords
            (``dispatch=``, ``swap_interval=``, ...), which also read ``HIERMOE_*`` environment variables.
    """

    def __init__(self, config: HierMoEConfig | None = None, **plugin_fields):
        if config is not None:
            if plugin_fields:
                raise ValueError(f"give either config or plugin fields, not both (got {sorted(plugin_fields)})")
            if not isinstance(config, HierMoEConfig):
                raise TypeError(f"config must be a hiermoe_hf.HierMoEConfig, got {type(config).__name__}")
            plugin_fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
        self.settings = HierMoEPlugin(**plugin_fields)
        self.last_grad_norm: float | None = None
        self.step = 0
        self.swaps_done = 0
        self.metrics: dict[str, float] = {}
        self.model: torch.nn.Module | None = None
        self._meter: TrafficMeter | None = None
        self._expert_sync: ExpertGradSync | None = None
        self._in_train = False
        self._deferred_dir: str | None = None
        self._store: RankStateStore | None = None
        self._collective_save = True
        self._without_ddp = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("HierMoECallback needs Trainer(model=...); model_init is not supported")
        trainer = _trainer_being_built()
        world, _ = world_and_rank()
        for option in ("deepspeed", "fsdp"):
            if getattr(args, option, None):
                raise ValueError(
                    f"HierMoECallback cannot run under TrainingArguments({option}=...): it would shard or flatten the "
                    "expert slices that expert parallelism keeps rank-local; drop it (the dense part then trains "
                    "under DDP)"
                )
        if world != args.world_size:
            raise ValueError(
                f"TrainingArguments see {args.world_size} processes but the default process group has {world}"
            )
        topology = self.settings.resolve_topology(world)
        if not is_patched(model):
            patch(model, self.settings.config(topology))
        elif runtime_of(model).topology != topology:
            raise ValueError(
                f"the model is patched with topology {runtime_of(model).topology}, not {topology} as resolved for "
                "this launch"
            )
        if world > 1 and self.settings.dense_sharding == "fsdp2":
            shard_dense(model)  # before the Trainer creates its optimizer
            # Accelerate's own "already prepared" marker: it registers the model without a DDP wrapper
            # (which it refuses around DTensors); FSDP2 reduces the dense grads.
            model._is_accelerate_prepared = True
        elif world > 1:
            keep_experts_out_of_ddp(model)
            if not dense_requires_grad(model):
                # Only expert slices train (DDP ignores them): DDP would have no gradient to average and
                # refuses to be built. Without it, do what its constructor does: rank 0's dense state everywhere.
                broadcast_dense_state(model)
                model._is_accelerate_prepared = True  # Accelerate's marker: registered, not wrapped
                self._without_ddp = True
        if world > 1:
            divide_expert_grads_by_world(model)
        self._expert_sync = ExpertGradSync(model)  # replicas of the expert-parallel group (ep_size < W)
        if self.settings.swap_interval:
            from hiermoe_hf.swap.round import swap_experts  # noqa: F401  (fail now, not at the first swap)
        self.model = model
        self._meter = TrafficMeter(model)
        self._clip_with_global_norm(trainer)
        self._log_metrics_through(trainer)
        self._wrap_save_pretrained(model)
        return control

    def _clip_with_global_norm(self, trainer: Trainer) -> None:
        """The Trainer clips (``max_grad_norm > 0``) and measures the norm it logs (``max_grad_norm=0``:
        a clip at ``inf``) through ``accelerator.clip_grad_norm_``, or, when FSDP2 shards the dense part,
        its ``_mixed_mesh_grad_norm``: both become the global-norm clip, on this instance only."""
        accelerator, model = trainer.accelerator, self.model

        def clip_grad_norm_(parameters, max_norm, norm_type=2.0):
            agree_before_unscale(accelerator.scaler, model)  # fp16: every rank skips a non-finite step alike
            accelerator.unscale_gradients()
            self._expert_sync()  # the norm of the replica-summed expert grads, as the step will see them
            norm = grad_clip.clip_grad_norm_(parameters, max_norm, norm_type, model=model)
            self.last_grad_norm = float(norm)
            return norm

        accelerator.clip_grad_norm_ = clip_grad_norm_
        if hasattr(trainer, "_mixed_mesh_grad_norm"):
            trainer._mixed_mesh_grad_norm = lambda wrapped, max_norm: clip_grad_norm_(wrapped.parameters(), max_norm)

    def _log_metrics_through(self, trainer: Trainer) -> None:
        """``Trainer.log`` appends its logs to ``log_history`` and hands them to the integrations before
        any ``on_log``: the metrics join the training logs (those with "loss") before it runs."""
        original = trainer.log

        def log(logs, *args, **kwargs):
            if "loss" in logs:
                logs.update(self.metrics)
            return original(logs, *args, **kwargs)

        trainer.log = log

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._in_train = True
        if self._without_ddp and dense_requires_grad(self.model):
            raise ValueError(
                "HierMoECallback: a parameter outside the expert slices was unfrozen after the Trainer was built; "
                "only expert slices trained then, so no DDP wrapper averages dense gradients. Set requires_grad "
                "before creating the Trainer"
            )
        if runtime_of(self.model).world_size == 1:
            return control
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._store is None or self._store.optimizer is not inner:
            if self._store is not None:
                self._store.remove()
            self._store = RankStateStore(self.model, inner)
        if state.global_step > 0:  # resume_from_checkpoint: the Trainer has loaded rank 0's copies
            if self.settings.dense_sharding == "fsdp2":
                raise ValueError(
                    "HierMoECallback: resume_from_checkpoint with dense_sharding='fsdp2' is not supported (the "
                    "Trainer reloads the dense part from one rank's files, not each rank's shards); resume with "
                    "HierMoEPlugin's accelerator.save_state/load_state, or train with dense_sharding='ddp'"
                )
            directory = _resume_dir()
            if directory is None or not os.path.isdir(str(directory)):
                raise ValueError(
                    "HierMoECallback: this Trainer resumed at step "
                    f"{state.global_step} but its checkpoint folder could not be found; pass "
                    "trainer.train(resume_from_checkpoint=<checkpoint folder>)"
                )
            extra = self._store.restore_now(directory)  # ValueError naming a folder without our rank files
            self.step = int(extra.get("step", state.global_step))
            self.swaps_done = int(extra.get("swaps_done", 0))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._in_train = False
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Both idempotent, done already by the clip when the Trainer called it (it always does on 5.17-5.24).
        agree_before_unscale(getattr(optimizer, "scaler", None), self.model)  # fp16: skip on all ranks
        if self._expert_sync is not None:
            self._expert_sync()  # expert grads summed over the replicas, before the step
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "step_was_skipped", False):  # fp16 overflow, the same on every rank
            return control
        self.step += 1
        self.swaps_done, self.metrics = after_optimizer_step(
            self.model, optimizer, self.step, self.settings.swap_interval, self._meter, self.swaps_done
        )
        return control

    def on_save(self, args, state, control, **kwargs):
        # Every rank gets here after the Trainer's rank-0 save: do the collective model save now.
        target = [self._deferred_dir]
        if world_and_rank()[0] > 1:
            dist.broadcast_object_list(target, src=0)
        self._deferred_dir = None
        if target[0] is not None:
            if self._collective_save:
                self._original_save(target[0])
            if self._store is not None:  # what rank 0's model and optimizer files cannot hold
                self._store.save(target[0], {"step": self.step, "swaps_done": self.swaps_done})
                self._store.seal(target[0])  # the manifest, last: a checkpoint cut short is refused at resume
        return control

    def _wrap_save_pretrained(self, model: torch.nn.Module) -> None:
        original = model.save_pretrained
        self._original_save = original
        # A PeftModel keeps PEFT's save (the adapter, fine from rank 0 alone); only the rank files wait for on_save.
        self._collective_save = patched_module(model) is model
        callback = self

        def save_pretrained(save_directory, *args, **kwargs):
            caller = sys._getframe(1)
            from_trainer = caller.f_code.co_name == "_save" and caller.f_globals.get("__name__") == _TRAINER_MODULE
            if from_trainer and runtime_of(model).global_world_size > 1:
                if not callback._collective_save:
                    if callback._in_train:
                        callback._deferred_dir = str(save_directory)
                    return original(save_directory, *args, **kwargs)
                # Trainer._save runs on rank 0 only; a collective save there would wait forever for the others.
                if not callback._in_train:
                    raise RuntimeError(
                        "trainer.save_model() saves from rank 0 only, but a HierMoE-patched model saves collectively: "
                        "call trainer.model.save_pretrained(path) on every rank instead"
                    )
                callback._deferred_dir = str(save_directory)
                return None
            return original(save_directory, *args, **kwargs)

        model.save_pretrained = save_pretrained


def _trainer_being_built() -> Trainer:
    """The ``Trainer`` whose ``__init__`` is running (it calls ``on_init_end`` last): callbacks are
    given no Trainer, and this one's clip and log must be patched, on the instance."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise ValueError(
        "HierMoECallback must be given to the Trainer when it is built: Trainer(..., callbacks=[HierMoECallback()]) "
        "(trainer.add_callback afterwards is too late: the model is patched when the Trainer is created)"
    )


def _resume_dir() -> str | None:
    """The checkpoint folder of the ``trainer.train(resume_from_checkpoint=...)`` call in progress:
    Transformers gives callbacks no path, so it is read from the Trainer's own training-loop frame."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and frame.f_globals.get("__name__") == _TRAINER_MODULE:
            return frame.f_locals.get("resume_from_checkpoint")
        frame = frame.f_back
    return None
