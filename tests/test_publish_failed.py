"""QoS 0 publishes the entry node fails or refuses are reported to their publisher, and its PONG waits for them.

The rules are ``protocol/entry.py``'s ("QoS 0 publishes this node fails", "The barrier"): failures, and refusals
of QoS 0 publishes without an id, are counted per client and reported as one ERROR with ``count`` per code (never
one frame per message) and logged once per report, and a client's PING is answered once every publish it sent
before left the entry node's queues and the frames that carry them were handed to zmq, after that report; other
clients' publishes never hold it.

- Core level: real ``NodeCore``s in the in-memory cluster (``testing.simulation``). The owners of a topic's shard
  are paused, so its lookups go unanswered and fail after ``lookup_timeout`` at each owner; or the node has no
  assignment yet, so publishes fail at once; or a subscriber's node crashed and the entry node saw it leave while
  the answers it routes by still name it; or the entry node's ``send_peer`` refuses a peer's frames (as the shell's
  does when zmq's queue for it is full); or the publishes are refused at intake (an invalid topic or qos, a
  reserved topic, an ACL). A property test runs publishes (valid and invalid), PINGs, pauses, refused peers, time
  and frame delivery in any order and checks the barrier and the counts against what two subscribers got.
- SDK: the client over a fake socket (``tests/test_exit_flush.SilentNode``): the report is counted in
  ``publish_failed`` and raised by ``flush()`` and ``close()`` with its count.
- Real cluster: the owners of a topic's shard stopped with SIGSTOP (for less than their lease TTL): the
  publisher's ``flush()`` raises ``unavailable`` with the number of its publishes, while another client of the same
  node publishes, flushes and is delivered to. The stopped nodes get SIGCONT in a finally block; the fixture stops
  every process by pid. And a reserved topic published 1,000 times: ``flush()`` raises one ``not_authorized``
  with count 1,000, while another client is served.
"""

from __future__ import annotations

import os
import signal
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
from shardmq.router.acl import Acl
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster
from shardmq.testing.simulation import SessionClient, Sim, SimConfig
from tests.test_exit_flush import SilentNode, fake
from tests.test_retained_sim import cluster as retained_sim_cluster

SHARDS = 16
ENTRY = "n0"
A, B, C = b"pub-a", b"pub-b", b"pub-c"
SUBSCRIBER, FAR_SUBSCRIBER = b"sub", b"sub-far"


# ---------------------------------------------------------------------------------------------- core level
def cluster(nodes: int = 3) -> Sim:
    return retained_sim_cluster(nodes, SHARDS)


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


def pub_frame(topic: str, payloads: list[bytes], qos: int = 0) -> tuple[bytes, dict[str, Any], bytes]:
    """QoS 0 publishes in one frame, as the SDK sends them: a PUB for one, else a PUBS of one run."""
    if len(payloads) == 1:
        return codec.PUB, {"topic": topic, "qos": qos}, payloads[0]
    runs = [([topic, qos, None], [len(p) for p in payloads], b"".join(payloads))]
    frame = codec.decode(codec.encode_runs(codec.PUBS, {}, runs))
    return codec.PUBS, frame.header, frame.payload


def publish(sim: Sim, rid: bytes, topic: str, payloads: list[bytes], qos: int = 0) -> None:
    sim.client_send(rid, ENTRY, *pub_frame(topic, payloads, qos))


def one_drain(sim: Sim, *frames: tuple[bytes, tuple[bytes, dict[str, Any], bytes]]) -> None:
    """The entry node reads these (client, frame) in one drain, then flushes (as the shell's loop does)."""
    core = sim.nodes[ENTRY].enter()
    for rid, (frame_type, header, payload) in frames:
        sim.session_clients.setdefault(rid, SessionClient(rid)).node_id = ENTRY
        core.on_client_parts([rid, *codec.encode(frame_type, header, payload)], sim.client_principal)
    core.flush()
    sim.pump_clients()


