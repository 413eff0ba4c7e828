"""Replicated persistent sessions on a real 4-node cluster (R=2): kill -9 of the node holding a session, or of the
session shard's primary, loses no acknowledged QoS 1 message queued for it; the client comes back through another
node and receives every one (at least once, in order).

The module starts its own cluster (nodes are killed) and stops it by pid at the end.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.ring import Assignment, shard_for_key
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster
from tests.test_retained import drain, endpoints_of

EXPIRY = 120


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("sessions-repl"), nodes=4, lease_ttl=2, log_level="warning")
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


def live(lc: LocalCluster) -> list[str]:
    return sorted(n["id"] for n in lc.status()["nodes"] if n["alive"])


def client_id_with(lc: LocalCluster, primary: str | None, not_owners: set[str]) -> str:
    """A client id whose session shard's primary is ``primary`` (any if None) and none of whose owners is in
    ``not_owners``."""
    document, _ = read_assignment(lc.etcd_client(), lc.cluster)
    assert document
    a = Assignment.from_json(document)
    p = uuid.uuid4().hex[:8]
    for i in range(10_000):
        owners = a.owners(shard_for_key(f"$session/car-{p}-{i}", a.shard_count))
        if (primary is None or owners[0] == primary) and not set(owners) & not_owners:
            return f"car-{p}-{i}"
    raise AssertionError("no such client id")


def kill_and_wait_gone(lc: LocalCluster, node: str, ask: str) -> None:
    """kill -9 ``node``; wait until ``ask`` no longer lists it as a member and the assignment settled."""
    lc.stop_node(node, sig=signal.SIGKILL)
    endpoint = endpoints_of(lc)[ask]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Client([endpoint], timeout=2.0) as c:
            status = c.status()
        if node not in status["members"] and status["settled"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{node} still a member after 30 s")


def publish(endpoint: str, topic: str, count: int, prefix: str) -> list[bytes]:
    payloads = [f"{prefix}{i}".encode() for i in range(count)]
    with Client([endpoint], timeout=10.0) as pub:
        for data in payloads:
            pub.publish(topic, data, qos=1)  # returns once acknowledged
    return payloads


def keep_publishing(endpoint: str, topic: str, acked: list[bytes], refused: list[str], stop: threading.Event) -> None:
    """QoS 1 publishes of unique payloads (``w0``, ``w1``, ...) until ``stop``: the acknowledged ones in ``acked``,
    the error codes of those refused (not acknowledged: the publisher knows) in ``refused``."""
    with Client([endpoint], timeout=5.0) as pub:
        i = 0
        while not stop.is_set():
            data = f"w{i}".encode()
            i += 1
            try:
                pub.publish(topic, data, qos=1)  # returns once acknowledged
            except ShardMQError as exc:
                refused.append(exc.code)
                continue
            acked.append(data)


@pytest.mark.timeout(60)
def test_kill_the_holder_the_session_comes_back_from_the_replica(lc: LocalCluster) -> None:
    """... also while a publisher keeps publishing QoS 1 through the kill: the route owners move the session's
    routes to the session shard's primary, which refuses (``unavailable``) what comes before it adopted the
    session, so every acknowledged payload reaches the client (at least once)."""
    eps = endpoints_of(lc)
    nodes = live(lc)
    holder, publisher, taker = nodes[0], nodes[1], nodes[2]
    cid = client_id_with(lc, None, {holder})
    topic = f"{cid}/cmd"
    with Client([eps[holder]], client_id=cid, clean_session=False, session_expiry=EXPIRY) as c:
        assert c.node == holder
        c.subscribe(topic, qos=1)
    queued = publish(eps[publisher], topic, 30, "q")  # every one acknowledged
    acked: list[bytes] = []
    refused: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=keep_publishing, args=(eps[taker], topic, acked, refused, stop), daemon=True)
    thread.start()
    try:
        while len(acked) < 20 and thread.is_alive():
            time.sleep(0.01)
        kill_and_wait_gone(lc, holder, publisher)
        during = len(acked)
        while len(acked) < during + 20 and thread.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    after = publish(eps[publisher], topic, 5, "after")  # queued at the session shard's primary now
    c = Client([eps[taker]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    try:
        assert c.session_present is True
        heard = [m.payload for m in drain(c)]
    finally:
        c.close()
    assert heard[: len(queued)] == queued and heard[-len(after) :] == after
    missing = [p for p in acked if p not in set(heard)]
    assert not missing, (len(missing), missing[:10], len(acked), refused[:5])


@pytest.mark.timeout(60)
def test_kill_the_session_primary_nothing_lost(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    nodes = live(lc)
    assert len(nodes) >= 3
    holder, primary = nodes[0], nodes[1]
    survivors = [n for n in nodes if n not in (holder, primary)]
    cid = client_id_with(lc, primary, {holder})
    topic = f"{cid}/cmd"
    with Client([eps[holder]], client_id=cid, clean_session=False, session_expiry=EXPIRY) as c:
        c.subscribe(topic, qos=1)
    first = publish(eps[survivors[0]], topic, 20, "a")
    kill_and_wait_gone(lc, primary, survivors[0])
    second = publish(eps[survivors[0]], topic, 10, "b")  # into the promoted replica's queue
    c = Client([eps[survivors[-1]]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    try:
        assert c.session_present is True
        assert [m.payload for m in drain(c)] == first + second
    finally:
        c.close()

