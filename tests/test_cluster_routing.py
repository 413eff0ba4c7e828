"""Routing through a real 3-node cluster: cross-node delivery, wildcards, the $ rule, exactly-once, order, QoS 1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import zmq

from shardmq.client import Client, Message, ShardMQError
from shardmq.client.client import use_curve
from shardmq.client.credentials import resolve as resolve_credentials
from shardmq.router import codec


def drain(client: Client, quiet: float = 0.5) -> list[Message]:
    """Everything that arrives until the client has been quiet for ``quiet`` seconds."""
    got: list[Message] = []
    while (msg := client.receive(timeout=quiet)) is not None:
        got.append(msg)
    return got


def unique() -> str:
    return uuid.uuid4().hex[:8]


def per_topic(pairs: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    """Payloads per topic, in arrival order: the order shardmq keeps is per publisher and topic."""
    out: dict[str, list[bytes]] = {}
    for topic, payload in pairs:
        out.setdefault(topic, []).append(payload)
    return out


def test_cluster_is_formed(cluster, connect) -> None:
    status = connect(0).status()
    assert status["members"] == ["n1", "n2", "n3"]
    assert status["shard_count"] == 4096 and status["replication"] == 2


def test_cross_node_delivery_exact(connect) -> None:
    p = unique()
    sub = connect(0)
    sub.subscribe(f"{p}/device/1", qos=1)
    pub = connect(2)
    assert sub.node != pub.node
    pub.publish(f"{p}/device/1", b"hello", qos=1)
    pub.publish(f"{p}/device/2", b"other", qos=1)
    got = drain(sub)
    assert [(m.topic, m.payload, m.qos) for m in got] == [(f"{p}/device/1", b"hello", 1)]


@pytest.mark.parametrize(
    ("filt", "matching", "not_matching"),
    [
        ("{p}/+/temp", ["{p}/a/temp", "{p}//temp"], ["{p}/a/b/temp", "{p}/temp"]),
        ("{p}/#", ["{p}", "{p}/a", "{p}/a/b/c"], ["x{p}/a"]),
        ("{p}/+/x/#", ["{p}/a/x", "{p}/a/x/y/z"], ["{p}/a/y/x"]),
        ("+/{p}/+", ["a/{p}/b", "/{p}/"], ["a/{p}", "a/{p}/b/c"]),
        ("+/{p}/#", ["q/{p}", "q/{p}/r/s"], ["{p}/q"]),
    ],
)
def test_wildcard_forms(connect, filt: str, matching: list[str], not_matching: list[str]) -> None:
    p = unique()
    sub = connect(1)
    sub.subscribe(filt.format(p=p), qos=1)
    pub = connect(0)
    for topic in [*matching, *not_matching]:
        pub.publish(topic.format(p=p), topic.encode(), qos=1)
    assert sorted(m.topic for m in drain(sub)) == sorted(t.format(p=p) for t in matching)


def test_dollar_topics_not_matched_by_leading_wildcards(connect) -> None:
    p = unique()
    hash_all, plus_first, sys_sub = connect(0), connect(1), connect(2)
    hash_all.subscribe("#", qos=1)
    plus_first.subscribe(f"+/{p}", qos=1)
    sys_sub.subscribe(f"$SYS/{p}", qos=1)
    pub = connect(1)
    pub.publish(f"$SYS/{p}", b"s", qos=1)
    pub.publish(f"plain/{p}", b"n", qos=1)
    assert [m.topic for m in drain(sys_sub)] == [f"$SYS/{p}"]
    assert [m.topic for m in drain(plus_first)] == [f"plain/{p}"]
    assert f"$SYS/{p}" not in [m.topic for m in drain(hash_all)]
    hash_all.unsubscribe("#")


def test_root_set_reported_in_status(connect) -> None:
    p = unique()
    c = connect(0)
    nodes = [connect(i) for i in range(3)]
    deadline = time.monotonic() + 5
    # Earlier tests' clients may still be leaving (their ROUTE_DELs in flight): start from a settled root set.
    while len({n.status()["root_set_size"] for n in nodes}) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = c.status()["root_set_size"]
    c.subscribe(f"+/{p}/root")
    statuses = [connect(i).status() for i in range(3)]
    assert all(s["root_set_size"] == before + 1 for s in statuses)
    c.unsubscribe(f"+/{p}/root")
    assert connect(1).status()["root_set_size"] == before


def test_exactly_one_copy_per_subscriber_with_overlapping_filters(connect) -> None:
    p = unique()
    sub = connect(0)
    for f in (f"{p}/a/b", f"{p}/+/b", f"{p}/#", "+/a/b", "#"):
        sub.subscribe(f, qos=1)
    other = connect(2)
    other.subscribe(f"{p}/a/+", qos=0)
    pub = connect(1)
    for i in range(20):
        pub.publish(f"{p}/a/b", str(i).encode(), qos=1)
    got = [m for m in drain(sub) if m.topic == f"{p}/a/b"]
    assert [m.payload for m in got] == [str(i).encode() for i in range(20)]
    assert [m.payload for m in drain(other)] == [str(i).encode() for i in range(20)]
    sub.unsubscribe("#", "+/a/b")


@pytest.mark.parametrize("qos", [0, 1])
def test_per_publisher_order(connect, qos: int) -> None:
    p = unique()
    topics = [f"{p}/order/{i}" for i in range(3)]
    sub = connect(2)
    sub.subscribe(f"{p}/order/+", qos=qos)
    pubs = [connect(0), connect(1)]
    n = 300
    for i in range(n):
        for k, pub in enumerate(pubs):
            pub.publish(topics[i % 3], f"{k}:{i}".encode(), qos=qos)
    got = drain(sub, quiet=1.0)
    assert len(got) == 2 * n
    for k in range(2):
        for topic in topics:
            seq = [int(m.payload.split(b":")[1]) for m in got if m.topic == topic and m.payload.startswith(b"%d:" % k)]
            assert seq == sorted(seq) and len(seq) == n // 3


def test_qos1_publish_is_acked_and_delivered_everywhere(connect) -> None:
    p = unique()
    subs = [connect(i) for i in range(3)]
    for i, s in enumerate(subs):
        s.subscribe(f"{p}/fan/#" if i else f"{p}/fan/out", qos=1)
    pub = connect(0)
    pub.publish(f"{p}/fan/out", b"x", qos=1)  # returns only after every destination node accepted it
    for s in subs:
        assert [m.payload for m in drain(s)] == [b"x"]
    pub.publish(f"{p}/nobody/listens", b"y", qos=1)  # no destinations: acked at once


def test_unsubscribe_stops_delivery(connect) -> None:
    p = unique()
    sub = connect(1)
    sub.subscribe(f"{p}/u/+", qos=1)
    pub = connect(0)
    pub.publish(f"{p}/u/1", b"1", qos=1)
    sub.unsubscribe(f"{p}/u/+")
    pub.publish(f"{p}/u/2", b"2", qos=1)
    assert [m.payload for m in drain(sub)] == [b"1"]


def test_bulk_subscribe_spreads_routes_over_owners(connect) -> None:
    p = unique()
    sub = connect(0)
    before = sum(connect(i).status()["routes"] for i in range(3))
    filters = [f"{p}/bulk/{i}" for i in range(3000)]
    progress: list[int] = []
    assert sub.subscribe_many(filters, qos=0, chunk=1000, progress=progress.append) == 3000
    assert progress == [1000, 2000, 3000]
    counts = [connect(i).status()["routes"] for i in range(3)]
    assert sum(counts) - before == 3000 * 2  # R=2: every route on two owners
    assert all(c > before // 3 for c in counts)  # spread, not piled on one node
    pub = connect(2)
    pub.publish(f"{p}/bulk/1234", b"z", qos=1)
    assert [m.topic for m in drain(sub)] == [f"{p}/bulk/1234"]
    sub.unsubscribe(*filters)
    assert sum(connect(i).status()["routes"] for i in range(3)) == before


def test_client_errors_are_exceptions_with_codes(connect) -> None:
    c = connect(0)
    with pytest.raises(ShardMQError) as e:
        c.subscribe("a/#/b")
    assert e.value.code == "invalid_filter" and "#" in e.value.reason
    with pytest.raises(ShardMQError) as e:
        c.publish("a/+", b"x")
    assert e.value.code == "invalid_topic"
    with pytest.raises(ShardMQError) as e:
        c.publish("a", b"x", qos=2)
    assert e.value.code == "invalid_qos"
    c.publish("still/works", b"x", qos=1)


def test_failover_to_next_endpoint(cluster, endpoints) -> None:
    dead = "tcp://127.0.0.1:1"  # nothing listens there
    with Client([dead, endpoints[1]], timeout=1.0) as c:
        assert c.node == "n2"
        c.publish("failover/ok", b"x", qos=1)


def test_vanished_client_routes_are_dropped(connect, endpoints) -> None:
    p = unique()
    ghost = Client(endpoints, client_id=f"ghost-{p}")
    ghost.subscribe(f"{p}/ghost", qos=1)
    routes = sum(connect(i).status()["routes"] for i in range(3))
    ghost._close_socket()  # vanish without BYE: the node notices when its probe cannot be routed
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum(connect(i).status()["routes"] for i in range(3)) == routes - 2:
            break
        time.sleep(0.5)
    assert sum(connect(i).status()["routes"] for i in range(3)) == routes - 2


@pytest.mark.parametrize("qos", [0, 1])
def test_publish_many_batches_keep_order_and_ack(connect, qos: int) -> None:
    p = unique()
    sub = connect(0)
    sub.subscribe(f"{p}/batch/+", qos=1)
    pub = connect(2)
    messages = [(f"{p}/batch/{i % 3}", f"{i}".encode()) for i in range(1200)]
    assert pub.publish_many(messages, qos=qos, batch=250) == 1200
    got = drain(sub, quiet=1.0)
    assert len(got) == 1200
    for k in range(3):
        seq = [int(m.payload) for m in got if m.topic == f"{p}/batch/{k}"]
        assert seq == sorted(seq) and len(seq) == 400
    assert connect(0).status()["metrics"].get("batches.msgs", 0) > 0  # deliveries shared frames
    with pytest.raises(ShardMQError) as e:
        pub.publish_many([(f"{p}/ok", b"x"), ("bad/#", b"y")], qos=qos)
    assert e.value.code == "invalid_topic"


@pytest.mark.timeout(60)
def test_one_batch_frame_mixing_local_remote_root_and_unmatched_topics(connect) -> None:
    """One PUBS frame whose topics resolve differently: the entry node routes each topic once per frame and
    sends QoS 0 items straight to its peers' outboxes; every subscriber still gets exactly its messages, in
    order per topic (a topic waiting for a lookup does not hold back the others)."""
    p = unique()
    local_sub, remote_sub, pub = connect(2), connect(0), connect(2)  # local_sub shares the publisher's node
    local_sub.subscribe(f"+/{p}/root")  # root set: matched on every node, here on the entry node itself
    remote_sub.subscribe(f"{p}/remote")
    remote_sub.subscribe(f"+/{p}/root")
    topics = [f"{p}/remote", f"x/{p}/root", f"{p}/nobody", f"{p}/remote", f"y/{p}/root"]
    messages = [(topics[i % len(topics)], str(i).encode()) for i in range(1000)]
    before = pub.status()["metrics"].get("publishes.routed", 0)
    assert pub.publish_many(messages, qos=0, batch=1000) == 1000


    want_remote = per_topic([m for m in messages if m[0] != f"{p}/nobody"])
    want_local = per_topic([m for m in messages if m[0].endswith(f"/{p}/root")])
    assert per_topic([(m.topic, m.payload) for m in drain(remote_sub, quiet=1.0)]) == want_remote
    assert per_topic([(m.topic, m.payload) for m in drain(local_sub, quiet=0.5)]) == want_local
    assert pub.status()["metrics"]["publishes.routed"] - before == 1000


@pytest.mark.timeout(60)
def test_runs_to_cold_local_and_remote_topics_keep_order_and_count(connect) -> None:
    """Runs (consecutive QoS 0 publishes to one topic share one item) whose first message needs a lookup, whose
    topic also has a subscriber on the entry node, or that nobody wants: every message arrives once, in order."""
    p = unique()
    local_sub, remote_sub, pub = connect(2), connect(0), connect(2)
    local_sub.subscribe(f"+/{p}/root")
    remote_sub.subscribe(f"{p}/cold/+")
    remote_sub.subscribe(f"+/{p}/root")
    runs = [f"{p}/cold/a", f"x/{p}/root", f"{p}/cold/b", f"{p}/nobody", f"{p}/cold/a"]
    messages = [(topic, f"{topic}:{i}".encode()) for topic in runs for i in range(120)]
    before = pub.status()["metrics"].get("publishes.routed", 0)
    assert pub.publish_many(messages, qos=0, batch=len(messages)) == len(messages)

    assert per_topic([(m.topic, m.payload) for m in drain(remote_sub, quiet=1.0)]) == per_topic(
        [m for m in messages if m[0] != f"{p}/nobody"]
    )
    assert per_topic([(m.topic, m.payload) for m in drain(local_sub, quiet=0.5)]) == per_topic(
        [m for m in messages if m[0] == f"x/{p}/root"]
    )
    assert pub.status()["metrics"]["publishes.routed"] - before == len(messages)


@pytest.mark.timeout(60)
def test_a_qos0_run_crosses_every_hop_as_one_item(connect, endpoints: list[str]) -> None:
    """The SDK sends consecutive QoS 0 publishes to one topic as one run; the entry node forwards it and the
    subscriber's node delivers it as one item (a raw subscriber sees MSGS with ``counts``), in order."""
    topic = f"{unique()}/run"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    use_curve(sock, resolve_credentials(None))  # the suite's operator credentials (conftest)
    sock.connect(endpoints[0])

    def frames(until: float) -> Iterator[codec.Frame]:
        while (left := until - time.monotonic()) > 0:
            if sock.poll(int(left * 1000)):
                frame = codec.decode(sock.recv_multipart())
                if frame.type == codec.PING:
                    sock.send_multipart(codec.encode(codec.PONG, {}))
                else:
                    yield frame

    try:
        sock.send_multipart(codec.encode(codec.SUB, {"id": 1, "filters": [topic], "qos": 0}))
        assert next(frames(time.monotonic() + 5)).type == codec.SUBACK
        pub = connect(2)
        sent: list[bytes] = []
        got: list[bytes] = []
        longest = 0
        for attempt in range(5):  # a publish whose lookup is not cached yet goes one by one; the next is a run
            batch = [f"{attempt}:{i}".encode() for i in range(200)]
            sent += batch
            pub.publish_many([(topic, data) for data in batch], qos=0, batch=len(batch))
            for frame in frames(time.monotonic() + 5):
                if frame.type == codec.MSG:
                    got.append(frame.payload)
                else:
                    assert frame.type == codec.MSGS
                    for _, sizes, blob in codec.split_runs(frame):
                        got += codec.cut(blob, sizes)
                        longest = max(longest, len(sizes or [0]))
                if len(got) == len(sent):
                    break
            if longest > 1:
                break
        assert got == sent
        assert longest > 1, "no message arrived as part of a run"
    finally:
        sock.close(linger=0)
