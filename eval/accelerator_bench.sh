#!/usr/bin/env bash
# The train-step and decode benchmarks on one accelerator (a GPU or a TPU chip), their JSON
# written to OUT_DIR (default eval/results/accelerator/) as bench_{train,decode}_<platform>.json
# (the decode one with its plot).
#
#     bash eval/accelerator_bench.sh [OUT_DIR]
#
# Needs JAX with its accelerator plugin (pip install -e ".[dev]" "jax[cuda12]", or "jax[tpu]").
# One device: CUDA_VISIBLE_DEVICES (GPU) or TPU_VISIBLE_CHIPS (TPU) default to the first one.
# What runs there: gpt2jax's train step (float32 and bfloat16; bfloat16 attention takes
# cuDNN's fused kernel on a GPU, attention_impl 'auto') and its generate. The PyTorch
# reference side of both benchmarks stays on the CPU, so their ratio columns compare an
# accelerator with the host, not two frameworks; read the gpt2jax_* figures.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-eval/results/accelerator}"

export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export TPU_VISIBLE_CHIPS="${TPU_VISIBLE_CHIPS:-0}"
export TPU_CHIPS_PER_PROCESS_BOUNDS="${TPU_CHIPS_PER_PROCESS_BOUNDS:-1,1,1}"
export TPU_PROCESS_BOUNDS="${TPU_PROCESS_BOUNDS:-1,1,1}"

platform="$(python -c 'import jax; print(jax.default_backend())')"
if [ "$platform" = cpu ]; then
    echo "error: JAX sees no GPU or TPU here (its default backend is cpu): install jax[cuda12]" \
         "or jax[tpu]; the CPU figures come from python -m eval.bench_train / bench_decode" >&2
    exit 2
fi
mkdir -p "$out"
python -c 'import jax; print("benchmarking on", jax.devices()[0].device_kind)'
python -m eval.bench_train --json "$out/bench_train_$platform.json"
python -m eval.bench_decode --json "$out/bench_decode_$platform.json"  # and its .png
echo "wrote $out/bench_train_$platform.json and $out/bench_decode_$platform.json"
