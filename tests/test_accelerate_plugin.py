"""HierMoEPlugin in an Accelerate loop on forked CPU/gloo ranks, against single-process Transformers.

Oracle: the unpatched model in one process, fed every rank's micro-batch of each step with the
loss averaged over ranks (what DDP means, DESIGN.md section 6), AdamW and
``torch.nn.utils.clip_grad_norm_`` on the whole model. Per-step losses and clip norms must agree
within 1e-5 relative.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import types

import pytest
import torch
from accelerate_state import fresh_accelerator
from dist import RankPool

from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

STEPS, B, L, LR, MAX_NORM = 12, 2, 9, 1e-3, 0.5
try:
    from hiermoe_hf.swap.round import swap_experts  # noqa: F401

    HAVE_SWAP = True
except ImportError:  # the swap issue's module is not there yet
    HAVE_SWAP = False
needs_swap = pytest.mark.skipif(not HAVE_SWAP, reason="hiermoe_hf.swap.swap_experts (swap issue) is not there yet")


def _config(kind: str):
    return tiny_qwen3_moe_config() if kind == "qwen" else tiny_deepseek_v3_config()


def _global_batch(step: int, world: int, accum: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (world * accum * B, L), generator=g)


def _micro(ids: torch.Tensor, rank: int, micro: int, accum: int) -> torch.Tensor:
    row = (rank * accum + micro) * B
    return ids[row : row + B]


def train_job(kind, plugin_kw, steps=STEPS, accum=1, save_at=None, save_dir=None, resume_dir=None, start=0,
              experts_only=False):
    """One rank of an Accelerate run with HierMoEPlugin; returns (losses, clip norms, placements, metrics)."""
    import torch.distributed as dist

    from hiermoe_hf.accelerate import HierMoEPlugin
    from hiermoe_hf.runtime.registry import moe_layers

    W, r = dist.get_world_size(), dist.get_rank()
    acc = fresh_accelerator(gradient_accumulation_steps=accum)
    logged = []  # what the plugin sends to the trackers, per optimizer step
    acc.log = lambda values, step=None, log_kwargs=None: logged.append((step, values))
    model = build_model(_config(kind), seed=0 if resume_dir is None else 7).train()  # resume: weights come from disk
    if experts_only:
        _train_only_routed_experts(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)  # made before patching: prepare re-points it
    plugin = HierMoEPlugin(**plugin_kw)
    model, opt = plugin.prepare(acc, model, opt)
    fingerprint = None  # this rank's exact training state at the save / right after the load
    if resume_dir is not None:
        acc.load_state(resume_dir)
        fingerprint = _fingerprint(acc.unwrap_model(model), opt)
    losses, norms = [], []
    for step in range(start, steps):
        ids = _global_batch(step, W, accum)
        total = 0.0
        for m in range(accum):
            with acc.accumulate(model):
                x = _micro(ids, r, m, accum)
                out = model(input_ids=x, labels=x)
                acc.backward(out.loss)
                total += out.loss.item() / accum
                if acc.sync_gradients:
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), MAX_NORM)))
                opt.step()
                opt.zero_grad()
        losses.append(total)
        if save_at is not None and step + 1 == save_at:
            acc.save_state(save_dir)
            fingerprint = _fingerprint(acc.unwrap_model(model), opt)
    layers = moe_layers(acc.unwrap_model(model))
    placements = {n: layer.placement.phys_of_E.tolist() for n, (_, layer) in layers.items()}
    return losses, norms, placements, plugin.metrics, plugin.step, logged, fingerprint


def _fingerprint(model, optimizer) -> dict:
    """sha256 of every parameter and of its optimizer state, bit for bit, plus the placements."""
    from hiermoe_hf.runtime.registry import moe_layers

    def digest(t):
        return hashlib.sha256(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    out = {}
    for name, p in model.named_parameters():
        out[name] = digest(p)
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            out[f"{name}/{key}"] = digest(value) if isinstance(value, torch.Tensor) else value
    out.update({f"{n}/placement": layer.placement.phys_of_E.tolist() for n, (_, layer) in moe_layers(model).items()})
    return out


def _train_only_routed_experts(model) -> None:
    """The MoE fine-tuning recipe that freezes everything but the routed experts."""
    for name, p in model.named_parameters():
        p.requires_grad_(".experts." in name)


def reference(kind, world, steps=STEPS, accum=1, experts_only=False):
    """Single process, unpatched: every rank's micro-batches, loss averaged over them."""
    model = build_model(_config(kind)).train()
    if experts_only:
        _train_only_routed_experts(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(steps):
        ids = _global_batch(step, world, accum)
        total = 0.0
        for r in range(world):
            for m in range(accum):
                x = _micro(ids, r, m, accum)
                loss = model(input_ids=x, labels=x).loss
                (loss / (world * accum)).backward()
                total += loss.item() / (world * accum)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms


def _rank_mean(results, i):
    per_rank = torch.tensor([res[i] for res in results], dtype=torch.float64)
    return per_rank.mean(0)


def _assert_close(got, want, what):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel < 1e-5, f"{what}: max relative difference {rel:.2e}\n got  {got.tolist()}\n want {want.tolist()}"


@pytest.mark.parametrize(
    "world,kind,plugin_kw,accum",
    [
        (4, "qwen", dict(topology="2x2", dispatch="hd2"), 1),
        (4, "qwen", dict(topology="2x2", dispatch="auto"), 1),
        (2, "deepseek", dict(topology="1x2", dispatch="a2a"), 2),  # also: grad accumulation
    ],
    ids=["4ranks-2x2-hd2-qwen", "4ranks-2x2-auto-qwen", "2ranks-1x2-a2a-deepseek-accum2"],
)
def test_plugin_training_equals_single_process(ranks, world, kind, plugin_kw, accum):
    results = ranks(world).run(train_job, kind, plugin_kw, accum=accum)
    want_losses, want_norms = reference(kind, world, accum=accum)
    _assert_close(_rank_mean(results, 0), want_losses, "loss per step")
    for r, res in enumerate(results):  # the clip norm is global: the same on every rank
        _assert_close(res[1], want_norms, f"clip norm on rank {r}")
    metrics = results[0][3]
    assert metrics["hiermoe/step"] == STEPS
    # tokens routed, summed over ranks and MoE layers: every rank's micro-batches went through every layer
    assert metrics["hiermoe/tokens"] == world * accum * B * L * _config(kind).num_hidden_layers - (
        world * accum * B * L * getattr(_config(kind), "first_k_dense_replace", 0)
    )
    logged = results[0][5]
    assert [step for step, _ in logged] == list(range(1, STEPS + 1)), "one tracker log per optimizer step"
    assert logged[-1][1] == metrics


def test_plugin_trains_only_the_routed_experts_exactly(ranks):
    """Every dense parameter frozen: DDP would refuse the model (no gradient to average); the plugin
    registers it unwrapped, with rank 0's dense state, and trains like one process."""
    results = ranks(4).run(train_job, "qwen", dict(topology="2x2", dispatch="hd2"), experts_only=True)
    want_losses, want_norms = reference("qwen", 4, experts_only=True)
    _assert_close(_rank_mean(results, 0), want_losses, "loss per step")
    for r, res in enumerate(results):
        _assert_close(res[1], want_norms, f"clip norm on rank {r}")


# The "load" policy swaps whenever that lowers the busiest rank's load, so swaps surely happen on a
# toy model (the dedup-aware "hierd" policy rightly finds moving experts not worth it at this size).
SWAPPING = dict(swap_interval=3, swap_policy="load", swap_pairs=2)


@needs_swap
def test_plugin_training_with_swaps_equals_single_process(ranks):
    results = ranks(4).run(train_job, "qwen", dict(topology="2x2", dispatch="hd2", **SWAPPING))
    want_losses, want_norms = reference("qwen", 4)
    _assert_close(_rank_mean(results, 0), want_losses, "loss per step with swaps")
    _assert_close(results[0][1], want_norms, "clip norm with swaps")
    assert all(res[2] == results[0][2] for res in results), "placements differ between ranks"
    assert results[0][3]["hiermoe/swaps_done"] > 0, "no swap happened: the test would prove nothing"
    assert any(p != sorted(p) for p in results[0][2].values())


def test_save_state_then_load_state_in_a_fresh_launch_continues_identically(ranks):
    plugin_kw = dict(topology="2x2", dispatch="hd2", **(SWAPPING if HAVE_SWAP else {}))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "state")
        full = ranks(4).run(train_job, "qwen", plugin_kw, save_at=6, save_dir=ckpt)
        rank_files = sorted(f for f in os.listdir(ckpt) if f.startswith("hiermoe_rank"))
        assert rank_files == [f"hiermoe_rank{r:05d}-of-00004.pt" for r in range(4)]
        fresh = RankPool(4)  # new processes: nothing survives but the files
        try:
            resumed = fresh.run(train_job, "qwen", plugin_kw, save_dir=None, resume_dir=ckpt, start=6)
        finally:
            fresh.close()
    for r in range(4):
        # The restored state is bit-identical (weights, Adam moments and steps, placements) on every rank...
        saved, loaded = full[r][6], resumed[r][6]
        assert saved.keys() == loaded.keys()
        assert [k for k in saved if saved[k] != loaded[k]] == [], f"rank {r}: state differs after load_state"
        # ...but the losses after it are not bit-exact: DDP reorders its gradient bucket after a run's first
        # step, so the resumed run's first all-reduce sums the dense grads in another order (~1e-7).
        _assert_close(resumed[r][0], full[r][0][6:], f"rank {r}: resumed losses vs the uninterrupted run")
        assert resumed[r][2] == full[r][2], f"rank {r}: placements differ after resuming"
        assert resumed[r][4] == STEPS
    if HAVE_SWAP:  # swaps before the save (step 3) and after the resume (steps 9, 12)
        swaps = [res[0][3]["hiermoe/swaps_done"] for res in (full, resumed)]
        assert swaps[0] > 0 and swaps[1] == swaps[0], swaps
    if not HAVE_SWAP:
        pytest.skip("resume checked without swaps: hiermoe_hf.swap.swap_experts is not there yet")


