#!/usr/bin/env bash
# Run one node against an existing etcd (multi-machine deployments).
# Usage: scripts/node.sh ID CLIENT_ENDPOINT PEER_ENDPOINT ETCD_URL [extra shardmq node flags]
set -euo pipefail
cd "$(dirname "$0")/.."
id=$1 client=$2 peer=$3 etcd=$4; shift 4
exec .venv/bin/shardmq node --id "$id" --client-endpoint "$client" --peer-endpoint "$peer" --etcd "$etcd" "$@"
