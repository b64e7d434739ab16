#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q tests "$@"
