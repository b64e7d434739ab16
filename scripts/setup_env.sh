#!/usr/bin/env bash
# Creates .venv (if missing) and installs hiermoe_hf with its dev extras into it.
# torch goes in first, pinned to the CPU build that these machines hold on local disk: a bare
# `torch` requirement on a machine without torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup_env: installing torch==2.13.0 (CPU wheel)" >&2
    .venv/bin/python -m pip install -q torch==2.13.0
fi
# The install is editable (code changes need none), so it is redone only when what it depends on
# changes: pyproject.toml, the Python, or the checkout the package points at (a fresh clone installs).
STAMP=.venv/.hiermoe_setup_stamp
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -V 2>&1) $(pwd)"
HAVE=$(cat "$STAMP" 2>/dev/null || true)
HERE=$(.venv/bin/python -c "import hiermoe_hf, os; print(os.path.dirname(os.path.dirname(hiermoe_hf.__file__)))" 2>/dev/null || true)
if [ "$WANT" != "$HAVE" ] || [ "$HERE" != "$(pwd)" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$WANT" > "$STAMP"
else
    echo "setup_env: .venv is up to date (pyproject.toml unchanged); skipping pip install" >&2
fi
.venv/bin/python -c "import hiermoe_hf, hiermoe_hf.patches, torch; print('setup_env: hiermoe_hf', hiermoe_hf.__version__, 'torch', torch.__version__)"
