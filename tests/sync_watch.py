"""What a CUDA stream would synchronise on, caught while the code runs on CPU tensors (issue 18 item 2).

On CPU a host<->device copy is a no-op and a boolean mask's ``nonzero`` happens inside ATen, so the
CPU tests see none of the syncs a GPU pays. ``SyncWatch`` runs the code as if every tensor were on
the device except those it can prove are host tensors, and counts:

* ``read.*``: Python-level reads of a device tensor (``tolist/item/cpu/numpy``, ``int()/float()/
  bool()/index``): a device-to-host copy each. Reads of host tensors cost nothing and are not counted.
* ``sync.h2d``: a host tensor copied to the device (``.to(device)``, ``.cuda()``, ``copy_`` into a
  device tensor) or ``torch.tensor/as_tensor(host data, device=...)``: a pageable H2D copy is
  ``cudaMemcpyAsync`` + a stream sync in PyTorch's copy kernel.
* ``sync.mixed``: an op taking a device tensor and a host tensor of more than one element: on a GPU
  an implicit H2D copy (advanced indexing) or a device-mismatch error.
* ``sync.<aten op>``: data-dependent ATen ops that read their result size on the host (``nonzero``,
  ``masked_select``, indexing or ``index_put`` with a boolean mask, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, ``equal``/``is_nonzero``) and any
  ``_local_scalar_dense`` not under a counted Python read (an ``.item()`` hidden in C++). Seen at the
  dispatcher, so also inside autograd's built-in backward formulas.
* ``sync.event``: CUDA event / stream / device synchronisation calls.

Apart from ``calls``, ``launches`` counts torch functions that would run on the device (a factory
with ``device=``, any op with a device tensor among its inputs): kernel launches, roughly (one
function may launch several), for comparing two paths' launch counts.

Host tensors: the results of factory functions called without ``device=`` (``torch.arange(W)``)
or with a host tensor's own ``.device`` (code that builds where its host data is), of
``torch.tensor`` on host data without ``device=``, and of ops whose tensor inputs are all host
tensors. Everything else (parameters, inputs, anything built with ``device=`` or ``*_like``) is a
device tensor. Counting happens only while ``active`` (the caller opens windows); host marks are set
whenever the watch is installed, so tensors cached on the host in a warm-up are still recognised.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_HOST = "_sync_watch_host"
FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
    torch.linspace, torch.eye, torch.randn, torch.rand, torch.randint, torch.randperm, torch.scalar_tensor,
}
FROM_HOST_DATA = {torch.tensor, torch.as_tensor}
READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__,
}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
DEVICE_OF = torch.Tensor.device.__get__
# Ops that legitimately take host tensors next to device ones (CPU-side index lists).
HOST_ARGS_OK = {torch.tensor_split, torch.Tensor.tensor_split}
aten = torch.ops.aten
SYNC_ATEN = {
    aten.nonzero.default, aten.nonzero.out, aten.masked_select.default, aten.bincount.default,
    aten.unique_dim.default, aten._unique2.default, aten._unique.default, aten.unique_consecutive.default,
    aten.equal.default, aten.is_nonzero.default, aten.argwhere.default, aten.nonzero_numpy.default,
}
ASYNC_ASSERTS = {aten._assert_async.default, aten._assert_async.msg}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
EVENT_WAITS = (
    (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda, "synchronize"),
    (torch.cuda.Event, "elapsed_time"),
)


def _caller() -> str:
    """The innermost package (or test) frames of the current stack, for the failure message."""
    frames = [f for f in traceback.extract_stack() if "hiermoe_hf" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _mark(out) -> None:
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            setattr(t, _HOST, True)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = []

    def walk(a):
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                walk(b)

    walk(list(args) + list(kwargs.values()))
    return flat


def _move_target(watch: "SyncWatch", args, kwargs) -> bool | None:
    """For ``Tensor.to``: True if it names a device (a device, a string device or a device tensor),
    False for a host tensor or a host tensor's ``.device``, None for a dtype-only cast."""
    if "device" in kwargs and kwargs["device"] is not None:
        return not watch.is_host_device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return not is_host(a)
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return not watch.is_host_device(a)
    return None


