"""Batched session-queue writes grouped per primary node (RETAINM) through the protocol core, in the in-memory cluster.

What is checked: with many persistent sessions on one holder, a forwarded batch's records go to each session shard's
primary in ONE frame (a part per shard) and on to each replica node in one frame, and the forwards are acknowledged
once every owner answered; a part with a stale shard epoch is answered stale alone (its records are sent again, the
other shards' are acknowledged from the first answer); a replica that does not answer fails exactly the shards it
holds, and so every forward with a record there; a batch written while shards stream to a hand-off target is relayed
to the target per shard and loses nothing.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shardmq.router import codec
from shardmq.testing.simulation import Sim
from tests.test_retained_sim import cluster
from tests.test_sessions_batch_sim import (
    acked_ids,
    frames_of,
    publish_batch,
    refused_ids,
    stream_some_shards_to_a_newcomer,
)
from tests.test_sessions_sim import bye, directory_owners, hello, queue_records, subscribe

CLIENTS = [b"dev-%d" % i for i in range(24)]


def many_away(sim: Sim, holder: str) -> None:
    """CLIENTS' persistent sessions, subscribed to sensors/# at QoS 1, away, held by ``holder``."""
    for rid in CLIENTS:
        hello(sim, holder, rid=rid)
        subscribe(sim, holder, rid=rid)
        bye(sim, holder, rid=rid)


def shards_by_primary(sim: Sim) -> dict[str, set[int]]:
    a = sim.etcd.doc
    assert a is not None
    out: dict[str, set[int]] = {}
    for rid in CLIENTS:
        shard = sim.shard_of("$session/" + rid.decode())
        out.setdefault(a.owners(shard)[0], set()).add(shard)
    return out


def writes(sent: list[tuple[str, str, Any, Any]], replica: bool) -> list[tuple[str, str, Any, Any]]:
    kinds = (codec.RETAIN, codec.RETAINS, codec.RETAINM)
    return [(s, d, t, h) for s, d, t, h in sent if t in kinds and h["replica"] is replica]


@pytest.mark.timeout(60)
def test_one_frame_per_primary_and_per_replica_node_carries_many_shards() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    many_away(sim, holder)
    remote = {p: s for p, s in shards_by_primary(sim).items() if p != holder}
    assert any(len(s) >= 2 for s in remote.values())
    sent = frames_of(sim)
    payloads = publish_batch(sim, sorted(sim.nodes)[1], 1, 5)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 6))
    to_primaries = [(d, t, h) for s, d, t, h in writes(sent, False) if s == holder]
    assert sorted(d for d, _, _ in to_primaries) == sorted(remote)  # one frame to each primary
    for dst, frame_type, h in to_primaries:
        if len(remote[dst]) >= 2:
            assert frame_type == codec.RETAINM
            assert {p[0] for p in h["parts"]} == remote[dst]
    pairs = [(s, d) for s, d, _, _ in writes(sent, True)]
    assert len(pairs) == len(set(pairs))  # one replica frame per (primary, replica node)
    for rid in CLIENTS:
        for owner in directory_owners(sim, rid):
            assert queue_records(sim, owner, rid) == payloads, (rid, owner)


@pytest.mark.timeout(60)
def test_a_stale_part_is_sent_again_alone_and_the_others_are_acknowledged() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    many_away(sim, holder)
    primary, shards = next((p, s) for p, s in sorted(shards_by_primary(sim).items()) if p != holder and len(s) >= 2)
    stale_shard = min(shards)
    sent = frames_of(sim)
    original = sim.send
    bent: list[int] = []

    def send(src: str, dst: str, parts: list[bytes]) -> None:
        header = orjson.loads(parts[1]) if parts[0] == codec.RETAINM else {}
        if not bent and src == holder and dst == primary and header.get("replica") is False:
            for part in header["parts"]:
                if part[0] == stale_shard:
                    part[1] += 7  # a shard epoch the primary does not have: that part alone is stale
            bent.append(header["id"])
            parts = [parts[0], orjson.dumps(header), *parts[2:]]
        original(src, dst, parts)

    sim.send = send  # type: ignore[method-assign]
    payloads = publish_batch(sim, sorted(sim.nodes)[1], 1, 5)
    assert sim.settle()
    assert bent
    assert acked_ids(sim) == set(range(1, 6))
    acks = [h for s, d, t, h in sent if t == codec.RETAINM_ACK and s == primary and h["id"] == bent[0]]
    assert [x[0] for x in acks[0]["stale"]] == [stale_shard] and acks[0]["failed"] == []
    again = [h for s, d, t, h in writes(sent, False) if s == holder and d == primary][1:]
    assert len(again) == 1 and again[0].get("shard") == stale_shard  # only the stale shard's records again
    assert sim.nodes[holder].core.metrics["retained.stale_retries"] == 1
    for rid in CLIENTS:
        for owner in directory_owners(sim, rid):
            assert queue_records(sim, owner, rid) == payloads, (rid, owner)


@pytest.mark.timeout(60)
def test_a_silent_replica_fails_exactly_the_shards_it_holds() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    many_away(sim, holder)
    primary = next(p for p, s in sorted(shards_by_primary(sim).items()) if p != holder and len(s) >= 2)
    silent = next(n for n in sorted(sim.nodes) if n != primary)
    sent = frames_of(sim, keep=lambda src, dst, parts: not (dst == silent and parts[0] == codec.RETAINM
                                                           and orjson.loads(parts[1])["replica"]))  # fmt: skip
    publish_batch(sim, sorted(sim.nodes)[1], 1, 5)
    assert sim.settle()
    assert acked_ids(sim) == set()  # every message has a record in a shard the silent node holds
    assert set(refused_ids(sim)) == set(range(1, 6))
    held = [orjson.loads(p[1]) for s, d, p in sim.held if s == primary]  # type: ignore[attr-defined]
    assert len(held) == 1
    asked = [h["id"] for s, d, t, h in writes(sent, False) if s == holder and d == primary]
    acks = [h for s, d, t, h in sent if t == codec.RETAINM_ACK and s == primary and h["id"] in asked]
    assert acks and {f[0] for f in acks[0]["failed"]} == {p[0] for p in held[0]["parts"]}


@pytest.mark.timeout(60)
def test_a_batch_during_a_handoff_is_relayed_per_shard() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    many_away(sim, holder)
    newcomer, streaming = stream_some_shards_to_a_newcomer(sim)
    sent = frames_of(sim)
    payloads = publish_batch(sim, holder, 1, 10)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 11))
    to_target = [h for _, d, t, h in writes(sent, True) if d == newcomer and t == codec.RETAINM]
    relayed = {p[0] for h in to_target for p in h["parts"]}
    moving = {sim.shard_of("$session/" + rid.decode()) for rid in CLIENTS} & streaming
    assert moving and moving <= relayed
    for rid in CLIENTS:
        for owner in directory_owners(sim, rid):
            assert queue_records(sim, owner, rid) == payloads, (rid, owner)
