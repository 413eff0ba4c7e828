"""Persistent sessions through the protocol core: real ``NodeCore``s in the in-memory cluster (``testing.simulation``).

What is checked: a persistent session keeps its routes while its client is away and queues QoS 1 (QoS 0 dropped and
counted); a reconnect on the same node or another gets the queue once, in order, with session_present; the old
holder drops its routes; a message published during the takeover overlap is delivered once (publish ids); a clean
connect discards a session held on another node; expiry ends a session; a dead holder means no session; clients may
not publish or subscribe under ``$session/``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from shardmq.protocol.records import decode_queued
from shardmq.router import codec
from shardmq.testing.simulation import Sim
from tests.test_retained_sim import cluster

CLIENT = b"dev-42"
TOPIC = "sensors/t1"


def hello(sim: Sim, node: str, clean: bool = False, expiry: float = 60, rid: bytes = CLIENT) -> dict[str, Any]:
    header: dict[str, Any] = {"id": 1, "client": rid.decode()}
    if not clean:
        header |= {"clean": False, "expiry": expiry}
    before = len(sim.session_clients[rid].frames) if rid in sim.session_clients else 0
    sim.client_send(rid, node, codec.HELLO, header)
    assert sim.settle()
    welcomes = [f.header for f in sim.session_clients[rid].frames[before:] if f.type == codec.WELCOME]
    assert len(welcomes) == 1, sim.session_clients[rid].frames[before:]
    return welcomes[0]


def away_session(sim: Sim, node: str, expiry: float = 60) -> None:
    """A persistent session held by ``node``, subscribed to ``sensors/#`` at QoS 1, whose client said BYE: the
    session keeps routing and queues its QoS 1 messages while the client is away."""
    hello(sim, node, expiry=expiry)
    subscribe(sim, node)
    bye(sim, node)


def holding_unacked(sim: Sim, node: str, publisher: str, count: int) -> list[bytes]:
    """A persistent session on ``node``, subscribed to ``sensors/#`` at QoS 1, whose client received ``count``
    messages published through ``publisher`` and acknowledged none of them (nor anything until ``listen_again``)."""
    hello(sim, node)
    subscribe(sim, node)
    sim.session_clients[CLIENT].ack = False
    return publish(sim, publisher, count)


def listen_again(sim: Sim) -> None:
    """The client acknowledges again and forgets what it heard: what it hears next is what a reconnect brings."""
    client = sim.session_clients[CLIENT]
    client.ack = True
    client.got.clear()


def send_hello(sim: Sim, node: str, rid: bytes = CLIENT) -> None:
    """A persistent HELLO to ``node``, not settled: the test steps the cluster itself."""
    sim.client_send(rid, node, codec.HELLO, {"id": 1, "clean": False, "expiry": 60})


def welcome_in_virtual_time(sim: Sim, node: str, limit: float = 10) -> tuple[dict[str, Any] | None, float]:
    """A persistent HELLO to ``node`` with time passing (ticks of 0.25 s, up to ``limit`` virtual seconds) until its
    WELCOME: the WELCOME (None if none came) and the virtual seconds it took."""
    sc = sim.session_clients[CLIENT]
    sc.frames.clear()
    send_hello(sim, node)
    start = sim.now
    while sc.welcome() is None and sim.now - start < limit:
        sim.tick(0.25)
        sim.drain()
        sim.pump_clients()
    return sc.welcome(), sim.now - start


def subscribe(sim: Sim, node: str, filt: str = "sensors/#", qos: int = 1, rid: bytes = CLIENT) -> dict[str, Any]:
    sim.client_send(rid, node, codec.SUB, {"id": 2, "filters": [filt], "qos": qos})
    assert sim.settle()
    return next(f.header for f in reversed(sim.session_clients[rid].frames) if f.type in (codec.SUBACK, codec.ERROR))


def bye(sim: Sim, node: str, rid: bytes = CLIENT) -> None:
    sim.client_send(rid, node, codec.BYE, {})
    sim.session_clients[rid].node_id = None
    assert sim.settle()


def publish(sim: Sim, node: str, count: int, topic: str = TOPIC) -> list[bytes]:
    payloads = []
    for _ in range(count):
        pid = sim.publish(node, topic)
        assert pid is not None
        payloads.append(b"%d" % pid)
    assert sim.settle()
    for p in payloads:
        assert sim.publishes[int(p)][4] == "acked", sim.publishes[int(p)]
    return payloads


def got(sim: Sim, rid: bytes = CLIENT) -> list[bytes]:
    return [payload for _, payload, _ in sim.session_clients[rid].got]


def has_route(sim: Sim, node: str, filt: str = "sensors/#") -> bool:
    """Some current owner of the filter's shard holds the route (filt -> node). (An ex-owner in its hand-off grace
    period may still hold routes removed since: it releases the shard when the grace ends.)"""
    shard = sim.shard_of(filt)
    a = sim.etcd.doc
    assert a is not None
    return any(
        any(f == filt and node in nodes for f, nodes in sim.nodes[owner].core.owner.routes.shard_routes(shard))
        for owner in a.owners(shard) if sim.nodes[owner].up
    )  # fmt: skip


def record(sim: Sim, rid: bytes = CLIENT) -> dict[str, Any] | None:
    topic = "$session/" + rid.decode()
    shard = sim.shard_of(topic)
    a = sim.etcd.doc
    assert a is not None
    held = sim.nodes[a.owners(shard)[0]].core.owner.retained.get(shard, topic)
    return None if held is None else orjson.loads(held.payload)


def metric(sim: Sim, name: str) -> int:
    return sum(n.core.metrics[name] for n in sim.nodes.values())


@pytest.mark.timeout(60)
def test_away_session_keeps_routing_and_queues_then_same_node_reconnect() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    assert hello(sim, n1)["session_present"] is False
    assert record(sim)["holder"] == n1
    assert subscribe(sim, n1)["results"] == [1]
    bye(sim, n1)
    assert has_route(sim, n1)  # kept while away
    sent = publish(sim, n2, 20)
    sim.publish(n2, TOPIC)  # a QoS 0 publish is dropped and counted while the client is away
    sim.nodes[n2].enter().on_client_parts([b"p0", *codec.encode(codec.PUB, {"topic": TOPIC, "qos": 0}, b"q0")])
    sim.nodes[n2].core.flush()
    assert sim.settle()
    sent.append(b"%d" % max(sim.publishes))
    assert metric(sim, "drops.session_offline") == 1
    assert got(sim) == []
    assert hello(sim, n1)["session_present"] is True
    assert sim.settle()
    assert got(sim) == sent  # every queued message once, in order
    live = publish(sim, n2, 3)
    assert got(sim) == sent + live


@pytest.mark.timeout(60)
def test_unacknowledged_come_again_with_dup_first() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    first = holding_unacked(sim, n1, n2, 3)
    assert got(sim) == first
    sim.client_away(CLIENT)  # killed: no BYE
    queued = publish(sim, n2, 2)
    listen_again(sim)
    assert hello(sim, n1)["session_present"] is True
    assert sim.settle()
    heard = sim.session_clients[CLIENT].got
    assert [p for _, p, _ in heard] == first + queued
    assert [dup for *_, dup in heard] == [True] * 3 + [False] * 2


@pytest.mark.timeout(60)
def test_takeover_on_another_node_moves_queue_routes_and_unacked() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    unacked = holding_unacked(sim, n1, n3, 2)
    bye(sim, n1)
    queued = publish(sim, n3, 30)
    listen_again(sim)
    welcome = hello(sim, n2)
    assert welcome["session_present"] is True and welcome["node"] == n2
    assert sim.settle()
    heard = sim.session_clients[CLIENT].got
    assert [p for _, p, _ in heard] == unacked + queued  # once each, in order
    assert [dup for *_, dup in heard][:2] == [True, True]
    assert record(sim)["holder"] == n2
    assert has_route(sim, n2) and not has_route(sim, n1)
    assert CLIENT not in sim.nodes[n1].core.destination.sessions
    live = publish(sim, n3, 5)
    assert got(sim) == unacked + queued + live
    assert metric(sim, "sessions.taken_over") == 1


@pytest.mark.timeout(60)
def test_connected_client_is_told_taken_over() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    hello(sim, n1)
    subscribe(sim, n1)
    heard_on_n1: list[codec.Frame] = []
    shell = sim.nodes[n1]
    send_client = shell.send_client

    def spy(rid: bytes, parts: list[bytes]) -> bool:  # the old connection, still open on n1
        heard_on_n1.append(codec.decode(parts))
        return send_client(rid, parts)

    shell.send_client = spy  # type: ignore[method-assign]
    send_hello(sim, n2)
    assert sim.settle()
    ends = [f.header for f in heard_on_n1 if f.type == codec.SESSION_END]
    assert [e["code"] for e in ends] == [codec.E_TAKEN_OVER] and n2 in ends[0]["reason"]
    assert sim.session_clients[CLIENT].welcome()["session_present"] is True
    assert metric(sim, "sessions.handed_over") == 1


@pytest.mark.timeout(60)
def test_message_in_takeover_overlap_is_delivered_once() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    away_session(sim, n1)
    queued = publish(sim, n3, 3)
    send_hello(sim, n2)
    # Step the takeover by hand until n2 sent SESSION_TAKEN: both n1 and n2 then have routes for the client.
    overlap: list[bytes] = []
    for _ in range(200):
        if sim.channels.get((n2, n1)) and any(p[0] == codec.SESSION_TAKEN for p in sim.channels[(n2, n1)]):
            break
        ready = sim.deliverable()
        assert ready, "the takeover stalled"
        sim.deliver(*ready[0])
    else:
        raise AssertionError("no SESSION_TAKEN")
    assert has_route(sim, n1) and has_route(sim, n2)
    pid = sim.publish(n3, TOPIC)
    assert pid is not None
    overlap.append(b"%d" % pid)
    # Let the forwards reach n1 before n2 hears of them, so that n1's tail carries the message too.
    for _ in range(50):
        if (n3, n1) in sim.channels:
            sim.deliver(n3, n1)
        else:
            break
    assert sim.settle()
    live = publish(sim, n3, 2)
    assert got(sim) == queued + overlap + live
    assert metric(sim, "sessions.duplicates_dropped") >= 1


@pytest.mark.timeout(60)
def test_clean_connect_discards_session_held_elsewhere() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    away_session(sim, n1)
    publish(sim, n3, 5)
    welcome = hello(sim, n2, clean=True)
    assert welcome["session_present"] is False
    assert sim.settle()
    assert got(sim) == []
    assert CLIENT not in sim.nodes[n1].core.destination.sessions
    assert not has_route(sim, n1)
    assert record(sim) is None
    assert metric(sim, "deliveries.session_ended") >= 5
    publish(sim, n3, 2)
    assert got(sim) == []  # the subscription went with the session
    assert hello(sim, n3)["session_present"] is False


@pytest.mark.timeout(60)
def test_clean_connect_on_the_holder_discards_it() -> None:
    sim = cluster()
    n1, _, n3 = sorted(sim.nodes)
    away_session(sim, n1)
    publish(sim, n3, 2)
    assert hello(sim, n1, clean=True)["session_present"] is False
    assert sim.settle()
    assert got(sim) == [] and record(sim) is None and not has_route(sim, n1)


@pytest.mark.timeout(60)
def test_expiry_ends_the_session() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    away_session(sim, n1, expiry=5)
    publish(sim, n3, 4)
    for _ in range(30):  # 7.5 s of virtual time
        sim.tick(0.25)
    assert sim.settle()
    assert CLIENT not in sim.nodes[n1].core.destination.sessions
    assert metric(sim, "deliveries.session_expired") == 4
    assert not has_route(sim, n1) and record(sim) is None
    assert hello(sim, n2)["session_present"] is False
    assert got(sim) == []


def directory_owners(sim: Sim, rid: bytes = CLIENT) -> tuple[str, ...]:
    a = sim.etcd.doc
    assert a is not None
    return a.owners(sim.shard_of("$session/" + rid.decode()))


def queue_records(sim: Sim, node: str, rid: bytes = CLIENT) -> list[bytes]:
    """The payloads of ``rid``'s replicated queue records held at ``node``, in the primary's write order."""
    found = sorted(sim.nodes[node].core.owner.retained.match(f"$sessionq/{rid.decode()}/+"), key=lambda t: t[1].stamp)
    return [decoded[3] for _, m in found if (decoded := decode_queued(m.payload)) is not None]


@pytest.mark.timeout(60)
def test_dead_holder_session_is_rebuilt_by_the_primary_from_the_replica() -> None:
    """kill -9 of the holder loses no acknowledged QoS 1 message: the session shard's primary adopts the session
    (routes, queue) and keeps queueing; a reconnect through another node gets everything, in order."""
    sim = cluster(4)
    primary, replica = directory_owners(sim)
    holder, other = sorted(set(sim.nodes) - {primary, replica})
    away_session(sim, holder)
    before = publish(sim, other, 5)
    assert queue_records(sim, primary) == before and queue_records(sim, replica) == before
    sim.crash(holder)
    assert sim.settle()
    assert record(sim)["holder"] == primary  # adopted
    assert metric(sim, "sessions.adopted") == 1
    after = publish(sim, other, 4)  # queued at the primary now
    assert hello(sim, other)["session_present"] is True
    assert sim.settle()
    assert got(sim) == before + after
    assert record(sim)["holder"] == other
    assert has_route(sim, other)
    live = publish(sim, replica, 2)
    assert got(sim) == before + after + live
    for _ in range(4):  # acknowledged: the trims reach the replicas at the next tick
        sim.tick(0.5)
        assert sim.settle()
    assert queue_records(sim, primary) == [] and queue_records(sim, replica) == []


@pytest.mark.timeout(60)
def test_unacknowledged_at_the_dead_holder_come_again_with_dup() -> None:
    """Messages the client had but had not acknowledged when its holder died come again from the replica, dup."""
    sim = cluster(4)
    primary, replica = directory_owners(sim)
    holder, other = sorted(set(sim.nodes) - {primary, replica})
    hello(sim, holder)
    subscribe(sim, holder)
    sim.session_clients[CLIENT].ack = False
    unacked = publish(sim, other, 3)
    assert got(sim) == unacked
    sim.crash(holder)
    assert sim.settle()
    sim.session_clients[CLIENT].ack = True
    sim.session_clients[CLIENT].got.clear()
    welcome = hello(sim, replica)  # the primary adopted it meanwhile (settle): the takeover moves it on
    assert welcome["session_present"] is True and welcome["node"] == replica
    assert sim.settle()
    heard = sim.session_clients[CLIENT].got
    assert [p for _, p, _ in heard] == unacked  # unacknowledged when the holder died: sent again, with dup
    assert all(dup for *_, dup in heard)


@pytest.mark.timeout(60)
def test_session_primary_rebuilds_on_the_takers_request() -> None:
    sim = cluster(4)
    primary, replica = directory_owners(sim)
    holder, other = sorted(set(sim.nodes) - {primary, replica})
    hello(sim, holder)
    subscribe(sim, holder)
    bye(sim, holder)
    queued = publish(sim, other, 3)
    core = sim.nodes[primary].core
    core.sessions.orphans_possible = False
    core.sessions.holders_lost = lambda gone: None  # type: ignore[method-assign]  # this primary does not adopt on its own
    sim.crash(holder)
    assert sim.settle()
    assert record(sim)["holder"] == holder
    assert hello(sim, other)["session_present"] is True
    assert sim.settle()
    assert got(sim) == queued
    assert metric(sim, "sessions.rebuilds_asked") == 1 and metric(sim, "sessions.adopted") == 1


@pytest.mark.timeout(60)
def test_holder_that_is_the_primary_dies_the_promoted_replica_adopts() -> None:
    sim = cluster(4)
    primary, replica = directory_owners(sim)
    hello(sim, primary)
    subscribe(sim, primary)
    bye(sim, primary)
    queued = publish(sim, replica, 4)
    sim.crash(primary)
    assert sim.settle()
    new_primary = directory_owners(sim)[0]
    assert new_primary != primary and record(sim)["holder"] == new_primary
    after = publish(sim, replica, 2)
    taker = sorted(set(sim.nodes) - {primary, new_primary})[0]
    assert hello(sim, taker)["session_present"] is True
    assert sim.settle()
    assert got(sim) == queued + after


@pytest.mark.timeout(60)
def test_dead_session_primary_loses_nothing_then_holder_dies() -> None:
    """kill -9 of the session shard's primary: the replica is promoted with the queue; then the holder dies too and
    the new primary rebuilds everything acknowledged."""
    sim = cluster(5)
    primary, replica = directory_owners(sim)
    holder, other, third = sorted(set(sim.nodes) - {primary, replica})
    hello(sim, holder)
    subscribe(sim, holder)
    bye(sim, holder)
    first = publish(sim, other, 3)
    sim.crash(primary)
    assert sim.settle()
    second = publish(sim, other, 3)
    sim.crash(holder)
    assert sim.settle()
    assert record(sim)["holder"] == directory_owners(sim)[0]
    assert hello(sim, third)["session_present"] is True
    assert sim.settle()
    assert got(sim) == first + second


@pytest.mark.timeout(60)
def test_clean_connect_and_expiry_delete_the_replicated_queue() -> None:
    sim = cluster(3)
    primary = directory_owners(sim)[0]
    n1, n2, _ = sorted(sim.nodes)
    hello(sim, n1, expiry=5)
    subscribe(sim, n1)
    bye(sim, n1)
    publish(sim, n2, 3)
    assert len(queue_records(sim, primary)) == 3
    for _ in range(30):
        sim.tick(0.25)
        assert sim.settle()
    assert record(sim) is None and queue_records(sim, primary) == []
    hello(sim, n1)
    subscribe(sim, n1)
    bye(sim, n1)
    publish(sim, n2, 2)
    assert len(queue_records(sim, primary)) == 2
    hello(sim, n2, clean=True)
    assert sim.settle()
    assert record(sim) is None and queue_records(sim, primary) == []


@pytest.mark.timeout(60)
def test_silent_holder_fails_the_takeover_in_time() -> None:
    sim = cluster()
    n1, n2, _ = sorted(sim.nodes)
    away_session(sim, n1)
    sim.pause(n1)
    send_hello(sim, n2)
    for _ in range(30):
        sim.tick(0.25)
        sim.drain()
    welcome = sim.session_clients[CLIENT].welcome()
    assert welcome is not None and welcome["session_present"] is False
    assert metric(sim, "sessions.takeover_failed") == 1


@pytest.mark.timeout(60)
def test_reserved_prefix_refused_for_clients() -> None:
    sim = cluster()
    n1, _, _ = sorted(sim.nodes)
    hello(sim, n1)
    result = subscribe(sim, n1, "$session/dev-42")["results"][0]
    assert result["code"] == codec.E_NOT_AUTHORIZED and "$session/" in result["reason"]
    sim.client_send(CLIENT, n1, codec.PUB, {"id": 9, "topic": "$session/other", "qos": 1}, b"x")
    error = sim.session_clients[CLIENT].frames[-1]
    assert error.type == codec.ERROR and error.header["code"] == codec.E_NOT_AUTHORIZED
    assert error.header["ref"] == 9
    assert metric(sim, "sessions.reserved_refused") == 2
    assert record(sim) is not None
    assert subscribe(sim, n1, "#")["results"] == [1]
    assert subscribe(sim, n1, "+/dev-42")["results"] == [1]
    assert sim.settle()
    assert not [t for t, _, _ in sim.session_clients[CLIENT].got if t.startswith("$")]  # wildcards skip the records


@pytest.mark.timeout(60)
def test_persistent_hello_needs_valid_expiry() -> None:
    sim = cluster()
    n1 = sorted(sim.nodes)[0]
    sim.client_send(CLIENT, n1, codec.HELLO, {"id": 1, "clean": False, "expiry": 0})
    frame = sim.session_clients[CLIENT].frames[-1]
    assert frame.type == codec.ERROR and frame.header["code"] == codec.E_BAD_HEADER


@pytest.mark.timeout(60)
def test_takeover_of_a_long_queue_in_chunks() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    away_session(sim, n1)
    queued = publish(sim, n3, 2500)  # past max_inflight (1 000) and SESSION_STATE's 1 000 per chunk
    assert sim.nodes[n1].core.destination.sessions[CLIENT].backlog
    assert hello(sim, n2)["session_present"] is True
    assert sim.settle()
    assert got(sim) == queued
    assert sim.nodes[n2].core.destination.sessions[CLIENT].held_bytes == 0


@pytest.mark.timeout(60)
def test_welcome_within_request_timeout_when_an_owner_is_slow() -> None:
    sim = cluster(6)
    a = sim.etcd.doc
    assert a is not None
    nodes = sorted(sim.nodes)
    directory = set(a.owners(sim.shard_of("$session/" + CLIENT.decode())))
    route_owners = set(a.owners(sim.shard_of("sensors/#")))
    slow = sorted(route_owners - directory)
    others = sorted(set(nodes) - directory - route_owners)
    if not slow or len(others) < 2:
        pytest.skip("this placement has no route owner outside the directory's owners")
    holder, taker = others[0], others[1]
    away_session(sim, holder)
    queued = publish(sim, nodes[0] if nodes[0] not in slow else holder, 3)
    sim.pause(slow[0])  # it takes the new holder's ROUTE_ADD but does not answer
    welcome, took = welcome_in_virtual_time(sim, taker)
    assert welcome is not None and welcome["session_present"] is True and welcome["node"] == taker
    assert took <= sim.cfg.request_timeout + 0.5
    assert metric(sim, "sessions.welcomed_before_routes") == 1
    assert got(sim) == queued
    sim.resume(slow[0])
    assert sim.settle()
    assert record(sim)["holder"] == taker


@pytest.mark.timeout(60)
def test_directory_read_falls_back_to_the_replica_in_time() -> None:
    sim = cluster(4)
    a = sim.etcd.doc
    assert a is not None
    nodes = sorted(sim.nodes)
    primary, replica = a.owners(sim.shard_of("$session/" + CLIENT.decode()))
    holder, taker = sorted(set(nodes) - {primary, replica})
    away_session(sim, holder)
    queued = publish(sim, holder, 3)
    sim.pause(primary)  # silent, still a member: the read must move on to the replica
    welcome, took = welcome_in_virtual_time(sim, taker)
    assert welcome is not None and welcome["session_present"] is True, welcome
    assert got(sim) == queued


@pytest.mark.timeout(60)
def test_session_survives_shard_moves_then_moves_to_a_new_node() -> None:
    sim = cluster()
    n1, n2, n3 = sorted(sim.nodes)
    away_session(sim, n1)
    before = publish(sim, n2, 10)
    new_nodes = [sim.join(), sim.join()]  # the rebalance moves shards, the directory's and the routes' among them
    assert sim.settle()
    after = publish(sim, n3, 10)
    assert hello(sim, new_nodes[1])["session_present"] is True
    assert sim.settle()
    assert got(sim) == before + after
    assert record(sim)["holder"] == new_nodes[1]
    assert has_route(sim, new_nodes[1]) and not has_route(sim, n1)


def unaccounted(sim: Sim, clients: dict[bytes, tuple[str, float]]) -> dict[bytes, list[bytes]]:
    """The invariant of replicated sessions: every acknowledged QoS 1 publish to a persistent client's topic (after
    its SUBACK) is delivered to it or in its session's replicated queue at the session shard's primary."""
    missing: dict[bytes, list[bytes]] = {}
    for rid, (topic, since) in clients.items():
        primary = directory_owners(sim, rid)[0]
        held = set(queue_records(sim, primary, rid)) if sim.nodes[primary].up else set()
        have = set(got(sim, rid)) | held
        acked = [b"%d" % p for p, (at, _, t, _, outcome, _) in sim.publishes.items()
                 if t == topic and at >= since and outcome == "acked"]  # fmt: skip
        lost = [p for p in acked if p not in have]
        if lost:
            missing[rid] = lost
    return missing


def kill_schedule(seed: int, publish_some: Callable[[Sim, random.Random, str, list[str]], None]) -> Sim:
    """A seeded schedule on 4 nodes (R = 2): persistent clients, each subscribed to its own topic, come and go
    through random nodes while ``publish_some(sim, rng, node, topics)`` publishes QoS 1 messages and nodes are
    killed (-9) and replaced, one at a time. After every step that settled, no acknowledged message is
    unaccounted for (``unaccounted``); at the end every client, reconnected, has received every one."""
    rng = random.Random(seed)
    sim = cluster(4)
    clients: dict[bytes, tuple[str, float]] = {}
    for i in range(4):
        rid, topic = b"car-%d" % i, f"cars/{i}/cmd"
        node = rng.choice(sorted(sim.nodes))
        hello(sim, node, rid=rid)
        assert subscribe(sim, node, topic, rid=rid)["results"] == [1]
        clients[rid] = (topic, sim.now)
    topics = [t for t, _ in clients.values()]
    for _step in range(25):
        live = sorted(n for n, node in sim.nodes.items() if node.up)
        action = rng.random()
        if action < 0.5:
            publish_some(sim, rng, rng.choice(live), topics)
        elif action < 0.75:
            rid = rng.choice(sorted(clients))
            sc = sim.session_clients[rid]
            if sc.node_id is None or not sim.nodes[sc.node_id].up:
                sc.node_id = None
                hello(sim, rng.choice(live), rid=rid)
            elif rng.random() < 0.5:
                bye(sim, sc.node_id, rid=rid)
            else:
                sim.client_away(rid)
        elif len(live) > 3:
            victim = rng.choice(live)
            sim.crash(victim)
            for sc in sim.session_clients.values():
                if sc.node_id == victim:
                    sc.node_id = None
        else:
            sim.join()
        assert sim.settle()
        assert unaccounted(sim, clients) == {}, sim.trace[-30:]
    for rid in sorted(clients):
        sc = sim.session_clients[rid]
        if sc.node_id is None or not sim.nodes[sc.node_id].up:
            sc.node_id = None
            hello(sim, sorted(n for n, node in sim.nodes.items() if node.up)[0], rid=rid)
    assert sim.settle()
    for rid, (topic, since) in clients.items():
        acked = {b"%d" % p for p, (at, _, t, _, outcome, _) in sim.publishes.items()
                 if t == topic and at >= since and outcome == "acked"}  # fmt: skip
        assert acked <= set(got(sim, rid)), (rid, sorted(acked - set(got(sim, rid))))
    return sim


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.timeout(120)
def test_persistent_sessions_survive_node_kills_seeded(seed: int) -> None:
    """``kill_schedule`` with single publishes: 1 to 5 at a time, each to a random client's topic."""

    def publish_some(sim: Sim, rng: random.Random, node: str, topics: list[str]) -> None:
        for _ in range(rng.randint(1, 5)):
            sim.publish(node, rng.choice(topics))

    kill_schedule(seed, publish_some)


