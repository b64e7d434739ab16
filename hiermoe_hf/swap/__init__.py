"""The expert swap: routing window, delta-rule objective, policies, executor, ``swap_experts``."""
