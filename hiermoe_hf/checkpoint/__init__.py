"""Checkpoints: Hub keys, the streamed collective save, the rank-local load, per-rank resume files."""
