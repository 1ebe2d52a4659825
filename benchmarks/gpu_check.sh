#!/usr/bin/env bash
# The train step's GPU figures in one call on one H100 or H200, compiles included, each part
# under its own time limit (9.5 minutes in all):
#   1. every bucket's step (bf16, FFHQ-64, batch 128: 128/256/512 samples at 64/32/16 px): ms,
#      samples/s, TFLOP/s, MFU, memory, compile time, and the p = 0.5 mix against a full step;
#   2. sampling throughput (18 Heun steps, 35 network evaluations, batch 256);
#   3. where the 16 px step's device time goes (the largest XLA ops of a profiled step).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine; OUT=DIR keeps the logs
#   CONFIG=configs/demo.py BATCH=16 DTYPE=float32 SMALL=8 SAMPLES=64 SAMPLE_BATCH=32 \
#       bash benchmarks/gpu_check.sh             # the same, tiny, on a CPU
#
# Needs jax with its GPU plugin, flax, optax, orbax-checkpoint, absl-py, ml-collections and clu
# (install the last two from wheels where the machine has no index). TensorFlow is not needed:
# no part reads data. On a CPU the profile finds no device timeline and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/ffhq64.py}
BATCH=${BATCH:-128}
DTYPE=${DTYPE:-bfloat16}
SMALL=${SMALL:-16}
SAMPLES=${SAMPLES:-2048}
SAMPLE_BATCH=${SAMPLE_BATCH:-256}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
quiet() { grep -v -E '^[WI][0-9]{4} ' || true; }

python -c "import jax; print('JAX', jax.__version__, jax.devices())"
echo "== train step per bucket: $CONFIG, batch $BATCH, $DTYPE"
timeout 330 python benchmarks/train_step.py --config="$CONFIG" --config.train.batch_size="$BATCH" \
    --config.model.dtype="$DTYPE" --steps=10 --json="$OUT/train_step.json" 2>&1 \
    | quiet | tee "$OUT/train_step.txt"
echo "== sampling: $SAMPLES images, batch $SAMPLE_BATCH"
timeout 120 python benchmarks/sample.py --config="$CONFIG" --config.model.dtype="$DTYPE" \
    --num="$SAMPLES" --batch="$SAMPLE_BATCH" 2>&1 | quiet | tee "$OUT/sample.txt"
echo "== profile of the ${SMALL}px step"
timeout 120 python benchmarks/profile_step.py --config="$CONFIG" \
    --config.train.batch_size="$BATCH" --config.model.dtype="$DTYPE" --size="$SMALL" 2>&1 \
    | quiet | tee "$OUT/profile.txt"
echo "logs in $OUT"
