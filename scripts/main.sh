#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M, SOTU), all 270 heads, ~12 minutes on 2 cores:
# fit affine lenses in closed form, fine-tune them with the KL objective, then decode a prompt.
# This recipe's lens beats the best constant prediction on 90% of heads on held-out SOTU and 95% on
# Shakespeare (bench/results/eval-smollm2-*-fit205k-ft8k.json). A fit of --tokens 16384 and a fine-tune of
# --tokens 2048 give a lens in ~2 min: held-out KL 3.16 instead of 3.13, 86% of heads above the constant.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/attention-lens fit --model smollm2-135m --data sotu --tokens 204800 --eval-tokens 512 \
    --out lenses/smollm2-fit --overwrite
.venv/bin/attention-lens train --init lenses/smollm2-fit --data sotu --tokens 8192 --batch-size 8 \
    --dtype bfloat16 --eval-tokens 512 --out lenses/smollm2 --overwrite
.venv/bin/attention-lens decode --lens lenses/smollm2 "The capital of France is"
