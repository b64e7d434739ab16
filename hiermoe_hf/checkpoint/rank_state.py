"""Per-rank resume files: what a rank-0 checkpoint (Accelerate's ``save_state``) cannot hold.

Accelerate writes the model and the optimizer from rank 0 only and loads that one copy on every
rank. With experts sharded, rank 0's copy holds rank 0's expert slices and Adam moments; loading it
everywhere would silently give every rank rank 0's experts. So each rank writes its own file with
its expert slices, their optimizer state, the placements (swaps change them), the routing history
that the next swap decision reads, and the swap log. On load, hooks on the experts modules and on
the optimizer substitute these entries into whatever state dict is being loaded, so Accelerate's
own loading code does the rest unchanged. The Trainer loads its checkpoint before any hook could
stage anything, so ``restore_now`` applies a file to the live model and optimizer instead.

The files hold only tensors, numbers, strings, lists and dicts (the swap log as JSON text) and are
read with ``torch.load(weights_only=True)``: a resume folder copied from elsewhere cannot run code.
Files of format 1 (pickled swap records) are read only by ``convert_pickled``, an explicit opt-in
for folders you trust.
"""

from __future__ import annotations

import json
import os
import pickle

import torch

from hiermoe_hf.runtime.guards import check_optimizer_holds_experts
from hiermoe_hf.runtime.registry import moe_layers, runtime_of

FORMAT = 2


