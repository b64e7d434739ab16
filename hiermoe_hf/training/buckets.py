"""Gradient all-reduces in buckets of bounded size (like DDP's 25 MB default).

Flattening every gradient of a dtype into one buffer costs a transient copy the size of the
gradients (tens of GB per rank for a DeepSeek-V3-size dense or expert part): an OOM on a GPU that
CPU tests never see (GPU_REVIEW.md #6). Here consecutive same-dtype tensors are flattened at most
``BUCKET_BYTES`` at a time; a tensor larger than a bucket is all-reduced in place (no copy at all).
The transient memory is at most one bucket, whatever the model's size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def buckets(tensors: Sequence[torch.Tensor], limit: int | None = None) -> list[list[torch.Tensor]]:
    """``tensors`` (one dtype) cut in order into runs of at most ``limit`` bytes (default
    ``BUCKET_BYTES``); a tensor over the limit, or not contiguous, is a bucket of its own."""
    limit = BUCKET_BYTES if limit is None else limit
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or size + nbytes > limit or nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def all_reduce_bucketed(
    tensors: Sequence[torch.Tensor], group=None, after: Callable[[torch.Tensor], None] | None = None
) -> None:
    """Sum ``tensors`` (one dtype, same order on every rank) over ``group`` in place, one bucket per
    ``all_reduce``; ``after(buffer)`` runs on each reduced buffer before it is copied back (e.g.
    ``div_``). Collective: every rank calls it with tensors of the same shapes."""
    for bucket in buckets(tensors):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], group=group)  # in place: no transient copy
            if after is not None:
                after(bucket[0])
            continue
        _reduce_flattened(bucket, group, after)


def _reduce_flattened(bucket: list[torch.Tensor], group, after) -> None:
    """One bucket through one flat buffer, freed on return (before the next bucket's is made)."""
    flat = _flatten_dense_tensors(bucket)
    dist.all_reduce(flat, group=group)
    if after is not None:
        after(flat)
    for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
        t.copy_(synced)
