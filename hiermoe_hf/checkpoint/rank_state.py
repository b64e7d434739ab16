"""Per-rank resume files: what a rank-0 checkpoint (Accelerate's ``save_state``) cannot hold.

Accelerate writes the model and the optimizer from rank 0 only and loads that one copy on every
rank. With experts sharded, rank 0's copy holds rank 0's expert slices and Adam moments; loading it
everywhere would silently give every rank rank 0's experts. So each rank writes its own file with
its expert slices, their optimizer state, the placements (swaps change them), the routing history
that the next swap decision reads, and the swap log; with the dense part sharded by FSDP2
(``shard_dense``), also its dense shards and their optimizer state. On load, hooks on the experts modules and on
the optimizer substitute these entries into whatever state dict is being loaded, so Accelerate's
own loading code does the rest unchanged. The Trainer loads its checkpoint before any hook could
stage anything, so ``restore_now`` applies a file to the live model and optimizer instead.

Every save has an id that each file carries with its rank and layout, and ``seal`` writes the
folder's manifest last (``checkpoint/manifest.py``); ``begin_load`` reads nothing before the manifest,
the layout, every file's checksum and the file's identity check out on every rank at once. With
``dispatch="auto"`` timing its candidates, the timed choice travels in the files too, so a resume runs
the strategy the interrupted run chose instead of timing again.

The files hold only tensors, numbers, strings, lists and dicts (the swap log as JSON text) and are
read with ``torch.load(weights_only=True)``: a resume folder copied from elsewhere cannot run code.
Files of format 1 (pickled swap records) are read only by ``convert_pickled``, an explicit opt-in
for folders you trust.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid

import torch
from torch.distributed.tensor import DTensor

from hiermoe_hf.checkpoint import manifest
from hiermoe_hf.checkpoint.manifest import SaveIdentity
from hiermoe_hf.runtime.guards import check_optimizer_holds_experts
from hiermoe_hf.runtime.registry import moe_layers, runtime_of

FORMAT = 2
# Every field a rank file must hold (a file without one is refused naming it, not a KeyError).
REQUIRED = ("format", "save_id", "rank", "world_size", "ep_size", "topology", "layers", "optimizer", "extra")


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
        self._pending_dense: dict[str, torch.Tensor] | None = None
        self._pending_dense_optimizer: dict[str, dict] | None = None
        self._saved: tuple[SaveIdentity, str] | None = None  # the last save's identity and file, for seal()
        self._handles = []
        if self._dense_shards():
            self._handles.append(model.register_load_state_dict_pre_hook(self._dense_pre_hook))

            def shards_while_loading(*args):  # a function: torch tags state-dict hooks with an attribute
                self._dense_state_dict_hook(*args)

            self._handles.append(model.register_state_dict_post_hook(shards_while_loading))
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

    def identity(self, save_id: str) -> SaveIdentity:
        rt = self.runtime
        return SaveIdentity(save_id, rt.global_world_size, rt.world_size, tuple(rt.topology.levels))

    def save(self, directory: str | os.PathLike, extra: dict | None = None, save_id: str | None = None) -> str:
        """Write this rank's file of a new save; ``save_id``: the save's id, the same on every rank (None:
        made now, collective). Call ``seal`` once every other file of the save is written too."""
        rt = self.runtime
        identity = self.identity(save_id or manifest.new_save_id(rt.collective_timeout_s))
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
        dense = self._dense_shards()
        dense_optimizer = {}
        if self.optimizer is not None and dense:
            state, ids = self.optimizer.state_dict()["state"], {id(p): n for n, p in dense.items()}
            dense_optimizer = {
                ids[id(p)]: _to_cpu(_local(state[i])) for i, p in enumerate(_flat_params(self.optimizer))
                if id(p) in ids and i in state
            }
        payload = {
            "format": FORMAT,
            "save_id": identity.save_id,
            "trials": rt.trials.state_text() if rt.trials is not None else "",  # auto's timed choice
            "dense": {n: p.detach().to_local().cpu().clone() for n, p in dense.items()},
            "dense_optimizer": dense_optimizer,
            "rank": rt.global_rank,  # files are per global rank: replicas hold their own routing windows
            "world_size": rt.global_world_size,
            "ep_size": rt.world_size,
            "topology": list(rt.topology.levels),
            "layers": layers,
            "optimizer": optimizer_state,
            "extra": dict(extra or {}),
        }
        os.makedirs(directory, exist_ok=True)
        path = rank_file(directory, rt.global_rank, rt.global_world_size)
        tmp = f"{path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves no half file under the real name
        self._saved = (identity, path)
        return path

    def seal(self, directory: str | os.PathLike) -> None:
        """Write the manifest of the save that ``save`` began in ``directory`` (``checkpoint/manifest.py``):
        last, once every file of it is written. Collective."""
        if self._saved is None or os.path.realpath(os.path.dirname(self._saved[1])) != os.path.realpath(directory):
            raise RuntimeError(f"seal({directory!r}) without a save into that folder on this rank")
        identity, path = self._saved
        manifest.write(os.fspath(directory), identity, path)

    # ---- loading ---------------------------------------------------------------------------------------------

    def begin_load(self, directory: str | os.PathLike) -> dict:
        """Read this rank's file, restore placements, routing and swap logs now, and stage the expert
        tensors and optimizer entries for the model/optimizer ``load_state_dict`` calls that follow.
        Returns the ``extra`` dict given to ``save``."""
        rt = self.runtime
        path = rank_file(directory, rt.global_rank, rt.global_world_size)
        payload = self._verified(os.fspath(directory), path)
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
        if set(payload.get("dense", {})) != set(self._dense_shards()):
            raise ValueError(
                f"{path} holds dense shards for {len(payload.get('dense', {}))} parameters but this model has "
                f"{len(self._dense_shards())} FSDP2-sharded ones: resume with the same dense_sharding"
            )
        self._pending_dense = payload.get("dense") or None
        self._pending_dense_optimizer = payload.get("dense_optimizer") if self.optimizer is not None else None
        if rt.trials is not None and payload.get("trials"):
            rt.trials.load_state_text(payload["trials"])
        return payload["extra"]

    def _verified(self, directory: str, path: str) -> dict:
        """This rank's file, read only once the folder's manifest, the layout, every file's size and
        checksum (this rank's share) and the file's own identity all hold on every rank (one collective
        agrees; on any problem every rank raises the same error naming the files)."""
        rt = self.runtime
        body = manifest.read(directory)
        problems = [body] if isinstance(body, str) else manifest.layout_problems(body, self.identity(""))
        if not problems:
            problems = manifest.file_problems(directory, body, path)
        payload = None
        if not problems:
            try:
                payload = read_rank_file(path)
                problems = _identity_problems(path, payload, self.identity(body["save_id"]), rt.global_rank)
            except ValueError as err:
                problems = [str(err)]
        manifest.agree(problems, rt.collective_timeout_s)
        return payload

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

    def _dense_shards(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if isinstance(p, DTensor)}

    def _dense_state_dict_hook(self, module, state_dict, prefix, local_metadata) -> None:
        """While a load is staged, ``state_dict()`` shows the local shards: loaders that inspect storages
        (safetensors' ``load_model``, used by Accelerate's ``load_state``) cannot read a DTensor's."""
        if self._pending_dense is None:
            return
        for key, value in state_dict.items():
            if isinstance(value, DTensor):
                state_dict[key] = value.to_local()

    def _dense_pre_hook(self, module, state_dict, prefix, *args):
        if self._pending_dense is None:
            return
        pending, self._pending_dense = self._pending_dense, None
        for name, p in self._dense_shards().items():
            state_dict[prefix + name] = _like(p, pending[name])

    def _optimizer_pre_hook(self, optimizer, state_dict):
        if self._pending_optimizer is None:
            return None
        saved, self._pending_optimizer = self._pending_optimizer, None
        state = dict(state_dict["state"])
        dense_saved, self._pending_dense_optimizer = self._pending_dense_optimizer or {}, None
        dense = {id(p): (n, p) for n, p in self._dense_shards().items()}
        for i, p in enumerate(_flat_params(optimizer)):
            if id(p) in dense:
                name, param = dense[id(p)]
                if name in dense_saved:
                    state[i] = {k: _like(param, v) if _is_shard(v) else v for k, v in dense_saved[name].items()}
                else:
                    state.pop(i, None)
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
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except RuntimeError as err:  # torch's zip reader: a truncated or otherwise corrupt file
        raise ValueError(
            f"{path} cannot be read as a HierMoE rank file: it is truncated or corrupt ({str(err).splitlines()[0]}); "
            "resume from another checkpoint"
        ) from None
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
    lacking = [k for k in REQUIRED if k not in payload]
    if lacking:
        raise ValueError(
            f"{path} lacks the fields {', '.join(lacking)} that every rank file holds: it is corrupt or was not "
            "written by hiermoe_hf; resume from another checkpoint"
        )
    return payload


def _identity_problems(path: str, payload: dict, want: SaveIdentity, rank: int) -> list[str]:
    """How a rank file's own identity (save, rank, world, ep_size, topology) differs from what this rank
    needs: the save of the folder's manifest, made for this rank in this layout."""
    got = {"save_id": payload["save_id"], "rank": payload["rank"], "world_size": payload["world_size"],
           "ep_size": payload["ep_size"], "topology": list(payload["topology"])}
    need = {**want.fields(), "rank": rank}
    return [f"{path} holds {k}={got[k]!r} where this rank needs {need[k]!r} (the manifest's save and this "
            "rank's slot): the file belongs to another save or another rank" for k in got if got[k] != need[k]]


def convert_pickled(directory: str | os.PathLike) -> list[str]:
    """Make a complete rank-file folder written by an older hiermoe_hf loadable: rewrite format-1
    (pickled) rank files as format 2, stamp every rank file with one new save id and write the
    folder's manifest (``checkpoint/manifest.py``), taking every file in it as part of the save.

    This unpickles format-1 files (``weights_only=False``), which can run code, and vouches for the
    folder being one complete save: call it, in one process, only on a folder you trust."""
    done, identity, save_id = [], None, uuid.uuid4().hex
    for fname in sorted(os.listdir(directory)):
        if not (fname.startswith("hiermoe_rank") and fname.endswith(".pt")):
            continue
        path = os.path.join(directory, fname)
        old = torch.load(path, map_location="cpu", weights_only=False)  # the explicit opt-in
        if old.get("format") == 1:
            for saved in old["layers"].values():
                saved["swaps"] = json.dumps(list(saved["swaps"]))
            optimizer: dict[str, dict] = {}
            for (lname, pname), state in old["optimizer"].items():
                optimizer.setdefault(lname, {})[pname] = state
            old = {**old, "format": FORMAT, "optimizer": optimizer}
        elif old.get("format") != FORMAT:
            continue
        new = {"extra": {}, **old, "save_id": save_id, "ep_size": old.get("ep_size", old["world_size"])}
        torch.save(new, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        identity = SaveIdentity(save_id, new["world_size"], new["ep_size"], tuple(new["topology"]))
        done.append(path)
    if identity is not None:
        manifest.write_trusted(os.fspath(directory), identity)
    return done


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _local(value):
    """State with DTensors replaced by this rank's shard."""
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    return value


def _is_shard(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _like(param: DTensor, local: torch.Tensor) -> DTensor:
    """A saved local shard as a DTensor laid out like ``param`` (same mesh, placements, global shape)."""
    return DTensor.from_local(
        local.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