# ---------------------------------------------------------------------- the window after a holder dies (item 2 gaps)
def lease_expires_unseen(sim: Sim, dead: str) -> None:
    """Advance the clock until ``dead``'s lease expired in etcd, the live nodes keeping theirs alive, without any
    node reading the view that shows it gone (``session_poll(node)`` then hands it to one node at a time)."""
    while dead in sim.etcd.members:
        sim.now += 0.25
        sim.etcd.expire(sim.now)
        for node_id in sorted(sim.nodes):
            sim.session_poll(node_id, read=False)


def route_owners(sim: Sim, filt: str = "sensors/#") -> tuple[str, ...]:
    a = sim.etcd.doc
    assert a is not None
    return a.owners(sim.shard_of(filt))


def outcome(sim: Sim, pid: int) -> str | None:
    return sim.publishes[pid][4]


@pytest.mark.timeout(60)
def test_route_owners_move_a_dead_holders_session_routes_to_the_adopter() -> None:
    """The window: the route owners see the holder gone before the session shard's primary does. The session's
    route moves to the primary instead of going; a publish resolved then reaches the primary, which does not
    acknowledge it before it adopted the session (it refuses ``unavailable``: the publisher sends it again);
    once it sees the holder gone it adopts on the spot and takes it. Every acknowledged message is delivered."""
    for owners_first in (True, False):
        sim = cluster(5)
        primary, replica = directory_owners(sim)
        candidates = sorted(set(sim.nodes) - {primary, replica} - set(route_owners(sim)))
        holder = candidates[0] if candidates else sorted(set(sim.nodes) - {primary, replica})[0]
        entry = sorted(set(sim.nodes) - {primary, replica, holder})[0]
        away_session(sim, holder)
        before = publish(sim, entry, 3)
        sim.crash(holder)
        lease_expires_unseen(sim, holder)
        readers = [n for n in sorted(sim.nodes) if n not in (holder, primary)]
        if owners_first:
            for node in readers:  # everyone but the primary sees the holder gone
                sim.session_poll(node)
            sim.drain()
            assert metric(sim, "routes.sessions_retargeted") >= 1
            early = sim.publish(entry, TOPIC)
            assert early is not None
            sim.drain()
            assert outcome(sim, early) == codec.E_UNAVAILABLE  # refused, not acknowledged into nowhere
            # Refused by the primary (a moved route) or by the entry node (an owner's answer naming the dead holder)
            assert metric(sim, "sessions.moved_refused") + metric(sim, "sessions.publish_refused_holder_gone") >= 1
            sim.session_poll(primary)  # now the primary sees it too: it adopts
        else:
            sim.session_poll(primary)
            for node in readers:
                sim.session_poll(node)
        sim.drain()
        late = sim.publish(entry, TOPIC)
        assert late is not None
        assert sim.settle()
        assert outcome(sim, late) == "acked"
        assert record(sim)["holder"] == primary
        acked = [b"%d" % p for p, (*_, o, _) in sim.publishes.items() if o == "acked"]
        assert hello(sim, entry)["session_present"] is True
        assert sim.settle()
        assert set(acked) <= set(got(sim)) and got(sim)[:3] == before


