"""The planner's answers a newcomer acts on (issue 20): a model that does not fit is pointed to the
settings that make it fit, and wire sizes or token counts below 1 are refused (they printed zero or
negative times)."""

from __future__ import annotations

import pytest

from hiermoe_hf.cost.planner import main

SAVING = "with --dense-sharding fsdp2 --gradient-checkpointing"


def _memory_text(*flags: str) -> str:
    """The planner's --memory section for DeepSeek-V3 (what ``main`` prints, without the slower layouts)."""
    import argparse

    from hiermoe_hf.cost import memory as mem

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    mem.add_arguments(parser)
    *flags, topology = flags
    args = parser.parse_args(["--model", "deepseek-v3", "--memory", *flags])
    return mem.format_text(mem.plan_from_args(args, tuple(int(x) for x in topology.split("x"))))


def test_a_model_that_does_not_fit_is_pointed_to_fsdp2_and_gradient_checkpointing():
    out = _memory_text("16x8")
    assert "does NOT fit in 80 GiB" in out
    line = next(x for x in out.splitlines() if SAVING in x)
    assert "fits on 16x8" in line  # README: 16x8 with FSDP2 and gradient checkpointing fits (51.8 GiB)
    out = _memory_text("--dense-sharding", "fsdp2", "--gradient-checkpointing", "16x8")
    assert "  fits in 80 GiB" in out and SAVING not in out
    out = _memory_text("--dense-sharding", "fsdp2", "--gradient-checkpointing", "2x8")
    assert "does NOT fit" in out and SAVING not in out  # already on: nothing more to suggest
    assert "fits on 2x8" not in _memory_text("2x8") and SAVING in _memory_text("2x8")


@pytest.mark.parametrize("flag,value", [("--dtype-bytes", "0"), ("--dtype-bytes", "-2"), ("--tokens", "0")])
def test_sizes_below_one_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as err:
        main(["--model", "qwen3-30b-a3b", "--topology", "2x8", flag, value])
    assert err.value.code == 2
    assert f"{flag} must be a whole number >= 1" in capsys.readouterr().err