def traffic_job(dispatch):
    """Inter-node rows counted from the routing vs the dispatcher's own per-stage counts."""
    import torch.distributed as dist

    import hiermoe_hf
    from hiermoe_hf.training.traffic import TrafficMeter

    r = dist.get_rank()
    model = build_model(tiny_qwen3_moe_config(num_experts=16, num_experts_per_tok=4))
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch=dispatch))
    meter = TrafficMeter(model)
    torch.manual_seed(5 + r)
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 11)))
    stages = [s for layer in hiermoe_hf.stats(model).values() for s in layer["stages"]]
    from_stats = sum(s["rows_sent"] for s in stages if s["name"] == "inter-node")
    counts = meter.pop()
    return counts["inter_node_rows"], counts["a2a_inter_node_rows"], from_stats


@pytest.mark.parametrize("dispatch", ["2dh", "hd2"])
def test_traffic_meter_agrees_with_dispatcher_counts(ranks, dispatch):
    results = ranks(4).run(traffic_job, dispatch)
    # Summed over ranks: in 2dh a rank's rail stage forwards its node peers' rows, not its own tokens'.
    counted, a2a, from_stats = (sum(res[i] for res in results) for i in range(3))
    assert counted == from_stats, f"rows counted from the routing {counted} != the dispatcher's {from_stats}"
    if dispatch == "2dh":
        assert counted == a2a  # 2dh sends a2a's rows, only in two stages
    else:
        assert counted < a2a  # de-duplication per destination node


