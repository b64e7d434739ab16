"""A lone rank never hangs (issue 19, item 5): the package's collectives wait a bounded time.

On 2 gloo ranks, rank 0 alone runs a MoE forward, then a collective ``save_pretrained`` (the
``if accelerator.is_main_process: model.save_pretrained(...)`` mistake); rank 1 does nothing. Rank 0
must raise within the timeout (2 s; the process group's own timeout here is 90 s) an error naming the
likely cause and the fix; rank 1 is fine. The timeout comes from ``HierMoEConfig.collective_timeout_s``
for the forward and from ``HIERMOE_COLLECTIVE_TIMEOUT`` for the save. The lone collectives stay
pending in the process group, so this module's rank pool is its own and is killed afterwards.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from dist import RankPool

import hiermoe_hf
from hiermoe_hf.exchange.bounded import CollectiveTimeout
from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def pool():
    p = RankPool(2)
    yield p
    p.close(force=True)  # rank 0 holds collectives nobody will join


def lone_job(save_dir: str):
    forward_model = hiermoe_hf.patch(
        build_model(tiny_qwen3_moe_config()),
        hiermoe_hf.HierMoEConfig(topology="1x2", dispatch="a2a", collective_timeout_s=TIMEOUT),
    )
    os.environ["HIERMOE_COLLECTIVE_TIMEOUT"] = str(TIMEOUT)
    try:
        save_model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="1x2"))
    finally:
        del os.environ["HIERMOE_COLLECTIVE_TIMEOUT"]
    timeouts = (runtime_of(forward_model).collective_timeout_s, runtime_of(save_model).collective_timeout_s)
    dist.barrier()
    if dist.get_rank() == 1:
        return "fine", timeouts
    out = {}
    for what, call in (("forward", lambda: forward_model(torch.randint(0, 256, (1, 5)))),
                       ("save", lambda: save_model.save_pretrained(save_dir))):
        t0 = time.monotonic()
        try:
            call()
            out[what] = ("returned", time.monotonic() - t0)
        except CollectiveTimeout as err:
            out[what] = (str(err), time.monotonic() - t0)
    return out, timeouts


def test_a_lone_rank_raises_within_the_timeout(pool, tmp_path):
    (rank0, t0), (rank1, t1) = pool.run(lone_job, str(tmp_path / "ckpt"), timeout=60)
    assert rank1 == "fine" and t0 == t1 == (TIMEOUT, TIMEOUT)
    for what, (msg, seconds) in rank0.items():
        assert TIMEOUT <= seconds < TIMEOUT + 10, (what, seconds)
        assert "called on some ranks only" in msg and "call it on every rank" in msg, msg
        assert "HIERMOE_COLLECTIVE_TIMEOUT" in msg
    assert "forward" in rank0["forward"][0] and "save_pretrained" in rank0["save"][0]


class _NcclLikeWork:
    """A CUDA collective's Work as ProcessGroupNCCL has it: ``wait(timeout)`` would sleep 1 ms between
    checks (so the bounded wait must not call it), ``is_completed`` is an event query."""

    def __init__(self, completes_after: int | None):
        self.queries, self.completes_after, self.waited = 0, completes_after, False

    def is_completed(self) -> bool:
        self.queries += 1
        return self.completes_after is not None and self.queries > self.completes_after

    def wait(self, timeout=None) -> bool:
        assert timeout is None, "Work.wait(timeout) on NCCL sleeps 1 ms between checks"
        self.waited = True
        return True


def test_cuda_collectives_are_polled_not_waited_with_a_timeout():
    from hiermoe_hf.exchange import bounded

    work = _NcclLikeWork(completes_after=3)
    bounded.wait(work, TIMEOUT, "a MoE layer's forward (its count exchange)", torch.device("cuda", 0))
    assert work.queries == 4 and work.waited  # then the stream-ordering wait, which the host does not block on
    never = _NcclLikeWork(completes_after=None)
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="save_pretrained"):
        bounded.wait(never, 0.05, "save_pretrained", torch.device("cuda", 0))
    assert 0.05 <= time.monotonic() - t0 < 1.0 and not never.waited
