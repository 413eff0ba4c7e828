"""Access control in the protocol core (``protocol/access.py``), driven through a real ``NodeCore`` in the
simulation: every SUB and PUB a principal sends is granted or refused exactly as a brute-force reading of its
ACL says (``filter_matches`` for publishes, ``filter_covers`` for subscriptions, each proved in
``tests/test_acl.py``), and sessions are bound to the principal that opened them."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.protocol import NodeCore
from shardmq.router import codec
from shardmq.router.acl import Acl, filter_covers
from shardmq.router.matching import filter_matches
from shardmq.testing.simulation import Sim, SimConfig

LEVELS = ["a", "b", "$s"]
_ids = itertools.count(1)

topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=3).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=1, max_size=3))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


SENT: list[tuple[bytes, list[bytes]]] = []  # what the node sent to clients, recorded by ``one_node``


def one_node() -> tuple[Sim, str]:
    sim = Sim(SimConfig(shard_count=8, replication=1, access_control=True))
    node = sim.join()
    assert sim.settle()
    sim_node = sim.nodes[node]
    send_client = sim_node.send_client

    def recorded(rid: bytes, parts: list[bytes]) -> bool:
        SENT.append((rid, parts))
        return send_client(rid, parts)

    sim_node.send_client = recorded  # type: ignore[method-assign]
    SENT.clear()
    return sim, node


def send(sim: Sim, node: str, rid: bytes, principal: str | None, frame: list[bytes]) -> list[codec.Frame]:
    """Feed one client frame to the node's core and deliver what follows; the frames sent back to ``rid``."""
    start = len(SENT)
    core: NodeCore = sim.nodes[node].enter()
    core.on_client_parts([rid, *frame], principal)
    core.flush()
    sim.settle()
    return [codec.decode(parts, max_payload=1 << 30) for r, parts in SENT[start:] if r == rid]


@settings(max_examples=150, deadline=None)
@given(
    publish=st.lists(filters(), max_size=3),
    subscribe=st.lists(filters(), max_size=3),
    wanted=st.lists(filters(), min_size=1, max_size=4),
    published=st.lists(topics, min_size=1, max_size=4),
)
def test_the_core_grants_exactly_what_the_acl_allows(
    publish: list[str], subscribe: list[str], wanted: list[str], published: list[str]
) -> None:
    sim, node = one_node()
    sim.nodes[node].core.access.set_principals({"p": Acl(tuple(publish), tuple(subscribe))})
    rid = b"client-p"
    sub_id = next(_ids)
    [suback] = send(sim, node, rid, "p", codec.encode(codec.SUB, {"id": sub_id, "filters": wanted, "qos": 1}))
    assert suback.type == codec.SUBACK
    for filt, result in zip(wanted, suback.header["results"], strict=True):
        allowed = any(filter_covers(a, filt) for a in subscribe)
        assert (result == 1) == allowed, (filt, subscribe, result)
        if not allowed:
            assert result["code"] == codec.E_NOT_AUTHORIZED
    for topic in published:
        pub_id = next(_ids)
        replies = send(sim, node, rid, "p", codec.encode(codec.PUB, {"id": pub_id, "topic": topic, "qos": 1}, b"m"))
        acked = any(f.type == codec.PUBACK and pub_id in f.header["ids"] for f in replies)
        refused = [f for f in replies if f.type == codec.ERROR and f.header.get("ref") == pub_id]
        allowed = any(filter_matches(p, topic) for p in publish)
        assert acked == allowed and bool(refused) == (not allowed), (topic, publish, replies)
        if refused:
            assert refused[0].header["code"] == codec.E_NOT_AUTHORIZED


def test_a_frame_without_a_known_principal_is_refused_whatever_it_asks() -> None:
    sim, node = one_node()
    sim.nodes[node].core.access.set_principals({"p": Acl.everything()})
    for principal in (None, "", "stranger"):
        [reply] = send(sim, node, b"c", principal, codec.encode(codec.HELLO, {"id": 7}))
        assert reply.type == codec.ERROR and reply.header["code"] == codec.E_NOT_AUTHORIZED
        assert reply.header["ref"] == 7
    assert b"c" not in sim.nodes[node].core.destination.sessions


def test_another_principal_on_the_same_routing_id_gets_a_new_session() -> None:
    sim, node = one_node()
    core = sim.nodes[node].core
    core.access.set_principals({"victim": Acl.everything(), "thief": Acl(subscribe=("x",))})
    send(sim, node, b"id", "victim", codec.encode(codec.SUB, {"id": 1, "filters": ["secret/#"], "qos": 1}))
    assert core.destination.sessions[b"id"].filters == {"secret/#": 1}
    [welcome] = send(sim, node, b"id", "thief", codec.encode(codec.HELLO, {"id": 2}))
    assert welcome.type == codec.WELCOME and welcome.header["session_present"] is False
    session = core.destination.sessions[b"id"]
    assert session.principal == "thief" and session.filters == {}
    assert core.metrics["security.session_taken_by_other_principal"] == 1


def test_a_changed_or_revoked_acl_ends_that_principals_sessions_only() -> None:
    sim, node = one_node()
    core = sim.nodes[node].core
    core.access.set_principals({"a": Acl(subscribe=("t/#",)), "b": Acl(subscribe=("t/#",))})
    for rid, principal in ((b"ca", "a"), (b"cb", "b")):
        send(sim, node, rid, principal, codec.encode(codec.SUB, {"id": 1, "filters": ["t/x"], "qos": 0}))
    start = len(SENT)
    core.access.set_principals({"a": Acl(subscribe=("t/x",)), "b": Acl(subscribe=("t/#",))})
    ended = [(r, codec.decode(p).header["code"]) for r, p in SENT[start:]]
    assert ended == [(b"ca", codec.E_NOT_AUTHORIZED)]
    assert set(core.destination.sessions) == {b"cb"}
    core.access.set_principals({"a": Acl(subscribe=("t/x",))})
    assert set(core.destination.sessions) == set()
    [reply] = send(sim, node, b"cb", "b", codec.encode(codec.PING, {"id": 3}))
    assert reply.type == codec.ERROR and reply.header["code"] == codec.E_NOT_AUTHORIZED
