#!/usr/bin/env bash
# Set up and run the test suite: the default tests, then the slow ones (real Gemma-3-270M, ~2 minutes).
# pytest's exit code 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test.sh || exit 1
run() {
    .venv/bin/python -m pytest -q "$@"
    local status=$?
    if [ "$status" -eq 5 ]; then
        echo "error: pytest collected no tests ($*)" >&2
        return 1
    fi
    return "$status"
}
if [ "$#" -gt 0 ]; then
    run "$@"
    exit $?
fi
run || exit $?
run -m slow
