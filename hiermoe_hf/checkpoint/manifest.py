"""A resume folder's manifest: which save its files belong to, and each file's size and checksum.

Every resume save (the plugin's ``accelerator.save_state``, the callback's Trainer checkpoint) gets an
identity, a uuid made on rank 0 and broadcast, that each rank file carries with its rank, the world
size, the topology and ``ep_size``. When every file is written, ``hiermoe_manifest.json`` is written
LAST (to a temporary name, then renamed): the save id, the layout, and the size and SHA-256 of every
file in the folder. A folder without it is a save that did not complete (or one made before
manifests) and is refused; a file whose size or checksum differs (flipped bytes, truncated, replaced
by another save's file, renamed into another rank's slot) is refused naming the file, before anything
reads it. The checks run on every rank at once, each rank hashing its own rank file and its share of
the others, and one collective makes every rank raise the same error.

Assumes, as Accelerate's ``load_state`` of rank 0's model file does, that every rank sees the folder
(a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hiermoe_hf.exchange import bounded

MANIFEST = "hiermoe_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 24


@dataclass(frozen=True)
class SaveIdentity:
    """What every file of one save carries: the save's id and the layout it was made with."""

    save_id: str
    world_size: int
    ep_size: int
    topology: tuple[int, ...]

    def fields(self) -> dict:
        return {"save_id": self.save_id, "world_size": self.world_size, "ep_size": self.ep_size,
                "topology": list(self.topology)}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def new_save_id(timeout_s: float) -> str:
    """A fresh uuid made on rank 0, the same on every rank. Collective (bounded: a save_state called on
    some ranks only raises instead of hanging)."""
    world, rank = _dist()
    raw = uuid.uuid4().bytes if rank == 0 else bytes(16)
    if world == 1:
        return raw.hex()
    box = torch.tensor(list(raw), dtype=torch.int64, device=_device())
    bounded.wait(dist.broadcast(box, src=0, async_op=True), timeout_s, "a checkpoint save (save_state)", box.device)
    return bytes(box.tolist()).hex()


def file_entry(path: str) -> dict:
    """{"size": bytes, "sha256": hex digest} of one file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _listing(folder: str) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), the manifest excluded."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _share(names: list[str], world: int, rank: int, own: str | None) -> list[str]:
    """The files this rank hashes: its own rank file, and every world-th of the files that are no
    rank's own (``hiermoe_rank*``), so that each file is hashed by exactly one rank."""
    shared = [n for n in names if not os.path.basename(n).startswith("hiermoe_rank")]
    mine = shared[rank::world]
    return mine + ([own] if own is not None and own in names else [])


def write(folder: str, identity: SaveIdentity, own_file: str | None) -> None:
    """Seal a finished save: every rank hashes its share of ``folder``'s files, rank 0 writes the
    manifest last. Collective; call on every rank once every file of the save is written."""
    world, rank = _dist()
    if world > 1:
        dist.barrier()  # every rank's files are written before rank 0 lists them
    names = [_listing(folder)] if rank == 0 else [None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    names = names[0]
    own = os.path.relpath(own_file, folder) if own_file is not None else None
    entries = {n: file_entry(os.path.join(folder, n)) for n in _share(names, world, rank, own)}
    gathered = [entries]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
    if rank == 0:
        files = {n: e for part in gathered for n, e in part.items()}
        # Files nobody hashed are rank files of another save left in the folder: not part of this one.
        _write_body(folder, identity, {n: e for n, e in files.items() if n in names})
    if world > 1:
        dist.barrier()  # the manifest exists before any rank goes on (and may publish the folder)


def write_trusted(folder: str, identity: SaveIdentity) -> None:
    """Seal a folder in this process alone, every file in it taken as part of the save (an explicit
    opt-in for a complete folder you trust, e.g. one written before manifests existed)."""
    _write_body(folder, identity, {n: file_entry(os.path.join(folder, n)) for n in _listing(folder)})


def _write_body(folder: str, identity: SaveIdentity, files: dict) -> None:
    body = {"format": MANIFEST_FORMAT, **identity.fields(), "files": dict(sorted(files.items()))}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))  # last: its presence says the save is complete


