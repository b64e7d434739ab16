"""What runs after every real optimizer step, under the Accelerate plugin and the Trainer callback alike:
the expert swap every ``swap_interval`` steps and the traffic metrics. Collective: every rank calls it."""

from __future__ import annotations

import torch

from hiermoe_hf.runtime.expert_grads import divide_expert_grads_by_world
from hiermoe_hf.training.traffic import TrafficMeter, summarize


def after_optimizer_step(
    model: torch.nn.Module, optimizer, step: int, swap_interval: int, meter: TrafficMeter, swaps_done: int
) -> tuple[int, dict[str, float]]:
    """Run the swap due at optimizer step ``step`` (1-based) and collect the step's metrics.

    optimizer: the torch optimizer whose state follows swapped experts (or a wrapper with ``.optimizer``).
    Returns (swaps done so far, the tracker metrics of this step).
    """
    if swap_interval and step % swap_interval == 0:
        from hiermoe_hf.swap.round import swap_experts  # noqa: PLC0415  (swap imports the runtime; keep start-up light)

        swaps_done += len(swap_experts(model, optimizer=getattr(optimizer, "optimizer", optimizer)))
        divide_expert_grads_by_world(model)  # in case a swap rebuilt a parameter object
    return swaps_done, flat_metrics(meter.pop(reduce=True), step, swaps_done)


def flat_metrics(counts: dict, step: int, swaps_done: int) -> dict[str, float]:
    """Scalars for trackers: counters summed over ranks for this optimizer step, plus run totals."""
    out = {f"hiermoe/{k}": v for k, v in counts.items() if k != "strategies"}
    out.update({f"hiermoe/{k}": v for k, v in summarize(counts).items()})
    out.update({f"hiermoe/strategy/{name}": n for name, n in sorted(counts["strategies"].items())})
    out["hiermoe/swaps_done"] = swaps_done
    out["hiermoe/step"] = step
    return out
