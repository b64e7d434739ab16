"""Turn a Hub repo id into a local checkpoint folder, once per node, failing fast without a network."""

from __future__ import annotations

import os

import torch.distributed as dist
from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

_CHECKPOINT_FILES = ["*.json", "*.safetensors"]  # config, generation config, index, weights


def resolve_checkpoint(name_or_path: str | os.PathLike, patterns: list[str] = _CHECKPOINT_FILES, **hub_kwargs) -> str:
    """Local folder of a checkpoint: ``name_or_path`` itself, or a Hub snapshot of the files matching
    ``patterns`` (downloaded if needed).

    Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``) only the cache is consulted; a Hub that
    cannot be reached fails fast (connection errors, bounded timeouts) with an ``OSError`` that says so.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} is a file; expected a folder or a Hub repo id ('owner/name')")
    offline = bool(hub_kwargs.pop("local_files_only", False)) or is_offline_mode()
    try:
        return snapshot_download(
            path, allow_patterns=patterns, local_files_only=offline, etag_timeout=10, **hub_kwargs
        )
    except HFValidationError as err:
        raise ValueError(f"{path!r} is neither a local folder nor a valid Hub repo id ('owner/name')") from err
    except LocalEntryNotFoundError as err:
        why = "the Hub is offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "the Hub is unreachable"
        raise OSError(
            f"cannot load {path!r}: it is not a local folder, {why}, and it is not in the Hugging Face cache; "
            "download it first (huggingface-cli download) or pass a local folder"
        ) from err
    except OSError as err:  # connection refused, DNS failure, timeout, gated or missing repo
        raise OSError(f"cannot load {path!r} from the Hugging Face Hub: {err}") from err


def resolve_on_all_ranks(name_or_path, hub: dict, world: int, rank: int) -> str:
    """One download per node (its local rank 0); the other ranks then read the cache. Errors reach every rank."""
    if world == 1 or os.path.isdir(os.fspath(name_or_path)):
        return resolve_checkpoint(name_or_path, **hub)
    downloads = int(os.environ.get("LOCAL_RANK", rank)) == 0
    folder, error = None, None
    if downloads:
        try:
            folder = resolve_checkpoint(name_or_path, **hub)
        except (OSError, ValueError) as err:
            error = (type(err) is ValueError, str(err))
    errors = [None] * world
    dist.all_gather_object(errors, error)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise (ValueError if failed[0] else OSError)(failed[1])
    return folder if downloads else resolve_checkpoint(name_or_path, **{**hub, "local_files_only": True})
