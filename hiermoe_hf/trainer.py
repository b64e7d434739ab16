"""Public path of the Trainer callback (``from hiermoe_hf.trainer import HierMoECallback``)."""

from hiermoe_hf.training.trainer_callback import HierMoECallback

__all__ = ["HierMoECallback"]
