"""QoS 0 messages a slow subscriber cannot take: dropped, counted per message and per client, and reported.

The real-cluster test makes a subscriber stop reading (a Client with tiny receive buffers that is not asked to
receive) while a publisher sends QoS 0 messages to its filter, then lets it read: every message is either
received or counted in ``Client.dropped`` (the node's DROPPED frames), and the node's per-message counter agrees.
Its cluster has a 4 KiB ``max_payload``, so a frame to the subscriber carries a few dozen messages: with the
default 1 MiB a busy node sends ~250 per frame and 200,000 messages fit in the node's 1,000-frame send queue.

The subscriber runs in its own process with zmq heartbeats off on its socket, and sends a PONG every second
while it stalls: this branch's node still heartbeats client connections, and a heartbeat timeout on a reader
whose input is stalled makes libzmq abort the process when it reads again (libzmq issue 3937). A stall as long
as a slow machine needs is then safe, and a crash fails this test instead of killing pytest. The unit tests
drive the core's ``flush`` through the shell with a fake socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from shardmq.client import Client
from shardmq.protocol.outbox import Delivery
from shardmq.protocol.records import Session
from shardmq.router import codec
from shardmq.router.codec import ProtocolError
from shardmq.shard.node import Node, NodeConfig
from shardmq.testing import LocalCluster

PUBLISHED = 200_000
RUN = 10  # consecutive messages to one topic: they travel as one run, and a dropped run counts RUN
TOPICS = 1000
MAX_PAYLOAD = 4096
PAD = b"." * 90  # ~100-byte messages: about 40 to a frame

# argv: endpoint, filter. Prints {"client", "node"} once subscribed and reads nothing until a line with the number
# published arrives on stdin; then reads until received + dropped reaches it (or 60 s pass), prints the result,
# and closes at the next line.
SUBSCRIBER = textwrap.dedent(
    """
    import json, select, sys, time
    import zmq
    from shardmq.client import Client
    from shardmq.router import codec

    class SlowReaderSocket(zmq.Socket):
        def setsockopt(self, option, value):
            if option in (zmq.HEARTBEAT_IVL, zmq.HEARTBEAT_TIMEOUT):
                return  # no heartbeats on this side (see the test's docstring)
            super().setsockopt(option, value)

    class SmallBuffers:
        # One frame in zmq and a few KiB in the kernel: the node's send queue fills soon after we stop reading.
        def __init__(self, ctx):
            self.ctx = ctx

        def socket(self, kind):
            sock = SlowReaderSocket(self.ctx, kind)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.RCVBUF, 4096)
            return sock

    endpoint, topic_filter = sys.argv[1], sys.argv[2]
    c = Client([endpoint], connect=False, timeout=10)
    c.ctx = SmallBuffers(c.ctx)
    c.connect()
    c.subscribe(topic_filter)
    print(json.dumps({"client": c.client_id, "node": c.node}), flush=True)
    deadline = time.monotonic() + 120
    while not select.select([sys.stdin], [], [], 1.0)[0] and time.monotonic() < deadline:
        c.sock.send_multipart(codec.encode(codec.PONG, {}))  # traffic for the node's heartbeat; reads nothing
    expected = int(sys.stdin.readline())
    received, payloads = 0, set()
    deadline = time.monotonic() + 60
    while received + c.dropped < expected and time.monotonic() < deadline:
        msg = c.receive(timeout=1.0)
        if msg is not None:
            received += 1
            payloads.add(msg.payload)
    extra = 0  # anything after the totals matched would be a message counted twice
    while extra < 1000 and c.receive(timeout=0.5) is not None:
        extra += 1
    print(json.dumps({"received": received, "unique": len(payloads), "dropped": c.dropped, "extra": extra}), flush=True)
    sys.stdin.readline()  # the test reads the node's status while this session still lives
    c.close()
    """
)


@pytest.fixture(scope="module")
def small_frames(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A 2-node cluster whose frames carry at most 4 KiB of payload; its client endpoints."""
    directory: Path = tmp_path_factory.mktemp("drops")
    lc = LocalCluster(directory, nodes=2, log_level="warning", node_args=["--max-payload", str(MAX_PAYLOAD)])
    lc.up(timeout=60)
    try:
        assert lc.state is not None
        yield lc.state.client_endpoints()
    finally:
        lc.down()


