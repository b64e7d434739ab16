#!/usr/bin/env bash
# The main job: sets up .venv if needed, then fine-tunes the embedded default model (a Qwen3-30B-A3B-shaped
# mini Qwen3-MoE, byte tokenizer, Python-docstring corpus: all offline) as 4 CPU processes on gloo with
# the emulated topology 2 nodes x 2. Extra arguments go to examples/finetune.py (e.g. --max-steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${HIERMOE_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup_env.sh  # tests that already run inside .venv skip it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export HIERMOE_TOPOLOGY=${HIERMOE_TOPOLOGY:-2x2}
# A free rendezvous port unless MASTER_PORT is set: two runs on one machine must not collide on 29500.
PORT=${MASTER_PORT:-$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# An explicit config file, so a stray default accelerate config cannot change the launch.
exec .venv/bin/accelerate launch --config_file examples/accelerate_configs/cpu_4proc.yaml --main_process_port "$PORT" \
    examples/finetune.py "$@"
