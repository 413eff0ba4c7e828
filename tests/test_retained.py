"""Retained messages on a real 3-node cluster (R=2): publish with retain on one node, subscribe on another (exact,
``a/+/c``, ``a/#``), delete with an empty payload, kill -9 the primary of a retained topic's shard, the SDK flavours.

The module starts its own cluster (short lease, so the kill settles fast) and stops it by pid at the end.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client, Message, ShardMQError
from shardmq.client.aio import AsyncClient
from shardmq.ring import Assignment, shard_for_key
from shardmq.router import codec
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster

LEASE_TTL = 2


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("retained"), nodes=3, lease_ttl=LEASE_TTL, log_level="warning")
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


def endpoints_of(lc: LocalCluster) -> dict[str, str]:
    assert lc.state is not None
    return {p.name: p.client_endpoint for p in lc.state.nodes}


def drain(client: Client, quiet: float = 0.5) -> list[Message]:
    got: list[Message] = []
    while (msg := client.receive(timeout=quiet)) is not None:
        got.append(msg)
    return got


def seen(messages: list[Message]) -> set[tuple[str, bytes, int, bool]]:
    return {(m.topic, m.payload, m.qos, m.retain) for m in messages}


@pytest.mark.timeout(60)
def test_publish_retained_then_subscribe_elsewhere(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    with Client([eps["n1"]]) as pub:
        pub.publish(f"{p}/x/c", b"one", qos=1, retain=True)
        pub.publish(f"{p}/y/c", b"two", qos=0, retain=True)
        pub.publish(f"{p}/y/d", b"three", qos=1, retain=True)
        pub.publish(f"{p}/x/c", b"one-b", qos=1, retain=True)  # replaces "one"
        pub.publish(f"{p}/z/c", b"live only", qos=1)  # not retained
        pub.flush()
    with Client([eps["n2"]]) as sub:
        assert sub.node == "n2"
        sub.subscribe(f"{p}/x/c", qos=1)
        assert seen(drain(sub)) == {(f"{p}/x/c", b"one-b", 1, True)}
        sub.subscribe(f"{p}/+/c", qos=1)
        assert seen(drain(sub)) == {(f"{p}/x/c", b"one-b", 1, True), (f"{p}/y/c", b"two", 0, True)}  # min qos
        sub.subscribe(f"{p}/#", qos=0)
        assert seen(drain(sub)) == {
            (f"{p}/x/c", b"one-b", 0, True), (f"{p}/y/c", b"two", 0, True), (f"{p}/y/d", b"three", 0, True)
        }  # fmt: skip
        # Live messages are never flagged, even a retain publish to an existing subscriber.
        with Client([eps["n3"]]) as pub3:
            pub3.publish(f"{p}/x/c", b"live", qos=1, retain=True)
        assert {(m.topic, m.payload, m.retain) for m in drain(sub)} == {(f"{p}/x/c", b"live", False)}
        # Deleted by an empty payload: a new subscriber gets nothing.
        with Client([eps["n3"]]) as pub3:
            pub3.publish(f"{p}/x/c", b"", qos=1, retain=True)
    with Client([eps["n3"]]) as late:
        late.subscribe(f"{p}/#", qos=1)
        assert seen(drain(late)) == {(f"{p}/y/c", b"two", 0, True), (f"{p}/y/d", b"three", 1, True)}


@pytest.mark.timeout(60)
def test_async_client_publishes_and_gets_retained(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]

    async def run() -> list[Message]:
        async with AsyncClient([eps["n3"]]) as pub:
            await pub.publish(f"{p}/a", b"A", qos=1, retain=True)
            await pub.publish_many([(f"{p}/b/{i}", b"B%d" % i) for i in range(3)], qos=1, retain=True)
        async with AsyncClient([eps["n1"]]) as sub:
            await sub.subscribe(f"{p}/#", qos=1)
            got = []
            while (msg := await sub.receive(timeout=1.0)) is not None:
                got.append(msg)
            return got

    got = asyncio.run(run())
    assert seen(got) == {(f"{p}/a", b"A", 1, True)} | {(f"{p}/b/{i}", b"B%d" % i, 1, True) for i in range(3)}


@pytest.mark.timeout(60)
def test_acl_retained_only_within_granted_filters_and_publish_grant(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    with Client([eps["n1"]]) as admin:
        admin.publish(f"{p}/sensors/a/temp", b"in", qos=1, retain=True)
        admin.publish(f"{p}/other/a/temp", b"out", qos=1, retain=True)
    reader = lc.add_credentials(f"r{p}", publish=[f"{p}/sensors/#"], subscribe=[f"{p}/sensors/#"])
    with Client([eps["n2"]], credentials=reader, timeout=5.0) as c:
        with pytest.raises(ShardMQError) as info:
            c.subscribe(f"{p}/#", qos=1)  # not granted: no SUBACK, and no retained message
        assert info.value.code == codec.E_NOT_AUTHORIZED
        with pytest.raises(ShardMQError) as info:
            c.publish(f"{p}/other/a/temp", b"x", qos=1, retain=True)  # a retain publish needs the publish grant
        assert info.value.code == codec.E_NOT_AUTHORIZED
        c.subscribe(f"{p}/sensors/+/temp", qos=1)
        assert seen(drain(c)) == {(f"{p}/sensors/a/temp", b"in", 1, True)}
    with Client([eps["n3"]]) as admin:
        admin.subscribe(f"{p}/other/+/temp", qos=1)
        assert seen(drain(admin)) == {(f"{p}/other/a/temp", b"out", 1, True)}  # the refused publish stored nothing


@pytest.mark.timeout(60)
def test_kill_the_primary_a_new_subscriber_still_gets_it(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    assert lc.state is not None
    document, _ = read_assignment(lc.etcd_client(), lc.cluster)
    assert document
    a = Assignment.from_json(document)
    p = uuid.uuid4().hex[:8]
    topic = next(t for t in (f"{p}/k/{i}" for i in range(1000)) if a.owners(shard_for_key(t, a.shard_count))[0] == "n2")
    with Client([eps["n1"]]) as pub:
        pub.publish(topic, b"survives", qos=1, retain=True)
    killed = time.monotonic()
    lc.stop_node("n2", sig=signal.SIGKILL)
    deadline = killed + 30
    last: object = None
    while time.monotonic() < deadline:  # once the survivors promoted the replica, a new subscriber gets it
        try:
            with Client([eps["n3"], eps["n1"]], timeout=2.0) as sub:
                sub.subscribe(f"{p}/k/+", qos=1)
                last = seen(drain(sub))
                if last == {(topic, b"survives", 1, True)}:
                    return
        except Exception as exc:  # noqa: BLE001 - a node may refuse while membership settles; try again
            last = exc
        time.sleep(0.5)
    pytest.fail(f"no retained message {time.monotonic() - killed:.1f}s after the kill: {last!r}")
