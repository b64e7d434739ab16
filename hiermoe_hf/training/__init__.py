"""Training integration: gradient semantics, DDP, clipping, traffic metrics, Accelerate and Trainer."""
