#!/usr/bin/env bash
# Issue 17's GPU check in one command: versions, each fused attention path against the dense
# reference (benchmarks/attention_parity.py), a profile of base's bf16 step with cuDNN attention
# (profile_step.py, trace and HLO kept), then attention_sweep.py's table under a time budget.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu_check
#   SWEEP_BUDGET_S=600 PYTHON=.venv/bin/python benchmarks/gpu_check.sh runs/gpu_check
#
# PARITY, PROFILE and SWEEP replace each script's arguments (e.g. a small run on a CPU:
# PROFILE='--config tiny_classic --steps 2' SWEEP='--configs tiny --lengths 128 --dtype float32').
#
# Every part writes its file as it goes, so a run cut short still leaves what it measured.
set -uo pipefail
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  git rev-parse --short HEAD 2>/dev/null || echo 'commit: not a git checkout'
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
                                            "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/versions.txt"
# shellcheck disable=SC2086  # the argument strings are split on purpose
"$py" benchmarks/attention_parity.py ${PARITY:-} 2>&1 | tee "$out/parity.md"
"$py" benchmarks/profile_step.py \
    ${PROFILE:---config base --steps 5 --set model.dtype=bfloat16 --set model.attention_impl=cudnn} \
    --save "$out/profile" 2>&1 | tee "$out/profile.txt"
"$py" benchmarks/attention_sweep.py --budget_s "${SWEEP_BUDGET_S:-240}" ${SWEEP:-} 2>&1 \
    | tee "$out/sweep.md"
