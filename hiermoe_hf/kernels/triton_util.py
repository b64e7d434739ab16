"""Shared helpers of the Triton kernel modules: can Triton run, block sizes, accumulation dtype.

Kept apart from the kernels so the three kernel families share one rule for "interpreter or GPU".
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    # Built alongside the kernels, so its type tells which mode the kernel modules were built in.
    pass


# Tests set these to force several programs per launch (cross-block offsets, edge masks, hidden
# split over programs as on a GPU) at interpreter-friendly sizes. Powers of two.
BLOCK_ROWS_OVERRIDE: int | None = None
BLOCK_W_OVERRIDE: int | None = None


def interpreting() -> bool:
    """True when ``@triton.jit`` builds interpreted kernels (``TRITON_INTERPRET=1`` at import time).

    The decorator reads the flag when a kernel module is imported, so the environment variable alone
    is not enough: a module imported before it was set holds compiled (GPU-only) kernels.
    """
    return type(_probe).__name__ == "InterpretedFunction"


def _fix_interpreter_index() -> bool:
    """Let the interpreter's ``range(K)`` over a kernel argument work with NumPy >= 2.4; True if patched.

    The interpreter holds a scalar argument as a 1-element array and Triton <= 3.6 turns it into a
    loop bound with ``int(array([v]))``, which NumPy 2.4 rejects ("only 0-dimensional arrays can be
    converted to Python scalars"; triton-lang/triton#9171, fixed upstream by squeezing first).
    Feature-detected: an interpreter that already accepts a 1-element tensor is left alone.
    """
    try:
        import warnings

        import numpy as np
        from triton.runtime import interpreter

        original = interpreter._patch_lang_tensor
        scope = interpreter._LangPatchScope()
        try:
            original(tl.core.tensor, scope)
            one = tl.core.tensor(interpreter.TensorHandle(np.array([1], dtype=np.int32), tl.int32), tl.int32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25-2.3 warn, then convert
                one.__index__()
            return False
        except TypeError:
            pass
        finally:
            scope.restore()
    except Exception:  # an interpreter whose internals differ: nothing known to fix
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if interpreting():
    _fix_interpreter_index()


def why_cannot_run() -> str | None:
    """None if the Triton kernels can launch here, else the reason (for a clear error)."""
    if interpreting():
        return None
    if torch.cuda.is_available():
        return None
    flag = os.environ.get("TRITON_INTERPRET")
    if flag == "1":
        return (
            "TRITON_INTERPRET=1 was set after hiermoe_hf.kernels.triton_* were imported; set it before "
            "the first import (e.g. at the top of conftest.py)"
        )
    return "no CUDA device and TRITON_INTERPRET is not '1' (Triton's interpreter runs on CPU tensors)"


def check_tensor(t: torch.Tensor) -> None:
    """Fail clearly instead of Triton's '0 active drivers' when a CPU tensor meets compiled kernels."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels got a {t.device.type} tensor but are compiled for CUDA; "
            "set TRITON_INTERPRET=1 before importing hiermoe_hf.kernels to run them on CPU"
        )


def device_guard(t: torch.Tensor):
    """Launch under ``t``'s device: Triton launches on the *current* device's stream, so a rank whose
    tensors are on ``cuda:k`` without ``torch.cuda.set_device(k)`` would hand device-k pointers to
    device 0 (GPU_REVIEW.md #4). No-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def acc_tl(dtype: torch.dtype):
    """Triton accumulation dtype for ``dtype`` rows: fp64 stays fp64, everything else sums in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (``tl.arange`` lengths must be powers of two)."""
    return triton.next_power_of_2(max(int(n), 1))


def row_blocks(rows: int, width: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_W) for row-gather style kernels over ``rows`` rows of ``width`` elements.

    On a GPU: 1024-wide chunks (16-byte vector loads, H=7168 splits evenly), about 4096 elements and
    at most 1024 rows per program (no register spill on sm_80/90/100: tests/test_triton_aot.py). In
    the interpreter each program and loop step costs Python time, so one block covers the whole width
    and many rows.
    """
    if device.type == "cuda" and not interpreting():
        block_w = BLOCK_W_OVERRIDE or min(pow2(width), 1024)
        # at most 1024 rows: [4096, 1] tiles (pack_route's backward with top-1) spill registers
        return BLOCK_ROWS_OVERRIDE or max(1, min(1024, 4096 // block_w)), block_w
    block_w = BLOCK_W_OVERRIDE or pow2(width)
    return BLOCK_ROWS_OVERRIDE or max(1, min(pow2(rows), max(1, 65536 // block_w))), block_w


# The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round by hand there so
# interpreter results match the reference as closely as GPU results do. Compiled away on a GPU.
_BF16_BY_HAND = tl.constexpr(interpreting())


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """Cast accumulated values to an output dtype, rounding to nearest even (also in the interpreter)."""
    if _BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