def welcome_while_views_come(sim: Sim, node: str, limit: float = 20) -> dict[str, Any] | None:
    """A persistent HELLO to ``node`` while time passes in ticks of 0.25 s, every node reading its view after each
    (a dead node leaves the views when its lease expires): the WELCOME, or None within ``limit`` virtual seconds."""
    sc = sim.session_clients[CLIENT]
    sc.frames.clear()
    send_hello(sim, node)
    start = sim.now
    while sc.welcome() is None and sim.now - start < limit:
        sim.tick(0.25)
        for node_id in sorted(sim.nodes):
            sim.session_poll(node_id)
        sim.drain()
        sim.pump_clients()
    return sc.welcome()


@pytest.mark.timeout(60)
def test_early_reconnect_through_a_node_that_still_sees_the_dead_holder() -> None:
    """The client reconnects at once, through a node whose view still shows the dead holder: the takeover gets no
    answer, so the node asks the session shard's primary to rebuild; the primary waits until it sees the holder
    gone and hands the session over, queue and all (not a fresh session over a leaked replica)."""
    sim = cluster(4)
    primary, replica = directory_owners(sim)
    holder, other = sorted(set(sim.nodes) - {primary, replica})
    away_session(sim, holder)
    queued = publish(sim, other, 4)
    sim.crash(holder)
    welcome = welcome_while_views_come(sim, other)  # at once: every view still shows the holder for its lease
    assert welcome is not None and welcome["session_present"] is True
    assert metric(sim, "sessions.takeover_fell_back") == 1 and metric(sim, "sessions.rebuilds_asked") == 1
    assert metric(sim, "sessions.fresh") == 1  # the first connect only
    assert sim.settle()
    assert got(sim) == queued
    assert record(sim)["holder"] == other


