"""Shared subscriptions through the protocol core: real ``NodeCore``s in the in-memory cluster (``testing.simulation``).

What is checked: each QoS 1 message to a shared group reaches exactly one member, across nodes, and every member
gets some; a plain subscriber of the same filter gets every message, and a client that is both gets both; no
retained messages on a shared subscribe; a member that unsubscribes or vanishes holding unacknowledged messages
has them go to another member (on its node, or another node); a destination node killed while its member held
acknowledged messages loses none of them (the entry node's copy goes to another node); bad groups are refused with
``invalid_filter``; and, as a hypothesis property, any mix of members on nodes and publishes gives each message to
exactly one member.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardmq.protocol.records import Publish, SharedForward
from shardmq.router import codec
from shardmq.testing.simulation import Sim
from tests.test_retained_sim import cluster, retain

SHARE = "$share/g/jobs/+"
TOPIC = "jobs/a"


def join(sim: Sim, rid: bytes, node: str, share: str = SHARE, ack: bool = True) -> dict:
    sim.client_send(rid, node, codec.SUB, {"id": 2, "filters": [share], "qos": 1})
    sim.session_clients[rid].ack = ack
    assert sim.settle()
    return next(f.header for f in reversed(sim.session_clients[rid].frames) if f.type in (codec.SUBACK, codec.ERROR))


def publish(sim: Sim, node: str, count: int, topic: str = TOPIC) -> list[bytes]:
    payloads = []
    for _ in range(count):
        pid = sim.publish(node, topic)
        assert pid is not None
        payloads.append(b"%d" % pid)
        sim.drain()
    assert sim.settle()
    for p in payloads:
        assert sim.publishes[int(p)][4] == "acked", sim.publishes[int(p)]
    return payloads


def got(sim: Sim, rid: bytes) -> list[bytes]:
    return [payload for _, payload, _ in sim.session_clients[rid].got]


def test_each_message_to_exactly_one_member_across_nodes() -> None:
    sim = cluster(3)
    members = {b"m0": "n0", b"m1": "n1", b"m2": "n1"}
    for rid, node in members.items():
        assert join(sim, rid, node)["results"] == [1]
    sent = publish(sim, "n2", 60)
    counts = Counter(p for rid in members for p in got(sim, rid))
    assert set(counts) == set(sent) and set(counts.values()) == {1}
    for rid in members:
        assert got(sim, rid), f"{rid!r} got nothing"
    # Weighted by members per node: n1 has two of the three members.
    on_n1 = len(got(sim, b"m1")) + len(got(sim, b"m2"))
    assert on_n1 == 40, on_n1


def test_plain_subscriber_gets_all_and_a_client_in_both_gets_both() -> None:
    sim = cluster(3)
    join(sim, b"m0", "n0")
    join(sim, b"m1", "n1")
    join(sim, b"plain", "n2", share="jobs/+")
    join(sim, b"m1", "n1", share="jobs/#")  # m1 is also a plain subscriber
    sent = publish(sim, "n0", 10)
    assert sorted(got(sim, b"plain")) == sorted(sent)
    m1 = Counter(got(sim, b"m1"))
    assert set(m1) == set(sent)  # as a plain subscriber it gets every message
    group = Counter(got(sim, b"m0")) + Counter({p: n - 1 for p, n in m1.items() if n > 1})
    assert group == Counter(sent)  # and through the group each message reaches exactly one member


def test_no_retained_on_shared_subscribe() -> None:
    sim = cluster(3)
    retain(sim, "n0", TOPIC)
    join(sim, b"m0", "n1")
    assert got(sim, b"m0") == []
    assert not any(f.header.get("retain") for f in sim.session_clients[b"m0"].frames if f.type == codec.MSG)


@pytest.mark.parametrize(
    ("share", "fix"),
    [("$share//jobs/+", "must not be empty"), ("$share/g+/jobs", "must not contain '+'"),
     ("$share/g#/jobs", "must not contain '#'"), ("$share/g", "non-empty group and filter"),
     ("$share/g/jobs/#/x", "'#' must be the last level")],
)  # fmt: skip
def test_bad_share_refused(share: str, fix: str) -> None:
    sim = cluster(2)
    answer = join(sim, b"m0", "n0", share=share)
    result = answer["results"][0]
    assert result["code"] == codec.E_INVALID_FILTER and fix in result["reason"], result


def test_unsubscribing_member_hands_unacked_to_local_member() -> None:
    sim = cluster(3)
    join(sim, b"slow", "n1", ack=False)
    join(sim, b"fast", "n1")
    sent = publish(sim, "n0", 10)
    held = got(sim, b"slow")
    assert held, "the round robin gave the slow member nothing"
    sim.client_send(b"slow", "n1", codec.UNSUB, {"id": 3, "filters": [SHARE]})
    assert sim.settle()
    assert sorted(got(sim, b"fast")) == sorted(sent)  # everything, held ones again (dup)
    dups = [p for _, p, dup in sim.session_clients[b"fast"].got if dup]
    assert sorted(dups) == sorted(held)
    assert sim.nodes["n1"].core.metrics["shared.redispatched_member_lost"] == len(held)


def test_vanished_member_hands_unacked_to_other_node() -> None:
    sim = cluster(3)
    join(sim, b"slow", "n1", ack=False)
    join(sim, b"other", "n2")
    sent = publish(sim, "n0", 10)
    held = got(sim, b"slow")
    assert held
    sim.client_away(b"slow")  # its connection is gone: the node finds it unreachable
    assert sim.settle()
    assert sorted(got(sim, b"other")) == sorted(sent)
    assert sim.nodes["n1"].core.metrics["shared.sent_on"] == len(held)
    # The entry node's copies are all released (every message was acknowledged by a member).
    assert not any(type(r).__name__ == "SharedForward" for r, _ in sim.nodes["n0"].core.requests._open.values())


def test_destination_node_killed_loses_no_acked_message() -> None:
    sim = cluster(4)
    join(sim, b"doomed", "n1", ack=False)
    join(sim, b"other", "n2")
    sent = publish(sim, "n0", 10)
    held = got(sim, b"doomed")
    assert held
    sim.crash("n1")
    assert sim.settle()
    assert sorted(set(got(sim, b"other"))) == sorted(sent)
    assert sim.nodes["n0"].core.metrics["shared.redispatched_node_lost"] == len(held)
    assert sim.nodes["n0"].core.metrics["shared.lost_after_ack"] == 0


def held_copies(sim: Sim, node: str) -> int:
    return sum(1 for r, _ in sim.nodes[node].core.requests._open.values() if type(r).__name__ == "HeldCopy")


def test_entry_node_killed_with_its_member_holding_loses_no_acked_message() -> None:
    """The member is on the publisher's own node: a backup at another node (SHARED_COPY) goes on if it dies."""
    sim = cluster(4)
    join(sim, b"doomed", "n0", ack=False)
    join(sim, b"other", "n2")
    sent = publish(sim, "n0", 10)  # every one acknowledged
    held = got(sim, b"doomed")
    assert held
    # The backups of what the local member holds sit with the node that has members of the share.
    assert held_copies(sim, "n2") == len(held)
    sim.crash("n0")
    assert sim.settle()
    assert sorted(set(got(sim, b"other"))) == sorted(sent)
    assert sim.nodes["n2"].core.metrics["shared.redispatched_entry_lost"] == len(held)
    assert sim.nodes["n2"].core.metrics["shared.lost_after_ack"] == 0
    assert held_copies(sim, "n2") == 0


