"""Collectives, host reads and GPU syncs of one training step (issues 13, 18): 4 gloo ranks (2x2).

Every ``torch.distributed`` collective the step issues is counted (a plain step without DDP runs
none but the layer's). Host reads of device tensors (``Tensor.tolist/item/cpu/numpy`` and
``int()/float()/bool()``) and everything else a CUDA stream would synchronise on (``sync_watch``:
blocking H2D copies of host tensors, ``torch.tensor(host data, device=...)``, boolean-mask indexing,
``nonzero``, hidden ``.item()`` in ATen, event waits) are counted while the patched experts forward
and its hooks (the traffic meter) run and over the whole backward, on CPU tensors treated as device
tensors. Budgets per MoE layer and step: ``hd2``/``2dh`` <= 9 collectives, ``a2a``/``hd1`` <= 5;
one host read in the forward, none in the backward, no other sync; ``auto`` costs exactly what the
strategy it picked costs; with the plugin's traffic meter attached and for ``auto`` (timed and
priced) the same 1/0/0.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from sync_watch import SyncWatch

import hiermoe_hf
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

COLLECTIVES = (
    "all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
    "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "barrier", "send", "recv",
    "isend", "irecv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list",
)
BUDGET = {"a2a": 5, "hd1": 5, "2dh": 9, "hd2": 9}


class Counter:
    """Collectives (always, once installed) and ``SyncWatch``'s reads and syncs (while ``active``)."""

    def __init__(self, watch: SyncWatch):
        self.watch = watch
        self.collectives: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return self.watch.active

    @active.setter
    def active(self, value: bool) -> None:
        self.watch.active = value

    @property
    def calls(self) -> dict[str, int]:
        return {**self.collectives, **self.watch.calls}

    @contextlib.contextmanager
    def installed(self):
        saved = []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                orig = getattr(dist, name)

                def counted(*args, _orig=orig, _key=f"collective.{name}", **kwargs):
                    self.collectives[_key] = self.collectives.get(_key, 0) + 1
                    return _orig(*args, **kwargs)

                saved.append((name, orig))
                setattr(dist, name, counted)
        try:
            yield self
        finally:
            for name, orig in reversed(saved):
                setattr(dist, name, orig)

    def total(self, prefix: str) -> int:
        return sum(v for k, v in self.calls.items() if k.startswith(prefix))


def _watch_forwards(model, counter: Counter, hooks: bool = False) -> None:
    """Count host reads only inside each patched experts forward (``hooks``: and inside its forward
    hooks, where the traffic meter runs)."""
    for _, (experts, _) in moe_layers(model).items():
        inner = experts.forward
        if hooks:
            experts.register_forward_hook(lambda *_: setattr(counter, "active", True), prepend=True)
            experts.register_forward_hook(lambda *_: setattr(counter, "active", False))

        def fwd(*args, _inner=inner, **kwargs):
            counter.active = True
            try:
                return _inner(*args, **kwargs)
            finally:
                counter.active = False

        experts.forward = fwd


def count_step(
    model_name: str, strategy: str, overlap_chunks: int | str = 1, meter: bool = False,
    cost_model: str | None = "hiermoe-paper", warmup_steps: int = 1,
) -> dict:
    """One training step's collectives (forward + backward), host reads of device tensors (inside the
    experts forwards and their hooks; the whole backward) and GPU syncs (``SyncWatch``: H2D copies,
    boolean masks, nonzero, hidden items, event waits) in the same windows."""
    return count_steps(model_name, strategy, overlap_chunks, meter, cost_model, (warmup_steps,))[0]


