"""hiermoe_hf: hierarchical de-duplicated expert parallelism for Hugging Face MoE models.

    cfg = hiermoe_hf.HierMoEConfig(topology="2x4", dispatch="auto")
    model = hiermoe_hf.patch(model, cfg)   # collective over the default process group
    hiermoe_hf.stats(model); hiermoe_hf.unpatch(model)
"""

from .checkpoint_load import from_pretrained
from .config import HierMoEConfig
from .patch import is_patched, patch, stats, unpatch
from .swap import swap_experts
from .topology import Topology
from .training import all_reduce_gradients

__all__ = [
    "HierMoEConfig", "Topology", "all_reduce_gradients", "from_pretrained", "is_patched", "patch", "stats",
    "swap_experts", "unpatch",
]
__version__ = "0.1.0"
