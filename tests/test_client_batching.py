"""Automatic batching of QoS 0 publishes in the blocking ``Client``.

The unit tests give one Client a fake socket (``FakeSocket``) and look at the frames it builds. A test that must
keep the flusher thread out holds ``client._lock``: the flusher only try-acquires it, so while the test thread
holds it nothing is sent behind the test's back. A lone publish leaves at once unless the previous one was less
than ``linger`` ago, so a test that wants publishes to gather starts with ``sending(client)``. The integration
tests use the session's real 3-node cluster.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.client import Client, Message, ShardMQError
from shardmq.client.client import VALID_TOPICS_MEMO
from shardmq.client.green import GreenClient
from shardmq.router import codec

# ---------------------------------------------------------------------------------------------- unit: fake socket


class FakeSocket:
    """Stands in for the DEALER socket: records every frame sent (and by which thread), answers like a node."""

    def __init__(self, max_payload: int = codec.DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.sent: list[codec.Frame] = []
        self.threads: list[str] = []
        self.replies: deque[list[bytes]] = deque()
        self.fail_next_send = False

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        if self.fail_next_send:
            self.fail_next_send = False
            raise zmq.ZMQError(zmq.EAGAIN)
        frame = codec.decode(parts, max_payload=1 << 62)
        self.sent.append(frame)
        self.threads.append(threading.current_thread().name)
        h, rid = frame.header, frame.header.get("id")
        reply: tuple[bytes, dict] | None = None
        if frame.type == codec.HELLO:
            reply = (codec.WELCOME, {"id": rid, "node": "n1", "max_payload": self.max_payload})
        elif frame.type == codec.SUB:
            reply = (codec.SUBACK, {"id": rid, "results": [h["qos"]] * len(h["filters"])})
        elif frame.type == codec.UNSUB:
            reply = (codec.UNSUBACK, {"id": rid})
        elif frame.type == codec.STATUS:
            reply = (codec.STATUS_REPLY, {"id": rid, "status": {}})
        elif frame.type == codec.LEAVE:
            reply = (codec.LEAVING, {"id": rid})
        elif frame.type == codec.PING:
            reply = (codec.PONG, {"id": rid})
        elif frame.type == codec.PUB and h["qos"] == 1:
            reply = (codec.PUBACK, {"ids": [rid]})
        elif frame.type == codec.PUBS and (ids := [ref for _, q, ref in h["items"] if q]):
            reply = (codec.PUBACK, {"ids": ids})
        if reply is not None:
            self.replies.append(codec.encode(*reply))

    def poll(self, timeout_ms: int) -> int:
        if not self.replies and timeout_ms:
            time.sleep(min(timeout_ms, 1) / 1000)
        return 1 if self.replies else 0

    def recv_multipart(self) -> list[bytes]:
        return self.replies.popleft()

    def close(self, linger: int | None = None) -> None:
        pass

    def disable_monitor(self) -> None:
        pass

    def published(self) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
        """(PUB or PUBS, [(topic, payload), ...]) for every publish frame sent, in order."""
        out = []
        for frame in self.sent:
            if frame.type == codec.PUB:
                out.append((codec.PUB, [(frame.header["topic"], frame.payload)]))
            elif frame.type == codec.PUBS:
                out.append((codec.PUBS, [(item[0], payload) for item, payload in codec.split_batch(frame)]))
        return out


class FakePoller:
    """The client's poller over a FakeSocket (the fake has no zmq monitor, so it never reports a disconnect)."""

    def __init__(self, sock: FakeSocket) -> None:
        self.sock = sock

    def poll(self, timeout_ms: int) -> list[tuple[FakeSocket, int]]:
        return [(self.sock, zmq.POLLIN)] if self.sock.poll(timeout_ms) else []


