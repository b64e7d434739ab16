"""hiermoe_hf: hierarchical de-duplicated expert parallelism for Hugging Face MoE models.

    cfg = hiermoe_hf.HierMoEConfig(topology="2x4", dispatch="auto")
    model = hiermoe_hf.patch(model, cfg)   # collective over the default process group
    hiermoe_hf.stats(model); hiermoe_hf.unpatch(model)

The package map is docs/architecture.md.
"""

from hiermoe_hf.api import patch, unpatch
from hiermoe_hf.checkpoint.load import from_pretrained
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.runtime.fsdp import shard_dense
from hiermoe_hf.runtime.registry import is_patched
from hiermoe_hf.runtime.stats import stats
from hiermoe_hf.swap.round import swap_experts
from hiermoe_hf.topology import Topology
from hiermoe_hf.training.gradients import all_reduce_gradients

__all__ = [
    "HierMoEConfig", "Topology", "all_reduce_gradients", "from_pretrained", "is_patched", "patch", "shard_dense",
    "stats", "swap_experts", "unpatch",
]
__version__ = "0.1.0"
