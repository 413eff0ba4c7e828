"""QoS 0 publishes the entry node fails are reported to their publisher, and its PONG waits for them.

The rules are ``protocol/entry.py``'s ("QoS 0 publishes this node fails", "The barrier"): failures are counted
per client and reported as one ERROR with ``count`` per code (never one frame per message), and a client's PING is
answered once every publish it sent before left the entry node's queues, after that report; other clients'
publishes never hold it.

- Core level: real ``NodeCore``s in the in-memory cluster (``testing.simulation``). The owners of a topic's shard
  are paused, so its lookups go unanswered and fail after ``lookup_timeout`` at each owner; or the node has no
  assignment yet, so publishes fail at once. A property test runs publishes, PINGs, pauses, time and frame
  delivery in any order and checks the barrier and the counts against what a subscriber got.
- SDK: the client over a fake socket (``tests/test_client_batching.FakePoller``): the report is counted in
  ``publish_failed`` and raised by ``flush()`` and ``close()`` with its count.
- Real cluster: the owners of a topic's shard stopped with SIGSTOP (for less than their lease TTL): the
  publisher's ``flush()`` raises ``unavailable`` with the number of its publishes, while another client of the same
  node publishes, flushes and is delivered to. The stopped nodes get SIGCONT in a finally block; the fixture stops
  every process by pid.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardmq.client import Client, ShardMQError
from shardmq.ring import Assignment, shard_for_key
from shardmq.router import codec
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster
from shardmq.testing.simulation import Sim, SimConfig
from tests.test_client_batching import FakePoller

SHARDS = 16
ENTRY = "n0"
A, B, C = b"pub-a", b"pub-b", b"pub-c"
SUBSCRIBER = b"sub"


# ---------------------------------------------------------------------------------------------- core level
def cluster(nodes: int = 3) -> Sim:
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2, snapshot_chunk=2))
    for _ in range(nodes):
        sim.join()
    assert sim.settle()
    return sim


def owners(sim: Sim, topic: str) -> tuple[str, ...]:
    """The owners of a one-level topic's shard (its only lookup)."""
    a = sim.etcd.doc
    assert a is not None
    return a.owners(shard_for_key(topic, SHARDS))


def blocked_topic(sim: Sim, prefix: str = "t") -> str:
    """A one-level topic the entry node does not own: publishes to it wait for a LOOKUP to another node."""
    return next(t for t in (f"{prefix}{i}" for i in range(1000)) if ENTRY not in owners(sim, t))


def local_topic(sim: Sim) -> str:
    """A one-level topic whose primary is the entry node: publishes to it are routed at once."""
    return next(t for t in (f"l{i}" for i in range(1000)) if owners(sim, t)[0] == ENTRY)


def mixed_topics(sim: Sim) -> list[str]:
    """Six topics: one the entry node resolves itself, one-level ones whose primary is n1 and n2 (the entry node
    is their replica or not), and two-level ones (two shards each, one of them the first level's)."""
    primary_of = {f"t{i}": owners(sim, f"t{i}") for i in range(1000)}
    picked = [next(t for t, o in primary_of.items() if o[0] == "n1" and ENTRY not in o),
              next(t for t, o in primary_of.items() if o[0] == "n2" and ENTRY in o),
              next(t for t, o in primary_of.items() if o[0] == "n2" and ENTRY not in o)]  # fmt: skip
    return [local_topic(sim), *picked, "a/x", "b/y"]


def publish(sim: Sim, rid: bytes, topic: str, payloads: list[bytes]) -> None:
    """QoS 0 publishes in one frame, as the SDK sends them: a PUB for one, else a PUBS of one run."""
    if len(payloads) == 1:
        sim.client_send(rid, ENTRY, codec.PUB, {"topic": topic, "qos": 0}, payloads[0])
        return
    runs = [([topic, 0, None], [len(p) for p in payloads], b"".join(payloads))]
    frame = codec.decode(codec.encode_runs(codec.PUBS, {}, runs))
    sim.client_send(rid, ENTRY, codec.PUBS, frame.header, frame.payload)


def ping(sim: Sim, rid: bytes, ping_id: int) -> None:
    sim.client_send(rid, ENTRY, codec.PING, {"id": ping_id})