def fake_client(cls: type[Client] = Client, max_payload: int = codec.DEFAULT_MAX_PAYLOAD, **kwargs) -> Client:
    """A connected client whose socket is a FakeSocket (``client.fake``); HELLO/WELCOME went through it."""
    fake = FakeSocket(max_payload)
    client = cls("tcp://fake", client_id=f"fake-{uuid.uuid4().hex[:8]}", connect=False, **kwargs)

    def open_fake(endpoint: str) -> None:
        client.sock, client._poller = fake, FakePoller(fake)

    client._open = open_fake  # type: ignore[method-assign]
    client.fake = fake  # type: ignore[attr-defined]
    client.connect()
    assert client.max_payload == max_payload  # taken from WELCOME
    fake.sent.clear()
    fake.threads.clear()
    return client


def sending(client: Client) -> Client:
    """As if a publish had just been made and sent: publishes gather for ``linger`` from now (a lone publish
    ``linger`` or more after the previous one leaves at once, in the caller's thread)."""
    client._core.last_publish = client._core.last_flush = time.monotonic()
    return client


def wait_for(condition: Callable[[], object], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def test_lone_publish_leaves_at_once_as_a_plain_pub_frame() -> None:
    c = fake_client(linger=60)
    c.publish("a/b", b"x")  # nothing pending, no publish just before: publish sends it, no thread hand-off
    [frame] = c.fake.sent
    assert frame.type == codec.PUB and frame.payload == b"x"
    assert frame.header == {"v": codec.PROTOCOL_VERSION, "topic": "a/b", "qos": 0}
    assert c.fake.threads == [threading.current_thread().name] and c._flusher is None
    c.flush()
    assert [f.type for f in c.fake.sent[1:]] == [codec.PING]  # flush waits for the node to have read it
    c.close()


def test_publishes_right_after_a_send_gather_in_one_frame() -> None:
    c = fake_client(linger=60)
    with c._lock:
        c.publish("t", b"0")  # leaves at once
        c.publish("t", b"1")  # less than linger after the previous publish: gathers
        c.publish("t", b"2")
        assert c._pending == [("t", b"1"), ("t", b"2")]
        c.flush()
    assert c.fake.published() == [(codec.PUB, [("t", b"0")]), (codec.PUBS, [("t", b"1"), ("t", b"2")])]
    c.close()


def test_max_batch_sends_one_pubs_in_order() -> None:
    c = sending(fake_client(max_batch=4, linger=60))
    with c._lock:
        for i in range(3):
            c.publish(f"t/{i % 2}", str(i))
        assert c.fake.sent == []
        c.publish("t/3", b"3")  # the 4th: sent in the caller's thread
        assert c._pending == []
    [frame] = c.fake.sent
    assert frame.type == codec.PUBS
    assert frame.header["items"] == [["t/0", 0, None], ["t/1", 0, None], ["t/0", 0, None], ["t/3", 0, None]]
    assert c.fake.published() == [(codec.PUBS, [("t/0", b"0"), ("t/1", b"1"), ("t/0", b"2"), ("t/3", b"3")])]
    assert c.fake.threads == [threading.current_thread().name]


def test_linger_sends_on_the_next_publish() -> None:
    c = sending(fake_client(max_batch=1000, linger=0.02))
    with c._lock:  # the flusher cannot send while we hold the lock
        c.publish("t", b"a")
        time.sleep(0.03)
        assert c.fake.sent == []
        c.publish("t", b"b")  # the oldest is now older than linger
        assert c._pending == []
    assert c.fake.published() == [(codec.PUBS, [("t", b"a"), ("t", b"b")])]


def test_max_batch_1_sends_every_publish_at_once_without_a_thread() -> None:
    c = fake_client(max_batch=1)
    for i in range(3):
        c.publish("t", str(i))
    assert c.fake.published() == [(codec.PUB, [("t", str(i).encode())]) for i in range(3)]
    assert c._flusher is None


def test_frames_respect_the_nodes_max_payload() -> None:
    c = sending(fake_client(max_payload=100, max_batch=1000, linger=60))
    sizes = [40, 40, 40, 150, 10, 10]
    with c._lock:
        for i, size in enumerate(sizes):
            c.publish(f"t/{i}", bytes([i]) * size)
        c.flush()
    frames = c.fake.published()
    assert [(kind, [int(t[2:]) for t, _ in msgs]) for kind, msgs in frames] == [
        (codec.PUBS, [0, 1]),
        (codec.PUB, [2]),
        (codec.PUB, [3]),  # larger than max_payload: alone (the node will refuse it, as before)
        (codec.PUBS, [4, 5]),
    ]
    assert [p for _, msgs in frames for _, p in msgs] == [bytes([i]) * s for i, s in enumerate(sizes)]
    assert all(len(f.payload) <= 100 for f in c.fake.sent if f.type == codec.PUBS)


def test_publish_many_shares_the_frame_builder() -> None:
    c = fake_client(max_payload=100)
    assert c.publish_many([("a", b"x" * 60), ("b", b"y" * 60), ("c", b"z" * 30)], qos=1) == 3
    kinds = [(f.type, f.header.get("id"), f.header.get("items")) for f in c.fake.sent]
    assert kinds[0][0] == codec.PUB and kinds[0][1] is not None  # one message: a PUB carrying its id
    assert kinds[1][0] == codec.PUBS and [it[:2] for it in kinds[1][2]] == [["b", 1], ["c", 1]]
    assert c.publish_many([("a", b"x" * 30)] * 3) == 3
    assert c.fake.published()[-1] == (codec.PUBS, [("a", b"x" * 30)] * 3)


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.tuples(st.sampled_from(["a", "b/c", "d"]), st.binary(max_size=40)), min_size=2, max_size=40),
    max_payload=st.integers(40, 300),
)
def test_consecutive_qos0_publishes_to_one_topic_go_as_runs(messages: list[tuple[str, bytes]], max_payload: int):
    c = sending(fake_client(max_payload=max_payload, max_batch=1000, linger=60))
    try:
        with c._lock:
            for topic, payload in messages:
                c.publish(topic, payload)
            c.flush()
        assert [m for _, msgs in c.fake.published() for m in msgs] == messages  # the reference: every message
        for frame in c.fake.sent:
            if frame.type == codec.PUBS:
                topics = [item[0] for item, _ in codec.split_batch(frame)]
                groups = [t for i, t in enumerate(topics) if i == 0 or topics[i - 1] != t]
                assert [item[0] for item in frame.header["items"]] == groups  # one item per run of one topic
                assert ("counts" in frame.header) == (len(groups) < len(topics))
                assert len(frame.payload) <= max_payload
    finally:
        c.close()


