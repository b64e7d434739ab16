"""Public path of the Accelerate plugin (``from hiermoe_hf.accelerate import HierMoEPlugin``)."""

from hiermoe_hf.training.accelerate_plugin import HierMoEPlugin

__all__ = ["HierMoEPlugin"]
