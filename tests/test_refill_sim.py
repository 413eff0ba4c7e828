"""Shards filled from nobody, in the deterministic simulation (``shardmq.testing.simulation``).

When a shard loses every owner at once, the leader gives it new owners that start with no routes; each node with
subscribers there adds its routes again (``Subscriptions.reannounce_orphaned``). Until those ROUTE_ADDs arrived,
an answer from the new owners' empty table sent a QoS 1 publish to nobody and acknowledged it (found by the fault
schedule): the new owners refuse lookups for the shard (``unavailable``) until every member reported its routes
there complete (``refilled`` on its ROUTE_ADD), a member that leaves the view meanwhile owing nothing, and answer
from what they have after ``request_timeout`` at most.
"""

from __future__ import annotations

from shardmq.rebalance import Member, target_table
from shardmq.testing.simulation import Sim, SimConfig

CONFIG = SimConfig(shard_count=16, replication=2)


def scenario(config: SimConfig = CONFIG, laggards: int = 0) -> tuple[Sim, str, str, list[str], list[str], str]:
    """5 nodes (and one per laggard); a subscriber on a node that is neither the leader nor an owner of its
    filter's shard, before the crash or after; both owners of that shard crash, and every node except the
    subscriber's (and ``laggards`` more, neither leader nor owner) reads views and exchanges frames until the
    shard's new owners are committed. Returns the sim, the filter, the subscriber's node, the new owners, the
    laggards and a publisher (not a laggard, and not an owner where another node is left)."""
    sim = Sim(config)
    for _ in range(5 + laggards):
        sim.join()
    assert sim.settle()
    leader = sim.leader_node()
    doc = sim.etcd.doc
    assert leader is not None and doc is not None
    for i in range(200):
        filt = f"r/{i}"
        shard = sim.shard_of(filt)
        dead = doc.owners(shard)
        survivors = {n: Member() for n in sim.live_members() if n not in dead}
        table = target_table(survivors, config.shard_count, config.replication)
        assert table is not None
        others = [n for n in sorted(survivors) if n not in (*table[shard], leader.node_id)]
        if leader.node_id not in dead and len(others) > laggards:
            break
    subscriber = others[0]  # not an owner before the crash, nor after it
    laggard_nodes = others[1 : 1 + laggards]
    assert sim.subscribe(subscriber, filt)
    assert sim.settle() and sim.acked.get(filt) == {subscriber}
    for node in dead:
        sim.crash(node)
    quiet = {subscriber, *laggard_nodes}
    new_owners: tuple[str, ...] = ()
    for _ in range(200):
        sim.now += 0.25
        sim.etcd.expire(sim.now)
        for node in sorted(sim.nodes):
            sim.session_poll(node, read=node not in quiet)
            if node not in quiet:
                sim.run_timers(node)
        sim.lead(leader.node_id)
        for src, dst in sim.deliverable():
            if dst not in quiet:
                while (src, dst) in sim.channels:
                    sim.deliver(src, dst)
        doc = sim.etcd.doc
        new_owners = doc.owners(shard)
        committed = new_owners and not set(new_owners) & set(dead)
        if committed and all(sim.nodes[o].core.view.assignment.owners(shard) == new_owners for o in new_owners):
            break
    assert new_owners and not set(new_owners) & set(dead)
    candidates = sorted(sim.live_members() - {*laggard_nodes, subscriber}, key=lambda n: (n in new_owners, n))
    publisher = candidates[0]  # not an owner where one is left: its publish asks the owners over the network
    return sim, filt, subscriber, list(new_owners), laggard_nodes, publisher


def publish_and_wait(sim: Sim, node: str, topic: str, quiet: set[str], rounds: int = 8) -> list:
    """Publish through ``node`` and deliver frames (none to ``quiet`` nodes) until the publisher has its answer;
    the publish's record: [time, entry, topic, expected, outcome, nodes reached]."""
    pid = sim.publish(node, topic)
    assert pid is not None
    record = sim.publishes[pid]
    for _ in range(rounds):
        for src, dst in sim.deliverable():
            if dst not in quiet:
                while (src, dst) in sim.channels:
                    sim.deliver(src, dst)
        if record[4] is not None:
            break
        sim.now += 0.1
        for n in sorted(sim.nodes):
            if n not in quiet:
                sim.run_timers(n)
        sim.pump_clients()
    return record


