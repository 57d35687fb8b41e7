#!/usr/bin/env bash
# catdog GPU check: one command, about 8 minutes on one GPU, nothing downloaded.
#
#   .gpu-kit/run.sh OUTDIR          on the GPU machine: python3 with its own torch; the kit's wheels
#                                   installed with `pip install --no-index --target` and on PYTHONPATH
#                                   (README.md, "GPU check" gives the whole command line)
#   .gpu-kit/run.sh --cpu OUTDIR    here, with .venv: the same steps on fewer, smaller images
#   ... OUTDIR --steps pytest_gpu,train_timing      only these steps (a rerun of the ones that failed)
#
# Writes OUTDIR/gpu-check.json (GPU, versions, each step's pass/fail, img/s and ratios to plain
# PyTorch loops) and OUTDIR/gpu-check.log.  Exit 0 only when every step passed.
# The code is the checkout this kit sits in (CATDOG_REPO overrides), run from source via PYTHONPATH.
set -euo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${CATDOG_REPO:-$KIT/..}" && pwd)"
MODE=()
if [[ "${1:-}" == "--cpu" ]]; then
  MODE=(--cpu)
  shift
fi
OUT="${1:?usage: run.sh [--cpu] OUTDIR [--steps a,b]}"
shift
if ((${#MODE[@]})); then
  PY="${PYTHON:-$REPO/.venv/bin/python}"
else
  PY="${PYTHON:-python3}"
fi
[[ -f "$REPO/catdog/training.py" ]] || { echo "run.sh: no catdog checkout at $REPO (set CATDOG_REPO)" >&2; exit 2; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO"
exec "$PY" -m gpu_kit.check "$OUT" --kit "$KIT" "${MODE[@]}" "$@"
