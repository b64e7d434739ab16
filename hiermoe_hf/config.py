"""User-facing configuration: `HierMoEConfig` (DESIGN.md section 2) and the ``HIERMOE_*`` rule.

Every setting has one environment variable (``ENV_VARS``), and every entry point (``HierMoEConfig()``,
so ``patch(model)`` and ``from_pretrained`` without a config, ``HierMoEPlugin``, ``HierMoECallback``)
resolves it the same way: an argument given > the environment variable > the default. Accelerate's
own settings behave so (``ACCELERATE_MIXED_PRECISION``, ``FSDP_*`` fill what the constructor was not
given), so a launch line such as ``HIERMOE_DISPATCH=hd2 torchrun train.py`` means the same whichever
entry point ``train.py`` uses.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Sequence

KERNELS = ("auto", "triton", "torch")
SWAP_POLICIES = ("hierd", "load")
_DISPATCH_RE = re.compile(r"^(auto|a2a|2dh|hd[1-9][0-9]*)$")

# One line per setting: field -> environment variable. A field added without a line here has no variable.
ENV_VARS = {
    "topology": "HIERMOE_TOPOLOGY",
    "dispatch": "HIERMOE_DISPATCH",
    "kernels": "HIERMOE_KERNELS",
    "swap_interval": "HIERMOE_SWAP_INTERVAL",
    "swap_policy": "HIERMOE_SWAP_POLICY",
    "cost_model": "HIERMOE_COST_MODEL",
    "swap_pairs": "HIERMOE_SWAP_PAIRS",
    "overlap_chunks": "HIERMOE_OVERLAP_CHUNKS",
    "ep_size": "HIERMOE_EP_SIZE",
    "collective_timeout_s": "HIERMOE_COLLECTIVE_TIMEOUT",
}
# What an integer variable takes, for its error message.
_INT_RANGES = {
    "swap_interval": "a whole number >= 0 (0 = never)",
    "swap_pairs": "a whole number >= 1",
    "overlap_chunks": "'auto' (timed, the default) or a whole number from 1 (no overlap) to 64",
    "ep_size": "a whole number >= 1, or none (= the world size)",
}
_NONE_WORDS = ("none",)  # HIERMOE_EP_SIZE=none, HIERMOE_COST_MODEL=none: the None default, explicitly


class _Unset:
    """The default of every ``HierMoEConfig`` field: "not given", so the environment may fill it."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def _setting(default: Any) -> Any:
    return field(default=UNSET, metadata={"default": default})


def parse_env(name: str, raw: str, default: Any) -> Any:
    """The value of environment variable ``ENV_VARS[name]`` = ``raw`` (stripped, non-empty) for a field
    whose default is ``default``: an integer for integer fields, None for "none" where None is valid."""
    env = ENV_VARS[name]
    if name == "collective_timeout_s":
        from hiermoe_hf.exchange.bounded import parse_timeout

        return parse_timeout(env, raw)
    if name == "overlap_chunks" and raw.lower() == "auto":
        return "auto"
    if raw.lower() in _NONE_WORDS and (default is None or name == "ep_size"):
        return None
    if name in _INT_RANGES:
        # ASCII digits only: int() would also take "１２" or "٣" (other scripts' digits) and "1_0".
        if not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise ValueError(f"{env}={raw!r} is not an integer (ASCII digits 0-9); {name} takes {_INT_RANGES[name]}")
        return int(raw)
    return raw


def from_env(name: str, default: Any) -> Any:
    """``ENV_VARS[name]`` parsed, or ``default`` when the variable is unset or empty (or has no variable)."""
    env = ENV_VARS.get(name)
    raw = os.environ.get(env, "").strip() if env else ""
    return parse_env(name, raw, default) if raw else default


def env_source(name: str, value: Any) -> str | None:
    """``"HIERMOE_X='raw'"`` when ``value`` of setting ``name`` is what its environment variable says."""
    env = ENV_VARS.get(name)
    raw = os.environ.get(env, "").strip() if env else ""
    if not raw:
        return None
    try:
        same = parse_env(name, raw, value) == value
    except ValueError:
        return None
    return f"{env}={raw!r}" if same else None


@contextlib.contextmanager
def naming_env(config: Any, *names: str) -> Iterator[None]:
    """Re-raise a ValueError about settings ``names`` of ``config`` (a HierMoEConfig or HierMoEPlugin)
    prefixed with the environment variables they came from, for checks that need the launch (world
    size, topology levels) and so run after the configuration was built."""
    try:
        yield
    except ValueError as err:
        sources = [s for s in (env_source(n, getattr(config, n, None)) for n in names) if s]
        if not sources:
            raise
        raise ValueError(f"{', '.join(sources)}: {err}") from None


