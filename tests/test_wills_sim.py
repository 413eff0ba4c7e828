"""Wills through the protocol core: real ``NodeCore``s in the in-memory cluster (``testing.simulation``).

What is checked: a client killed without BYE has its will published once, within the documented bound
(3 x ``client_idle_check`` of its last frame), to a watcher on another node; BYE clears it (nothing published, the
record goes); a connection back on the same node within the grace keeps it unpublished; a persistent session's will
goes when its connection is found gone and the record stays without it; a takeover through another node publishes
the old connection's will once and keeps the new one; a crashed holder's wills are published once by the session
shard's primary (also when the holder was that primary); two claims of one will publish it once; a bad will is
refused with a code that says what to fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from shardmq.router import codec
from shardmq.testing.simulation import Sim
from tests.test_retained_sim import cluster
from tests.test_sessions_sim import metric, record

CLIENT = b"dev-7"
WATCHER = b"watcher"
WILL = {"topic": "wills/dev-7", "qos": 1, "retain": False}
IDLE = 10.0  # SimConfig.client_idle_check


def connect(sim: Sim, node: str, rid: bytes = CLIENT, will: dict[str, Any] | None = WILL, payload: bytes = b"gone",
            clean: bool = True, expiry: float = 60) -> codec.Frame:  # fmt: skip
    """HELLO (with ``will``); the node's answer (WELCOME or ERROR)."""
    header: dict[str, Any] = {"id": 1, "client": rid.decode()}
    if will is not None:
        header["will"] = will
    if not clean:
        header |= {"clean": False, "expiry": expiry}
    before = len(sim.session_clients[rid].frames) if rid in sim.session_clients else 0
    sim.client_send(rid, node, codec.HELLO, header, payload if will is not None else b"")
    assert sim.settle()
    answers = [f for f in sim.session_clients[rid].frames[before:] if f.type in (codec.WELCOME, codec.ERROR)]
    assert len(answers) == 1, sim.session_clients[rid].frames[before:]
    return answers[0]


def watch(sim: Sim, node: str) -> None:
    connect(sim, node, WATCHER, will=None)
    sim.client_send(WATCHER, node, codec.SUB, {"id": 2, "filters": ["wills/#"], "qos": 1})
    assert sim.settle()


def heard(sim: Sim) -> list[bytes]:
    return [payload for _, payload, _ in sim.session_clients[WATCHER].got]


def run(sim: Sim, seconds: float, until: int | None = None, dt: float = 0.5) -> float:
    """Advance the clock ``seconds`` (timers fire, frames are delivered); with ``until``, stop once the watcher
    heard that many messages. Returns the time advanced."""
    spent = 0.0
    while spent < seconds:
        sim.tick(dt)
        sim.drain()
        spent += dt
        if until is not None and len(heard(sim)) >= until:
            break
    return spent


@pytest.mark.timeout(60)
def test_killed_client_will_published_once_within_the_bound() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    watch(sim, n2)
    assert connect(sim, n1).type == codec.WELCOME
    stored = record(sim, CLIENT)
    assert stored is not None and stored["holder"] == n1 and stored["persistent"] is False
    assert stored["will"]["topic"] == WILL["topic"]
    sim.client_away(CLIENT)  # killed: no BYE; its node finds out at its next probe
    took = run(sim, 4 * IDLE, until=1)
    assert heard(sim) == [b"gone"]
    assert took <= 3 * IDLE
    run(sim, 3 * IDLE)
    assert heard(sim) == [b"gone"]  # once
    assert record(sim, CLIENT) is None  # a clean session's record was only there for the will
    assert metric(sim, "wills.published") == 1 and metric(sim, "wills.delivered") == 1


@pytest.mark.timeout(60)
def test_bye_clears_the_will() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    watch(sim, n2)
    connect(sim, n1)
    sim.client_send(CLIENT, n1, codec.BYE, {})
    sim.session_clients[CLIENT].node_id = None
    assert sim.settle()
    run(sim, 4 * IDLE)
    assert heard(sim) == []
    assert record(sim, CLIENT) is None
    assert metric(sim, "wills.published") == 0 and metric(sim, "wills.cleared") == 1


@pytest.mark.timeout(60)
def test_back_on_the_same_node_within_the_grace_keeps_the_will() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    watch(sim, n2)
    connect(sim, n1)
    node = sim.nodes[n1].enter()
    node.client_unreachable(CLIENT)  # a probe found the connection gone; zmq re-makes it
    node.flush()
    run(sim, IDLE / 2)
    assert connect(sim, n1).type == codec.WELCOME  # HELLO again on the re-made connection, the same will
    run(sim, 2 * IDLE)
    assert heard(sim) == []
    assert record(sim, CLIENT)["will"]["topic"] == WILL["topic"]