def count_steps(
    model_name: str, strategy: str, overlap_chunks: int | str, meter: bool, cost_model: str | None,
    at: tuple[int, ...],
) -> list[dict]:
    """``count_step``'s counts of several steps of one training run: the i-th counted step comes
    after ``at[i]`` steps (earlier counted ones included)."""
    cfg = tiny_qwen3_moe_config() if model_name == "qwen3_moe" else tiny_deepseek_v3_config()
    model = build_model(cfg).train()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5 + dist.get_rank()))
    cfg = hiermoe_hf.HierMoEConfig(
        topology="2x2", dispatch=strategy, kernels="torch", cost_model=cost_model, overlap_chunks=overlap_chunks
    )
    hiermoe_hf.patch(model, cfg)
    if meter:  # what the plugin and the callback attach: it must add no host read per layer
        from hiermoe_hf.training.traffic import TrafficMeter

        TrafficMeter(model)
    watch = SyncWatch()
    # Installed after the patch (its tensors reach the device with the model, or lazily in the first
    # forward) and before the warm-up: what a forward caches on the host is recognised when counted.
    out, done = [], 0
    with watch.installed():
        for steps in at:
            for _ in range(steps - done):  # warm-up: lazily built state is not the per-step cost
                model(ids, labels=ids).loss.backward()
            done = steps + 1
            model.zero_grad()
            watch.calls = {}
            fwd = Counter(watch)
            with fwd.installed():
                _watch_forwards(model, fwd, hooks=meter)
                loss = model(ids, labels=ids).loss
            fwd_calls, watch.calls = fwd.calls, {}
            bwd = Counter(watch)
            with bwd.installed():
                bwd.active = True
                loss.backward()
                bwd.active = False
            out.append(_counted(model, {"forward": fwd_calls, "backward": bwd.calls}, watch))
    return out


def _counted(model, calls: dict, watch: SyncWatch) -> dict:
    layers = len(moe_layers(model))
    stats = hiermoe_hf.stats(model)

    def total(where: str, prefix: str) -> int:
        return sum(v for k, v in calls[where].items() if k.startswith(prefix))

    return {
        "layers": layers,
        "collectives": total("forward", "collective.") + total("backward", "collective."),
        "forward_reads": total("forward", "read."),
        "backward_reads": total("backward", "read."),
        "hidden_syncs": total("forward", "sync.") + total("backward", "sync."),
        "calls": calls,
        "where": watch.where,
        "strategies": [s["strategy"] for s in stats.values()],
        "chunks": [s["overlap_chunks"] for s in stats.values()],
    }


COSTS = ("collectives", "forward_reads", "backward_reads", "hidden_syncs")
_FIXED_RUNS: dict = {}


def fixed_step(pool, model_name: str, strategy: str, chunks: int = 1) -> list[dict]:
    """``count_step`` of a fixed strategy on every rank, run once per module (several tests compare
    ``auto``'s steps against the same fixed ones)."""
    key = (model_name, strategy, chunks)
    if key not in _FIXED_RUNS:
        _FIXED_RUNS[key] = pool.run(count_step, model_name, strategy, chunks)
    return _FIXED_RUNS[key]


def _per_layer(result: dict) -> dict:
    return {k: result[k] / result["layers"] for k in COSTS}


def _assert_costs_what_it_ran(r: dict, fixed: dict) -> None:
    """``auto``'s step costs exactly the sum of the fixed strategies' per-layer costs it ran (keyed by
    strategy, or by (strategy, chunks) for a timed chunk count)."""
    ran = r["strategies"] if isinstance(next(iter(fixed)), str) else list(zip(r["strategies"], r["chunks"]))
    want = {k: sum(fixed[s][k] for s in ran) for k in COSTS}
    got = {k: r[k] for k in COSTS}
    assert got == want, (r["strategies"], got, want, r["calls"])


@pytest.mark.parametrize("model_name", ["qwen3_moe", "deepseek_v3"])
def test_budgets_per_strategy_and_auto_free(ranks, model_name):
    pool = ranks(4)
    fixed = {}
    for strategy in ("a2a", "2dh", "hd1", "hd2"):
        results = fixed_step(pool, model_name, strategy)
        for r in results:
            per = _per_layer(r)
            assert per["collectives"] <= BUDGET[strategy], (strategy, per, r["calls"])
            assert per["forward_reads"] <= 1, (strategy, per, r["calls"])
            assert per["backward_reads"] == 0, (strategy, per, r["calls"])
            assert per["hidden_syncs"] == 0, (strategy, per, r["calls"])
            assert r["strategies"] == [strategy] * r["layers"]
        fixed[strategy] = _per_layer(results[0])
    for r in pool.run(count_step, model_name, "auto"):
        _assert_costs_what_it_ran(r, fixed)


@pytest.mark.parametrize("model_name", ["qwen3_moe", "deepseek_v3"])
def test_timed_auto_is_free_during_and_after_its_trials(ranks, model_name):
    """``auto`` without a cost model (``cost/trials.py``): its timings ride in the count exchange, so
    a step during the trials (the second: every layer runs hd2) and one after the choice cost
    exactly what the strategy they ran costs."""
    pool = ranks(4)
    fixed = {s: _per_layer(fixed_step(pool, model_name, s)[0]) for s in ("hd1", "hd2")}
    for during, after in pool.run(count_steps, model_name, "auto", 1, False, None, (1, 7)):
        assert during["strategies"] == ["hd2"] * during["layers"], during["strategies"]
        for r in (during, after):
            _assert_costs_what_it_ran(r, fixed)


