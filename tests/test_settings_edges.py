"""Settings at the edges (issue 19, items 5 and 7): the collective timeout and integer variables.

``HierMoEConfig.collective_timeout_s`` / ``HIERMOE_COLLECTIVE_TIMEOUT`` take seconds > 0 (default 600);
``HIERMOE_*`` integer variables take ASCII digits only (``int()`` also takes other scripts' digits,
e.g. Arabic-Indic "١٢" = 12), and each error states the range that field really takes.
"""

from __future__ import annotations

import pytest

from hiermoe_hf import HierMoEConfig
from hiermoe_hf.accelerate import HierMoEPlugin
from hiermoe_hf.exchange.bounded import DEFAULT_TIMEOUT_S, resolve_timeout


@pytest.mark.parametrize("bad", [0, -1.5, float("nan"), float("inf"), "soon", True])
def test_collective_timeout_must_be_positive_seconds(bad):
    with pytest.raises(ValueError, match=r"collective_timeout_s=.* is not valid; give a number of seconds > 0"):
        HierMoEConfig(collective_timeout_s=bad)


def test_collective_timeout_setting_then_variable_then_default(monkeypatch):
    monkeypatch.delenv("HIERMOE_COLLECTIVE_TIMEOUT", raising=False)
    assert resolve_timeout(None) == DEFAULT_TIMEOUT_S == 600.0
    monkeypatch.setenv("HIERMOE_COLLECTIVE_TIMEOUT", "45")
    assert resolve_timeout(None) == 45.0 and resolve_timeout(7) == 7.0
    assert HierMoEPlugin().collective_timeout_s == 45.0
    assert HierMoEPlugin(collective_timeout_s=3).config().collective_timeout_s == 3
    monkeypatch.setenv("HIERMOE_COLLECTIVE_TIMEOUT", "later")
    with pytest.raises(ValueError, match="HIERMOE_COLLECTIVE_TIMEOUT='later' is not valid"):
        HierMoEPlugin()


@pytest.mark.parametrize("raw", ["\u0661\u0662", "\uff11\uff12", "1_2", "12.0", "0x10"])
def test_integer_variables_take_ascii_digits_only(monkeypatch, raw):
    monkeypatch.setenv("HIERMOE_SWAP_INTERVAL", raw)
    with pytest.raises(ValueError, match=r"HIERMOE_SWAP_INTERVAL=.* is not an integer \(ASCII digits 0-9\)"):
        HierMoEPlugin()


def test_ep_size_variable_error_states_its_real_range(monkeypatch):
    monkeypatch.setenv("HIERMOE_EP_SIZE", "two")
    with pytest.raises(ValueError) as err:
        HierMoEPlugin()
    assert ">= 1, or none" in str(err.value) and ">= 0" not in str(err.value)
    monkeypatch.setenv("HIERMOE_EP_SIZE", "0")
    with pytest.raises(ValueError, match=">= 1"):
        HierMoEPlugin()