def refuse_peers(sim: Sim, refused: set[str]) -> None:
    """The entry node's ``send_peer`` refuses frames for the nodes in ``refused`` (a set the caller may change),
    as the shell's does when zmq's queue for that peer is full."""
    node = sim.nodes[ENTRY]
    send = node.send_peer

    def send_peer(dest: str, parts: list[bytes]) -> bool:
        return dest not in refused and send(dest, parts)

    node.send_peer = send_peer  # type: ignore[method-assign]


class RecordingLog:
    """The core's structlog calls, kept as (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, e, fields in self.lines if e == event]


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


def test_publishes_to_a_node_that_left_are_reported_once_per_message() -> None:
    """A subscriber's node crashed; the entry node saw it leave, the owner of the topic's shard not yet, so its
    answer still names it: the run and the PUBs to it (routed by the fast path, and by ``forward`` where a local
    subscriber is matched too) are reported, each message once, before the PONG; the local subscriber got its own."""
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2))
    for _ in range(4):
        sim.join()
    assert sim.settle()
    fast, general = (next(t for t in (f"{p}{i}" for i in range(1000)) if not {ENTRY, "n1"} & set(owners(sim, t)))
                     for p in ("f", "g"))  # fmt: skip
    sim.client_send(FAR_SUBSCRIBER, "n1", codec.SUB, {"id": 1, "filters": [fast, general], "qos": 0})
    sim.client_send(SUBSCRIBER, ENTRY, codec.SUB, {"id": 2, "filters": [general], "qos": 0})
    assert sim.settle()
    sim.crash("n1")
    core = sim.nodes[ENTRY].core
    while "n1" in core.view.members:  # only the entry node reads the view: the owners still answer with n1
        sim.tick(0.25)
        sim.refresh(ENTRY)
    publish(sim, A, fast, [b"f%d" % i for i in range(30)])
    publish(sim, A, fast, [b"f30"])
    publish(sim, A, general, [b"g%d" % i for i in range(4)])
    ping(sim, A, 1)
    sim.drain()
    *errors, (pong_type, pong) = heard(sim, A)  # one report per flush that found some: each lookup's answer's
    assert (pong_type, pong["id"]) == (codec.PONG, 1)
    assert sum(h["count"] for _, h in errors) == 35
    for error_type, error in errors:
        assert error_type == codec.ERROR and error["code"] == codec.E_UNAVAILABLE and "ref" not in error
        assert "destination node(s) n1 left the cluster" in error["reason"]
    assert sorted(p for _, p, _ in sim.session_clients[SUBSCRIBER].got) == [b"g%d" % i for i in range(4)]
    assert core.metrics["drops.dead_destination"] == 35 and core.metrics["publishes.failed_reported"] == 35


def test_forwards_in_frames_zmq_refuses_are_reported_before_the_pong() -> None:
    """The entry node's queues for both subscribers' nodes are full: the QoS 0 messages in those frames are counted
    for their publishers once each (not once per node) and reported in the same flush, before a PONG of a PING
    read in the same drain; a QoS 1 publish among them gets its own ERROR; a publisher whose frames went is told
    nothing."""
    sim = cluster()
    topic, other = local_topic(sim), blocked_topic(sim)
    for rid, node in ((FAR_SUBSCRIBER, "n1"), (b"sub-far-2", "n2")):
        sim.client_send(rid, node, codec.SUB, {"id": 1, "filters": [topic], "qos": 1})
    sim.client_send(SUBSCRIBER, "n1", codec.SUB, {"id": 2, "filters": [other], "qos": 0})
    assert sim.settle()
    publish(sim, B, other, [b"warm"])  # the answer for ``other`` is cached: routed at once from here on
    sim.drain()
    refused = {"n1", "n2"}
    refuse_peers(sim, refused)
    qos1 = (codec.PUB, {"topic": topic, "qos": 1, "id": 7}, b"q")
    one_drain(sim, (A, pub_frame(topic, [b"a%d" % i for i in range(40)])),
              *((A, pub_frame(topic, [b"a%d" % i])) for i in range(40, 45)), (A, qos1),
              (C, pub_frame(topic, [b"c0", b"c1"])), (A, (codec.PING, {"id": 1}, b"")))  # fmt: skip
    assert [(t, h.get("ref"), h.get("count")) for t, h in heard(sim, A)] == [
        (codec.ERROR, 7, None), (codec.ERROR, None, 45), (codec.PONG, None, None)]  # fmt: skip
    assert "destination node n" in heard(sim, A)[1][1]["reason"]
    assert reports_and_pongs(sim, C) == [(codec.ERROR, 2)]  # reported at the same flush, without a PING
    refused.clear()
    one_drain(sim, (B, pub_frame(other, [b"b0", b"b1"])), (B, (codec.PING, {"id": 2}, b"")))
    assert reports_and_pongs(sim, B) == [(codec.PONG, 2)]
    sim.drain()
    assert [p for _, p, _ in sim.session_clients[SUBSCRIBER].got] == [b"warm", b"b0", b"b1"]
    assert sim.nodes[ENTRY].core.metrics["publishes.failed_reported"] == 47
    assert sim.nodes[ENTRY].core.entry.pongs_held == []


def test_qos0_refusals_without_an_id_are_reported_together_before_the_pong() -> None:
    """Invalid topics and qos, a reserved topic and one the ACL does not allow, published at QoS 0 without an id:
    one ERROR per code with the count, before the PONG of a PING read in the same drain; a publish with an id is
    refused with its own ERROR naming it, at once; a valid publish beside them is delivered, and its PONG, which
    waits for its lookup, comes after the report of a refusal read before it."""
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2, access_control=True))
    for _ in range(3):
        sim.join()
    assert sim.settle()
    sim.client_principal = "p"
    for n in sim.nodes.values():
        n.core.access.set_principals({"p": Acl(("ok/#", "$session/#", "a/#"), ("#",))})
    sim.client_send(SUBSCRIBER, ENTRY, codec.SUB, {"id": 1, "filters": ["ok/#"], "qos": 0})
    assert sim.settle()
    with_id = (codec.PUB, {"topic": "a/#", "qos": 0, "id": 8}, b"")
    one_drain(sim, (A, pub_frame("a/#", [b"%d" % i for i in range(30)])),
              *((A, pub_frame("a/+", [b"x"])) for _ in range(5)), (A, with_id), (A, pub_frame("ok/2", [b"q2"], qos=2)),
              (A, pub_frame("$session/c", [b"s1", b"s2", b"s3"])), (A, pub_frame("secret", [b"n1", b"n2"])),
              (A, pub_frame("secret", [b"n3"])), (A, (codec.PING, {"id": 1}, b"")))  # fmt: skip
    frames = heard(sim, A)
    assert [(t, h.get("code"), h.get("ref"), h.get("count")) for t, h in frames] == [
        (codec.ERROR, codec.E_INVALID_TOPIC, 8, None),
        (codec.ERROR, codec.E_INVALID_TOPIC, None, 35),
        (codec.ERROR, codec.E_INVALID_QOS, None, 1),
        (codec.ERROR, codec.E_NOT_AUTHORIZED, None, 6),
        (codec.PONG, None, None, None),
    ]  # fmt: skip
    assert frames[1][1]["reason"].startswith("35 QoS 0 publishes refused at node n0, the last: ")
    assert "refused again if sent again" in frames[1][1]["reason"]
    assert "may not publish to 'secret'" in frames[3][1]["reason"]
    sim.session_clients[A].frames.clear()
    one_drain(sim, (A, pub_frame("ok/1", [b"fine"])), (A, pub_frame("a/#", [b"x"])), (A, (codec.PING, {"id": 2}, b"")))
    sim.drain()  # the PONG comes once ok/1 is routed, after the report
    assert reports_and_pongs(sim, A) == [(codec.ERROR, 1), (codec.PONG, 2)]
    assert [p for _, p, _ in sim.session_clients[SUBSCRIBER].got] == [b"fine"]
    metrics = sim.nodes[ENTRY].core.metrics
    assert metrics["errors.invalid_topic"] == 37 and metrics["errors.not_authorized"] == 6
    assert metrics["publishes.failed_reported"] == 43


def test_a_report_is_logged_once_per_code_with_its_count() -> None:
    sim = Sim(SimConfig(shard_count=SHARDS))
    sim.join()  # no assignment: every valid publish fails at once
    core = sim.nodes[ENTRY].core
    log = core.log = RecordingLog()  # type: ignore[assignment]
    one_drain(sim, (A, pub_frame("a/b", [b"%d" % i for i in range(10)])),
              *((A, pub_frame("a/c", [b"x"])) for _ in range(3)), (A, pub_frame("a/#", [b"y", b"z"])),
              (B, pub_frame("b", [b"1"])))  # fmt: skip
    assert [(f["client"], f["code"], f["count"]) for f in log.events("publish_failed")] == [
        ("pub-a", codec.E_UNAVAILABLE, 13),
        ("pub-a", codec.E_INVALID_TOPIC, 2),
        ("pub-b", codec.E_UNAVAILABLE, 1),
    ]
    assert core.metrics["errors.unavailable"] == 14  # the metric counts each message
    one_drain(sim, (A, pub_frame("a/d", [b"w"])))
    assert [f["count"] for f in log.events("publish_failed")] == [13, 2, 1, 1]


CLIENTS = [A, B, C]
STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["publish", "publish+ping"]), st.integers(0, 2), st.integers(0, 6), st.integers(1, 4)
        ),
        st.tuples(st.just("ping"), st.integers(0, 2)),
        st.tuples(st.just("pause"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
        st.tuples(st.just("resume"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
        st.tuples(st.just("refuse"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
        st.tuples(st.just("accept"), st.sampled_from([("n1",), ("n2",), ("n1", "n2")])),
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
    """Three publishers on one entry node, subscribers to ``#`` there and on n1, the owners of the other shards
    paused and resumed, the entry node's frames to n1 or n2 refused (zmq's queue full) for a while, time passing,
    frames delivered one at a time, in any order; some publishes go to an invalid topic. Checked:

    - a PING from a client with nothing waiting at the entry node is answered at once (others' waits do not hold
      it); every PING is answered once, in order;
    - each client's reported counts add up to exactly its publishes that some subscriber never got (nothing else
      loses messages here), and by each PONG, at least those of them sent before its PING were reported."""
    sim = cluster()
    sim.client_send(SUBSCRIBER, ENTRY, codec.SUB, {"id": 1, "filters": ["#"], "qos": 0})
    sim.client_send(FAR_SUBSCRIBER, "n1", codec.SUB, {"id": 1, "filters": ["#"], "qos": 0})
    assert sim.settle()
    entry = sim.nodes[ENTRY].core.entry
    topics = [*mixed_topics(sim), "bad/#"]
    refused: set[str] = set()
    refuse_peers(sim, refused)
    sent: dict[bytes, list[bytes]] = {rid: [] for rid in CLIENTS}
    pings: dict[bytes, list[tuple[int, int]]] = {rid: [] for rid in CLIENTS}  # (ping id, publishes sent before)
    paused_at: dict[str, float] = {}
    ids = iter(range(1, 10**6))
    for step in steps:
        kind = step[0]
        if kind in ("publish", "publish+ping"):
            rid, topic = CLIENTS[step[1]], topics[step[2]]
            payloads = [b"%s:%d" % (rid, len(sent[rid]) + k) for k in range(step[3])]
            sent[rid].extend(payloads)
            if kind == "publish":
                publish(sim, rid, topic, payloads)
                continue
            ping_id = next(ids)
            pings[rid].append((ping_id, len(sent[rid])))
            one_drain(sim, (rid, pub_frame(topic, payloads)), (rid, (codec.PING, {"id": ping_id}, b"")))
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
        elif kind == "refuse":
            refused.update(step[1])
        elif kind == "accept":
            refused.difference_update(step[1])
        elif kind == "deliver":
            ready = sim.deliverable()
            if ready:
                sim.deliver(*ready[step[1] % len(ready)])
    for node in paused_at:
        sim.resume(node)
    refused.clear()
    assert sim.settle()
    assert entry.waiting_of == {} and entry.pongs_due == {} and entry.queued_publishes == 0
    assert entry.pongs_held == []
    near, far = ({payload for _, payload, _ in sim.session_clients[rid].got} for rid in (SUBSCRIBER, FAR_SUBSCRIBER))
    # Two pauses of n1 in a row can outlast what its lease allows: fenced, it ends the far subscriber's session
    # (SESSION_END), and what that subscriber misses from then on is its gap, told to it, not the publishers'.
    far_ended = any(f.type == codec.SESSION_END for f in sim.session_clients[FAR_SUBSCRIBER].frames)
    got = near if far_ended else near & far
    for rid in CLIENTS:
        lost = [p for p in sent[rid] if p not in got]
        reported = 0
        pongs: list[tuple[int, int]] = []  # (ping id, counts reported before it)
        for frame_type, header in heard(sim, rid):
            if frame_type == codec.ERROR:
                assert "ref" not in header and header["code"] in (codec.E_UNAVAILABLE, codec.E_INVALID_TOPIC), header
                reported += header["count"]
            elif frame_type == codec.PONG:
                pongs.append((header["id"], reported))
        assert reported == len(lost), (rid, reported, lost)
        assert [i for i, _ in pongs] == [i for i, _ in pings[rid]]  # every PING answered once, in order
        for (_, reported_before), (_, sent_before) in zip(pongs, pings[rid], strict=True):
            assert reported_before >= sum(1 for p in sent[rid][:sent_before] if p not in got)


# ---------------------------------------------------------------------------------------------- SDK
class ReportingNode(SilentNode):
    """A node stand-in that answers each PING with its reports (ERROR with ``count``), then the PONG."""

    def __init__(self) -> None:
        super().__init__(pong=True)
        self.reports: list[tuple[str, int]] = []  # (code, count) sent before the next PONG

    def before_pong(self) -> list[list[bytes]]:
        reason = "QoS 0 publishes failed at node n1, the last: no owner of shard 3 answered"
        replies = [codec.error_parts(code, f"{count} {reason}", count=count) for code, count in self.reports]
        self.reports.clear()
        return replies


def reporting_client() -> tuple[Client, ReportingNode]:
    node = ReportingNode()
    client, _ = fake(True, node, timeout=1.0)
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


@pytest.mark.timeout(120)
def test_flush_raises_one_refusal_with_the_count_of_a_thousand_refused_publishes(stoppable: LocalCluster) -> None:
    """A topic under ``$session/`` (which a client may never publish to) published 1,000 times at QoS 0: the node
    refuses each, and the publisher hears of them in reports (not 1,000 ERRORs), raised by
    ``flush()`` as one error with their count, while another client of the same node is served."""
    assert stoppable.state is not None
    endpoint = next(p for p in stoppable.state.nodes if p.name == "n1").client_endpoint
    p = uuid.uuid4().hex[:8]
    refused, sent = f"$session/{p}", 1000
    with Client([endpoint], timeout=30.0) as pub, Client([endpoint], timeout=30.0) as other, \
            Client([endpoint], timeout=10.0) as sub:  # fmt: skip
        sub.subscribe(f"{p}/ok")
        for i in range(sent):
            pub.publish(refused, b"%d" % i)
            if i % 100 == 0:
                other.publish(f"{p}/ok", b"%d" % i)
        other.flush()
        with pytest.raises(ShardMQError) as err:
            pub.flush()
        assert err.value.code == codec.E_NOT_AUTHORIZED and err.value.count == sent, err.value
        assert "QoS 0 publishes refused at node n1" in err.value.reason and refused in err.value.reason, err.value
        assert pub.publish_failed == sent and not pub.errors and other.publish_failed == 0
        got = [sub.receive(timeout=5.0) for _ in range(10)]
        assert [m.payload for m in got if m is not None] == [b"%d" % i for i in range(0, sent, 100)]
        pub.publish(f"{p}/ok", b"after")
        pub.flush()  # reported once: the next flush has nothing to raise
