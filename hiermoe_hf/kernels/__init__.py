"""Dispatch kernels: plain-torch references (``reference``) and Triton versions (``triton_*``)."""
