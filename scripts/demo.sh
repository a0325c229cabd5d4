#!/usr/bin/env bash
# Set up the machine, then run ferry's demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ferry demo "$@"
