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
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import hiermoe_hf, hiermoe_hf.patches, torch; print('setup_env: hiermoe_hf', hiermoe_hf.__version__, 'torch', torch.__version__)"
