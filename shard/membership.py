"""The node's etcd session: lease, registration and the member list.

Rules of this file:
- etcd is the only authority on membership. A node is a member while its key
  ``/shardmq/<cluster>/members/<node>`` exists; the key is attached to a lease the session keeps alive, so a node
  that dies (or cannot reach etcd) drops out when its lease expires, without anyone deciding it.
- The session runs in its own thread because every etcd call is a blocking HTTP request; it never touches node
  state. It hands each new member snapshot to the node's event loop over an inproc zmq PUSH socket, so the loop
  stays single-threaded.
- A snapshot's ``epoch`` is the highest etcd ``create_revision`` among the member keys: every node that sees the
  same member set computes the same epoch, and a join always raises it.
- Cluster settings (shard count, replication) are written once at ``/shardmq/<cluster>/config`` with a
  create-if-absent transaction; the first writer wins and every node reads the stored value.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import etcd3gw
import orjson
import structlog
import zmq

log = structlog.get_logger("shardmq.membership")


@dataclass(frozen=True, slots=True)
class MemberInfo:
    node_id: str
    client_endpoint: str
    peer_endpoint: str
    weight: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "client_endpoint": self.client_endpoint,
            "peer_endpoint": self.peer_endpoint,
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemberInfo:
        return cls(data["node"], data["client_endpoint"], data["peer_endpoint"], int(data.get("weight", 1)))


def etcd_client(url: str, timeout: float = 5.0) -> etcd3gw.Etcd3Client:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return etcd3gw.client(host=parsed.hostname or "127.0.0.1", port=parsed.port or 2379, timeout=timeout)


def cluster_prefix(cluster: str) -> str:
    return f"/shardmq/{cluster}/"


def ensure_cluster_config(client: etcd3gw.Etcd3Client, cluster: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Store ``settings`` unless the cluster already has some; return what is stored."""
    key = cluster_prefix(cluster) + "config"
    client.create(key, orjson.dumps(settings))
    stored = client.get(key)
    return orjson.loads(stored[0])


def read_members(client: etcd3gw.Etcd3Client, cluster: str) -> tuple[int, dict[str, MemberInfo]]:
    members: dict[str, MemberInfo] = {}
    epoch = 0
    for value, meta in client.get_prefix(cluster_prefix(cluster) + "members/"):
        info = MemberInfo.from_dict(orjson.loads(value))
        members[info.node_id] = info
        epoch = max(epoch, int(meta.get("create_revision", 0)))
    return epoch, members


class EtcdSession(threading.Thread):
    """Keeps this node registered and streams member snapshots to ``notify_endpoint``."""

    def __init__(
        self,
        ctx: zmq.Context,
        etcd_url: str,
        cluster: str,
        me: MemberInfo,
        notify_endpoint: str,
        lease_ttl: int = 5,
        poll_interval: float = 0.25,
    ) -> None:
        super().__init__(name="etcd-session", daemon=True)
        self._ctx = ctx
        self._url = etcd_url
        self._cluster = cluster
        self._me = me
        self._notify_endpoint = notify_endpoint
        self._ttl = lease_ttl
        self._poll = poll_interval
        self._stopping = threading.Event()
        self._lease: Any = None
        self.client = etcd_client(etcd_url)

    def stop(self) -> None:
        self._stopping.set()

    def _register(self) -> None:
        self._lease = self.client.lease(self._ttl)
        key = cluster_prefix(self._cluster) + f"members/{self._me.node_id}"
        self.client.put(key, orjson.dumps(self._me.to_dict()), self._lease)
        log.info("registered", node=self._me.node_id, lease_ttl=self._ttl)

    def run(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.connect(self._notify_endpoint)
        last: tuple[int, dict[str, MemberInfo]] | None = None
        next_refresh = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    now = time.monotonic()
                    if self._lease is None:
                        self._register()
                        next_refresh = now + self._ttl / 3
                    elif now >= next_refresh:
                        if self._lease.refresh() <= 0:
                            log.warning("lease_lost", node=self._me.node_id)
                            self._lease = None
                            continue
                        next_refresh = now + self._ttl / 3
                    snapshot = read_members(self.client, self._cluster)
                    if snapshot != last:
                        last = snapshot
                        epoch, members = snapshot
                        push.send(
                            orjson.dumps(
                                {"epoch": epoch, "members": [m.to_dict() for m in members.values()]}
                            )
                        )
                except Exception as exc:  # etcd unreachable: keep trying; the lease decides membership
                    log.warning("etcd_error", node=self._me.node_id, error=str(exc))
                    self._stopping.wait(0.5)
                self._stopping.wait(self._poll)
        finally:
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    self._lease.revoke()
            push.close(linger=0)
