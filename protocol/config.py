"""The settings the protocol core acts on (the shell's ``NodeConfig`` adds sockets, etcd and files)."""

from __future__ import annotations

from dataclasses import dataclass

from shardmq.rebalance.handoff import SNAPSHOT_CHUNK
from shardmq.ring import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT
from shardmq.router import codec


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    node_id: str
    shard_count: int = DEFAULT_SHARD_COUNT  # until the cluster's stored settings are known
    replication: int = DEFAULT_REPLICATION
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    request_timeout: float = 5.0
    lookup_timeout: float = 1.0  # then ask the next owner: a dead primary costs one timeout, not a failed publish
    route_cache_size: int = 100_000  # (topic, shard) lookup answers kept at the entry node; 0 turns the cache off
    route_cache_ttl: float = 1.0  # a cached answer is asked again after this; owners wait 2x for INVALIDATE_ACKs
    handoff_grace: float = 3.0  # an ex-owner keeps serving and forwarding this long after a flip
    handoff_timeout: float = 30.0
    redelivery_interval: float = 2.0
    client_idle_check: float = 10.0
    # QoS 1 flow control per client session (see ``destination``).
    max_inflight: int = 1000
    max_queued: int = 10_000
    max_session_bytes: int = 64 * 1024 * 1024
    # Check every client frame against its principal's ACL (``access``); off for --insecure and the simulation.
    access_control: bool = False
    # Retained messages (``retained``): bytes (payload + topic) a node holds at most; a write past it is refused.
    max_retained_bytes: int = 256 * 1024 * 1024
    retained_fetch_timeout: float | None = None  # a member's RETAINED_REPLY; None: request_timeout
    snapshot_chunk: int = SNAPSHOT_CHUNK  # routes per SNAPSHOT frame of a hand-off (the simulation uses a few)
    # Store retained records and persistent sessions through ``Effects.persist`` and hold every acknowledgement
    # until the change it confirms is stored (``durable``); the shell turns it on with --data-dir.
    durable: bool = False
    # The etcd lease's TTL: a member that died is out of every view within it (and a moment). A session shard's
    # primary asked to rebuild a session whose holder it still sees waits that long (``sessions``).
    lease_ttl: float = 5.0