def test_qos1_messages_never_share_an_item() -> None:
    c = fake_client()
    assert c.publish_many([("a", b"1"), ("a", b"2"), ("a", b"3")], qos=1) == 3
    [frame] = c.fake.sent
    assert frame.type == codec.PUBS and "counts" not in frame.header and len(frame.header["items"]) == 3


def test_valid_topics_are_remembered_within_a_bound_and_invalid_ones_always_refused() -> None:
    c = fake_client(max_batch=1000, linger=60)
    try:
        with c._lock:
            for _ in range(2):
                with pytest.raises(ShardMQError) as e:
                    c.publish("a/#", b"x")
                assert e.value.code == "invalid_topic"
            for i in range(VALID_TOPICS_MEMO + 10):
                c.publish(f"t/{i}", b"x")
            assert 0 < len(c._valid_topics) <= VALID_TOPICS_MEMO
            assert "a/#" not in c._valid_topics
            with pytest.raises(ShardMQError):
                c.publish_many([("ok", b"x"), ("bad/+", b"y")])
    finally:
        c.close()


def test_a_msgs_run_is_received_as_its_messages_in_order() -> None:
    c = fake_client()
    runs = [
        (["a", 0, None, False], [1, 2, 3], b"xyyzzz"),
        (["b", 1, 9, True], None, b"q"),
        (["a", 0, None, False], None, b"w"),
    ]
    c.fake.replies.append(codec.encode_runs(codec.MSGS, {}, runs))
    got = [c.receive(timeout=1) for _ in range(5)]
    assert [(m.topic, m.payload, m.qos, m.dup) for m in got if m is not None] == [
        ("a", b"x", 0, False), ("a", b"yy", 0, False), ("a", b"zzz", 0, False),
        ("b", b"q", 1, True), ("a", b"w", 0, False),
    ]  # fmt: skip
    c.close()


