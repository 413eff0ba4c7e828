#!/usr/bin/env bash
# Start a local cluster in the background: a private etcd plus N nodes (default 3). Usage: scripts/cluster-up.sh [N] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/shardmq cluster up --nodes "${1:-3}" --dir "${2:-.shardmq}"
