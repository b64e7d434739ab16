"""Both install modes ship the per-family modules of ``patches/`` as ``hiermoe_hf.patches`` (issue 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hiermoe_hf.patches

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_patches_folder():
    assert Path(hiermoe_hf.patches.__file__).resolve() == REPO / "patches" / "__init__.py"
    assert [h.__name__ for h in hiermoe_hf.patches.HOOKS] == ["hiermoe_hf.patches.deepseek_v3"]


def test_regular_install_ships_patches(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    # the target dir goes first on sys.path, ahead of the editable finder (which setuptools appends)
    code = f"import sys; sys.path.insert(0, {str(target)!r}); import hiermoe_hf.patches as p; "
    code += "print(p.__file__); print(sorted(h.__name__ for h in p.HOOKS))"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(str(target)), lines
    assert lines[1] == "['hiermoe_hf.patches.deepseek_v3']"