@dataclass
class HierMoEConfig:
    """How `hiermoe_hf.patch` shards experts and exchanges tokens.

    Args:
        topology: level sizes outermost first (``[2, 4]``), a string ``"2x4"``, or None for
            nodes x LOCAL_WORLD_SIZE from the launcher.
        dispatch: "auto", "a2a", "2dh" or "hdD" (D = 1 .. number of levels).
        kernels: "auto" (Triton on CUDA tensors when it imports), "triton" or "torch".
        swap_interval: optimizer steps between expert swaps; 0 = never.
        swap_policy: "hierd" (dedup-aware) or "load" (balance raw token counts).
        cost_model: path of a calibration JSON, a preset ("default", "hiermoe-paper"), "calibrate"
            (a short calibration of the links when the model is patched), or None: ``auto`` then
            times its candidates on each layer's first forwards and keeps the fastest
            (``cost/trials.py``); the planner and the swap objective use the default constants.
        swap_pairs: expert pairs exchanged per planning round.
        ep_size: ranks per expert-parallel group; None = the world. The world splits into
            W / ep_size replicas of the group (expert data parallelism); the topology then describes
            one group, and groups are blocks of consecutive ranks (inside a node when they fit).
        overlap_chunks: split each MoE layer's tokens into this many chunks and pipeline them, so
            one chunk's exchange is in flight while another's experts run (and DeepSeek-V3's shared
            experts run while the routed tokens travel); 1 = no overlap; "auto" (the default): time
            1 and 4 chunks on the first forwards (after ``auto``'s strategy trials) and keep the
            faster (``cost/trials.py``).
        collective_timeout_s: seconds a rank waits in the package's own collectives (the layer's
            count exchange, the collective save, the resume checks) for the other ranks before it
            raises an error naming the likely cause (a forward or save called on some ranks only);
            None = ``HIERMOE_COLLECTIVE_TIMEOUT`` at use, else 600 (``exchange/bounded.py``).
    """

    topology: str | Sequence[int] | None = _setting(None)
    dispatch: str = _setting("auto")
    kernels: str = _setting("auto")
    swap_interval: int = _setting(0)
    swap_policy: str = _setting("hierd")
    cost_model: str | None = _setting(None)
    swap_pairs: int = _setting(1)
    overlap_chunks: int | str = _setting("auto")
    ep_size: int | None = _setting(None)
    collective_timeout_s: float | None = _setting(None)

    def __post_init__(self) -> None:
        for f in fields(self):  # precedence: the argument > HIERMOE_<FIELD> > the default
            source = None
            if getattr(self, f.name) is UNSET:
                setattr(self, f.name, from_env(f.name, f.metadata.get("default")))
                source = env_source(f.name, getattr(self, f.name))
            check = _CHECKS.get(f.name)
            try:
                if check is not None:
                    check(getattr(self, f.name))
            except ValueError as err:
                raise (ValueError(f"{source}: {err}") if source else err) from None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dispatch(value: Any) -> None:
    if not isinstance(value, str) or not _DISPATCH_RE.match(value):
        raise ValueError(
            f"unknown dispatch strategy {value!r}; valid: 'auto', 'a2a', '2dh', 'hd1' .. 'hdD' "
            "(D up to the number of topology levels)"
        )


def _check_choice(name: str, valid: tuple[str, ...]):
    def check(value: Any) -> None:
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

    return check


def _check_swap_interval(value: Any) -> None:
    if not _integer(value) or value < 0:
        raise ValueError(f"swap_interval must be an integer >= 0 (0 = never), got {value!r}")


def _check_swap_pairs(value: Any) -> None:
    if not _integer(value) or value < 1:
        raise ValueError(f"swap_pairs must be an integer >= 1, got {value!r}")


def _check_ep_size(value: Any) -> None:
    if value is not None and (not _integer(value) or value < 1):
        raise ValueError(f"ep_size must be an integer >= 1 or None (= the world size), got {value!r}")


def _check_overlap_chunks(value: Any) -> None:
    if value != "auto" and (not _integer(value) or not 1 <= value <= 64):
        raise ValueError(
            f"overlap_chunks must be 'auto' (timed) or an integer from 1 (no overlap) to 64, got {value!r}"
        )


def _check_collective_timeout(value: Any) -> None:
    if value is not None:
        from hiermoe_hf.exchange.bounded import parse_timeout

        parse_timeout("collective_timeout_s", value)


def _check_cost_model(value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"cost_model must be a path to a calibration JSON or None, got {value!r}")


def _check_topology(value: Any) -> None:
    if value is not None:
        from hiermoe_hf.topology import parse_levels

        parse_levels(value)  # raises on a malformed spec


# field -> its check (ValueError naming the bad value and the valid choices); a field without one is unchecked.
_CHECKS = {
    "topology": _check_topology,
    "dispatch": _check_dispatch,
    "kernels": _check_choice("kernels", KERNELS),
    "swap_interval": _check_swap_interval,
    "swap_policy": _check_choice("swap_policy", SWAP_POLICIES),
    "cost_model": _check_cost_model,
    "swap_pairs": _check_swap_pairs,
    "overlap_chunks": _check_overlap_chunks,
    "ep_size": _check_ep_size,
    "collective_timeout_s": _check_collective_timeout,
}