def rank_file(directory: str | os.PathLike, rank: int, world_size: int) -> str:
    return os.path.join(directory, f"hiermoe_rank{rank:05d}-of-{world_size:05d}.pt")


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order ``Optimizer.state_dict`` numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class RankStateStore:
    """Saves and restores one rank's expert-parallel state for a patched model and its optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        check_optimizer_holds_experts(model, optimizer)
        self.model = model
        self.optimizer = optimizer
        self.runtime = runtime_of(model)
        self._pending_params: dict[str, dict[str, torch.Tensor]] | None = None
        self._pending_optimizer: dict[int, dict] | None = None
        self._handles = []
        for experts, layer in moe_layers(model).values():
            self._handles.append(experts.register_load_state_dict_pre_hook(self._module_pre_hook(layer.name)))
        if optimizer is not None:
            self._handles.append(optimizer.register_load_state_dict_pre_hook(self._optimizer_pre_hook))

    # ---- saving ----------------------------------------------------------------------------------------------

    def _expert_indices(self) -> dict[int, tuple[str, str]]:
        """Optimizer state index -> (layer, parameter name) for every expert parameter."""
        where = {}
        for experts, layer in moe_layers(self.model).values():
            for name in layer.param_names:
                where[id(getattr(experts, name))] = (layer.name, name)
        return {i: where[id(p)] for i, p in enumerate(_flat_params(self.optimizer)) if id(p) in where}

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> str:
        rt = self.runtime
        layers = {}
        for name, (experts, layer) in moe_layers(self.model).items():
            layers[name] = {
                "placement": layer.placement.state_dict(),
                "params": {p: getattr(experts, p).detach().cpu() for p in layer.param_names},
                "routing": layer.routing.state_dict(),
                "swaps": json.dumps(list(layer.swaps)),
            }
        optimizer_state: dict[str, dict] = {}  # layer -> parameter -> its optimizer state
        if self.optimizer is not None:
            state = self.optimizer.state_dict()["state"]
            for i, (lname, pname) in self._expert_indices().items():
                if i in state:
                    optimizer_state.setdefault(lname, {})[pname] = _to_cpu(state[i])
        payload = {
            "format": FORMAT,
            "rank": rt.rank,
            "world_size": rt.world_size,
            "topology": list(rt.topology.levels),
            "layers": layers,
            "optimizer": optimizer_state,
            "extra": dict(extra or {}),
        }
        os.makedirs(directory, exist_ok=True)
        path = rank_file(directory, rt.rank, rt.world_size)
        tmp = f"{path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves no half file under the real name
        return path

    # ---- loading ---------------------------------------------------------------------------------------------

    def begin_load(self, directory: str | os.PathLike) -> dict:
        """Read this rank's file, restore placements, routing and swap logs now, and stage the expert
        tensors and optimizer entries for the model/optimizer ``load_state_dict`` calls that follow.
        Returns the ``extra`` dict given to ``save``."""
        rt = self.runtime
        path = rank_file(directory, rt.rank, rt.world_size)
        if not os.path.exists(path):
            found = sorted(f for f in os.listdir(directory) if f.startswith("hiermoe_rank")) if os.path.isdir(
                directory
            ) else []
            raise ValueError(
                f"{path} is missing: this checkpoint was not saved by {rt.world_size} expert-parallel ranks "
                f"with HierMoEPlugin (found: {', '.join(found) or 'no hiermoe_rank* files'}); resume with the "
                "world size it was saved with"
            )
        payload = read_rank_file(path)
        if payload["topology"] != list(rt.topology.levels):
            raise ValueError(
                f"{path} was saved with topology {'x'.join(map(str, payload['topology']))}; this run uses "
                f"{rt.topology}: resume with the same topology"
            )
        layers = moe_layers(self.model)
        if set(payload["layers"]) != set(layers):
            raise ValueError(
                f"{path} holds MoE layers {sorted(payload['layers'])} but the model has {sorted(layers)}"
            )
        self._pending_params = {}
        for name, saved in payload["layers"].items():
            experts, layer = layers[name]
            layer.placement.load_state_dict(saved["placement"])
            device = getattr(experts, layer.param_names[0]).device
            layer.routing.load_state_dict(saved["routing"], device)
            layer.swaps[:] = json.loads(saved["swaps"])
            self._pending_params[name] = saved["params"]
        self._pending_optimizer = (
            {(lname, pname): st for lname, per in payload["optimizer"].items() for pname, st in per.items()}
            if self.optimizer is not None else None
        )
        return payload["extra"]

    def restore_now(self, directory: str | os.PathLike) -> dict:
        """``begin_load`` and apply it at once: this rank's expert slices into the model, their
        optimizer state into the optimizer (for a Trainer that has already loaded rank 0's copies)."""
        extra = self.begin_load(directory)
        with torch.no_grad():
            for name, (experts, _) in moe_layers(self.model).items():
                for pname, tensor in self._pending_params.pop(name).items():
                    getattr(experts, pname).copy_(tensor)
        self._pending_params = None
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer.state_dict())  # the pre-hook swaps in this rank's state
        return extra

    def _module_pre_hook(self, layer_name: str):
        def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            if self._pending_params is None or layer_name not in self._pending_params:
                return
            for pname, tensor in self._pending_params.pop(layer_name).items():
                state_dict[prefix + pname] = tensor
            if not self._pending_params:
                self._pending_params = None

        return hook

    def _optimizer_pre_hook(self, optimizer, state_dict):
        if self._pending_optimizer is None:
            return None
        saved, self._pending_optimizer = self._pending_optimizer, None
        state = dict(state_dict["state"])
        for i, where in self._expert_indices().items():
            if where in saved:
                state[i] = saved[where]
            else:  # this rank had taken no step on that slice yet
                state.pop(i, None)
        return {**state_dict, "state": state}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def read_rank_file(path: str) -> dict:
    """A format-2 rank file, read without unpickling code (``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects beyond tensors and plain data (an older, pickled HierMoE rank file, or a file "
            f"that is not one), so it was not loaded: unpickling it could run code. If you trust this folder, "
            f"convert it once with hiermoe_hf.checkpoint.rank_state.convert_pickled({os.path.dirname(path)!r}) "
            f"and resume again ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} has format {found!r}; this version reads format {FORMAT}")
    return payload


def convert_pickled(directory: str | os.PathLike) -> list[str]:
    """Rewrite the format-1 (pickled) rank files in ``directory`` as format 2. This unpickles them
    (``weights_only=False``), which can run code: call it only on a folder you trust."""
    done = []
    for fname in sorted(os.listdir(directory)):
        if not (fname.startswith("hiermoe_rank") and fname.endswith(".pt")):
            continue
        path = os.path.join(directory, fname)
        old = torch.load(path, map_location="cpu", weights_only=False)  # the explicit opt-in
        if old.get("format") != 1:
            continue
        for saved in old["layers"].values():
            saved["swaps"] = json.dumps(list(saved["swaps"]))
        optimizer: dict[str, dict] = {}
        for (lname, pname), state in old["optimizer"].items():
            optimizer.setdefault(lname, {})[pname] = state
        new = {**old, "format": FORMAT, "optimizer": optimizer}
        torch.save(new, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        done.append(path)
    return done


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
