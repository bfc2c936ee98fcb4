#!/usr/bin/env bash
# The main job on the embedded default: fit + fine-tune affine lenses for SmolLM2-135M on SOTU, then decode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/attention-lens train --model smollm2-135m --data sotu --kind affine --layers 26-29 \
    --tokens 4096 --dtype bfloat16 --out lenses/smollm2 --overwrite
.venv/bin/attention-lens decode --lens lenses/smollm2 "The capital of France is"