CALLS: dict[str, tuple[Callable[[Client], object], bytes | None]] = {
    "publish_qos1": (lambda c: c.publish("t/q", b"1", qos=1), codec.PUB),
    "publish_many": (lambda c: c.publish_many([("t/m", b"m"), ("t/n", b"n")]), codec.PUBS),
    "subscribe": (lambda c: c.subscribe("t/#"), codec.SUB),
    "subscribe_many": (lambda c: c.subscribe_many(["t/+", "u/+"]), codec.SUB),
    "unsubscribe": (lambda c: c.unsubscribe("t/#"), codec.UNSUB),
    "receive": (lambda c: c.receive(timeout=0), None),
    "status": (lambda c: c.status(), codec.STATUS),
    "leave": (lambda c: c.leave(), codec.LEAVE),
    "flush": (lambda c: c.flush(), codec.PING),  # the barrier: the node has read them once it answers
    "connect": (lambda c: c.connect(), codec.HELLO),
    "close": (lambda c: c.close(), codec.PING),  # then BYE
}


@pytest.mark.parametrize("name", list(CALLS))
def test_every_other_call_sends_pending_publishes_first(name: str) -> None:
    call, frame_type = CALLS[name]
    c = sending(fake_client(max_batch=1000, linger=60))
    with c._lock:
        c.publish("t/a", b"0")
        c.publish("t/a", b"1")
        assert c.fake.sent == []
        call(c)
    assert c._pending == []
    first = c.fake.sent[0]
    assert first.type == codec.PUBS and [p for _, p in codec.split_batch(first)] == [b"0", b"1"]
    assert [f.type for f in c.fake.sent[1:2]] == ([frame_type] if frame_type else [])


def test_flusher_thread_sends_what_gathered_when_the_caller_is_idle() -> None:
    c = sending(fake_client(linger=0.05))  # a publish just went: this one gathers, only the flusher can send it
    c.publish("t", b"gathered")
    thread = c._flusher.thread
    assert thread.daemon and thread.name.startswith("shardmq-flusher")
    time.sleep(0.01)  # the application is idle: no call
    assert c.fake.sent == []  # not before ``linger`` after the last send
    wait_for(lambda: c.fake.sent)
    assert c.fake.published() == [(codec.PUB, [("t", b"gathered")])]
    assert c.fake.threads == [thread.name]
    c.close()
    assert not thread.is_alive() and c._flusher is None


def test_flusher_is_woken_only_when_the_pending_list_becomes_non_empty() -> None:
    c = sending(fake_client(max_batch=1000, linger=60))
    sets = 0
    with c._lock:
        c.publish("t", b"0")  # starts the flusher and wakes it
        wake = c._flusher.wake
        real_set = wake.set

        def counting_set() -> None:
            nonlocal sets
            sets += 1
            real_set()

        wake.set = counting_set  # type: ignore[method-assign]
        c.publish("t", b"1")
        c.publish("t", b"2")
        assert sets == 0
        c.flush()
        c.publish("t", b"3")
        assert sets == 1
    c.close()


def test_unclosed_client_is_garbage_collected_and_its_flusher_ends() -> None:
    c = sending(fake_client(linger=0.01))
    c.publish("t", b"x")
    thread, fake = c._flusher.thread, c.fake
    wait_for(lambda: fake.sent)
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None  # the thread's weakref did not keep it alive
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_background_flush_error_is_raised_by_the_next_call() -> None:
    c = sending(fake_client(linger=0.01))
    c.fake.fail_next_send = True
    c.publish("t", b"lost")
    wait_for(lambda: c.errors)
    with pytest.raises(ShardMQError) as e:
        c.publish("t", b"next")
    assert e.value.code == "unavailable" and "ZMQError" in e.value.reason
    c.close()


def test_constructor_checks_batching_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Client("tcp://x", connect=False, max_batch=0)
    with pytest.raises(ValueError, match="linger"):
        Client("tcp://x", connect=False, linger=-1)


