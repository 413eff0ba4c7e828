"""The asyncio flavour (``AsyncClient``) and the sans-I/O core every flavour shares.

The core tests drive ``ClientCore`` steps with a simulated node and a simulated clock (``Sim``): no sockets, no
waiting, a silent node costs no real time. The AsyncClient tests use real node processes on 127.0.0.1: the
session's 3-node cluster (``endpoints``), and a cluster of this module's own for the test that kills a node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.client import Client, Message, ShardMQError
from shardmq.client.aio import AsyncClient
from shardmq.client.core import (
    BULK_CHUNK,
    CLOSE,
    DACK_BATCH,
    NOW,
    OVERLOAD_BACKOFF,
    OVERLOAD_BACKOFF_MAX,
    PENDING_FIRST,
    PENDING_FLUSH,
    PENDING_LONE,
    YIELDED,
    Backoff,
    ClientCore,
    Open,
    Recv,
    Send,
    Steps,
)
from shardmq.router import codec
from shardmq.shard.security import client_server_secret, load_cluster_key
from shardmq.testing import LocalCluster, pid_runs
from shardmq.testing.cluster import CLUSTER_KEYS_ENV

# ---------------------------------------------------------------------------------------------- core: simulated


class Sim:
    """Drives core steps against simulated nodes: ``live`` endpoints answer like a node, the others never do; a
    Recv with nothing to read advances the simulated clock by its whole timeout."""

    def __init__(self, core: ClientCore, live: set[str], max_payload: int = codec.DEFAULT_MAX_PAYLOAD) -> None:
        self.core = core
        self.live = live
        self.max_payload = max_payload
        self.now = 100.0
        self.endpoint: str | None = None
        self.sessions: dict[str, set[str]] = {}  # endpoint -> clients it has a session for
        self.sent: list[tuple[str | None, codec.Frame]] = []
        self.replies: deque[list[bytes]] = deque()
        self.refusals: deque[str] = deque()  # codes the next QoS 1 PUBs are refused with, one each

    def run(self, steps: Steps[Any]) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                effect = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value
            value = error = None
            if effect is NOW:
                value = self.now
            elif isinstance(effect, Open):
                self.endpoint = effect.endpoint
                self.replies.clear()
                self.core.socket_opened()
                if effect.endpoint in self.live:  # what the shells learn from the socket's monitor
                    self.core.handshake_succeeded()
            elif effect is CLOSE:
                self.endpoint = None
                self.core.socket_closed()
            elif isinstance(effect, Send):
                self._answer(codec.decode(effect.parts, max_payload=1 << 62))
            elif isinstance(effect, Recv):
                if self.replies:
                    value = self.core.decode(self.replies.popleft(), self.now)
                else:
                    self.now += effect.timeout
            else:
                raise AssertionError(f"unknown effect {effect!r}")

    def _answer(self, frame: codec.Frame) -> None:
        self.sent.append((self.endpoint, frame))
        if self.endpoint not in self.live:
            return
        h, rid = frame.header, frame.header.get("id")
        node = self.endpoint.rsplit("/", 1)[-1] if self.endpoint else "?"
        if frame.type == codec.HELLO:
            present = h["client"] in self.sessions.setdefault(self.endpoint, set())
            self.sessions[self.endpoint].add(h["client"])
            reply = {"id": rid, "node": node, "session_present": present, "max_payload": self.max_payload}
            self.replies.append(codec.encode(codec.WELCOME, reply))
        elif frame.type == codec.SUB:
            self.replies.append(codec.encode(codec.SUBACK, {"id": rid, "results": [h["qos"]] * len(h["filters"])}))
        elif frame.type == codec.PING:
            self.replies.append(codec.encode(codec.PONG, {"id": rid}))
        elif frame.type == codec.PUB and h["qos"] == 1 and self.refusals:
            self.replies.append(codec.error_parts(self.refusals.popleft(), "refused", rid))
        elif frame.type == codec.PUB and h["qos"] == 1:
            self.replies.append(codec.encode(codec.PUBACK, {"ids": [rid]}))

    def types(self, endpoint: str) -> list[bytes]:
        return [f.type for ep, f in self.sent if ep == endpoint]


def make_core(endpoints: list[str], timeout: float = 2.0, **kwargs: Any) -> ClientCore:
    return ClientCore(endpoints, kwargs.pop("client_id", "c1"), timeout, kwargs.pop("max_batch", 128), 0.0005)


def test_core_connects_past_a_silent_node_in_simulated_time() -> None:
    core = make_core(["tcp://dead/n0", "tcp://live/n1"])
    sim = Sim(core, live={"tcp://live/n1"})
    sim.run(core.connect())
    assert (core.node, core.endpoint, core.connected) == ("n1", "tcp://live/n1", True)
    assert sim.now == 102.0  # one whole timeout on the silent node, and not a real second
    assert sim.types("tcp://dead/n0") == [codec.HELLO]


def test_core_fails_over_resubscribes_reports_the_gap_and_resends() -> None:
    core = make_core(["tcp://a/n1", "tcp://b/n2", "tcp://c/n3"])
    sim = Sim(core, live={"tcp://a/n1", "tcp://b/n2", "tcp://c/n3"})
    sim.run(core.connect())
    sim.run(core.subscribe_many(["x/#"], 1, BULK_CHUNK, None))
    sim.live.discard("tcp://a/n1")  # the node dies: it reads nothing and answers nothing
    sim.run(core.publish_acked("x/y", b"m"))  # silent: fail over, subscribe again, send it again
    assert core.node == "n2" and core.failovers == 1 and core.interruptions == 1
    types = sim.types("tcp://b/n2")
    assert types == [codec.HELLO, codec.SUB, codec.PUB]
    [sub] = [f for ep, f in sim.sent if ep == "tcp://b/n2" and f.type == codec.SUB]
    assert sub.header["filters"] == ["x/#"] and sub.header["qos"] == 1
    with pytest.raises(ShardMQError) as err:
        core.take_message()
    assert err.value.code == codec.E_INTERRUPTED and "did not have this client's session" in err.value.reason


def test_core_resumes_a_session_only_on_the_node_that_holds_it() -> None:
    core = make_core(["tcp://a/n1"])
    sim = Sim(core, live={"tcp://a/n1"})
    sim.run(core.connect())
    sim.run(core.subscribe_many(["s/+"], 0, BULK_CHUNK, None))
    core.connection_broken()  # zmq re-made the connection: HELLO again; the node still has our session
    sim.run(core.prepare())
    assert core.interruptions == 0 and sim.types("tcp://a/n1")[-1] == codec.HELLO
    assert core.welcome({"node": "n9", "session_present": True}, "tcp://z/n9", sim.now) == [
        {"filters": ["s/+"], "qos": 0}
    ]  # another node's old session of ours may lack subscriptions: subscribe again
    assert core.interruptions == 1


def test_resubscribe_plan_groups_by_qos_and_chunks() -> None:
    core = make_core(["tcp://a/n1"])
    core.subscriptions = {f"f/{i}": i % 2 for i in range(2 * BULK_CHUNK + 3)}
    plan = core.resubscribe_plan()
    assert sorted((h["qos"], len(h["filters"])) for h in plan) == [(0, 2), (0, BULK_CHUNK), (1, 1), (1, BULK_CHUNK)]
    assert sorted(f for h in plan for f in h["filters"]) == sorted(core.subscriptions)
    assert all(core.subscriptions[f] == h["qos"] for h in plan for f in h["filters"])


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.sampled_from(["a", "b/c", "d/e/f"]), st.integers(0, 120)), max_size=60),
    max_payload=st.integers(1, 300),
    qos=st.sampled_from([0, 1]),
)
def test_publish_frames_never_exceed_max_payload_and_keep_order(
    sizes: list[tuple[str, int]], max_payload: int, qos: int
) -> None:
    core = make_core(["tcp://a/n1"])
    core.max_payload = max_payload
    messages = [(topic, bytes([i % 256]) * n) for i, (topic, n) in enumerate(sizes)]
    refs: list[int | None] = list(range(1, len(messages) + 1)) if qos else [None] * len(messages)
    got: list[tuple[str, bytes]] = []
    got_refs: list[int | None] = []
    for parts in core.publish_frames(messages, qos, refs):
        frame = codec.decode(parts, max_payload=1 << 62)
        if frame.type == codec.PUB:
            got.append((frame.header["topic"], frame.payload))
            got_refs.append(frame.header.get("id"))
        else:
            assert frame.type == codec.PUBS
            assert len(frame.payload) <= max_payload  # a message larger than the limit only ever goes alone
            for item, payload in codec.split_batch(frame):
                got.append((item[0], payload))
                got_refs.append(item[2])
    assert got == messages
    assert got_refs == refs


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([codec.SUBACK, codec.PUBACK, codec.PONG, codec.ERROR, codec.WELCOME]),
    rid=st.integers(1, 20),
    other=st.integers(1, 20),
    batch=st.booleans(),
)
def test_replies_match_only_their_request(kind: bytes, rid: int, other: int, batch: bool) -> None:
    # Frames as the codec hands them over (the shapes it checks are not what this test is about).
    if kind == codec.ERROR:
        frame = codec.Frame(kind, {"code": codec.E_FENCED, "reason": "no", "ref": other})
    elif batch:
        frame = codec.Frame(kind, {"ids": [other, other + 1]})
    else:
        frame = codec.Frame(kind, {"id": other})
    answers = other == rid or (batch and kind != codec.ERROR and other + 1 == rid)
    if kind == codec.ERROR and answers:
        with pytest.raises(ShardMQError) as err:
            ClientCore.match_reply(frame, rid, codec.SUBACK)
        assert err.value.code == codec.E_FENCED
    elif kind == codec.SUBACK and answers:
        assert ClientCore.match_reply(frame, rid, codec.SUBACK) is frame.header
    else:
        assert ClientCore.match_reply(frame, rid, codec.SUBACK) is None


def test_dacks_are_sent_when_the_inbox_empties_or_a_batch_is_due() -> None:
    core = make_core(["tcp://a/n1"])
    core.connected = True
    n = DACK_BATCH + 10
    for mid in range(n):
        core.handle_unsolicited(codec.decode(codec.encode(codec.MSG, {"topic": "t", "qos": 1, "mid": mid}, b"x")))
    acked: list[list[int]] = []
    for _ in range(n):
        message, dack = core.take_message()
        assert message is not None and message.qos == 1
        if dack is not None:
            acked.append(codec.decode(dack).header["mids"])
    assert [len(a) for a in acked] == [DACK_BATCH, 10]
    assert [m for a in acked for m in a] == list(range(n))
    assert core.take_message() == (None, None)


def test_a_gap_is_raised_after_the_messages_before_it() -> None:
    core = make_core(["tcp://a/n1"])
    core.subscriptions["t"] = 0
    core.handle_unsolicited(codec.decode(codec.encode(codec.MSG, {"topic": "t", "qos": 0}, b"before")))
    core.handle_unsolicited(codec.decode(codec.encode(codec.SESSION_END, {"code": "shutdown", "reason": "bye"})))
    assert core.recovery == "failover" and core.interruptions == 1
    message, _ = core.take_message()
    assert message == Message("t", b"before", 0, False)
    with pytest.raises(ShardMQError) as err:
        core.take_message()
    assert err.value.code == codec.E_INTERRUPTED


def test_retain_flag_on_publish_frames() -> None:
    core = make_core(["tcp://live/n1"])
    sim = Sim(core, live={"tcp://live/n1"})
    sim.run(core.publish_acked("a/b", b"x", retain=True))
    sim.run(core.publish_acked("a/c", b"y"))
    core.add_pending("q/0", b"0", sim.now)
    sim.run(core.publish_retained("a/d", b"z"))
    pubs = [f for _, f in sim.sent if f.type in (codec.PUB, codec.PUBS)]
    assert [(f.header["topic"], f.header.get("retain")) for f in pubs] == [
        ("a/b", True), ("a/c", None), ("q/0", None), ("a/d", True)
    ]  # a retain publish never travels as a bare flag the node would ignore, and goes after what was pending
    assert pubs[-1].header["qos"] == 0 and pubs[-1].payload == b"z"
    core.max_payload = 1 << 20
    frames = [codec.decode(p) for p in core.publish_frames([("t", b"1"), ("t", b"2")], 0, [None, None], retain=True)]
    assert [f.type for f in frames] == [codec.PUBS]
    assert frames[0].header["items"] == [["t", 0, None, True], ["t", 0, None, True]]  # no run: each is stored
    [single] = [codec.decode(p) for p in core.publish_frames([("t", b"1")], 1, [7], retain=True)]
    assert single.type == codec.PUB and single.header == {"v": codec.PROTOCOL_VERSION, "topic": "t", "qos": 1,
                                                         "id": 7, "retain": True}  # fmt: skip


def test_retain_flag_on_received_messages() -> None:
    core = make_core(["tcp://a/n1"])
    core.connected = True
    core.handle_unsolicited(codec.decode(codec.encode(codec.MSG, {"topic": "r", "qos": 1, "mid": 1, "retain": True},
                                                      b"kept")))  # fmt: skip
    core.handle_unsolicited(codec.decode(codec.encode(codec.MSG, {"topic": "l", "qos": 0}, b"live")))
    runs = [(["r2", 0, None, False, True], None, b"a"), (["l2", 1, 2, False], None, b"b")]
    core.handle_unsolicited(codec.decode(codec.encode_runs(codec.MSGS, {}, runs)))
    got = [core.take_message()[0] for _ in range(4)]
    assert got == [
        Message("r", b"kept", 1, False, True), Message("l", b"live", 0, False, False),
        Message("r2", b"a", 0, False, True), Message("l2", b"b", 1, False, False),
    ]  # fmt: skip
    assert not core.errors


def test_a_new_session_forgets_the_message_ids_of_messages_still_in_the_inbox() -> None:
    """QoS 1 messages of the old session still unread when a node without our session welcomes us: they are still
    handed over (with their retain flag), but never acknowledged, since their ids meant the old session's."""
    core = make_core(["tcp://a/n1"])
    core.connected = True
    for mid, retain in ((1, True), (2, False)):
        header = {"topic": f"t{mid}", "qos": 1, "mid": mid, "retain": retain}
        core.handle_unsolicited(codec.decode(codec.encode(codec.MSG, header, b"x")))
    core.welcome({"node": "n2", "session_present": False}, "tcp://b/n2", 0.0)
    assert [entry[4] for entry in core.inbox] == [None, None]
    assert core.take_message() == (Message("t1", b"x", 1, False, True), None)
    assert core.take_message() == (Message("t2", b"x", 1, False, False), None)
    assert not core.dacks


