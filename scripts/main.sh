#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M, SOTU), all 270 heads, ~5 minutes on 2 cores from a fresh
# clone, set-up included: fit affine lenses in closed form, score them on held-out SOTU against the logit lens,
# DLA and the best constant prediction, write report.html (heatmaps + a prompt's token grid), and decode a prompt.
# The long recipe (fit --tokens 204800, then train --init ... --tokens 8192 --dtype bfloat16; ~12 minutes) is in
# the README's "Recipes" section.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lens=lenses/smollm2
.venv/bin/attention-lens fit --model smollm2-135m --data sotu --tokens 49152 --eval-tokens 0 --out "$lens" --overwrite
.venv/bin/attention-lens eval --lens "$lens" --data sotu --tokens 512 --constant-tokens 4096 --out "$lens/eval-sotu.json" --overwrite
.venv/bin/attention-lens report --lens "$lens" --eval "$lens/eval-sotu.json" --out report.html --overwrite
.venv/bin/attention-lens decode --lens "$lens" "The capital of France is"
echo "Open $(pwd)/report.html for every head's scores and the token grid of a prompt."
