"""HIERMOE_* settings behave the same at every entry point (issue 20): argument > environment >
default for HierMoEConfig (hence patch(model) and from_pretrained without a config), HierMoEPlugin
and HierMoECallback; errors about a value from the environment name the variable, also those that
need the launch (the world size, the topology's levels); patch before the process group exists
says how to start one. Single process: the launch-dependent checks run before any collective, so
the world size is faked where a launch is needed."""

from __future__ import annotations

import pytest

import hiermoe_hf
from hiermoe_hf.runtime import patch as patch_module
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

ENV = {"HIERMOE_DISPATCH": "hd2", "HIERMOE_SWAP_INTERVAL": "7", "HIERMOE_SWAP_POLICY": "load",
       "HIERMOE_OVERLAP_CHUNKS": "2", "HIERMOE_KERNELS": "torch"}
FROM_ENV = {"dispatch": "hd2", "swap_interval": 7, "swap_policy": "load", "overlap_chunks": 2, "kernels": "torch"}


def _settings(obj) -> dict:
    return {k: getattr(obj, k) for k in FROM_ENV}


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("HIERMOE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_every_entry_point_takes_argument_then_environment_then_default(clean_env):
    from hiermoe_hf.accelerate import HierMoEPlugin
    from hiermoe_hf.trainer import HierMoECallback

    defaults = _settings(hiermoe_hf.HierMoEConfig())
    assert defaults == {"dispatch": "auto", "swap_interval": 0, "swap_policy": "hierd", "overlap_chunks": "auto",
                        "kernels": "auto"}
    for name, value in ENV.items():
        clean_env.setenv(name, value)
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))  # one process: topology 1x1
    seen = {
        "HierMoEConfig()": _settings(hiermoe_hf.HierMoEConfig()),
        "patch(model)": _settings(hiermoe_hf.runtime.registry.runtime_of(model).config),
        "HierMoEPlugin()": _settings(HierMoEPlugin()),
        "HierMoEPlugin().config()": _settings(HierMoEPlugin().config()),
        "HierMoECallback()": _settings(HierMoECallback().settings),
    }
    assert seen == {k: FROM_ENV for k in seen}
    given = dict(dispatch="a2a", swap_interval=0, swap_policy="hierd", overlap_chunks=1, kernels="auto")
    assert _settings(hiermoe_hf.HierMoEConfig(**given)) == given  # an argument wins, also one equal to the default
    assert _settings(HierMoEPlugin(**given)) == given
    assert _settings(HierMoECallback(**given).settings) == given
    assert _settings(HierMoECallback(config=hiermoe_hf.HierMoEConfig(**given)).settings) == given


@pytest.mark.parametrize(
    "env,value,needles",
    [
        ("HIERMOE_KERNELS", "cuda", ["HIERMOE_KERNELS='cuda'", "triton", "torch"]),
        ("HIERMOE_DISPATCH", "fast", ["HIERMOE_DISPATCH='fast'", "a2a", "hd1"]),
        ("HIERMOE_SWAP_PAIRS", "0", ["HIERMOE_SWAP_PAIRS='0'", ">= 1"]),
        ("HIERMOE_EP_SIZE", "two", ["HIERMOE_EP_SIZE='two'", "integer"]),
    ],
)
def test_a_bogus_variable_is_refused_by_hiermoe_config_and_patch(clean_env, env, value, needles):
    clean_env.setenv(env, value)
    for build in (hiermoe_hf.HierMoEConfig, lambda: hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))):
        with pytest.raises(ValueError) as err:
            build()
        for needle in needles:
            assert needle in str(err.value), str(err.value)


def test_launch_dependent_errors_name_the_variable(clean_env):
    """HIERMOE_DISPATCH=hd9 is well formed but a 2x2 topology has 2 levels; HIERMOE_EP_SIZE=3 does not
    divide 4 ranks. Both are found only with the launch: by patch and by the plugin/callback."""
    from hiermoe_hf.accelerate import HierMoEPlugin

    clean_env.setattr(patch_module, "world", lambda: (4, 0))  # checks before any collective
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    clean_env.setenv("HIERMOE_TOPOLOGY", "2x2")
    clean_env.setenv("HIERMOE_DISPATCH", "hd9")
    with pytest.raises(ValueError, match=r"HIERMOE_DISPATCH='hd9': strategy 'hd9' is not available on topology 2x2"):
        hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))
    clean_env.delenv("HIERMOE_DISPATCH")
    clean_env.delenv("HIERMOE_TOPOLOGY")
    clean_env.setenv("HIERMOE_EP_SIZE", "3")
    with pytest.raises(ValueError, match=r"HIERMOE_EP_SIZE='3': ep_size=3 does not divide the world size 4"):
        hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))
    with pytest.raises(ValueError, match=r"HIERMOE_EP_SIZE='3': ep_size=3 does not divide the world size 4"):
        HierMoEPlugin().resolve_topology(4)
    # The same values given as arguments are reported as arguments.
    clean_env.delenv("HIERMOE_EP_SIZE")
    with pytest.raises(ValueError, match=r"^ep_size=3 does not divide the world size 4"):
        HierMoEPlugin(ep_size=3).resolve_topology(4)


def test_patch_before_the_process_group_exists_says_how_to_start_it(clean_env):
    for cfg, ranks in ((hiermoe_hf.HierMoEConfig(topology="2x2"), 4), (hiermoe_hf.HierMoEConfig(ep_size=2), 2)):
        with pytest.raises(ValueError) as err:
            hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), cfg)
        msg = str(err.value)
        for needle in ("process group is not initialised", f"torchrun --nproc-per-node {ranks}", "accelerate launch",
                       "init_process_group", "'1x1'"):
            assert needle in msg, msg