def test_a_qos1_publish_refused_unavailable_overloaded_or_fenced_is_sent_again_after_a_pause() -> None:
    core = make_core(["tcp://a/n1"])
    sim = Sim(core, live={"tcp://a/n1"})
    sim.run(core.connect())
    started = sim.now
    sim.refusals.extend([codec.E_UNAVAILABLE, codec.E_OVERLOADED, codec.E_FENCED, codec.E_UNAVAILABLE])
    sim.run(core.publish_acked("a/b", b"x"))  # returns: the fifth try was acknowledged
    assert [f.type for _, f in sim.sent].count(codec.PUB) == 5
    assert sim.now - started >= OVERLOAD_BACKOFF * (1 + 2 + 4 + 8)  # the pauses, doubling


def test_a_qos1_publish_still_refused_at_its_timeout_raises_the_refusal() -> None:
    core = make_core(["tcp://a/n1"], timeout=0.5)
    sim = Sim(core, live={"tcp://a/n1"})
    sim.run(core.connect())
    sim.refusals.extend([codec.E_UNAVAILABLE] * 1000)
    with pytest.raises(ShardMQError) as err:
        sim.run(core.publish_acked("a/b", b"x"))
    assert err.value.code == codec.E_UNAVAILABLE and 1000 > len(sim.refusals) > 990
    sim.refusals.clear()
    sim.refusals.append(codec.E_INVALID_TOPIC)  # not a refusal that ends by itself: raised at once
    with pytest.raises(ShardMQError) as err:
        sim.run(core.publish_acked("a/b", b"y"))
    assert err.value.code == codec.E_INVALID_TOPIC and [f.type for _, f in sim.sent].count(codec.PUB) == 7


