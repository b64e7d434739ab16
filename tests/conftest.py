import os
import tempfile

# Before torch/triton are imported anywhere: the interpreter flag is read when kernels are defined,
# one thread per rank keeps forked gloo ranks from oversubscribing 2 cores, and nothing reaches a hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hiermoe-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401  (imported before forking, so ranks start in ~0.5 s)
from dist import RankPool  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ranks():
    """``ranks(n)``: a pool of n forked gloo ranks, started once per test module and per n."""
    pools: dict[int, RankPool] = {}

    def get(n: int) -> RankPool:
        if n not in pools:
            pools[n] = RankPool(n)
        return pools[n]

    yield get
    for pool in pools.values():
        pool.close()
