#!/usr/bin/env bash
# One short, prepared GPU session: the native Pallas kernel tests, then the attention benchmark.
#
#   bash launch/gpu_check.sh OUT_DIR [PHASE_SECONDS]
#
# Runs on a CUDA machine whose Python already has jax[cuda] (the package versions are printed
# first, to be recorded with the numbers). Each phase has its own time limit so that one slow
# phase cannot take the others' time; the logs and tables land in OUT_DIR.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [PHASE_SECONDS]}
limit=${2:-150}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' \
  | tee -a "$out/device.txt"

# 1. The kernel against the XLA walk, natively (the interpret class is the CPU copy of the same cases).
timeout "$limit" $py -m pytest -q -p no:cacheprovider tests/kernels/pallas_test.py \
  -k 'not Interpret' 2>&1 | tail -25 | tee "$out/pallas_test.txt"

# 2. The kernel per storage format vs cuDNN BF16 attention and the XLA walk (Self-Forcing shapes).
timeout "$limit" $py launch/bench_attention.py --methods=none --xla_walk --repeats=3 \
  --out "$out/kernels.md" --json "$out/kernels.json" 2>&1 | tail -30
