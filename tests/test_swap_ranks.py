"""Expert swap on forked gloo ranks: executor provenance, function unchanged, training parity, swap_experts.

Oracles: weights, grads and optimizer state that encode (layer, parameter, logical expert, element)
exactly; the unpatched Transformers model on the global batch; the same training run without swaps.
All multi-rank checks of this module share the pools of the ``ranks`` fixture.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

E = 8  # experts per layer in the tiny models; 4 ranks as 2x2 hold 2 each (rank r: 2r, 2r+1)


def _config(kind):
    return tiny_qwen3_moe_config() if kind == "qwen" else tiny_deepseek_v3_config()


def _code(layer_i, param_i, expert, shape):
    """A value per (layer, parameter, logical expert, element), exact in float32 (< 2**24)."""
    numel = torch.Size(shape).numel()
    return float(((layer_i * 2 + param_i) * E + expert) * 2048) + torch.arange(numel, dtype=torch.float32).view(shape)


def _encode_full_model(model):
    from hiermoe_hf import patches

    with torch.no_grad():
        for li, (site, experts) in enumerate(patches.find_experts(model)):
            for pi, name in enumerate(site.param_names):
                full = getattr(experts, name)
                for x in range(E):
                    full[x] = _code(li, pi, x, full.shape[1:])


def executor_provenance_job(kind):
    """Two rounds of swaps (across nodes, inside a node, inside a rank) with params, grads and
    AdamW state encoded; returns the mismatches found and the placements."""
    import torch.distributed as dist

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.executor import execute_swaps

    model = build_model(_config(kind))
    _encode_full_model(model)
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2"))
    layers = moe_layers(model)
    names = list(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for li, name in enumerate(names):
        experts, layer = layers[name]
        for pi, pname in enumerate(layer.param_names):
            p = getattr(experts, pname)
            code = torch.stack([_code(li, pi, int(x), p.shape[1:]) for x in layer.local_logical()])
            assert torch.equal(p.detach(), code)
            p.grad = code + 0.25
            opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": -code, "exp_avg_sq": 2 * code + 1}
    rounds = [
        [(names[0], 0, 7), (names[0], 2, 1), (names[0], 4, 5), (names[1], 3, 6), (names[1], 0, 4)],
        # chained: 7 and 2 now share rank 0 (a slot exchange); 0 is on rank 3, 3 on rank 1 (across nodes);
        # 6 on rank 1 and 1 on rank 0 (inside node 0)
        [(names[0], 7, 2), (names[0], 0, 3), (names[1], 6, 1)],
    ]
    import hiermoe_hf.swap.executor as executor

    staged, chosen = [], executor.comm_device
    executor.comm_device = lambda like: staged.append(chosen(like)) or staged[-1]  # the buffers' device
    try:
        for swaps in rounds:
            execute_swaps(model, swaps, opt)
    finally:
        executor.comm_device = chosen
    bad = [] if staged and set(staged) == {torch.device("cpu")} else [f"send buffers staged on {staged}"]
    rank, e = dist.get_rank(), 2
    for li, name in enumerate(names):
        experts, layer = layers[name]
        for pi, pname in enumerate(layer.param_names):
            p = getattr(experts, pname)
            st = opt.state[p]
            for slot in range(e):
                x = int(layer.placement.logical_of_P[rank * e + slot])
                code = _code(li, pi, x, p.shape[1:])
                for what, got, want in [
                    ("weight", p.detach()[slot], code),
                    ("grad", p.grad[slot], code + 0.25),
                    ("exp_avg", st["exp_avg"][slot], -code),
                    ("exp_avg_sq", st["exp_avg_sq"][slot], 2 * code + 1),
                ]:
                    if not torch.equal(got, want):
                        bad.append(f"{name}.{pname} slot {slot} (expert {x}): {what}")
            if float(st["step"]) != 3.0:
                bad.append(f"{name}.{pname}: step changed")
    placements = {n: layers[n][1].placement.phys_of_E.tolist() for n in names}
    return bad, placements


@pytest.mark.parametrize("kind", ["qwen", "deepseek"])
def test_executor_moves_weights_grads_and_optimizer_state_exactly(ranks, kind):
    results = ranks(4).run(executor_provenance_job, kind)
    for r, (bad, _) in enumerate(results):
        assert not bad, f"rank {r}: " + "; ".join(bad[:5])
    placements = results[0][1]
    assert all(res[1] == placements for res in results), "placements differ between ranks"
    names = list(placements)
    phys0 = placements[names[0]]
    # layer 0, physical slot of each logical expert: 0<->7, 2<->1, 4<->5 give [7, 2, 1, 3, 5, 4, 6, 0];
    # then 7<->2 (slots 0, 1) and 0<->3 (slots 7, 3) give:
    assert phys0 == [3, 2, 0, 7, 5, 4, 6, 1], phys0


def logits_job(kind, dispatch):
    """Logits of the patched model before and after swaps, and the unpatched model's on the global batch."""
    import torch.distributed as dist

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.executor import execute_swaps

    W, r = dist.get_world_size(), dist.get_rank()
    ref = build_model(_config(kind))
    model = build_model(_config(kind))
    ids = torch.randint(0, 256, (W * 2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits[2 * r : 2 * r + 2]
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch=dispatch))
    names = list(moe_layers(model))
    with torch.no_grad():
        before = model(ids[2 * r : 2 * r + 2]).logits
        execute_swaps(model, [(names[0], 1, 6), (names[0], 2, 0), (names[-1], 5, 3)])  # cross-node, in-node
        after = model(ids[2 * r : 2 * r + 2]).logits
    return before, after, want


