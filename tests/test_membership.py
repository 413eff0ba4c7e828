"""The etcd session (``shardmq.shard.membership.EtcdSession``) against the real etcd of the session cluster.

Each test uses a cluster name of its own, so it never touches the nodes of the shared cluster.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import etcd3gw
import orjson
import pytest
import zmq

from shardmq.shard.membership import EtcdSession, MemberInfo, cluster_prefix
from shardmq.testing import LocalCluster


@pytest.fixture
def session_pair(cluster: LocalCluster) -> Iterator[tuple[EtcdSession, zmq.Socket, str]]:
    """A running session whose periodic read and keep-alive are 10 s or more away, and the PULL socket its
    snapshots arrive on."""
    assert cluster.state is not None
    name = f"watch-{uuid.uuid4().hex[:8]}"
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    endpoint = f"inproc://snapshots-{name}"
    pull.bind(endpoint)
    me = MemberInfo("w1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    session = EtcdSession(ctx, cluster.etcd_access(), name, me, endpoint, lease_ttl=30, poll_interval=30.0)
    session.start()
    try:
        yield session, pull, name
    finally:
        session.stop()
        session.join(timeout=5)
        pull.close(linger=0)
        cluster.etcd_client().delete_prefix(cluster_prefix(name))


def next_snapshot(pull: zmq.Socket, timeout: float) -> dict | None:
    if not pull.poll(int(timeout * 1000)):
        return None
    kind, snapshot, _document = pull.recv_multipart()
    assert kind == b"view"
    return orjson.loads(snapshot)


@pytest.mark.timeout(30)
def test_a_member_joining_is_seen_through_the_watch_not_the_periodic_read(cluster, session_pair) -> None:
    session, pull, name = session_pair
    first = next_snapshot(pull, 10)
    assert first is not None and [m["node"] for m in first["members"]] == ["w1"]
    while next_snapshot(pull, 0.5) is not None:  # the leader campaign may push one more view
        pass
    other = MemberInfo("w2", "tcp://127.0.0.1:3", "tcp://127.0.0.1:4")
    client = cluster.etcd_client()
    started = time.monotonic()
    client.put(cluster_prefix(name) + "members/w2", orjson.dumps(other.to_dict()))
    seen = next_snapshot(pull, 12)
    took = time.monotonic() - started
    assert seen is not None and sorted(m["node"] for m in seen["members"]) == ["w1", "w2"]
    assert took < 2  # the next read or keep-alive is 10 s or more away: only the watch can have woken it
    session.stop()
    session.join(timeout=5)
    deadline = time.monotonic() + 5
    while any(t.name == "etcd-watch-w1" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # stop() revokes the lease, whose deletion is the event that lets the watch thread see it should end.
    assert not any(t.name == "etcd-watch-w1" for t in threading.enumerate())


@pytest.mark.timeout(30)
def test_a_lease_lost_while_paused_registers_again_and_never_reads_as_a_removal(cluster, session_pair) -> None:
    """The lease goes (here: revoked from outside, as its expiry would while the process was stopped) and with it
    our key; the next read, woken by the watch, comes long before the next keep-alive. The session must register
    again, not hand the node a view without itself (which the node takes for ``cluster remove`` and stops)."""
    session, pull, name = session_pair
    first = next_snapshot(pull, 10)
    assert first is not None and first["registration"] == 1
    while next_snapshot(pull, 0.5) is not None:  # the leader campaign may push one more view
        pass
    client = cluster.etcd_client()
    found = client.get(cluster_prefix(name) + "members/w1", metadata=True)
    lease = etcd3gw.Lease(int(found[0][1]["lease"]), client)
    lease.revoke()
    views = []
    deadline = time.monotonic() + 4  # the next keep-alive is 5 s away: only the check on our missing key acts
    while time.monotonic() < deadline:
        seen = next_snapshot(pull, 0.5)
        if seen is not None:
            views.append(seen)
    assert views, "no view after the lease was lost"
    assert all("w1" in [m["node"] for m in v["members"]] for v in views), views
    assert views[-1]["registration"] == 2


@pytest.mark.timeout(30)
def test_a_key_deleted_under_a_live_lease_reads_as_a_removal(cluster, session_pair) -> None:
    """``cluster remove``: our key deleted while the lease lives. The view without us goes to the node."""
    session, pull, name = session_pair
    first = next_snapshot(pull, 10)
    assert first is not None
    while next_snapshot(pull, 0.5) is not None:
        pass
    cluster.etcd_client().delete(cluster_prefix(name) + "members/w1")
    seen = next_snapshot(pull, 4)
    assert seen is not None and "w1" not in [m["node"] for m in seen["members"]]
    assert seen["registration"] == 1