@pytest.mark.timeout(60)
def test_early_reconnect_primary_never_answers_fresh_purges_the_replica() -> None:
    """A fresh session over a replicated one (its holder and its primary both silent): the old queue records are
    purged at the primary before the new holder's, so nothing leaks."""
    sim = cluster(5)
    primary, replica = directory_owners(sim)
    holder, other, _third = sorted(set(sim.nodes) - {primary, replica})
    away_session(sim, holder)
    publish(sim, other, 3)
    assert len(queue_records(sim, primary)) == 3
    core = sim.nodes[primary].core
    refused: list[str] = []
    original = core.sessions.on_take

    def silent_rebuild(sender: str, frame: codec.Frame, tries: int = 0) -> None:
        if frame.header.get("rebuild") is True:  # this primary refuses every rebuild (as if it saw the holder alive)
            refused.append(sender)
            core.refuse_peer(sender, frame, codec.E_UNAVAILABLE, "test: no rebuild")
            return
        original(sender, frame, tries)

    core.sessions.on_take = silent_rebuild  # type: ignore[method-assign]
    core.sessions.holders_lost = lambda gone: None  # type: ignore[method-assign]  # nor adopts on its own
    sim.crash(holder)
    welcome = welcome_while_views_come(sim, other)
    assert welcome is not None and welcome["session_present"] is False
    assert refused and metric(sim, "sessions.replica_purged") == 1
    assert sim.settle()
    assert queue_records(sim, primary) == [] and queue_records(sim, replica) == []
    fresh = publish(sim, other, 2)  # the fresh session's own queue is not purged
    assert record(sim)["holder"] == other
    assert got(sim) == [] or set(got(sim)) <= set(fresh)