@pytest.mark.parametrize("kind,dispatch", [("qwen", "hd2"), ("deepseek", "auto"), ("qwen", "a2a")])
def test_logits_before_and_after_a_swap_are_equal(ranks, kind, dispatch):
    for r, (before, after, want) in enumerate(ranks(4).run(logits_job, kind, dispatch)):
        scale = want.abs().max()
        assert ((after - before).abs().max() / scale).item() < 1e-6, f"rank {r}: logits changed by the swap"
        assert ((after - want).abs().max() / scale).item() < 1e-5, f"rank {r}: differs from unpatched Transformers"


STEPS, B, L = 12, 2, 9


def _batch(step, W, r):
    """Each rank's micro-batch; every token id below 64, so routing is skewed towards few experts."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 64, (W * B, L), generator=g)
    return ids[r * B : (r + 1) * B]


def training_job(mode):
    """12 AdamW steps of the patched model; ``mode``: "none" (no swaps), "load" (swap_experts every
    2 steps with the load policy) or "forced" (the executor every 2 steps, across and inside nodes).
    Returns (losses, full parameters after unpatch, number of swaps)."""
    import torch.distributed as dist

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.executor import execute_swaps

    W, r = dist.get_world_size(), dist.get_rank()
    model = build_model(tiny_qwen3_moe_config()).train()
    policy = "load" if mode == "load" else "hierd"
    cfg = hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2", swap_interval=2, swap_policy=policy)
    hiermoe_hf.patch(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = list(moe_layers(model))
    forced = [[(names[0], 0, 7), (names[1], 2, 5)], [(names[0], 7, 3), (names[1], 1, 2)]]
    losses, swaps = [], 0
    for step in range(STEPS):
        x = _batch(step, W, r)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        hiermoe_hf.all_reduce_gradients(model)
        opt.step()
        if step % 2 == 1 and mode == "load":
            swaps += len(hiermoe_hf.swap_experts(model, opt))
        if step % 2 == 1 and mode == "forced":
            round_ = forced[(step // 2) % 2]
            execute_swaps(model, round_, opt)
            swaps += len(round_)
        opt.zero_grad()
        losses.append(loss.item())
    hiermoe_hf.unpatch(model)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, swaps


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", ["load", "forced"])
def test_training_with_swaps_equals_training_without(ranks, mode):
    pool = ranks(4)
    plain = pool.run(training_job, "none")
    swapped = pool.run(training_job, mode)
    assert swapped[0][2] > 0, "no swap happened: the parity check would be vacuous"
    for r in range(4):
        got, want = torch.tensor(swapped[r][0]), torch.tensor(plain[r][0])
        assert _max_rel(got, want) < 1e-6, f"rank {r} losses:\n{got.tolist()}\n{want.tolist()}"
        for name, p in plain[r][1].items():
            assert _max_rel(swapped[r][1][name], p) < 1e-6, f"rank {r}: parameter {name} after unpatch"


def _cost_json(path):
    """Link constants where rows are expensive and latency is nil: a co-location swap pays off."""
    stages = {n: {"alpha": 0.0, "beta": 1e-9} for n in ("flat", "inter-node", "intra-node")}
    with open(path, "w") as f:
        json.dump({"topology": "2x2", "source": "test", "stages": stages}, f)


def swap_experts_job(policy, cost_path):
    """Routing forced through the patched experts module, 4 forwards of 256 tokens per rank: 3/4 of
    the tokens pick experts 0 (rank 0, node 0) and 6 (rank 3, node 1) together, 1/4 pick 1 and 2.
    Returns the records, stats' swaps, placement, the output change and the interval's token count."""
    from hiermoe_hf.runtime.registry import moe_layers

    model = build_model(tiny_qwen3_moe_config())
    cfg = hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2", swap_interval=1, swap_policy=policy,
                                   cost_model=cost_path)
    hiermoe_hf.patch(model, cfg)
    layers = moe_layers(model)
    experts, layer = layers[list(layers)[0]]
    T = 256
    hidden = torch.randn(T, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 6]] * (3 * T // 4) + [[1, 2]] * (T // 4))
    w = torch.full((T, 2), 0.5)
    with torch.no_grad():
        before = experts(hidden, ids, w)
        for _ in range(3):
            experts(hidden, ids, w)
        records = hiermoe_hf.swap_experts(model)
        after = experts(hidden, ids, w)
    stats = hiermoe_hf.stats(model)
    return (records, stats[layer.name]["swaps"], layer.placement.phys_of_E.tolist(),
            _max_rel(after, before), layer.routing.tokens)


@pytest.mark.parametrize("policy", ["hierd", "load"])
def test_swap_experts_plans_the_same_swap_on_every_rank(ranks, policy):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cost.json")
        _cost_json(path)
        results = ranks(4).run(swap_experts_job, policy, path)
    records, logged, placement, change, tokens = results[0]
    assert all(res[0] == records and res[2] == placement for res in results), "ranks disagree"
    assert len(records) == 1 and logged == records
    rec = records[0]
    assert set(rec) >= {"layer", "experts", "ranks", "predicted_saving", "move_cost", "policy"}
    assert rec["policy"] == policy and rec["ranks"][0] != rec["ranks"][1]
    rank_of = [p // 2 for p in placement]
    if policy == "hierd":  # co-locates the pair used together, and says it pays off
        assert rank_of[0] == rank_of[6] and rec["predicted_saving"] > rec["move_cost"] > 0
    else:  # rank 0 computes 0 and 1 (all tokens): load moves expert 0 to the idle rank 2
        assert rec["experts"] == [0, 4] and rank_of[0] == 2
    # the forward after the swap ran with the new placement: the window's interval restarted at it
    assert change < 1e-6 and tokens == 256


def gather_job():
    """Each rank records its own routing (rank r: r + 1 tokens); every rank gathers the same window."""
    import torch.distributed as dist

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.window import gather_windows

    r = dist.get_rank()
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="2x2"))
    layers = [layer for _, layer in moe_layers(model).values()]
    for _ in range(2):
        layers[0].routing.record(torch.tensor([[r, 7 - r]] * (r + 1)), 8, training=False)
    window = gather_windows(layers, torch.device("cpu"))[0]
    return window.ids_NK.tolist(), window.origin_N.tolist(), window.rows_scale, window.passes


def test_routing_windows_gather_every_ranks_tokens(ranks):
    results = ranks(4).run(gather_job)
    ids, origin, scale, passes = results[0]
    assert all(res == results[0] for res in results)
    assert origin == [r for r in range(4) for _ in range(2 * (r + 1))]
    assert ids == [[r, 7 - r] for r in range(4) for _ in range(2 * (r + 1))]
    assert scale == 0.5 and passes == 2.0  # 10 tokens per forward over all ranks, 20 held


def test_bad_input():
    model = build_model(tiny_qwen3_moe_config())
    with pytest.raises(ValueError, match="not patched"):
        hiermoe_hf.swap_experts(model)
    with pytest.raises(ValueError, match="unknown swap_policy 'nearest'; valid: hierd, load"):
        hiermoe_hf.HierMoEConfig(swap_policy="nearest")
    with pytest.raises(ValueError, match="swap_interval must be an integer >= 0"):
        hiermoe_hf.HierMoEConfig(swap_interval=-1)
    with pytest.raises(ValueError, match="swap_pairs must be an integer >= 1"):
        hiermoe_hf.HierMoEConfig(swap_pairs=0)
    hiermoe_hf.patch(model)  # world size 1: nothing to swap between
    assert hiermoe_hf.swap_experts(model) == []
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        hiermoe_hf.swap_experts(model, optimizer=object())
    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.executor import execute_swaps

    name = list(moe_layers(model))[0]
    with pytest.raises(ValueError, match="not a logical expert id in 0..7"):
        execute_swaps(model, [(name, 0, 8)])
    with pytest.raises(ValueError, match="repeats an expert"):
        execute_swaps(model, [(name, 0, 1), (name, 1, 2)])
    with pytest.raises(ValueError, match="no MoE layer 'nope'"):
        execute_swaps(model, [("nope", 0, 1)])


def gather_to_rank0_job():
    """gather_windows(dst=0): rank 0 gets the all-gathered window, the other ranks None."""
    import torch.distributed as dist

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.window import gather_windows

    r = dist.get_rank()
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(topology="2x2"))
    layers = [layer for _, layer in moe_layers(model).values()]
    layers[0].routing.record(torch.tensor([[r, 7 - r]] * (r + 1)), 8, training=False)
    everywhere = gather_windows(layers, torch.device("cpu"))[0]
    to_zero = gather_windows(layers, torch.device("cpu"), dst=0)[0]
    if r:
        return to_zero is None
    return (
        torch.equal(to_zero.ids_NK, everywhere.ids_NK) and torch.equal(to_zero.origin_N, everywhere.origin_N)
        and (to_zero.rows_scale, to_zero.passes) == (everywhere.rows_scale, everywhere.passes)
    )


def test_routing_windows_gathered_to_rank_0_only(ranks):
    assert ranks(4).run(gather_to_rank0_job) == [True] * 4