def metric(status: dict[str, Any], name: str) -> int:
    return int(status["metrics"].get(name, 0))


@pytest.mark.timeout(240)
def test_every_message_is_delivered_or_reported_dropped(small_frames: list[str]) -> None:
    prefix = f"slow/{uuid.uuid4().hex[:8]}"
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, small_frames[0], f"{prefix}/+"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher = Client([small_frames[0]])
    entry = Client([small_frames[1]], timeout=60)  # across a peer hop: FWDS runs, delivered as MSGS runs
    try:
        hello = json.loads(sub.stdout.readline() or "null")  # type: ignore[union-attr]
        assert hello is not None, f"subscriber did not start: {sub.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        assert watcher.node == hello["node"] != entry.node
        before = watcher.status()
        topics = [f"{prefix}/{i}" for i in range(TOPICS)]
        published = 0
        deadline = time.monotonic() + 60
        while published < PUBLISHED and time.monotonic() < deadline:
            topic = topics[(published // RUN) % TOPICS]
            entry.publish_many([(topic, b"%d:%s" % (published + i, PAD)) for i in range(RUN)], batch=RUN)
            published += RUN
        entry.flush()  # the entry node has read them all (and forwarded them: one loop turn, in order)
        sub.stdin.write(f"{published}\n")  # type: ignore[union-attr]
        sub.stdin.flush()  # type: ignore[union-attr]
        line = sub.stdout.readline()  # type: ignore[union-attr]
        assert line, f"subscriber died: {sub.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        result = json.loads(line)
        after = watcher.status()
        sub.stdin.write("close\n")  # type: ignore[union-attr]
        sub.stdin.flush()  # type: ignore[union-attr]
        assert sub.wait(timeout=30) == 0
    finally:
        watcher.close()
        entry.close()
        if sub.poll() is None:
            sub.kill()
            sub.wait(timeout=10)
    grown = {name: metric(after, name) - metric(before, name) for name in (
        "drops.client_hwm", "drops.client_hwm_reported", "drops.client_hwm_frames", "deliveries.qos0",
        "clients.vanished",
    )}  # fmt: skip
    assert grown["clients.vanished"] == 0, "the subscriber's connection broke: its queued messages were lost"
    assert result["dropped"] > 0, f"nothing was dropped ({published} published): the test did not stall the reader"
    assert result["extra"] == 0 and result["unique"] == result["received"]
    assert result["received"] + result["dropped"] == published == PUBLISHED, (result, published, grown)
    assert grown["drops.client_hwm"] == result["dropped"] == grown["drops.client_hwm_reported"]
    assert grown["deliveries.qos0"] == result["received"]
    assert grown["drops.client_hwm_frames"] < result["dropped"]  # a dropped frame held several messages
    assert {"client": hello["client"], "dropped": result["dropped"], "unreported": 0} in after["clients_dropped"]


# ---------------------------------------------------------------------------------------------- unit: fake socket


class FakeRouter:
    """The node's client ROUTER: records frames per client; ``full`` makes sends fail like a full send queue."""

    def __init__(self) -> None:
        self.full = False
        self.sent: list[tuple[bytes, codec.Frame]] = []

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append((parts[0], codec.decode(parts[1:], max_payload=1 << 62)))


def node_with(*rids: bytes) -> tuple[Node, FakeRouter]:
    node = Node(NodeConfig("n1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "http://127.0.0.1:0"))
    router = FakeRouter()
    node.client_sock = router  # type: ignore[assignment]
    for rid in rids:
        node.core.destination.sessions[rid] = Session(rid, 0.0)
    return node, router


def test_a_full_queue_counts_every_qos0_message_of_the_frame_and_keeps_qos1_in_flight() -> None:
    node, router = node_with(b"slow")
    session = node.core.destination.sessions[b"slow"]
    session.inflight[1] = ("t/q", b"q", False)
    node.core.outbox.deliver(b"slow", Delivery("t/a", 0, None, False, b"xyyzzz", [1, 2, 3]))  # a run of 3
    node.core.outbox.deliver(b"slow", Delivery("t/b", 0, None, False, b"w"))
    node.core.outbox.deliver(b"slow", Delivery("t/q", 1, 1, False, b"q"))
    router.full = True
    node.core.flush()
    m = node.core.metrics
    assert (m["drops.client_hwm"], m["drops.client_hwm_frames"]) == (4, 1)  # 4 messages in 1 frame
    assert (session.dropped, session.dropped_unreported) == (4, 4)
    assert session.inflight[1] == ("t/q", b"q", False)  # not written: the redelivery tick resends it
    assert node.core.destination.drops_view() == [{"client": "slow", "dropped": 4, "unreported": 4}]

    node.core.destination.drops_tick()  # still full: the report waits too (and its frame is counted as a frame)
    assert router.sent == [] and session.dropped_unreported == 4 and m["drops.client_hwm_frames"] == 2

    router.full = False
    node.core.outbox.deliver(b"slow", Delivery("t/c", 0, None, False, b"v"))
    node.core.flush()
    assert [(f.type, f.header.get("count")) for _, f in router.sent] == [(codec.MSG, None), (codec.DROPPED, 4)]
    assert (session.dropped, session.dropped_unreported, m["drops.client_hwm_reported"]) == (4, 0, 4)
    assert node.core.destination.drop_reports == {}
    node.core.flush()  # nothing more is owed: no second DROPPED
    assert len(router.sent) == 2


def test_a_client_nothing_is_sent_to_learns_of_its_drops_from_the_tick() -> None:
    node, router = node_with(b"idle", b"fine")
    router.full = True
    node.core.outbox.deliver(b"idle", Delivery("t/a", 0, None, False, b"ab", [1, 1]))
    node.core.flush()
    router.full = False
    node.core.destination.drops_tick()
    assert [(rid, f.type, f.header["count"]) for rid, f in router.sent] == [(b"idle", codec.DROPPED, 2)]
    assert node.core.metrics["drops.client_hwm_reported"] == 2
    # Only clients with drops are listed, the worst first, at most 10.
    for i in range(12):
        rid = b"c%d" % i
        node.core.destination.sessions[rid] = Session(rid, 0.0, dropped=i + 10)
    view = node.core.destination.drops_view()
    assert len(view) == 10 and [c["dropped"] for c in view] == list(range(21, 11, -1))


def test_a_session_that_ended_is_not_told() -> None:
    node, router = node_with(b"gone")
    router.full = True
    node.core.outbox.deliver(b"gone", Delivery("t/a", 0, None, False, b"a"))
    node.core.flush()
    del node.core.destination.sessions[b"gone"]  # BYE or vanished: clean session, its counts end with it
    router.full = False
    node.core.destination.drops_tick()
    assert router.sent == [] and node.core.destination.drop_reports == {}


def test_dropped_frame_is_checked_by_the_codec_and_refused_from_clients() -> None:
    frame = codec.decode(codec.encode(codec.DROPPED, {"count": 7}))
    assert frame.type == codec.DROPPED and frame.header["count"] == 7
    for bad in ({}, {"count": True}, {"count": "7"}, {"count": 1.5}):
        with pytest.raises(ProtocolError) as err:
            codec.decode(codec.encode(codec.DROPPED, bad))
        assert err.value.code == codec.E_BAD_HEADER
    with pytest.raises(ProtocolError) as err:
        codec.decode(codec.encode(codec.DROPPED, {"count": 1}), allowed=codec.CLIENT_REQUESTS)
    assert err.value.code == codec.E_UNKNOWN_TYPE


def test_the_sdk_adds_up_dropped_frames() -> None:
    client = Client("tcp://fake", connect=False)
    for count in (3, 0, -5, 4):  # a negative count (a broken node) must not lower the total
        client._handle_unsolicited(codec.decode(codec.encode(codec.DROPPED, {"count": count})))
    assert client.dropped == 7
