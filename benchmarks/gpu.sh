#!/usr/bin/env bash
# The GPU measurements in one go (docs/benchmarks.md), for a machine with a GPU
# whose python3 already has jax (with its CUDA plugin), flax, optax and torch,
# and nothing to install from (the data and TFDS packages are not needed here).
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # from the repository root
#
# Writes to OUT_DIR (default $OUT, else /tmp/faer_gpu): the chip and versions,
# the Flax model against the PyTorch reference in float32 on that chip, and
# the training-step benchmark of the base variant at batch 256 in bfloat16
# (images/s and MFU against the chip's bf16 peak) and in float32, each next to
# the PyTorch reference on the same GPU (--torch-device auto; should torch fail
# there, the JAX figure is taken alone). VARIANT,
# BATCH, IMAGE and STEPS override the benchmark's shapes (VARIANT=test
# BATCH=4 IMAGE=64 STEPS=1 runs it all on a CPU in a minute or two).
set -uo pipefail
out=${1:-${OUT:-/tmp/faer_gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
variant=${VARIANT:-base} batch=${BATCH:-256} image=${IMAGE:-224} steps=${STEPS:-10}
status=0

(nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  2>&1 | tee "$out/versions.txt" || status=1

# Parity on this chip: random weights far from initialisation, one batch; exits 1 above the tolerance.
"$py" -m faer_jax.interop check --variant "$variant" --num-classes 7 2>&1 | tee "$out/parity.txt" || status=1

bench() {  # dtype framework
  local name="$out/train_${variant}_b${batch}_$1_$2"
  "$py" -m faer_jax.benchmark train --variant "$variant" --batch-size "$batch" --image-size "$image" \
    --dtype "$1" --framework "$2" --steps "$steps" --json > "$name.json" 2> "$name.log"
  local rc=$?
  cat "$name.json"
  return $rc
}
for dtype in bfloat16 float32; do
  bench "$dtype" both || bench "$dtype" jax || status=1
done
exit $status
