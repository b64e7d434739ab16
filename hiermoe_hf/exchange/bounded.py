"""Bounded waits for the package's own collectives: a lone rank raises instead of hanging.

A collective that only some ranks reach (``if accelerator.is_main_process:
model.save_pretrained(...)``, an evaluation forward on the main process only) otherwise waits until
the process group's timeout (30 minutes by default) and then fails without saying why. The package's
collectives are started with ``async_op=True`` and waited for with ``Work.wait(timeout)``: on gloo
that raises after the timeout (checked on this machine); on NCCL, a wait given a timeout blocks the
host until the work completes or the timeout passes (then it aborts the communicator and raises),
but it checks every millisecond (it sleeps between event queries), so a count exchange that
completes in 50 us would cost the layer up to 1 ms. On CUDA tensors the wait therefore polls
``Work.is_completed`` (an event query) itself against the deadline, then ``Work.wait()`` orders the
current stream after the collective. Where this is used on the hot path (the layer's count exchange)
the host reads the result right after anyway, so the wait adds no collective and no host sync. After
a timeout the process group is unusable (the lone collective is still pending): the error says to
fix the call site and restart.

The timeout is ``HierMoEConfig.collective_timeout_s``; None there means ``HIERMOE_COLLECTIVE_TIMEOUT``
(seconds), else ``DEFAULT_TIMEOUT_S`` (10 minutes: longer than a slow rank's checkpoint write or a
first forward's compilation on a real cluster, far shorter than the process-group default).
"""

from __future__ import annotations

import datetime
import math
import os
import time

import torch

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "HIERMOE_COLLECTIVE_TIMEOUT"


class CollectiveTimeout(RuntimeError):
    """A package collective that the other ranks did not join within the timeout."""


def parse_timeout(source: str, value) -> float:
    """A timeout in seconds: a finite number > 0 (``source`` names the setting in the error)."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"{source}={value!r} is not valid; give a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:g})"
        )
    return seconds


def resolve_timeout(setting: float | None) -> float:
    """``collective_timeout_s``: the setting, else ``HIERMOE_COLLECTIVE_TIMEOUT``, else the default."""
    if setting is not None:
        return parse_timeout("collective_timeout_s", setting)
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    return parse_timeout(TIMEOUT_ENV, raw) if raw else DEFAULT_TIMEOUT_S


def wait(work, timeout_s: float, what: str, device: torch.device) -> None:
    """Wait for an ``async_op=True`` collective on tensors on ``device``; raise ``CollectiveTimeout``
    naming ``what`` (the call that every rank must make) when the other ranks did not join within
    ``timeout_s`` seconds."""
    try:
        if device.type == "cuda":
            done = _poll(work, timeout_s)
        else:
            done = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        done = False
    if done is False:
        raise CollectiveTimeout(
            f"hiermoe_hf: this rank waited {timeout_s:g} s in {what} for the other ranks, which never joined. "
            f"Likely cause: {what} was called on some ranks only, e.g. `if accelerator.is_main_process: "
            "model.save_pretrained(...)` or an evaluation forward on the main process only. Fix: call it on every "
            "rank (save_pretrained is collective and rank 0 writes; run evaluation forwards on all ranks), then "
            f"restart the job. The wait is bounded by HierMoEConfig.collective_timeout_s / {TIMEOUT_ENV}."
        ) from None


def _poll(work, timeout_s: float) -> bool:
    """True once ``work`` has completed (then ``work.wait()``: the current stream waits for it, the host
    does not), False after ``timeout_s``. ``time.sleep(0)`` between queries only yields the GIL."""
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            return False
        time.sleep(0)
    work.wait()
    return True