def heard(sim: Sim, rid: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """What the client heard, in order (the frames a publisher gets: ERROR and PONG)."""
    client = sim.session_clients.get(rid)
    return [] if client is None else [(f.type, f.header) for f in client.frames]


def reports_and_pongs(sim: Sim, rid: bytes) -> list[tuple[bytes, Any]]:
    """The client's ERRORs as (ERROR, count) and PONGs as (PONG, id), in order."""
    return [(t, h["count"] if t == codec.ERROR else h["id"]) for t, h in heard(sim, rid)]


def kinds(sim: Sim, rid: bytes) -> list[bytes]:
    return [t for t, _ in heard(sim, rid)]


def tick_until(sim: Sim, done: Callable[[], bool], limit: int = 40) -> None:
    for _ in range(limit):
        if done():
            return
        sim.tick(0.25)
    assert done(), "not within the lookups' timeouts"


def test_failed_qos0_publishes_are_reported_in_one_error_before_the_pong() -> None:
    sim = cluster()
    topic = blocked_topic(sim)
    for node in owners(sim, topic):
        sim.pause(node)
    publish(sim, A, topic, [b"%d" % i for i in range(40)])  # a run of 40 in one PUBS
    for i in range(40, 45):
        publish(sim, A, topic, [b"%d" % i])  # five PUBs
    ping(sim, A, 1)
    assert heard(sim, A) == []  # the PONG waits for the publishes, which wait for the lookup
    entry = sim.nodes[ENTRY].core.entry
    assert entry.waiting_of == {A: 45} and entry.pongs_due == {A: [1]}
    tick_until(sim, lambda: codec.PONG in kinds(sim, A))
    (error_type, error), (pong_type, pong) = heard(sim, A)  # one ERROR for all 45, then the PONG
    assert (error_type, pong_type, pong["id"]) == (codec.ERROR, codec.PONG, 1)
    assert error["code"] == codec.E_UNAVAILABLE and error["count"] == 45 and "ref" not in error
    assert error["reason"].startswith("45 QoS 0 publishes failed at node n0")
    assert "no owner of shard" in error["reason"] and "not delivered: publish again" in error["reason"]
    metrics = sim.nodes[ENTRY].core.metrics
    assert metrics["errors.unavailable"] == 45 and metrics["publishes.failed_reported"] == 45
    assert entry.waiting_of == {} and entry.pongs_due == {} and entry.failure_reports == {}
    for node in owners(sim, topic):
        sim.resume(node)
    assert sim.settle()


def test_a_pong_waits_for_its_own_clients_publishes_only() -> None:
    sim = cluster()
    blocked, local = blocked_topic(sim), local_topic(sim)
    for node in owners(sim, blocked):
        sim.pause(node)
    publish(sim, A, blocked, [b"a1", b"a2", b"a3"])
    ping(sim, A, 1)
    publish(sim, B, local, [b"b1", b"b2"])
    ping(sim, B, 2)
    ping(sim, C, 3)  # published nothing
    assert heard(sim, B) == [(codec.PONG, {"v": codec.PROTOCOL_VERSION, "id": 2})]  # at once: routed at once
    assert heard(sim, C) == [(codec.PONG, {"v": codec.PROTOCOL_VERSION, "id": 3})]
    ping(sim, A, 4)
    assert heard(sim, A) == []
    entry = sim.nodes[ENTRY].core.entry
    assert entry.waiting_of == {A: 3} and entry.pongs_due == {A: [1, 4]}
    for node in owners(sim, blocked):  # the owners answer before the lookup's timeout: forwarded, nothing failed
        sim.resume(node)
    sim.drain()
    assert [(t, h["id"]) for t, h in heard(sim, A)] == [(codec.PONG, 1), (codec.PONG, 4)]
    assert entry.waiting_of == {} and entry.pongs_due == {}
    assert sim.nodes[ENTRY].core.metrics["publishes.failed_reported"] == 0


def test_publishes_before_any_assignment_are_reported_at_once_and_before_a_pong_of_the_same_drain() -> None:
    sim = Sim(SimConfig(shard_count=SHARDS))
    sim.join()  # no leader has written an assignment yet
    core = sim.nodes["n0"].core
    assert core.view.assignment is None
    publish(sim, A, "a/b", [b"%d" % i for i in range(10)])
    [(error_type, error)] = heard(sim, A)  # the flush after the frame reported them, without a PING
    assert error_type == codec.ERROR and error["code"] == codec.E_UNAVAILABLE and error["count"] == 10
    assert "no shard assignment yet" in error["reason"]
    # A publish and a PING handled in one drain: the report goes before the PONG, not at the flush after it.
    sim.session_clients[A].frames.clear()
    core.now = sim.now
    core.on_client_parts([A, *codec.encode(codec.PUB, {"topic": "a/c", "qos": 0}, b"x")])
    core.on_client_parts([A, *codec.encode(codec.PING, {"id": 9})])
    core.flush()
    sim.pump_clients()
    assert reports_and_pongs(sim, A) == [(codec.ERROR, 1), (codec.PONG, 9)]


def test_a_report_zmq_refuses_is_owed_and_no_pong_vouches_for_it_meanwhile() -> None:
    """The client's queue is full (zmq refuses its frames): the report is kept, and a PING gets no PONG while it is
    owed (the SDK's flush then times out saying the publishes may be lost); once zmq takes frames again, the next
    PING gets the report and then its PONG."""
    sim = Sim(SimConfig(shard_count=SHARDS))
    sim.join()
    node = sim.nodes["n0"]
    refused: set[bytes] = {A}
    send = node.send_client

    def send_client(rid: bytes, parts: list[bytes]) -> bool:  # the shell's send with zmq's queue for A full
        return rid not in refused and send(rid, parts)

    node.send_client = send_client  # type: ignore[method-assign]
    publish(sim, A, "a/b", [b"1", b"2", b"3"])
    ping(sim, A, 1)
    assert heard(sim, A) == []
    assert node.core.metrics["publishes.failed_reported"] == 0
    refused.clear()
    ping(sim, A, 2)
    assert reports_and_pongs(sim, A) == [(codec.ERROR, 3), (codec.PONG, 2)]
    assert node.core.metrics["publishes.failed_reported"] == 3


CLIENTS = [A, B, C]
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 2), st.integers(0, 5), st.integers(1, 4)),
        st.tuples(st.just("ping"), st.integers(0, 2)),
        st.tuples(st.just("pause"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
        st.tuples(st.just("resume"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
        st.tuples(st.just("tick"), st.integers(1, 4)),
        st.tuples(st.just("deliver"), st.integers(0, 5)),
    ),
    min_size=15,
    max_size=60,
)
MAX_PAUSE = 1.5  # a paused owner is resumed within this (its lease, 3 s, must not run out: no member changes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_property_pongs_follow_their_clients_publishes_and_every_loss_is_reported(steps: list[tuple[Any, ...]]) -> None:
    """Three publishers on one entry node, a subscriber to ``#`` there, the owners of the other shards paused and
    resumed, time passing, frames delivered one at a time, in any order. Checked:

    - a PING from a client with nothing waiting at the entry node is answered at once (others' waits do not hold
      it); every PING is answered once, in order;
    - each client's reported counts add up to exactly its publishes the subscriber never got (nothing else loses
      messages here), and by each PONG, at least those of them sent before its PING were reported."""
    sim = cluster()
    sim.client_send(SUBSCRIBER, ENTRY, codec.SUB, {"id": 1, "filters": ["#"], "qos": 0})
    assert sim.settle()
    entry = sim.nodes[ENTRY].core.entry
    topics = mixed_topics(sim)
    sent: dict[bytes, list[bytes]] = {rid: [] for rid in CLIENTS}
    pings: dict[bytes, list[tuple[int, int]]] = {rid: [] for rid in CLIENTS}  # (ping id, publishes sent before)
    paused_at: dict[str, float] = {}
    ids = iter(range(1, 10**6))
    for step in steps:
        kind = step[0]
        if kind == "publish":
            rid, topic = CLIENTS[step[1]], topics[step[2]]
            payloads = [b"%s:%d" % (rid, len(sent[rid]) + k) for k in range(step[3])]
            sent[rid].extend(payloads)
            publish(sim, rid, topic, payloads)
        elif kind == "ping":
            rid = CLIENTS[step[1]]
            ping_id = next(ids)
            pings[rid].append((ping_id, len(sent[rid])))
            idle = not entry.waiting_of.get(rid)
            ping(sim, rid, ping_id)
            if idle:
                assert heard(sim, rid)[-1] == (codec.PONG, {"v": codec.PROTOCOL_VERSION, "id": ping_id})
        elif kind == "pause":
            for node in step[1]:
                if node not in paused_at:
                    sim.pause(node)
                    paused_at[node] = sim.now
        elif kind == "resume":
            for node in step[1]:
                if paused_at.pop(node, None) is not None:
                    sim.resume(node)
        elif kind == "tick":
            for _ in range(step[1]):
                for node, since in list(paused_at.items()):
                    if sim.now + 0.25 - since > MAX_PAUSE:
                        sim.resume(node)
                        del paused_at[node]
                sim.tick(0.25)
        elif kind == "deliver":
            ready = sim.deliverable()
            if ready:
                sim.deliver(*ready[step[1] % len(ready)])
    for node in paused_at:
        sim.resume(node)
    assert sim.settle()
    assert entry.waiting_of == {} and entry.pongs_due == {} and entry.queued_publishes == 0
    got = {payload for _, payload, _ in sim.session_clients[SUBSCRIBER].got}
    for rid in CLIENTS:
        lost = [p for p in sent[rid] if p not in got]
        reported = 0
        pongs: list[tuple[int, int]] = []  # (ping id, counts reported before it)
        for frame_type, header in heard(sim, rid):
            if frame_type == codec.ERROR:
                assert "ref" not in header and header["code"] == codec.E_UNAVAILABLE, header
                reported += header["count"]
            elif frame_type == codec.PONG:
                pongs.append((header["id"], reported))
        assert reported == len(lost), (rid, reported, lost)
        assert [i for i, _ in pongs] == [i for i, _ in pings[rid]]  # every PING answered once, in order
        for (_, reported_before), (_, sent_before) in zip(pongs, pings[rid], strict=True):
            assert reported_before >= sum(1 for p in sent[rid][:sent_before] if p not in got)


# ---------------------------------------------------------------------------------------------- SDK
class ReportingNode:
    """A DEALER stand-in: answers HELLO, and each PING with the node's reports (ERROR with ``count``) and a PONG."""

    def __init__(self) -> None:
        self.sent: list[codec.Frame] = []
        self.replies: list[list[bytes]] = []
        self.reports: list[tuple[str, int]] = []  # (code, count) sent before the next PONG
        self.closed = False

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        frame = codec.decode(parts, max_payload=1 << 62)
        self.sent.append(frame)
        rid = frame.header.get("id")
        if frame.type == codec.HELLO:
            self.replies.append(codec.encode(codec.WELCOME, {"id": rid, "node": "n1"}))
        elif frame.type == codec.PING:
            for code, count in self.reports:
                reason = f"{count} QoS 0 publishes failed at node n1, the last: no owner of shard 3 answered"
                self.replies.append(codec.error_parts(code, reason, count=count))
            self.reports.clear()
            self.replies.append(codec.encode(codec.PONG, {"id": rid}))

    def poll(self, timeout_ms: int) -> int:
        if not self.replies and timeout_ms:
            time.sleep(min(timeout_ms, 5) / 1000)
        return 1 if self.replies else 0

    def recv_multipart(self) -> list[bytes]:
        return self.replies.pop(0)

    def close(self, linger: int | None = None) -> None:
        self.closed = True

    def disable_monitor(self) -> None:
        pass


def reporting_client() -> tuple[Client, ReportingNode]:
    node = ReportingNode()
    client = Client("tcp://fake", connect=False, timeout=1.0, max_batch=1000, linger=60)

    def open_fake(endpoint: str) -> None:
        client.sock, client._poller = node, FakePoller(node)  # type: ignore[assignment]

    client._open = open_fake  # type: ignore[method-assign]
    client.connect()
    return client, node


@pytest.mark.timeout(10)
def test_flush_raises_the_reports_added_up_per_code_and_counts_them() -> None:
    client, node = reporting_client()
    client.publish("t/a", b"1")
    node.reports = [(codec.E_UNAVAILABLE, 3), (codec.E_UNAVAILABLE, 4)]  # two flushes' reports before the PONG
    with pytest.raises(ShardMQError) as err:
        client.flush()
    assert err.value.code == codec.E_UNAVAILABLE and err.value.count == 7
    assert err.value.reason.startswith("7 QoS 0 publishes failed") and "no owner of shard 3" in err.value.reason
    assert client.publish_failed == 7 and not client.errors
    client.publish("t/a", b"2")
    client.flush()  # nothing failed since: no error
    client.publish("t/a", b"3")
    node.reports = [(codec.E_OVERLOADED, 1), (codec.E_UNAVAILABLE, 2)]
    with pytest.raises(ShardMQError) as err:
        client.flush()
    assert (err.value.code, err.value.count) == (codec.E_OVERLOADED, 1)
    with pytest.raises(ShardMQError) as err:  # one kept error per code: the next call raises the other
        client.flush()
    assert (err.value.code, err.value.count) == (codec.E_UNAVAILABLE, 2)
    assert client.publish_failed == 10
    client.close()


@pytest.mark.timeout(10)
def test_close_raises_the_report_after_closing_the_socket() -> None:
    client, node = reporting_client()
    client.publish("t/a", b"1")
    node.reports = [(codec.E_UNAVAILABLE, 1)]
    with pytest.raises(ShardMQError) as err:
        client.close()
    assert err.value.code == codec.E_UNAVAILABLE and err.value.count == 1
    assert node.closed and [f.type for f in node.sent][-1] == codec.BYE
    assert client.publish_failed == 1


# ---------------------------------------------------------------------------------------------- real cluster
@pytest.fixture(scope="module")
def stoppable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory: Path = tmp_path_factory.mktemp("publish_failed")
    lc = LocalCluster(directory, nodes=3, log_level="warning", lease_ttl=10)  # stopped nodes stay members
    lc.up(timeout=60)
    yield lc
    lc.down()


@pytest.mark.timeout(120)
def test_flush_raises_how_many_publishes_no_owner_answered_while_another_client_is_served(
    stoppable: LocalCluster,
) -> None:
    assert stoppable.state is not None
    nodes = {p.name: p for p in stoppable.state.nodes}
    endpoint = nodes["n1"].client_endpoint
    document, _ = read_assignment(stoppable.etcd_client(), stoppable.cluster)
    assert document
    a = Assignment.from_json(document)
    p = uuid.uuid4().hex[:8]
    topics = [f"{p}-{i}" for i in range(10_000)]  # one level: each is looked up in one shard only
    blocked = next(t for t in topics if "n1" not in a.owners(shard_for_key(t, a.shard_count)))
    local = next(t for t in topics if a.owners(shard_for_key(t, a.shard_count))[0] == "n1")
    stopped = [nodes[n].pid for n in a.owners(shard_for_key(blocked, a.shard_count))]
    sent = 50
    with Client([endpoint], timeout=30.0) as pub, Client([endpoint], timeout=30.0) as other, \
            Client([endpoint], timeout=10.0) as sub:  # fmt: skip
        sub.subscribe(local)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(sent):
                pub.publish(blocked, b"%d" % i)
            for i in range(10):
                other.publish(local, b"%d" % i)
            other.flush()  # served: its publishes were routed at once, nothing of it waits
            with pytest.raises(ShardMQError) as err:
                pub.flush()  # answered once both owners' lookups timed out: every publish failed, and it says so
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert err.value.code == codec.E_UNAVAILABLE and err.value.count == sent, err.value
        assert f"{sent} QoS 0 publishes failed at node n1" in err.value.reason
        assert pub.publish_failed == sent and other.publish_failed == 0
        got = [sub.receive(timeout=5.0) for _ in range(10)]
        assert [m.payload for m in got if m is not None] == [b"%d" % i for i in range(10)]
        pub.publish(local, b"after")
        pub.flush()  # reported once: the next flush has nothing to raise
        assert pub.publish_failed == sent
