# Sourced by bench/gpu.sh (bash): make the project's dependencies importable on a machine whose Python lacks them
# (the lent GPU machine: torch and transformers, no DeepSpeed/Ray/Zarr/sae-lens/datasets), from the kit that
# `make gpu-kit` builds here (bench/gpu_kit.py) and that a device run carries (`carry: [".gpu-kit"]`).
# In: PY (the Python to use), FPO_KIT (the kit's folder, default .gpu-kit), FPO_KIT_DIR (where to unpack it,
# default /tmp/fpo-kit). Out: PYTHONPATH (the kit's site tree and the repository) and PATH, or exit 2 naming
# what is missing. Where everything already imports (a cluster with `pip install -e .`), it changes nothing.
FPO_KIT="${FPO_KIT:-.gpu-kit}"
if "$PY" -c "import deepspeed, ray, zarr, sae_lens, datasets" >/dev/null 2>&1; then
  return 0 2>/dev/null || exit 0
fi
if [[ ! -f "$FPO_KIT/site.tar.xz" ]]; then
  echo "bench/kit_env.sh: $PY lacks the project's dependencies and there is no kit at $FPO_KIT/site.tar.xz:" \
       "build it on a machine with the project installed (make gpu-kit) and carry .gpu-kit with the run" >&2
  exit 2
fi
FPO_KIT_DIR="${FPO_KIT_DIR:-/tmp/fpo-kit}"
if [[ ! -f "$FPO_KIT_DIR/.unpacked" || "$FPO_KIT/site.tar.xz" -nt "$FPO_KIT_DIR/.unpacked" ]]; then
  rm -rf "$FPO_KIT_DIR" && mkdir -p "$FPO_KIT_DIR"
  t0=$SECONDS
  tar -xJf "$FPO_KIT/site.tar.xz" -C "$FPO_KIT_DIR"
  touch "$FPO_KIT_DIR/.unpacked"
  echo "bench/kit_env.sh: unpacked $FPO_KIT/site.tar.xz into $FPO_KIT_DIR in $((SECONDS - t0)) s"
fi
export PYTHONPATH="$FPO_KIT_DIR/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the trainer and the cache job run their workers as `python -m ...` children: they inherit PYTHONPATH
"$PY" -m bench.gpu_kit check --manifest "$FPO_KIT/manifest.json" || {
  echo "bench/kit_env.sh: the kit does not make the project importable here (above); stopping" >&2; exit 2; }
