#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M, SOTU), all 270 heads, ~10 minutes on 2 cores:
# fit affine lenses in closed form, fine-tune them with the KL objective, then decode a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/attention-lens fit --model smollm2-135m --data sotu --tokens 16384 --eval-tokens 512 \
    --out lenses/smollm2-fit --overwrite
.venv/bin/attention-lens train --init lenses/smollm2-fit --data sotu --tokens 2048 --batch-size 8 \
    --dtype bfloat16 --eval-tokens 512 --out lenses/smollm2 --overwrite
.venv/bin/attention-lens decode --lens lenses/smollm2 "The capital of France is"