def test_backoff_doubles_up_to_its_cap_and_stops_at_the_deadline() -> None:
    backoff = Backoff(0.0, 1.0)
    pauses = []
    now = 0.0
    while (pause := backoff.next(now)) is not None:
        pauses.append(pause)
        now += pause
    assert pauses[0] == OVERLOAD_BACKOFF and max(pauses) == OVERLOAD_BACKOFF_MAX
    assert all(b == min(2 * a, OVERLOAD_BACKOFF_MAX) for a, b in zip(pauses, pauses[1:], strict=False))
    assert now <= 1.0 < now + min(2 * pauses[-1], OVERLOAD_BACKOFF_MAX)


def test_pending_publishes_flush_at_max_batch_and_on_linger() -> None:
    core = ClientCore(["tcp://a/n1"], "c1", 1.0, 3, 0.5)
    assert [core.add_pending("t", b"x", 0.0) for _ in range(3)] == [1, 0, 2]  # first, queued, flush (max_batch)
    frames, count = core.take_pending()
    assert count == 3 and len(frames) == 1 and core.pending == []
    assert core.add_pending("t", b"y", 10.0) == PENDING_LONE  # linger since the previous publish: at once
    frames, count = core.take_pending()
    core.pending_sent(count, 10.0)
    assert core.add_pending("t", b"y", 10.1) == PENDING_FIRST  # closer than linger to the previous one: gather
    assert core.add_pending("t", b"z", 10.6) == PENDING_FLUSH  # the oldest is older than linger