def publish_while_nodes_learn(sim: Sim, rng: Any, dead: str, topics: list[str], rounds: int = 12) -> None:
    """After ``dead`` was killed: the clock runs past its lease expiry while QoS 1 publishes go through random live
    nodes, the nodes read their views one at a time in a random order, and frames are delivered partially, so
    publishes are resolved and answered while some nodes see the holder gone and others do not."""
    for _ in range(rounds):
        sim.now += 0.25
        sim.etcd.expire(sim.now)
        live = [n for n in sorted(sim.nodes) if sim.nodes[n].up]
        rng.shuffle(live)
        for node in live:
            sim.session_poll(node, read=rng.random() < 0.4)
            sim.run_timers(node)
            if rng.random() < 0.6:
                sim.publish(rng.choice(live), rng.choice(topics))
            for src, dst in sim.deliverable():
                if rng.random() < 0.5:
                    sim.deliver(src, dst)
        sim.pump_clients()


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.timeout(120)
def test_publishes_while_the_holder_dies_lose_nothing_acknowledged_seeded(seed: int) -> None:
    """Persistent clients away (or connected) on random nodes; a holder is killed while QoS 1 messages keep being
    published and the nodes learn of the death one by one: after it settled, every acknowledged message for a
    live persistent session is delivered or in its replicated queue, and a reconnect gets them all."""

    rng = random.Random(seed)
    sim = cluster(5)
    clients: dict[bytes, tuple[str, float]] = {}
    for i in range(4):
        rid, topic = b"car-%d" % i, f"cars/{i}/cmd"
        node = rng.choice(sorted(sim.nodes))
        hello(sim, node, rid=rid)
        assert subscribe(sim, node, topic, rid=rid)["results"] == [1]
        clients[rid] = (topic, sim.now)
        if rng.random() < 0.5:
            bye(sim, node, rid=rid)
    topics = [t for t, _ in clients.values()]
    for _kill in range(2):
        holders = sorted({n for n, node in sim.nodes.items() if node.up
                          for rid in clients if rid in node.core.destination.sessions})  # fmt: skip
        victim = rng.choice(holders)
        sim.crash(victim)
        for sc in sim.session_clients.values():
            if sc.node_id == victim:
                sc.node_id = None
        publish_while_nodes_learn(sim, rng, victim, topics)
        assert sim.settle()
        assert unaccounted(sim, clients) == {}, sim.trace[-40:]
        sim.join()
        assert sim.settle()
    live = sorted(n for n, node in sim.nodes.items() if node.up)
    for rid in sorted(clients):
        sc = sim.session_clients[rid]
        if sc.node_id is None or not sim.nodes[sc.node_id].up:
            sc.node_id = None
            hello(sim, rng.choice(live), rid=rid)
    assert sim.settle()
    for rid, (topic, since) in clients.items():
        acked = {b"%d" % p for p, (at, _, t, _, o, _) in sim.publishes.items()
                 if t == topic and at >= since and o == "acked"}  # fmt: skip
        assert acked <= set(got(sim, rid)), (rid, sorted(acked - set(got(sim, rid))))