def mismatch_job(topology):
    from hiermoe_hf.accelerate import HierMoEPlugin

    acc = fresh_accelerator()
    model = build_model(tiny_qwen3_moe_config())
    try:
        HierMoEPlugin(topology=topology).prepare(acc, model)
    except ValueError as err:
        return str(err)
    return None


def test_plugin_topology_that_does_not_match_the_launch_is_a_clear_error(ranks):
    for msg in ranks(4).run(mismatch_job, "2x4"):
        assert msg is not None and "2x4" in msg and "4 processes" in msg and "1x4" in msg, msg


# ---- single-process checks: environment, validation, launch detection ----------------------------------------


def test_env_vars_fill_unset_fields_and_explicit_arguments_win(monkeypatch):
    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.setenv("HIERMOE_DISPATCH", "hd2")
    monkeypatch.setenv("HIERMOE_TOPOLOGY", "2x2")
    monkeypatch.setenv("HIERMOE_SWAP_INTERVAL", "25")
    monkeypatch.setenv("HIERMOE_SWAP_POLICY", "load")
    p = HierMoEPlugin()
    assert (p.dispatch, p.topology, p.swap_interval, p.swap_policy) == ("hd2", "2x2", 25, "load")
    assert p.config().dispatch == "hd2" and p.kernels == "auto" and p.swap_pairs == 1
    assert HierMoEPlugin(dispatch="a2a", swap_interval=0).dispatch == "a2a"
    assert HierMoEPlugin(dispatch="a2a", swap_interval=0).swap_interval == 0