class _Functions(TorchFunctionMode):
    def __init__(self, watch: "SyncWatch"):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = self.watch
        if func == DEVICE_OF:
            out = func(*args, **kwargs)
            return w.host_device(out) if is_host(args[0]) else out
        if func in READS:
            if not is_host(args[0]):
                w.bump(f"read.{func.__name__}")
            with w.reading():
                return func(*args, **kwargs)
        if func in FACTORIES:
            out = func(*args, **kwargs)
            on_device = kwargs.get("device") is not None and not w.is_host_device(kwargs["device"])
            if on_device:
                w.launch()
            if on_device and func in FROM_HOST_DATA and (not args or not isinstance(args[0], torch.Tensor)
                                                        or is_host(args[0])):
                w.bump("sync.h2d")
            if not on_device and not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
                                      and not is_host(args[0])):
                _mark(out)
            return out
        tensors = _tensors(args, kwargs)
        out = func(*args, **kwargs)
        if func in MOVES:
            target = True if func is torch.Tensor.cuda else _move_target(w, args, kwargs)
            if is_host(args[0]) and target:
                w.bump("sync.h2d")
                if out is args[0]:  # on CPU ``.to(cpu)`` is the tensor itself; on a GPU a new device tensor
                    out = out.view_as(out)
            elif is_host(args[0]) and target is None or target is False:
                _mark(out)
            return out
        if func is torch.Tensor.copy_:
            if is_host(args[1]) and not is_host(args[0]):
                w.bump("sync.h2d")
            return out
        if tensors:
            host = [is_host(t) for t in tensors]
            if all(host):
                _mark(out)
            else:
                w.launch()
                if any(h and t.numel() > 1 for h, t in zip(host, tensors)) and func not in HOST_ARGS_OK:
                    w.bump(f"sync.mixed.{getattr(func, '__name__', func)}")
        return out


class _Aten(TorchDispatchMode):
    def __init__(self, watch: "SyncWatch"):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = self.watch
        if func in ASYNC_ASSERTS:  # a device assert on a GPU; on CPU it reads the flag at once
            with w.reading():
                return func(*args, **kwargs)
        if func in SYNC_ATEN:
            w.bump(f"sync.{func.__name__}")
        elif func is aten._local_scalar_dense.default and not w.in_read:
            w.bump("sync.hidden_item")
        elif func in BOOL_INDEXED:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx or ()):
                w.bump(f"sync.bool_mask.{func.__name__}")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            w.bump("sync.repeat_interleave")
        return func(*args, **kwargs)


class SyncWatch:
    """Counts what a CUDA stream would sync on (module docstring) while ``active``."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.where: dict[str, str] = {}  # first place each kind of sync was seen (package frames)
        self.launches = 0
        self._host_devices: list[torch.device] = []  # kept alive: recognised by identity
        self.active = False
        self.in_read = False

    def bump(self, key: str) -> None:
        if self.active:
            self.calls[key] = self.calls.get(key, 0) + 1
            if key.startswith("sync.") and key not in self.where:
                self.where[key] = _caller()

    def host_device(self, device: torch.device) -> torch.device:
        """A fresh ``torch.device`` equal to ``device``, remembered as a host tensor's ``.device``."""
        mine = torch.device(str(device))
        self._host_devices.append(mine)
        return mine

    def is_host_device(self, device) -> bool:
        return any(device is d for d in self._host_devices)

    def launch(self) -> None:
        if self.active:
            self.launches += 1

    @contextlib.contextmanager
    def reading(self):
        saved, self.in_read = self.in_read, True
        try:
            yield
        finally:
            self.in_read = saved

    @contextlib.contextmanager
    def counting(self):
        saved, self.active = self.active, True
        try:
            yield self
        finally:
            self.active = saved

    @contextlib.contextmanager
    def installed(self):
        saved = []
        for owner, name in EVENT_WAITS:
            orig = getattr(owner, name)

            def waited(*a, _orig=orig, _name=name, **k):
                self.bump(f"sync.event.{_name}")
                return _orig(*a, **k)

            saved.append((owner, name, orig))
            setattr(owner, name, waited)
        try:
            with _Functions(self), _Aten(self):
                yield self
        finally:
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)

    def total(self, prefix: str) -> int:
        return sum(v for k, v in self.calls.items() if k.startswith(prefix))
