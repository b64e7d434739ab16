"""Which device a collective's buffers live on: the data's, never an assumed current device.

Under NCCL every buffer must sit on the rank's own GPU. ``torch.cuda.current_device()`` is that GPU
only if the script called ``torch.cuda.set_device(local_rank)``; without it every rank would put its
buffers on ``cuda:0`` ("Duplicate GPU detected", device mismatches; GPU_REVIEW.md #8, #9). The device
is taken, in order, from the data (a model's CUDA parameter), the device the process group was bound
to (``init_process_group(device_id=...)``), and only then the current device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def choose_comm_device(
    backend: str | None, like: torch.device | None, bound: torch.device | None, current: int | None
) -> torch.device:
    """Pure rule: CPU unless ``backend`` is NCCL; then ``like`` if it is a CUDA device, else ``bound``,
    else ``cuda:current``."""
    if backend != "nccl":
        return torch.device("cpu")
    if like is not None and like.type == "cuda":
        return like
    if bound is not None:
        return bound
    return torch.device("cuda", current if current is not None else 0)


def comm_device(like: torch.nn.Module | torch.Tensor | None = None) -> torch.device:
    """``choose_comm_device`` for the default process group and ``like`` (a model or tensor)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = dist.get_backend()
    if isinstance(like, torch.nn.Module):
        like = next((p for p in like.parameters() if p.is_cuda), None)
    device = like.device if isinstance(like, torch.Tensor) else None
    bound = getattr(dist.group.WORLD, "bound_device_id", None)
    current = torch.cuda.current_device() if backend == "nccl" and bound is None and device is None else None
    return choose_comm_device(backend, device, bound, current)


def fsdp2_device_map(device_map, backend: str | None, device: torch.device | None):
    """``device_map`` for a ``dense_sharding="fsdp2"`` load: the caller's if given; under NCCL the
    rank's GPU (``device``), since Transformers would otherwise materialise the weights on the CPU while
    FSDP2's mesh is on CUDA; else None (CPU, as Transformers does)."""
    if device_map is not None or backend != "nccl":
        return device_map
    return {"": device}
