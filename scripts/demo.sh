#!/usr/bin/env bash
# One command: set up .venv, start a local 3-node cluster with its own etcd, route real traffic, show what
# happened, and stop everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shardmq demo "$@"
