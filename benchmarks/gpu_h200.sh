#!/usr/bin/env bash
# The GPU comparison on one H200, about 6 minutes, from the repository root:
#
#   bash benchmarks/gpu_h200.sh [WHEEL_DIR]
#
# 1. DPO full fine-tuning, bf16 autocast over float32 weights, on the Llama-3.2-1B shape (random weights built
#    from benchmarks/configs/llama-3.2-1b.json, no download): the engine against TRL's DPOTrainer on the same
#    tokenised pairs, batch, lengths and AdamW, alternating, medians of 3 (samples/s, GPU peak, MFU against a
#    bf16 matmul peak measured in each process).
# 2. Rollout decoding by backend (the loop, static cache, compiled static cache, continuous batching) on the
#    same model in bf16, 64 rows of up to 256 tokens, medians of 3, against a device-to-device copy.
#
# TRL and datasets come from the wheels shipped beside the script (WHEEL_DIR, default .whl: `make gpu-wheels`
# fetches them, as for benchmarks/gpu_check.py), installed with --no-index --no-deps into a private directory
# put first on PYTHONPATH, never over the environment's torch. Results: $OUT (default benchmarks/results).
set -euo pipefail
WHEELS=${1:-.whl}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ! $PY -c "import trl, datasets" 2>/dev/null; then
    SITE=${BENCH_SITE:-/tmp/bench-site}
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# the seeded 1.2B-parameter builds (causal, and the same weights for the reference), once, before any timing
$PY -c "from benchmarks.workloads import model_dir; print(model_dir('llama-1b', 'causal'))"
timeout 300 $PY -m benchmarks.run --device cuda --size llama-1b --peer trl --objectives dpo --repeats 3 \
    --threads 8 --json "$OUT/h200_llama1b_dpo.json"
timeout 240 $PY -m benchmarks.decoding --device cuda --size llama-1b --repeats 3 \
    --backends generate static compile continuous --json "$OUT/h200_llama1b_decoding.json"