def test_green_client_does_not_batch_nor_start_threads() -> None:
    c = fake_client(GreenClient)
    assert c.max_batch == 1
    c.publish("t", b"0")
    c.publish("t", b"1")
    assert c.fake.published() == [(codec.PUB, [("t", b"0")]), (codec.PUB, [("t", b"1")])]
    assert c._flusher is None
    with pytest.raises(ValueError, match="publish_many"):
        GreenClient("tcp://x", connect=False, max_batch=8)


# ---------------------------------------------------------------------------------------------- real cluster


def unique() -> str:
    return uuid.uuid4().hex[:8]


def collect(client: Client, n: int, timeout: float = 30.0, quiet: float = 1.0) -> list[Message]:
    """Up to ``n`` messages, stopping ``quiet`` seconds after the last one (or at ``timeout``)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline and (msg := client.receive(timeout=quiet)) is not None:
        got.append(msg)
    return got


@pytest.mark.timeout(60)
def test_lone_publish_leaves_at_once_and_the_next_then_sleep_by_the_flusher(connect, endpoints) -> None:
    topic = f"{unique()}/lone"
    sub = connect(1)
    sub.subscribe(topic)
    pub = Client(endpoints, client_id=f"lone-{unique()}", linger=0.2)
    try:
        pub.publish(topic, b"lone")
        assert pub._pending == []  # sent by publish itself
        pub.publish(topic, b"next")  # within linger of that publish: gathers
        time.sleep(0.5)  # no other call on pub: only its flusher thread can have sent it
        assert pub._pending == [] and pub._flusher is not None
        got = collect(sub, 2, quiet=5.0)
        assert [(m.topic, m.payload, m.qos) for m in got] == [(topic, b"lone", 0), (topic, b"next", 0)]
    finally:
        pub.close()


@pytest.mark.timeout(60)
def test_tight_loop_arrives_in_order_in_fewer_frames(connect) -> None:
    n = 2000
    topic = f"{unique()}/burst"
    sub = connect(1)
    sub.subscribe(topic)
    got: list[Message] = []
    reader = threading.Thread(target=lambda: got.extend(collect(sub, n)))  # sub is used by this thread only
    pub, probe = connect(0), connect(0)
    assert pub.node == probe.node != sub.node
    before = probe.status()["metrics"]
    reader.start()
    for i in range(n):
        pub.publish(topic, str(i))
    pub.flush()
    reader.join(timeout=40)
    after = probe.status()["metrics"]
    assert [m.payload for m in got] == [str(i).encode() for i in range(n)]
    publishes = after["publishes.in"] - before.get("publishes.in", 0)
    frames = after["frames_in.client"] - before.get("frames_in.client", 0)
    assert publishes >= n
    assert frames < n // 2, f"{frames} client frames for {n} publishes"


@pytest.mark.timeout(60)
def test_qos0_and_qos1_on_one_topic_keep_their_order(connect) -> None:
    topic = f"{unique()}/mixed"
    sub = connect(2)
    sub.subscribe(topic, qos=1)
    pub = connect(0)
    qos = [1 if i % 5 == 4 else 0 for i in range(300)]
    for i, q in enumerate(qos):
        pub.publish(topic, str(i), qos=q)
    pub.flush()
    got = collect(sub, len(qos))
    assert [(m.payload, m.qos) for m in got] == [(str(i).encode(), q) for i, q in enumerate(qos)]


@pytest.mark.timeout(60)
def test_close_delivers_what_was_pending(connect, endpoints) -> None:
    topic = f"{unique()}/close"
    sub = connect(1)
    sub.subscribe(topic)
    pub = sending(Client(endpoints, client_id=f"close-{unique()}", max_batch=10_000, linger=60))
    with pub._lock:  # keeps the flusher out: only close() can send them
        for i in range(50):
            pub.publish(topic, str(i))
        assert len(pub._pending) == 50
        pub.close()
    assert [m.payload for m in collect(sub, 50)] == [str(i).encode() for i in range(50)]
