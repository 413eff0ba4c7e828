#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite (unit, property and integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
