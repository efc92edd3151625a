#!/usr/bin/env bash
# The GPU checks on one H200, from the repository root:
#
#   bash benchmarks/gpu_h200.sh [WHEEL_DIR] [STAGE ...]        # default stages: check grpo (about 7 minutes at most)
#
# check     benchmarks/gpu_check.py: every family in bf16, then in 4-bit QLoRA, on the Llama-3.2-1B shape (random
#           weights from config, no download), each a few steps in its own process: finite, moving the objective's
#           way, peak memory against the start-up estimate, tokens/s and MFU; under a 150 s budget.
# grpo      GRPO against TRL's GRPOTrainer (rloo: RLOO against its RLOOTrainer) on the same shape (`--size llama-1b-group`: 8 prompts x 4 responses of
#           128 new tokens per iteration), bf16 autocast over float32 weights, alternating, medians of 3.
# dpo       DPO against TRL's DPOTrainer on the same shape (8 pairs of ~435-token rows per step), medians of 3.
# decoding  rollout decoding by backend (the loop, static cache, compiled static cache, continuous batching),
#           64 rows of up to 256 tokens, medians of 3, against a device-to-device copy.
#
# TRL, datasets and bitsandbytes come from the wheels in WHEEL_DIR (default .whl: `make gpu-wheels`), installed
# with --no-index --no-deps into a private directory put first on PYTHONPATH, never over the image's torch.
# Results: $OUT (default benchmarks/results).
set -euo pipefail
WHEELS=${1:-.whl}
shift || true
STAGES=${*:-check grpo}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
if ! $PY -c "import trl, datasets, bitsandbytes" 2>/dev/null; then
    SITE=${BENCH_SITE:-/tmp/bench-site}
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, transformers, trl, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)"
for stage in $STAGES; do
    echo "== $stage $(date -u +%T)"
    case $stage in
        check) timeout 180 $PY -m benchmarks.gpu_check --budget 150 --out "$OUT" || echo "check: exit $?" ;;
        grpo|rloo) timeout 240 $PY -m benchmarks.run --device cuda --size llama-1b-group --peer trl --objectives $stage \
                       --repeats 3 --threads 8 --json "$OUT/h200_llama1b_$stage.json" || echo "$stage: exit $?" ;;
        dpo) timeout 300 $PY -m benchmarks.run --device cuda --size llama-1b --peer trl --objectives dpo --repeats 3 \
                 --threads 8 --json "$OUT/h200_llama1b_dpo.json" || echo "dpo: exit $?" ;;
        decoding) timeout 240 $PY -m benchmarks.decoding --device cuda --size llama-1b --repeats 3 \
                      --backends generate static compile continuous --json "$OUT/h200_llama1b_decoding.json" \
                      || echo "decoding: exit $?" ;;
        *) echo "unknown stage $stage (check, grpo, rloo, dpo, decoding)"; exit 2 ;;
    esac
done
echo "== done $(date -u +%T)"
