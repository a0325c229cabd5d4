#!/usr/bin/env bash
# The dedicated fuzz run (relocation, control API, config parsers, media server):
# N generated inputs per fuzz test (default 100,000;
# the test suite runs a sample of 150). Expect hours at the default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FERRY_FUZZ_EXAMPLES="${1:-100000}" exec .venv/bin/pytest -q -p no:cacheprovider tests/unit/test_fuzz_relocation.py tests/unit/test_fuzz_inputs.py