def test_local_member_ack_releases_the_backup() -> None:
    sim = cluster(3)
    join(sim, b"local", "n0")
    join(sim, b"away", "n1")
    sent = publish(sim, "n0", 10)
    assert sorted(got(sim, b"local") + got(sim, b"away")) == sorted(sent)
    assert got(sim, b"local")
    assert sim.nodes["n0"].core.metrics["shared.copies_out"] == len(got(sim, b"local"))
    assert not any(held_copies(sim, n) for n in sim.nodes)  # released once the member acknowledged
    assert not any(type(r).__name__ == "SharedCopy" for r, _ in sim.nodes["n0"].core.requests._open.values())


def shared_fwd(sim: Sim, src: str, dst: str, share: str, fid: int) -> Publish:
    """A SHARED_FWD from ``src`` as its entry side would send it, the answer to come back to ``src``'s registry."""
    core = sim.nodes[src].core
    pub = Publish(None, None, TOPIC, 1, b"x", acks_left=1)
    core.requests.open(SharedForward(dst, pub, share), core.entry, rid=fid)
    header = {"id": fid, "topic": TOPIC, "qos": 1, "share": share, "pid": 1}
    sim.send(src, dst, codec.encode(codec.SHARED_FWD, header, b"x"))
    return pub


def test_no_member_anywhere_at_arrival_is_acknowledged_like_no_subscriber() -> None:
    """A route named a member that is gone and no node has another: FWD_ACK, as a plain publish that matches no
    subscriber is acknowledged; counted ``shared.no_member_acked``, not lost after an acknowledgement."""
    sim = cluster(3)
    pub = shared_fwd(sim, "n0", "n1", "$share/nobody/jobs/+", 10**9)
    assert sim.settle()
    assert pub.acks_left == 0 and not pub.failed
    n1 = sim.nodes["n1"].core.metrics
    assert n1["shared.no_member_acked"] == 1 and n1["shared.lost"] == 0
    assert sim.nodes["n0"].core.metrics["shared.lost_after_ack"] == 0


