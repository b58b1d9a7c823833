#!/usr/bin/env bash
# Rehearse the GPU kit here (make gpu-kit-rehearsal, ~8 min): a fresh venv holding only what the GPU machine's image
# holds of the project's dependency closure (bench/gpu_image.txt; transformers at the image's 5.17.0), the kit built
# for this Python (3.11 here; the real kit is cp312), then what a lent session runs there (bench/gpu_session.sh) on
# the CPU: bench/kit_env.sh unpacks the kit and checks every import, the quick benchmark end to end (the Ray cache
# job, ZeRO-3 training, the loader), bench.head_grad and bench.optimizer. A kit that misses a module fails here,
# not in the 15 minutes of a lent GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FPO_KIT_EMULATION:-${FPO_TEST_CACHE:-$HOME/.cache/fpo-dist-tests}/kit-emulation}"
PY=.venv/bin/python
python3.11 -m venv --clear "$VENV"
# the image's packages that the closure uses, and what fpo_dist and the bench import beside them
IMAGE_SIDE=$("$PY" - <<'EOF'
from bench.gpu_kit import closure, image_packages
image = image_packages()
print(" ".join(sorted(k for k in closure() if k in image and k not in ("torch", "transformers"))))
EOF
)
"$VENV/bin/python" -m pip install -q torch==2.13.0 transformers==5.17.0 $IMAGE_SIDE tensorboard pytest pytest-timeout
# whatever pip pulled in beyond the image's list goes again: the emulated machine has the image's packages only
EXTRA=$("$VENV/bin/python" - <<'EOF'
from importlib import metadata
from bench.gpu_kit import image_packages
from packaging.utils import canonicalize_name
image = image_packages() | {"pip", "fpo-dist"}  # fpo-dist: the repository itself (its egg-info in the cwd)
print(" ".join(sorted({canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()} - image)))
EOF
)
[[ -z "$EXTRA" ]] || "$VENV/bin/python" -m pip uninstall -q -y $EXTRA
echo "kit rehearsal: emulated image at $VENV (removed, not in the image: ${EXTRA:-none})"
"$PY" -m bench.gpu_kit build --python 3.11 --out .gpu-kit-rehearsal
# what a lent session runs (bench/gpu_session.sh), on the CPU: the kit, the quick bench, head_grad, the optimizer
rm -rf "$VENV.session"
PY="$VENV/bin/python" FPO_KIT=.gpu-kit-rehearsal FPO_KIT_DIR="$VENV.kit" FPO_SESSION_DEVICE=cpu OUT="$VENV.session" \
  bash bench/gpu_session.sh
if grep -E ": exit [1-9]|: skipped|FAILED" "$VENV.session/summary.md"; then
  echo "kit rehearsal: FAILED (above; logs in $VENV.session/session.tar.gz)" >&2; exit 1
fi
echo "kit rehearsal: passed ($VENV.session/summary.md)"
