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


def _folder_imports(package: Path) -> dict[str, set[str]]:
    """Folder (or top-level module) of hiermoe_hf -> the folders it imports, lazy imports included."""
    import re

    out: dict[str, set[str]] = {}
    pattern = re.compile(r"^\s*(?:from|import)\s+hiermoe_hf\.(\w+)", re.M)
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] == "patches":
            continue  # the symlinked adapters folder
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for target in pattern.findall(path.read_text()):
            if target != me:
                out.setdefault(me, set()).add(target)
    return out


def test_no_two_folders_import_each_other():
    """docs/architecture.md "Layering": imports go one way between any two folders."""
    edges = _folder_imports(Path(hiermoe_hf.__file__).parent)
    both_ways = sorted({tuple(sorted((a, b))) for a, to in edges.items() for b in to if a in edges.get(b, ())})
    assert both_ways == [], both_ways


def test_ruff_is_clean():
    """The project's lint rules (pyproject.toml [tool.ruff]) hold over every Python file (ruff: dev extra)."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        import pytest

        pytest.skip("ruff is not installed beside this Python (pip install -e .[dev])")
    # the directories, and the Python scripts without a .py suffix (ruff skips those in a directory)
    paths = ["hiermoe_hf", "patches", "scripts", "examples", "tests", "scripts/gpu_check", "scripts/demo"]
    out = subprocess.run([str(ruff), "check", *[p for p in paths if (REPO / p).exists()]], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