def test_a_yielded_receive_wait_returns_early() -> None:
    core = make_core(["tcp://a/n1"])
    core.connected = True
    steps = core.wait_for_message(None)
    assert next(steps) is NOW
    effect = steps.send(0.0)
    assert isinstance(effect, Recv) and effect.yieldable
    with pytest.raises(StopIteration):
        steps.send(YIELDED)


# ---------------------------------------------------------------------------------------------- AsyncClient


def unique() -> str:
    return uuid.uuid4().hex[:8]


def rotate(endpoints: list[str], index: int) -> list[str]:
    return endpoints[index:] + endpoints[:index]


async def collect(client: AsyncClient, n: int, timeout: float = 20.0, quiet: float = 2.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline and (msg := await client.receive(timeout=quiet)):
        got.append(msg)
    return got


class Ticker:
    """A task that ticks every ``period`` seconds and records the longest gap between ticks: the event loop was
    blocked for about that long at most."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.mark.timeout(60)
def test_qos0_and_qos1_messages_all_arrive(endpoints: list[str]) -> None:
    topic = f"aio/{unique()}"

    async def main() -> None:
        async with AsyncClient(rotate(endpoints, 1)) as sub, AsyncClient(rotate(endpoints, 0)) as pub:
            assert sub.node != pub.node
            await sub.subscribe(f"{topic}/#", qos=1)
            await sub.subscribe_many([f"{topic}/0"], qos=0)  # a second filter: still one copy (the highest qos)
            for i in range(200):
                await pub.publish(f"{topic}/0", f"q0-{i}")
            for i in range(100):
                await pub.publish(f"{topic}/1", f"q1-{i}", qos=1)
            assert await pub.publish_many([(f"{topic}/1", f"m-{i}") for i in range(50)], qos=1) == 50
            got = await collect(sub, 350)
            assert [m.payload for m in got if m.topic.endswith("/0")] == [f"q0-{i}".encode() for i in range(200)]
            assert [m.payload for m in got if m.topic.endswith("/1")] == [
                *(f"q1-{i}".encode() for i in range(100)),
                *(f"m-{i}".encode() for i in range(50)),
            ]
            assert {m.qos for m in got if m.topic.endswith("/1")} == {1}
            status = await sub.status()
            assert status["members"] == sorted(status["members"]) and sub.node in status["members"]
            await sub.unsubscribe(f"{topic}/#", f"{topic}/0")
            assert sub.subscriptions == {}

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_concurrent_tasks_share_one_client(endpoints: list[str]) -> None:
    """Publishing tasks and a receiving task on one AsyncClient: the lock serialises them, the receiver gives
    the socket up to the publishers, and every message arrives, in order per task."""
    topic = f"aio/{unique()}"
    tasks, each = 12, 30

    async def main() -> None:
        async with AsyncClient(rotate(endpoints, 2)) as c:
            await c.subscribe(f"{topic}/#", qos=1)
            got: list[Message] = []

            async def consumer() -> None:
                while len(got) < 2 * tasks * each and (msg := await c.receive(timeout=10.0)) is not None:
                    got.append(msg)

            async def producer(k: int) -> None:
                for i in range(each):
                    await c.publish(f"{topic}/{k}", f"{i}", qos=1)  # waits for its PUBACK
                    await c.publish(f"{topic}/{k}/zero", f"{i}")  # queued, sent by the flush task or the next call

            reader = asyncio.create_task(consumer())
            await asyncio.sleep(0.05)  # the consumer is now waiting in receive, holding the lock
            started = time.monotonic()
            await asyncio.gather(*(producer(k) for k in range(tasks)))
            publish_s = time.monotonic() - started
            await asyncio.wait_for(reader, 30)
        for k in range(tasks):
            assert [m.payload for m in got if m.topic == f"{topic}/{k}"] == [str(i).encode() for i in range(each)]
            zero = [m.payload for m in got if m.topic == f"{topic}/{k}/zero"]
            assert zero == [str(i).encode() for i in range(each)]
        assert publish_s < 20  # a consumer waiting in receive did not hold the publishers up for its timeouts

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_receive_timeout_returns_none(endpoints: list[str]) -> None:
    async def main() -> None:
        async with AsyncClient(endpoints) as c:
            await c.subscribe(f"aio/{unique()}")
            with Ticker() as ticker:
                started = time.monotonic()
                assert await c.receive(timeout=0.3) is None
                waited = time.monotonic() - started
            assert 0.25 <= waited < 2.0
            assert ticker.ticks >= 20  # the loop ran the ticker while receive waited

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_node_that_does_not_answer_never_blocks_the_loop() -> None:
    """Two endpoints that accept connections and never answer (zmq ROUTERs that read nothing): the client waits
    ``timeout`` on each, then raises ``unavailable``; meanwhile the loop keeps ticking."""
    ctx = zmq.Context.instance()
    silent = [ctx.socket(zmq.ROUTER) for _ in range(2)]
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in silent]

    async def main() -> float:
        c = AsyncClient([f"tcp://127.0.0.1:{p}" for p in ports], timeout=0.5, credentials=False)  # plain ROUTERs
        with Ticker() as ticker:
            started = time.monotonic()
            with pytest.raises(ShardMQError) as err:
                await c.subscribe("t/#", qos=1)
            assert err.value.code == codec.E_UNAVAILABLE
            assert 0.9 <= time.monotonic() - started < 3.0
        await c.close()
        assert ticker.ticks >= 20
        return ticker.max_gap

    try:
        max_gap = asyncio.run(main())
    finally:
        for s in silent:
            s.close(linger=0)
    # A blocking wait would stall the loop for a whole timeout (500 ms); the margin is for a busy machine.
    assert max_gap < 0.15, f"the event loop stalled for {max_gap * 1000:.0f} ms"


@pytest.mark.timeout(30)
def test_a_cancelled_call_leaves_the_client_usable(endpoints: list[str]) -> None:
    """Cancelled while it waits for a silent node's WELCOME, the client does not keep that half-made connection:
    the next call connects to the next endpoint."""
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    # A CURVE server under the suite's client key (no ZAP handler in this process: it admits any client key), so
    # the client's handshake succeeds and it waits for a WELCOME that never comes.
    silent.curve_server = True
    cluster_key = load_cluster_key(os.path.join(os.environ[CLUSTER_KEYS_ENV], "cluster.key"))
    silent.curve_secretkey = client_server_secret(cluster_key)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    topic = f"aio/{unique()}/cancel"

    async def main() -> None:
        c = AsyncClient([f"tcp://127.0.0.1:{port}", endpoints[0]], timeout=2.0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await c.subscribe(topic, qos=1)
        await c.subscribe(topic, qos=1)
        assert c.endpoint == endpoints[0]
        await c.publish(topic, b"after", qos=1)
        msg = await c.receive(timeout=5.0)
        assert msg is not None and msg.payload == b"after"
        await c.close()

    try:
        asyncio.run(main())
    finally:
        silent.close(linger=0)


@pytest.mark.timeout(60)
def test_lone_publish_leaves_without_another_call(endpoints: list[str]) -> None:
    topic = f"aio/{unique()}/lone"

    async def main() -> None:
        async with AsyncClient(rotate(endpoints, 1)) as sub, AsyncClient(endpoints, linger=60) as pub:
            await sub.subscribe(topic)
            await pub.publish(topic, b"lone")
            assert pub._pending == [(topic, b"lone")]  # queued: the flush task runs on the loop's next turn
            await asyncio.sleep(0.2)  # no call on pub
            assert pub._pending == []
            msg = await sub.receive(timeout=5.0)
            assert msg is not None and (msg.topic, msg.payload) == (topic, b"lone")

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_close_flushes_what_is_pending(endpoints: list[str]) -> None:
    topic = f"aio/{unique()}/close"

    async def main() -> None:
        async with AsyncClient(rotate(endpoints, 1)) as sub:
            await sub.subscribe(topic)
            pub = AsyncClient(endpoints, max_batch=10_000, linger=60)
            await pub.connect()
            for i in range(50):
                await pub.publish(topic, str(i))
            assert len(pub._pending) == 50
            await pub.close()  # no await in between: only close can have sent them
            assert pub.sock is None
            assert [m.payload for m in await collect(sub, 50)] == [str(i).encode() for i in range(50)]

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_errors_and_validation(endpoints: list[str]) -> None:
    async def main() -> None:
        async with AsyncClient(endpoints) as c:
            with pytest.raises(ShardMQError) as err:
                await c.publish("a/#", b"x")
            assert err.value.code == codec.E_INVALID_TOPIC
            with pytest.raises(ShardMQError) as err:
                await c.subscribe("a/#/b")
            assert err.value.code == codec.E_INVALID_FILTER
            with pytest.raises(ShardMQError) as err:
                await c.publish("a", b"x", qos=2)
            assert err.value.code == codec.E_INVALID_QOS
            await c.flush()  # nothing published: no round trip, no error
        with pytest.raises(ValueError, match="max_batch"):
            AsyncClient(endpoints, max_batch=0)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- failover


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster this module may kill nodes of (the session's cluster is shared by other tests)."""
    lc = LocalCluster(tmp_path_factory.mktemp("aio"), nodes=3, lease_ttl=2, log_level="warning")
    lc.up(timeout=60)
    try:
        yield lc
    finally:
        lc.down()


@pytest.mark.timeout(120)
def test_failover_after_kill_delivers_every_acknowledged_qos1_message(own_cluster: LocalCluster) -> None:
    """The node the publishing AsyncClient is connected to is killed (SIGKILL) mid-stream: the client fails over
    and every publish it saw acknowledged reaches the subscriber (at least once)."""
    assert own_cluster.state is not None
    nodes = {p.name: p for p in own_cluster.state.nodes}
    victim = nodes["n1"]
    topic = f"aio/{unique()}/kill"
    n, kill_at = 120, 40

    async def main() -> tuple[set[int], list[ShardMQError], set[int], AsyncClient]:
        sub = AsyncClient([nodes["n2"].client_endpoint, nodes["n3"].client_endpoint])
        pub = AsyncClient(
            [victim.client_endpoint, nodes["n2"].client_endpoint, nodes["n3"].client_endpoint], timeout=2.0
        )
        async with sub, pub:
            assert pub.node == "n1" and sub.node == "n2"
            await sub.subscribe(topic, qos=1)
            acked: set[int] = set()
            refused: list[ShardMQError] = []
            received: set[int] = set()

            async def consume() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not (done.is_set() and acked <= received):
                    msg = await sub.receive(timeout=0.5)
                    if msg is not None:
                        received.add(int(msg.payload))

            done = asyncio.Event()
            reader = asyncio.create_task(consume())
            ticker = Ticker().__enter__()
            for i in range(n):
                if i == kill_at:
                    os.kill(victim.pid, signal.SIGKILL)
                try:
                    await pub.publish(topic, str(i), qos=1)
                    acked.add(i)
                except ShardMQError as exc:  # not acknowledged: may or may not arrive
                    refused.append(exc)
            done.set()
            await reader
            ticker.__exit__()
            print(
                f"failovers {pub.failovers}, refused {len(refused)}, loop's longest gap {ticker.max_gap * 1000:.0f} ms"
            )
            assert pub.node != "n1" and pub.failovers >= 1
            assert ticker.max_gap < 0.5  # failing over is waiting on sockets, never blocking the loop
            return acked, refused, received, pub

    acked, refused, received, _ = asyncio.run(main())
    assert not pid_runs(victim)
    assert set(range(kill_at)) <= acked
    assert len(acked) >= n - 10, f"too many publishes refused after the failover: {refused}"
    assert acked <= received, f"acknowledged but never delivered: {sorted(acked - received)}"


# ---------------------------------------------------------------------------------------------- one core


def test_every_flavour_drives_the_same_core() -> None:
    from shardmq.client.green import GreenClient

    for cls in (Client, GreenClient):
        client = cls("tcp://127.0.0.1:1", connect=False)
        assert type(client._core) is ClientCore
    assert type(AsyncClient("tcp://127.0.0.1:1")._core) is ClientCore


@pytest.mark.timeout(60)
def test_the_sdk_docs_asyncio_example_runs(endpoints: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "SDK.md").read_text()
    section = doc.split("## asyncio (`AsyncClient`)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "sdk_example"}  # not __main__: the session's cluster, not its own
    exec(compile(code, "docs/SDK.md", "exec"), namespace)
    asyncio.run(namespace["main"](endpoints))
    printed = capsys.readouterr().out
    assert printed.strip() == str(sorted([b"qos 0", *(b"order %d" % n for n in range(10))]))


def test_the_core_imports_no_io() -> None:
    """The core's rule, checked: nothing that could read a clock, touch a socket or start a thread."""
    import ast

    import shardmq.client.core as core_module

    tree = ast.parse(Path(core_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"zmq", "time", "threading", "asyncio", "socket", "select", "gevent", "selectors"}


def test_core_tells_a_refused_handshake_from_a_cut_connection() -> None:
    """Only the node's ZAP answer refuses at once; a failure that may be a connection cut half-way (NO_DETAIL)
    refuses only when it repeats before any handshake succeeded on the socket; after a success every
    non-AUTH failure is a broken connection zmq re-makes."""
    core = make_core(["tcp://a/n1"])
    core.socket_opened()
    assert core.handshake_failed("tcp://a/n1", "HANDSHAKE_FAILED_NO_DETAIL") is None
    core.connection_broken()  # the disconnect after it: nothing went over this socket, no HELLO to say again
    assert core.recovery is None
    refused = core.handshake_failed("tcp://a/n1", "HANDSHAKE_FAILED_NO_DETAIL")
    assert refused is not None and refused.code == codec.E_NOT_AUTHORIZED and "requires credentials" in refused.reason
    core.socket_opened()
    assert core.handshake_failed("tcp://a/n1", "HANDSHAKE_FAILED_PROTOCOL") is not None  # a mechanism mismatch
    core.socket_opened()
    core.handshake_succeeded()
    for event in ("HANDSHAKE_FAILED_NO_DETAIL", "HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL"):
        assert core.handshake_failed("tcp://a/n1", event) is None  # a relay cut, a node restarting
    core.connection_broken()
    assert core.recovery == "hello"
    assert core.handshake_failed("tcp://a/n1", "HANDSHAKE_FAILED_AUTH") is not None  # revoked meanwhile
