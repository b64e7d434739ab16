"""Routing statistics for the swap: the bounded window, its counters, its resume state (one process)."""

from __future__ import annotations

import torch

import hiermoe_hf
from hiermoe_hf.runtime.routing import RoutingStats
from hiermoe_hf.swap.window import gather_windows
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config


def test_window_is_a_bounded_ring_with_invalid_ids_dropped():
    stats = RoutingStats(capacity=4)
    stats.record(torch.tensor([[1, 2], [3, 8], [-1, 7]]), num_experts=8, training=True)
    assert stats.ids_NK.tolist() == [[1, 2], [3, -1], [-1, 7], [-1, -1]]  # 8 = Transformers' sentinel
    stats.record(torch.tensor([[4, 5], [6, 0]]), num_experts=8, training=False)
    assert stats.ids_NK.tolist() == [[6, 0], [3, -1], [-1, 7], [4, 5]]  # the oldest token was overwritten
    assert (stats.filled, stats.tokens, stats.forwards, stats.passes) == (4, 5, 2, 3)
    assert stats.window().shape == (4, 2) and stats.ids_NK.dtype == torch.int32


def test_a_batch_larger_than_the_window_is_sampled_evenly():
    stats = RoutingStats(capacity=4)
    stats.record(torch.arange(20).view(10, 2), num_experts=20, training=False)
    assert stats.window().tolist() == [[0, 1], [6, 7], [12, 13], [18, 19]]  # every 3rd token
    assert stats.tokens == 10


def test_end_interval_keeps_the_window_and_state_dict_round_trips():
    stats = RoutingStats(capacity=3)
    stats.record(torch.tensor([[0, 1], [2, 3]]), 4, training=True)
    saved = stats.state_dict()
    clone = RoutingStats()
    clone.load_state_dict(saved)
    assert clone.state_dict()["ids_NK"].tolist() == saved["ids_NK"].tolist()
    assert {k: v for k, v in clone.state_dict().items() if k != "ids_NK"} == {
        k: v for k, v in saved.items() if k != "ids_NK"}
    stats.end_interval()
    assert (stats.tokens, stats.forwards, stats.passes, stats.filled) == (0, 0, 0, 2)


def test_gather_without_a_process_group_gives_this_ranks_window_and_scale():
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))
    from hiermoe_hf.runtime.registry import moe_layers

    layers = [layer for _, layer in moe_layers(model).values()]
    layers[0].routing.record(torch.tensor([[0, 1], [2, 3], [4, 5]]), 8, training=True)
    layers[0].routing.record(torch.tensor([[6, 7], [0, 2], [1, 3]]), 8, training=True)
    first, second = gather_windows(layers, torch.device("cpu"))
    assert second is None  # nothing recorded there
    assert first.ids_NK.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2], [1, 3]]
    assert first.origin_N.tolist() == [0] * 6
    assert first.rows_scale == 0.5 and first.passes == 4.0  # 3 tokens per forward of the 6 held
