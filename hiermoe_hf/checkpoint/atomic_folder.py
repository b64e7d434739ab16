"""Replace a checkpoint folder in one step: a crash leaves either the old folder or the new one.

The new checkpoint is written into a hidden sibling folder (``partial_folder``); ``publish`` then
swaps it in with Linux's atomic ``renameat2(RENAME_EXCHANGE)`` (or, where that is missing, two
renames with the old folder kept aside until the new one is in place). Files of the old folder that
are not weights (tokenizer, README, ...) are carried over, as plain ``save_pretrained`` keeps them.
"""

from __future__ import annotations

import ctypes
import os
import shutil

_PARTIAL_SUFFIX = ".hiermoe-partial"
_OLD_SUFFIX = ".hiermoe-old"


def partial_folder(target: str) -> str:
    """Where the checkpoint for ``target`` is written before ``publish`` (same file system)."""
    return os.path.join(os.path.dirname(target), "." + os.path.basename(target) + _PARTIAL_SUFFIX)


def _is_weights_file(name: str) -> bool:
    """Weights and index files of any earlier save in this folder (replaced, never carried over)."""
    return name.startswith(("model.", "model-", "pytorch_model")) and (".safetensors" in name or ".bin" in name)


def publish(partial: str, target: str) -> None:
    """Make the finished folder ``partial`` appear at ``target`` in one step (the old one stays until then),
    with the old folder's files that are not weights carried over."""
    if os.path.lexists(target):
        _carry_over(target, partial)
    swap_in(partial, target)


def _carry_over(target: str, partial: str) -> None:
    for name in os.listdir(target):  # keep what a plain save would keep (tokenizer files, README, ...)
        src, dst = os.path.join(target, name), os.path.join(partial, name)
        if os.path.lexists(dst) or _is_weights_file(name):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def swap_in(partial: str, target: str) -> None:
    """Replace ``target`` by the finished folder ``partial`` in one step, carrying nothing over (a resume
    folder holds one save: files of an older one must not survive beside it)."""
    if not os.path.lexists(target):
        os.rename(partial, target)
        return
    if _exchange(partial, target):
        shutil.rmtree(partial)  # now holds the old checkpoint
        return
    old = target + _OLD_SUFFIX  # no atomic exchange here: the old folder is renamed aside first
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(target, old)
    os.rename(partial, target)
    shutil.rmtree(old)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