def read(folder: str) -> dict | str:
    """The manifest of ``folder``, or a problem (a string) saying why there is none usable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return (
            f"{folder} has no {MANIFEST}, which every save writes last: the save into this folder did not "
            "complete (a crash or a killed rank mid-save), or the folder was written by an older hiermoe_hf "
            "without manifests. Resume from an earlier complete checkpoint; if you trust this folder and know "
            "it is complete, seal it once with hiermoe_hf.checkpoint.rank_state.convert_pickled(folder)"
        )
    try:
        with open(path) as f:
            body = json.load(f)
        need = ("format", "save_id", "world_size", "ep_size", "topology", "files")
        lacking = [k for k in need if k not in body]
        if lacking:
            return f"{path} lacks the fields {', '.join(lacking)}: it is corrupt; resume from another checkpoint"
    except (OSError, ValueError) as err:
        return f"{path} cannot be read ({err}): it is corrupt; resume from another checkpoint"
    return body


def layout_problems(body: dict, identity: SaveIdentity) -> list[str]:
    """How the manifest's layout differs from this run's (``identity.save_id`` unused)."""
    out = []
    if body["world_size"] != identity.world_size:
        out.append(
            f"this checkpoint was saved by {body['world_size']} ranks but this run has {identity.world_size}: "
            f"resume with {body['world_size']} ranks (rank files of other world sizes are never read)"
        )
    elif body["ep_size"] != identity.ep_size:
        out.append(
            f"this checkpoint was saved with ep_size={body['ep_size']} but this run uses ep_size={identity.ep_size}: "
            f"expert slices and placements differ; resume with ep_size={body['ep_size']}"
        )
    elif list(body["topology"]) != list(identity.topology):
        out.append(
            f"this checkpoint was saved with topology {'x'.join(map(str, body['topology']))} but this run uses "
            f"{'x'.join(map(str, identity.topology))}: resume with the same topology"
        )
    return out


def file_problems(folder: str, body: dict, own_file: str) -> list[str]:
    """This rank's share of the checksum checks: its own rank file and every world-th other file."""
    world, rank = _dist()
    files = body["files"]
    own = os.path.relpath(own_file, folder)
    out = []
    if own not in files:
        out.append(f"{own_file} is missing from save {body['save_id']} (not in its {MANIFEST})")
    for name in _share(sorted(files), world, rank, own):
        path = os.path.join(folder, name)
        want = files[name]
        if not os.path.exists(path):
            out.append(f"{path} is missing (listed in {MANIFEST} of save {body['save_id']})")
            continue
        got = file_entry(path)
        if got["size"] != want["size"]:
            out.append(f"{path} has {got['size']} bytes but save {body['save_id']} wrote {want['size']}: "
                       "it is truncated or was replaced")
        elif got["sha256"] != want["sha256"]:
            out.append(f"{path} differs from what save {body['save_id']} wrote (sha256 {got['sha256'][:12]}... vs "
                       f"{want['sha256'][:12]}...): it is corrupt or belongs to another save")
    return out


def agree(problems: list[str], timeout_s: float) -> None:
    """Raise the same ValueError on every rank when any rank found a problem. Collective: one bounded
    all-reduce of the problem count; only when some rank has one, the messages are gathered too."""
    world, _ = _dist()
    texts = list(problems)
    if world > 1:
        count = torch.tensor([len(problems)], dtype=torch.int64, device=_device())
        bounded.wait(dist.all_reduce(count, async_op=True), timeout_s, "a checkpoint load (load_state / resume)",
                     count.device)
        if int(count.item()) == 0:
            return
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        texts = [f"rank {r}: {p}" for r, part in enumerate(gathered) for p in part]
    if texts:
        raise ValueError("hiermoe_hf refused to resume from this checkpoint:\n  " + "\n  ".join(texts))