def test_overlap_chunks_defaults_to_auto_and_takes_auto_or_an_integer_from_the_env(monkeypatch):
    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.delenv("HIERMOE_OVERLAP_CHUNKS", raising=False)
    assert HierMoEPlugin().overlap_chunks == "auto" and HierMoEPlugin().config().overlap_chunks == "auto"
    for raw, want in (("auto", "auto"), ("AUTO", "auto"), ("4", 4), ("1", 1)):
        monkeypatch.setenv("HIERMOE_OVERLAP_CHUNKS", raw)
        assert HierMoEPlugin().config().overlap_chunks == want
    assert HierMoEPlugin(overlap_chunks=2).overlap_chunks == 2  # an argument wins


@pytest.mark.parametrize(
    "env,value,needles",
    [
        ("HIERMOE_DISPATCH", "fast", ["HIERMOE_DISPATCH", "'fast'", "a2a", "hd1"]),
        ("HIERMOE_SWAP_INTERVAL", "often", ["HIERMOE_SWAP_INTERVAL", "'often'", "integer"]),
        ("HIERMOE_SWAP_INTERVAL", "-3", ["HIERMOE_SWAP_INTERVAL", "-3", ">= 0"]),
        ("HIERMOE_KERNELS", "cuda", ["HIERMOE_KERNELS", "'cuda'", "triton", "torch"]),
        ("HIERMOE_TOPOLOGY", "2by2", ["HIERMOE_TOPOLOGY", "2by2"]),
        ("HIERMOE_SWAP_POLICY", "random", ["HIERMOE_SWAP_POLICY", "'random'", "hierd", "load"]),
        ("HIERMOE_OVERLAP_CHUNKS", "many", ["HIERMOE_OVERLAP_CHUNKS", "'many'", "'auto'", "integer"]),
        ("HIERMOE_OVERLAP_CHUNKS", "0", ["HIERMOE_OVERLAP_CHUNKS", "0", "'auto'", "1"]),
    ],
)
def test_bad_env_values_name_the_variable_and_the_choices(monkeypatch, env, value, needles):
    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError) as err:
        HierMoEPlugin()
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_bad_arguments_name_the_value():
    from hiermoe_hf.accelerate import HierMoEPlugin

    with pytest.raises(ValueError, match="'hd0x'"):
        HierMoEPlugin(dispatch="hd0x")
    with pytest.raises(ValueError, match="swap_pairs"):
        HierMoEPlugin(swap_pairs=0)


def test_topology_is_taken_from_the_launcher_and_checked_against_it(monkeypatch):
    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.delenv("HIERMOE_TOPOLOGY", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert HierMoEPlugin().resolve_topology(16).levels == (2, 8)
    assert HierMoEPlugin(topology="2x2x4").resolve_topology(16).levels == (2, 2, 4)  # finer than the launch
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"3x2 groups ranks into nodes of 2.*nodes of 3"):
        HierMoEPlugin(topology="3x2").resolve_topology(6)
    with pytest.raises(ValueError, match=r"topology 4x4 has 16 ranks but this launch started 6 processes"):
        HierMoEPlugin(topology="4x4").resolve_topology(6)


def test_an_accelerator_that_missed_the_launch_is_detected(monkeypatch):
    from accelerate.utils import DistributedType

    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.setenv("WORLD_SIZE", "4")
    alone = types.SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(ValueError, match=r"started 4 processes.*Accelerator\(cpu=True\)"):
        HierMoEPlugin().prepare(alone, build_model(tiny_qwen3_moe_config()))
    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=4)
    with pytest.raises(ValueError, match="FSDP"):
        HierMoEPlugin().prepare(fsdp, build_model(tiny_qwen3_moe_config()))
