"""What ``patch`` installs on a model instance: its state, the per-layer forward, ``stats``."""
