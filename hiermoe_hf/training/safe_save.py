"""Crash-safe ``accelerator.save_state`` for ``HierMoEPlugin``: a save either completes or leaves the
previous checkpoint in that folder loadable.

Accelerate writes the model, the optimizer, the schedulers and the RNG states into the folder one
after another, and the plugin's hook adds each rank's file: a rank killed half way would leave new
files beside old ones, which resumed silently wrong. So a save into a named folder is written into a
hidden sibling (``atomic_folder.partial_folder``), sealed with its manifest (``checkpoint/manifest.py``,
written last) and then swapped in for the old folder in one step (``atomic_folder.swap_in``). With
Accelerate's automatic checkpoint naming every save goes to a new folder anyway: it is sealed in
place, and one cut short has no manifest and is refused at load with that reason.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from hiermoe_hf.checkpoint.atomic_folder import partial_folder, swap_in


def crash_safe_save_state(accelerator, begin: Callable[[], None], seal: Callable[[str], None]):
    """``accelerator.save_state`` that writes aside, seals and swaps in. ``begin()``: the save's first
    collective (every rank), after rank 0 cleared any partial folder a crashed save left; ``seal(folder)``:
    writes the manifest once every file is written (collective)."""
    original = accelerator.save_state

    def save_state(output_dir: str | None = None, safe_serialization: bool = True, **kwargs):
        if output_dir is None or accelerator.project_configuration.automatic_checkpoint_naming:
            begin()
            location = original(output_dir, safe_serialization, **kwargs)
            seal(location)
            return location
        target = os.path.realpath(os.fspath(output_dir))
        partial = partial_folder(target)
        # One writer per file system: the main process, or each node's with save_on_each_node.
        writer = accelerator.is_local_main_process if accelerator.project_configuration.save_on_each_node \
            else accelerator.is_main_process
        if writer and os.path.lexists(partial):  # left by a save that crashed
            shutil.rmtree(partial)
        begin()  # a collective: no rank writes into the partial folder before rank 0 cleared it
        original(partial, safe_serialization, **kwargs)
        seal(partial)
        if writer:
            swap_in(partial, target)
        accelerator.wait_for_everyone()
        return target

    return save_state
