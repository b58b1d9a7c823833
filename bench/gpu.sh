#!/usr/bin/env bash
# The whole benchmark on one GPU machine: parts 1-3 at the `gpu` sizes of bench/presets.py (~0.47B-parameter
# Llama built from config, bf16, JumpReLU SAE 1024x16384; nothing is downloaded). About 6-8 minutes on one H200.
# Writes bench/results/cuda.json and cuda.md (or under --out DIR); extra arguments go to `python -m bench.run`,
# e.g. `bench/gpu.sh --quick` for a one-minute check that everything runs on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
exec "$PY" -m bench.run --device cuda "$@"