def test_refilled_shard_does_not_acknowledge_a_publish_that_reached_nobody() -> None:
    """The colleague's reproduction: before the fix the publish was "acked", reached nobody, and the subscriber
    was never interrupted. Now the new owners refuse the lookup while the subscriber's node has not reported, so
    the publish fails ``unavailable``; once it has read its view and re-added its route, the shard answers again
    and the next publish reaches it."""
    sim, filt, subscriber, owners, _, publisher = scenario()
    shard = sim.shard_of(filt)
    assert all(shard in sim.nodes[o].core.owner.refilling for o in owners)
    record = publish_and_wait(sim, publisher, filt, {subscriber})
    assert record[4] != "acked", f"acknowledged, reached {record[5]}"
    assert record[4] == "unavailable" and not record[5]
    assert not sim.interrupted
    # The subscriber's node reads its view: it re-adds its route and reports the shard complete to both owners.
    sim.refresh(subscriber)
    sim.drain()
    assert all(shard not in sim.nodes[o].core.owner.refilling for o in owners)
    assert all(sim.has_route(o, shard, filt, subscriber) for o in owners)
    record = publish_and_wait(sim, publisher, filt, set())
    assert record[4] == "acked" and record[5] == {subscriber}
    assert not any(sim.nodes[o].core.metrics["routes.refill_timeouts"] for o in owners)
    assert sim.settle()


def test_a_member_that_leaves_during_the_refill_does_not_block_it() -> None:
    """A laggard that never reads the new assignment crashes while the owners wait for it: once their view shows it
    gone, it owes no report (its routes went with it), and the shard answers without waiting for the timeout."""
    config = SimConfig(shard_count=16, replication=2, request_timeout=20.0)  # the fallback stays out of the way
    sim, filt, subscriber, owners, laggards, publisher = scenario(config, laggards=1)
    shard = sim.shard_of(filt)
    sim.refresh(subscriber)
    sim.drain()
    assert all(sim.nodes[o].core.owner.refilling[shard].waiting == set(laggards) for o in owners)
    record = publish_and_wait(sim, publisher, filt, set(laggards))
    assert record[4] == "unavailable"  # still waiting for the laggard
    sim.crash(laggards[0])
    for _ in range(40):
        sim.tick(0.25)
        for node in sorted(sim.nodes):
            sim.refresh(node)
        sim.drain()
        if laggards[0] not in sim.live_members():
            break
    sim.drain()
    assert laggards[0] not in sim.live_members()
    assert all(shard not in sim.nodes[o].core.owner.refilling for o in owners)
    assert not any(sim.nodes[o].core.metrics["routes.refill_timeouts"] for o in owners)
    record = publish_and_wait(sim, publisher, filt, set())
    assert record[4] == "acked" and record[5] == {subscriber}


def test_refill_ends_after_request_timeout_without_every_report() -> None:
    """The bounded fallback: a member that neither reports nor leaves (here: it never reads its view) keeps the
    shard unavailable for ``request_timeout`` at most; then the owners answer from what they have, and count it."""
    sim, filt, subscriber, owners, laggards, publisher = scenario(laggards=1)
    shard = sim.shard_of(filt)
    sim.refresh(subscriber)
    sim.drain()
    quiet = set(laggards)
    for _ in range(int(sim.cfg.request_timeout / 0.25) + 1):
        sim.now += 0.25
        for node in sorted(sim.nodes):
            sim.session_poll(node, read=node not in quiet)  # the laggard keeps its lease, but reads nothing
            if node not in quiet:
                sim.run_timers(node)
    assert all(shard not in sim.nodes[o].core.owner.refilling for o in owners)
    assert all(sim.nodes[o].core.metrics["routes.refill_timeouts"] >= 1 for o in owners)
    record = publish_and_wait(sim, publisher, filt, quiet)
    assert record[4] == "acked" and record[5] == {subscriber}
