"""What the Trainer callback adds beside DistributedDataParallel when only the expert slices train
(DDP refuses a model without a dense parameter that requires a gradient). The expert slices' own
DDP treatment (ignore list, 1/W hooks) is installed by ``patch``: ``runtime/expert_grads.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.runtime.expert_grads import expert_parameters


def dense_requires_grad(model: torch.nn.Module) -> bool:
    """Whether a DDP wrapper would have a gradient to average: a parameter outside the expert slices
    (which DDP ignores) requires grad. False when only the routed experts train; DDP then refuses to
    be built ("DistributedDataParallel is not needed when a module doesn't have any parameter that
    requires a gradient"), and the expert slices need no wrapper (their grads are summed by the combine's
    backward and divided by W by their hooks)."""
    experts = {id(p) for p in expert_parameters(model)}
    return any(p.requires_grad and id(p) not in experts for p in model.parameters())


def broadcast_dense_state(model: torch.nn.Module) -> None:
    """What DDP's constructor does, for a model trained without it: every dense parameter and buffer
    takes rank 0's value (expert slices differ per rank by design and stay). Collective, once."""
    experts = {id(p) for p in expert_parameters(model)}
    with torch.no_grad():
        for tensor in [p for p in model.parameters() if id(p) not in experts] + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


