#!/usr/bin/env bash
# The test command (README.md): install the package with its test extra, pinned to the
# releases in tests/constraints.txt (torch 2.13.0 as on the CPU machines: setup.py itself only
# gives ranges), then run the whole suite with Triton's CPU interpreter. pytest's exit code 5 ("no tests
# collected") is a failure here like any other non-zero code. pytest-xdist runs the suite on two
# workers (MAGE_TEST_WORKERS to change it); the modules that start processes share one of them
# (tests/conftest.py: MULTIPROCESS_MODULES).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c tests/constraints.txt -e ".[test]"
export TRITON_INTERPRET=1
python -m pytest -q -n "${MAGE_TEST_WORKERS:-2}" --dist loadgroup tests "$@"
