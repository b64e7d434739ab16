"""The public entry points that span the layers: ``patch`` = the runtime's ``patch_experts`` plus the
collective ``save_pretrained`` of ``checkpoint/save.py`` bound on the instance."""

from __future__ import annotations

import torch

from hiermoe_hf.checkpoint.save import bind_collective_save
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.runtime.guards import patch_target
from hiermoe_hf.runtime.patch import patch_experts, unpatch

__all__ = ["patch", "unpatch"]


def patch(model: torch.nn.Module, config: HierMoEConfig | None = None) -> torch.nn.Module:
    """Shard the routed experts over the default process group and route tokens hierarchically.

    With ``config.ep_size`` smaller than the world, the experts are sharded over each expert-parallel
    group of ep_size consecutive ranks and replicated across the W / ep_size groups
    (``runtime/ep_layout.py``). Collective: every rank calls it with the same model and config.
    Patching again with the same config (or none) is a no-op; with a different config it raises.
    Create the optimizer afterwards (expert parameters are replaced by their local slices). ``model``
    may be a PEFT model (its base model is patched, PEFT's own ``save_pretrained`` stays). Wrap the
    result in DDP afterwards: the expert slices are already on DDP's ignore list and their gradients
    scaled by 1/W (section 6).
    """
    out = patch_experts(model, config, experts_are_local=False)
    bind_collective_save(patch_target(model))  # the Transformers model: a PeftModel keeps PEFT's own save
    return out