@pytest.mark.parametrize("model_name", ["qwen3_moe", "deepseek_v3"])
def test_timed_overlap_chunks_are_free_during_and_after_their_trials(ranks, model_name):
    """The defaults (``overlap_chunks="auto"`` after the timed strategy, ``cost/trials.py``): a step
    in the chunk phase (x4), the step that decides (counted in 4 chunks, run in 1 or 4: its
    counts merged on the host) and one after cost exactly what they ran: 1 host read per layer
    forward, none in the backward, no hidden sync, the collectives of that strategy and chunk count."""
    from hiermoe_hf.cost.trials import CHUNK_ROUNDS, OVERLAP_CHUNKS, TIMED_ROUNDS

    pool = ranks(4)
    fixed = {(s, c): _per_layer(fixed_step(pool, model_name, s, c)[0]) for s in ("hd1", "hd2")
             for c in (1, OVERLAP_CHUNKS)}
    chunk_phase = 2 * (1 + TIMED_ROUNDS)  # steps before the first one in 4 chunks
    decide = chunk_phase + CHUNK_ROUNDS  # steps before the deciding forward
    at = (chunk_phase, decide, decide + 1)
    for rank_results in pool.run(count_steps, model_name, "auto", "auto", False, None, at):
        for warmup, r in zip(at, rank_results):
            if warmup == chunk_phase:
                assert r["chunks"] == [OVERLAP_CHUNKS] * r["layers"], r  # the kept strategy in 4 chunks
            per = _per_layer(r)
            assert per["forward_reads"] == 1 and per["backward_reads"] == 0 and per["hidden_syncs"] == 0, r["calls"]
            _assert_costs_what_it_ran(r, fixed)


@pytest.mark.parametrize("model_name", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("strategy", ["a2a", "hd2"])
def test_chunks_add_only_their_row_exchanges(ranks, strategy, model_name):
    """overlap_chunks=3: still one count exchange and one host read per layer; each chunk adds only
    its row exchanges (the budget minus the count exchange, per chunk). DeepSeek-V3's block, which
    then runs its shared experts during the transfer, still calls the experts module (hooks see it)."""
    chunks = 3
    for r in ranks(4).run(count_step, model_name, strategy, chunks):
        per = _per_layer(r)
        assert per["collectives"] == 1 + chunks * (BUDGET[strategy] - 1), (per, r["calls"])
        assert per["forward_reads"] == 1 and per["backward_reads"] == 0 and per["hidden_syncs"] == 0, r["calls"]


@pytest.mark.parametrize("strategy", ["a2a", "hd2"])
def test_traffic_meter_adds_no_host_read(ranks, strategy):
    pool = ranks(4)
    for plain, metered in zip(fixed_step(pool, "qwen3_moe", strategy), pool.run(count_step, "qwen3_moe",
                                                                                  strategy, meter=True)):
        assert _per_layer(metered) == _per_layer(plain), (metered["calls"], plain["calls"])


@pytest.mark.parametrize("model_name", ["qwen3_moe", "deepseek_v3"])
def test_gpu_sync_budget_with_meter_and_auto(ranks, model_name):
    """Issue 18: with the traffic meter attached, for a fixed strategy, ``auto`` priced and ``auto``
    timed (during its trials and after its choice): per MoE layer and step exactly one host read in
    the forward, none in the backward and no other GPU sync (review findings 1, 3, 12)."""
    pool = ranks(4)
    cases = (("hd2", "hiermoe-paper", (1,)), ("auto", "hiermoe-paper", (1,)), ("auto", None, (2, 7)))
    for strategy, cost_model, at in cases:
        for rank_results in pool.run(count_steps, model_name, strategy, 1, True, cost_model, at):
            for warmup, r in zip(at, rank_results):
                per = _per_layer(r)
                got = (per["forward_reads"], per["backward_reads"], per["hidden_syncs"])
                assert got == (1, 0, 0), f"{(strategy, cost_model, warmup, got)} {r['calls']} {r['where']}"
