"""A pool of forked gloo ranks that stays up for a whole test module.

``pool.run(fn, *args)`` runs ``fn(*args)`` on every rank (inside an initialised default process
group) and returns the per-rank results; a rank's exception is re-raised in the test with its
traceback. ``fn`` must be a module-level function (it is sent by reference).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback

import torch
import torch.distributed as dist


def _worker(rank: int, world: int, init_file: str, conn) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            fn, args, kwargs = job
            try:
                conn.send(("ok", fn(*args, **kwargs)))
            except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
                conn.send(("err", traceback.format_exc()))
    finally:
        dist.destroy_process_group()
        conn.close()


class RankPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("fork")
        fd, self._init_file = tempfile.mkstemp(prefix="hiermoe-pg-")
        os.close(fd)
        os.unlink(self._init_file)
        self._conns, self._procs = [], []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world_size, self._init_file, child), daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)

    def run(self, fn, *args, timeout: float = 300, **kwargs) -> list:
        if not self._conns:  # closed after an earlier timeout: never hand back an empty result list
            raise RuntimeError(f"the rank pool was closed after an earlier failure; {fn.__name__} did not run")
        for c in self._conns:
            c.send((fn, args, kwargs))
        results, errors = [], []
        for r, c in enumerate(self._conns):
            if not c.poll(timeout):
                self.close(force=True)
                raise TimeoutError(f"rank {r} did not answer within {timeout} s running {fn.__name__}")
            status, value = c.recv()
            if status == "err":
                errors.append(f"--- rank {r} ---\n{value}")
            results.append(value)
        if errors:
            raise AssertionError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return results

    def close(self, force: bool = False) -> None:
        for c in self._conns:
            try:
                if not force:
                    c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=0 if force else 20)
            if p.is_alive():
                p.kill()
        self._conns, self._procs = [], []
