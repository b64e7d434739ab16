"""A device-side clock: the GPU's global nanosecond timer written into a device tensor.

CUDA events can only be read on the host, after the GPU has passed them: ``dispatch="auto"``'s
trials would have to wait for the previous forward's end event before its timing rides in the next
count exchange (a stream sync per MoE forward while timing; GPU_REVIEW.md #12). A stamp is a tiny
kernel storing ``%globaltimer`` when the stream reaches it, like an event, but the difference of two
stamps is a device tensor that goes into the all-reduced vector with no host involvement at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer


@triton.jit
def _stamp_kernel(out_ptr):
    tl.store(out_ptr, globaltimer())


def stamp(like: torch.Tensor) -> torch.Tensor:
    """int64 [1] on ``like``'s CUDA device: nanoseconds of the GPU's global timer when its current
    stream reaches this point. Launched under ``like``'s device (never the current device's)."""
    out = torch.empty(1, dtype=torch.int64, device=like.device)
    with torch.cuda.device(like.device):
        _stamp_kernel[(1,)](out)
    return out
