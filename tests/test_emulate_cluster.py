"""scripts/emulate_cluster: a 2x2 all_to_all over namespaces, and nothing left behind afterwards."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "emulate_cluster"


def _can_make_namespaces() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "emulate_cluster needs root (network namespaces, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"hmoe-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "this container cannot create network namespaces (no CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


SKIP = _can_make_namespaces()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

A2A_CHECK = textwrap.dedent(
    """
    import os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    try:
        x = torch.arange(w, dtype=torch.float32) + 100 * r
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
        assert out.tolist() == [100 * s + r for s in range(w)], out
        if r == 0:
            print("a2a ok", w, os.environ["GLOO_SOCKET_IFNAME"], flush=True)
            if len(sys.argv) > 1:
                open(sys.argv[1], "w").close()
        if len(sys.argv) > 1:
            time.sleep(120)  # held so the test can interrupt the run
    finally:
        dist.destroy_process_group()
    """
)


def _ours(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"hmoe-{pid}-")]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _launch(tmp_path: Path, *extra: str) -> subprocess.Popen:
    script = tmp_path / "a2a_check.py"
    script.write_text(A2A_CHECK)
    cmd = [
        str(SCRIPT),
        "--nodes",
        "2",
        "--ranks-per-node",
        "2",
        "--rate",
        "1gbit",
        "--delay",
        "0.2ms",
        "--port",
        str(29400 + os.getpid() % 500),
        "--python",
        sys.executable,
        "--",
        str(script),
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@needs_netns
def test_2x2_all_to_all_and_nothing_left(tmp_path):
    before = _root_links()
    proc = _launch(tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "a2a ok 4 hm0" in out
    assert _ours(proc.pid) == []
    assert _root_links() == before


@needs_netns
def test_ctrl_c_cleans_up(tmp_path):
    marker = tmp_path / "started"
    proc = _launch(tmp_path, str(marker))
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() is not None else ""
        time.sleep(0.2)
    assert len(_ours(proc.pid)) == 3  # bridge + 2 nodes
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _ours(proc.pid) == [], out


def test_clear_errors(tmp_path):
    if os.geteuid() != 0:
        r = subprocess.run([str(SCRIPT), "--", "x.py"], capture_output=True, text=True)
        assert r.returncode == 2 and "needs root" in r.stderr
        return
    if not shutil.which("ip"):
        pytest.skip("iproute2 is not installed")
    # root, but tc missing from PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "id", "dirname", "ip", "env"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    r = subprocess.run(
        [str(bindir / "bash"), str(SCRIPT), "--", "x.py"], capture_output=True, text=True, env={"PATH": str(bindir)}
    )
    assert r.returncode == 2 and "'tc' not found: install iproute2" in r.stderr
    r = subprocess.run([str(SCRIPT), "--nodes", "zero", "--", "x.py"], capture_output=True, text=True)
    assert r.returncode == 2 and "--nodes must be an integer" in r.stderr
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 2 and "no command given" in r.stderr
