#!/usr/bin/env bash
# Run one node against an existing etcd (multi-machine deployments).
# Usage: scripts/node.sh ID CLIENT_ENDPOINT PEER_ENDPOINT ETCD_URL --cluster-key-file FILE [extra shardmq node flags]
# (the same cluster key file on every node; see the README's security paragraph, or --insecure)
set -euo pipefail
cd "$(dirname "$0")/.."
id=$1 client=$2 peer=$3 etcd=$4; shift 4
exec .venv/bin/shardmq node --id "$id" --client-endpoint "$client" --peer-endpoint "$peer" --etcd "$etcd" "$@"