def test_member_elsewhere_refusing_at_arrival_refuses_upstream() -> None:
    """No member here, and the node that has one refuses (its share's queue is full): the destination answers
    ``overloaded`` instead of FWD_ACK, so the publisher is told and sends it again."""
    sim = cluster(3)
    join(sim, b"full", "n2", ack=False)
    n2 = sim.nodes["n2"].core
    n2.cfg = replace(n2.cfg, max_inflight=1, max_queued=0)
    publish(sim, "n0", 1)  # fills its one-message window
    pub = shared_fwd(sim, "n0", "n1", SHARE, 10**9)
    assert sim.settle()
    assert pub.failed and pub.acks_left == 1
    assert sim.nodes["n0"].core.metrics["errors.overloaded"] == 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    placement=st.lists(st.integers(0, 2), min_size=1, max_size=5),
    publishers=st.lists(st.integers(0, 2), min_size=1, max_size=12),
    leave=st.one_of(st.none(), st.integers(0, 4)),
)
def test_property_exactly_one_member(placement: list[int], publishers: list[int], leave: int | None) -> None:
    """Any members on any nodes, publishes from any node, and maybe one member leaving holding unacknowledged
    messages halfway: every message reaches exactly one current member (a redispatched one counts once more only
    at the member that left, which never acknowledged it)."""
    sim = cluster(3)
    rids = [b"m%d" % i for i in range(len(placement))]
    leaving = rids[leave] if leave is not None and leave < len(rids) and len(rids) > 1 else None
    for rid, node in zip(rids, placement, strict=True):
        join(sim, rid, f"n{node}", ack=rid != leaving)
    half = len(publishers) // 2
    sent = [p for n in publishers[:half] for p in publish(sim, f"n{n}", 1)]
    if leaving is not None:
        sim.client_send(leaving, sim.session_clients[leaving].node_id or "n0", codec.UNSUB,
                        {"id": 3, "filters": [SHARE]})  # fmt: skip
        assert sim.settle()
    sent += [p for n in publishers[half:] for p in publish(sim, f"n{n}", 1)]
    counts = Counter(p for rid in rids if rid != leaving for p in set(got(sim, rid)))
    assert sorted(counts) == sorted(sent), (counts, sent)
    assert set(counts.values()) == {1}
