#!/usr/bin/env bash
# Stop exactly what scripts/cluster-up.sh started. Usage: scripts/cluster-down.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/shardmq cluster down --dir "${1:-.shardmq}"
