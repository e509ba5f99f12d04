#!/usr/bin/env bash
# One short, prepared GPU session: the native Pallas kernel tests, the attention benchmark per
# storage format (with QVG's span encode), and a tile-size sweep of the kernel.
#
#   bash launch/gpu_check.sh OUT_DIR [PHASE_SECONDS] [TUNE_FORMATS]
#
# Runs on a CUDA machine whose Python already has jax[cuda] (the package versions are printed
# first, to be recorded with the numbers). Each phase has its own time limit so that one slow
# phase cannot take the others' time; the logs and tables land in OUT_DIR.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [PHASE_SECONDS] [TUNE_FORMATS]}
limit=${2:-150}
tune=${3:-int4,qvg_int2_prerope}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' \
  | tee -a "$out/device.txt"

# 1. The kernel against the XLA walk, natively (the interpret class is the CPU copy of the same cases).
timeout "$limit" $py -m pytest -q -p no:cacheprovider -rf tests/kernels/pallas_test.py \
  -k 'not Interpret' 2>&1 | tail -40 > "$out/pallas_test.txt"
tail -5 "$out/pallas_test.txt"

# 2. The kernel per storage format vs cuDNN BF16 attention and the XLA walk (Self-Forcing shapes).
timeout "$limit" $py launch/bench_attention.py --methods=none --xla_walk --repeats=3 \
  --out "$out/kernels.md" --json "$out/kernels.json" > "$out/kernels.log" 2>&1
tail -32 "$out/kernels.log"

# 3. Tile sizes, warps and pipeline stages of the kernel on a few formats.
if [ -n "$tune" ]; then
  timeout "$limit" $py launch/bench_attention.py --methods=none --formats=bf16 --tune="$tune" \
    --repeats=3 --out "$out/tune.md" --json "$out/tune.json" > "$out/tune.log" 2>&1
  grep '^| ' "$out/tune.md" | sort -t'|' -k3 -g | head -12
fi