@pytest.mark.timeout(60)
def test_persistent_session_will_when_gone_record_stays() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    watch(sim, n2)
    connect(sim, n1, clean=False)
    sim.client_away(CLIENT)
    run(sim, 4 * IDLE, until=1)
    assert heard(sim) == [b"gone"]
    stored = record(sim, CLIENT)
    assert stored is not None and stored["holder"] == n1 and "will" not in stored  # the session lives on
    # It comes back (session present) with a will, then closes cleanly: nothing more is published.
    assert connect(sim, n1, clean=False, payload=b"gone2").header["session_present"] is True
    assert record(sim, CLIENT)["will"]["payload"]
    sim.client_send(CLIENT, n1, codec.BYE, {})
    sim.session_clients[CLIENT].node_id = None
    assert sim.settle()
    run(sim, 4 * IDLE)
    assert heard(sim) == [b"gone"]
    assert "will" not in record(sim, CLIENT)


@pytest.mark.timeout(60)
def test_takeover_publishes_the_old_connections_will_once() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    watch(sim, n3)
    connect(sim, n1, clean=False, payload=b"old")
    welcome = connect(sim, n2, clean=False, payload=b"new")  # another connection takes the session over
    assert welcome.header["session_present"] is True
    assert sim.session_clients[CLIENT].frames  # (the old connection heard SESSION_END taken_over)
    run(sim, 4 * IDLE)
    assert heard(sim) == [b"old"]
    stored = record(sim, CLIENT)
    assert stored["holder"] == n2 and stored["will"]["payload"] == "bmV3"  # base64 of b"new": still pending
    assert metric(sim, "wills.published") == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("holder_is_primary", [False, True])
def test_crashed_holders_will_published_once_by_the_primary(holder_is_primary: bool) -> None:
    sim = cluster(4)
    nodes = sorted(sim.nodes)
    a = sim.etcd.doc
    assert a is not None
    rid = next(
        b"dev-%d" % i for i in range(1000)
        if (a.owners(sim.shard_of(f"$session/dev-{i}"))[0] == nodes[0]) == holder_is_primary
    )  # fmt: skip
    watch(sim, nodes[1])
    connect(sim, nodes[0], rid, will={"topic": "wills/x", "qos": 1, "retain": True}, payload=b"crashed")
    assert record(sim, rid)["holder"] == nodes[0]
    sim.crash(nodes[0])  # kill -9 of the node holding the client
    assert sim.settle()  # its lease expires, the leader moves its shards
    run(sim, 2 * IDLE)
    assert heard(sim) == [b"crashed"]
    assert metric(sim, "wills.published") == 1
    # retain honoured: a new subscriber gets the will as the topic's retained message
    assert sim.subscribe(nodes[2], "wills/x")
    assert sim.settle()
    assert sim.retained_got[sim.last_client]["wills/x"] == (b"crashed", 1)


@pytest.mark.timeout(60)
def test_two_claims_of_one_will_publish_it_once() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    watch(sim, n3)
    connect(sim, n1)
    will = record(sim, CLIENT)["will"]
    for node in (n1, n2, n3):  # the holder and two others find it gone at the same moment
        sim.nodes[node].enter().wills.claim(CLIENT.decode(), will, "test")
    assert sim.settle()
    run(sim, IDLE)
    assert heard(sim) == [b"gone"]
    assert metric(sim, "wills.published") == 1 and metric(sim, "wills.claimed_elsewhere") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("will", "code"),
    [
        ({"topic": "wills/+", "qos": 0}, codec.E_INVALID_TOPIC),
        ({"topic": "wills/x", "qos": 2}, codec.E_INVALID_QOS),
        ({"topic": "$session/x", "qos": 0}, codec.E_NOT_AUTHORIZED),
        ({"qos": 0}, codec.E_BAD_HEADER),
    ],
)
def test_bad_will_refused_with_a_code(will: dict[str, Any], code: str) -> None:
    sim = cluster()
    answer = connect(sim, sorted(sim.nodes)[0], will=will)
    assert answer.type == codec.ERROR and answer.header["code"] == code
    assert "will" in answer.header["reason"]
    assert record(sim, CLIENT) is None


@pytest.mark.timeout(60)
def test_will_topic_checked_against_the_principals_acl() -> None:
    from shardmq.router.acl import Acl
    from tests.test_access import one_node, send

    sim, node = one_node()
    sim.nodes[node].core.access.set_principals({"p": Acl(publish=("dev/p/#",))})
    hello = {"id": 5, "client": "p1", "will": {"topic": "dev/q/status", "qos": 1}}
    [refused] = send(sim, node, b"p1", "p", codec.encode(codec.HELLO, hello, b"off"))
    assert refused.type == codec.ERROR and refused.header["code"] == codec.E_NOT_AUTHORIZED
    assert refused.header["ref"] == 5 and "will" in refused.header["reason"]
    hello["will"] = {"topic": "dev/p/status", "qos": 1}
    [welcome] = send(sim, node, b"p1", "p", codec.encode(codec.HELLO, hello, b"off"))
    assert welcome.type == codec.WELCOME
