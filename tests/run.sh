#!/usr/bin/env bash
# The test command (README.md): install the package with its test extra, then run
# the whole suite with Triton's CPU interpreter. pytest's exit code 5 ("no tests
# collected") is a failure here like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
