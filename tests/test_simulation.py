"""The deterministic simulation (``shardmq.testing.simulation``) under hypothesis: the nodes' real protocol cores
(``shardmq.protocol.NodeCore``, the object every node process runs) on a simulated network, etcd and clock.

Two state machines drive it:

* ``StrictCluster``: at most one disruption (crash, pause, partition, restart, etcd outage) at a time, and only
  from a quiescent cluster (preconditions; quiescent also means etcd reachable and no node retiring). Checks
  invariants 1-3 after every step, invariant 4 whenever the cluster is quiescent, and invariants 4 and 5 plus
  "every publish reaches every acknowledged live subscriber" after a final settle.
* ``ChaosCluster``: disruptions at any time, leases may go unrenewed. Checks the safety invariants 1-3 after every
  step and convergence (5) after healing everything (and that every interrupted client could subscribe again);
  route loss is expected there (two owners can fail) and is not checked.

Invariants, exactly as checked (``Checker``):

1. Over the sequence of committed etcd documents, no shard's epoch decreases, and a change of a shard's owner
   tuple always comes with a higher epoch.
2. For every (shard, epoch) ever committed, the owner tuple is the same in every document that has it.
3. Write-fencing. (a) A node that is running, not fenced (``NodeCore.fenced``: the session's lease check, or a
   re-registration whose view it has not processed yet) and believes from its view that it owns (shard, epoch)
   believes what etcd committed for (shard, epoch) (so with 2., two different owner sets can never both accept
   writes for one (shard, epoch)). (b) Such a node holds a lease etcd still has. (c) No running, unfenced node
   acts as owner on a view read before etcd expired its lease.
4. When the cluster is quiescent, every etcd owner of a shard holds the route of every acknowledged subscription
   of that shard whose subscriber is a live member. Subscriptions of a node whose own lease expired after the
   SUBACK are excluded (its peers dropped its routes on purpose), and so are interrupted ones (session ended:
   no longer acknowledged) until their client subscribes again.
5. After healing/resuming everything and settling: every live node's view is etcd's document, and its owner
   table is ``ShardMap.build(live members).table``.

Every publish the machines make is a real QoS 1 PUB through a node's entry side, and the final check publishes to
every subscribed filter from every live node and waits for the PUBACK: the message must have reached every
acknowledged live subscriber's node (a real MSG to its client).

Replaying a failure: the simulation is deterministic, so hypothesis's printed step list replays it verbatim;
``print_blob=True`` also prints a ``@reproduce_failure`` line. ``SIM_EXAMPLES`` scales the runs.

Fixed tests below pin single rules found or checked by the simulation: a restart retires the previous incarnation,
a peer whose view lags a re-registration defers the route change, a SUB for a shard with no owner is refused, a
fenced node ends its sessions, etcd outages shorter and longer than the TTL, refused moves reach the
coordinator, stale items are never applied, a new replica's fill timer outlasts the coordinator's deadline, a
SUB waits for every ROUTE_ADD still installing its filters, and a QoS 1 publish through an entry node whose view
does not show a restarted subscriber's node yet fails instead of being acknowledged undelivered.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardmq.protocol.subscriptions import REANNOUNCE_DELAY
from shardmq.rebalance import Member, target_table
from shardmq.ring import ShardMap
from shardmq.router import codec
from shardmq.testing.simulate import matching_topic
from shardmq.testing.simulation import ROOT, Sim, SimConfig

CONFIG = SimConfig(shard_count=16, replication=2)
FILTERS = [f"t/{i}" for i in range(10)]
# Wildcard filters too: one keyed by its first level (lives in shard("t")), one in the root set (on every node).
SUB_FILTERS = [*FILTERS, "t/+", "+/x"]
MAX_NODES = 6
EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "150"))
PICK = st.integers(min_value=0, max_value=63)


def pick(items: list, i: int):
    return items[i % len(items)]


class Checker:
    """Invariants 1-5 over a ``Sim``; keeps what it needs of the history between calls."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.seen = 0
        self.committed: dict[tuple[int, int], tuple[str, ...]] = {}

    def check_history(self) -> None:  # invariants 1 and 2
        history = self.sim.etcd.history
        for i in range(self.seen, len(history)):
            rev, doc = history[i]
            if i > 0:
                prev = history[i - 1][1]
                for shard, (a, b) in enumerate(zip(prev.states, doc.states, strict=True)):
                    assert b.epoch >= a.epoch, f"rev {rev}: shard {shard} epoch fell {a.epoch} -> {b.epoch}"
                    assert a.owners == b.owners or b.epoch > a.epoch, (
                        f"rev {rev}: shard {shard} owners {a.owners} -> {b.owners} without an epoch bump"
                    )
            for shard, st_ in enumerate(doc.states):
                key = (shard, st_.epoch)
                known = self.committed.setdefault(key, st_.owners)
                assert known == st_.owners, f"shard {shard} epoch {st_.epoch} committed as {known} and {st_.owners}"
        self.seen = len(history)

    def check_fencing(self) -> None:  # invariant 3
        sim = self.sim
        for n in sim.nodes.values():
            a = n.core.view.assignment
            if not n.up or sim.fenced(n) or a is None:
                continue
            owned = a.shards_of(n.node_id)
            for shard in owned:
                state = a.state(shard)
                assert self.committed.get((shard, state.epoch)) == state.owners, (
                    f"{n.node_id} acts on uncommitted ownership of shard {shard}: {state}"
                )
            assert n.lease_id in sim.etcd.leases, f"{n.node_id} is unfenced without a live lease at t={sim.now}"
            expired_at = sim.etcd.expired.get(n.node_id, 0)
            assert not (owned and n.view_read_at < expired_at), (
                f"{n.node_id} acts as owner of {owned} on a view (read at rev {n.view_read_at}) older than the "
                f"expiry of its lease (rev {expired_at})"
            )

    def route_losses(self) -> list[str]:  # invariant 4
        sim = self.sim
        doc = sim.etcd.doc
        if doc is None:
            return []
        live = sim.live_members()
        losses = []
        for filt, subscribers in sorted(sim.acked.items()):
            shard = sim.shard_of(filt)
            for sub in sorted(subscribers & live):
                if sim.etcd.expired.get(sub, 0) and sim.expired_after_ack(filt, sub):
                    continue
                owners = sorted(live) if shard == ROOT else doc.owners(shard)
                for owner in owners:
                    if not sim.has_route(owner, shard, filt, sub):
                        losses.append(f"{owner} (owner of shard {shard}) lacks acked route {filt} -> {sub}")
        return losses

    def publish_misses(self) -> list[str]:
        sim = self.sim
        misses = []
        for node_id in sorted(sim.live_members()):
            for filt in sorted(f for f, subs in sim.acked.items() if subs):
                expected = frozenset(s for s in sim.acked.get(filt, set()) & sim.live_members()
                                     if not sim.expired_after_ack(filt, s))  # fmt: skip
                answer = sim.check_publish(node_id, matching_topic(filt))
                if answer is None or not expected <= answer:
                    misses.append(f"publish {filt} from {node_id}: reached {answer}, acked {sorted(expected)}")
        return misses

    def resubscribe_all(self, rounds: int = 3) -> None:
        """Every client whose session ended subscribes again (through the first live node that takes it)."""
        sim = self.sim
        for _ in range(rounds):
            if not sim.interrupted:
                return
            for entry in list(sim.interrupted):
                for node_id in sorted(sim.live_members()):
                    if entry in sim.interrupted and sim.resubscribe(sim.interrupted.index(entry), node_id):
                        break
            sim.settle()
        assert not sim.interrupted, f"clients could not subscribe again: {sim.interrupted}"

    def check_converged(self) -> None:  # invariant 5
        sim = self.sim
        assert sim.settle(), f"no quiescence after settling (t={sim.now})"
        live = sorted(sim.live_members())
        target = ShardMap.build(dict.fromkeys(live, 1), CONFIG.shard_count, CONFIG.replication).table
        assert sim.etcd.doc is not None and sim.etcd.doc.table == target
        for node_id in live:
            view = sim.nodes[node_id].core.view
            assert view.assignment == sim.etcd.doc and view.assignment.table == target, f"{node_id} did not converge"


class ClusterBase(RuleBasedStateMachine):
    strict = True

    def __init__(self) -> None:
        super().__init__()
        self.sim = Sim(CONFIG)
        for _ in range(3):
            self.sim.join()
        self.check = Checker(self.sim)

    def running(self) -> list[str]:
        return sorted(n for n, node in self.sim.nodes.items() if node.up)

    def alive(self) -> list[str]:
        return sorted(n for n, node in self.sim.nodes.items() if not node.crashed)

    def calm(self) -> bool:
        """No disruption in progress and the cluster quiescent: a new failure may start (strict mode)."""
        return not self.strict or self.sim.quiescent()

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0]), renew=st.booleans())
    def tick(self, dt: float, renew: bool) -> None:
        self.sim.tick(dt, renew=renew or self.strict)

    @precondition(lambda self: bool(self.sim.deliverable()))
    @rule(i=PICK, times=st.integers(min_value=1, max_value=4))
    def deliver(self, i: int, times: int) -> None:
        src, dst = pick(self.sim.deliverable(), i)
        for _ in range(times):
            self.sim.deliver(src, dst)

    @rule(i=PICK)
    def refresh(self, i: int) -> None:
        self.sim.refresh(pick(sorted(self.sim.nodes), i))

    @rule()
    def renew_leases(self) -> None:
        self.sim.trace.append("renew_leases")
        for node_id in sorted(self.sim.nodes):
            self.sim.session_poll(node_id, read=False)

    @rule(i=PICK)
    def coordinator_step(self, i: int) -> None:
        leaders = sorted(n for n, node in self.sim.nodes.items() if node.core.coordinator is not None) or ["n0"]
        self.sim.lead(pick(leaders, i))

    @rule(i=PICK, f=st.sampled_from(SUB_FILTERS))
    def subscribe(self, i: int, f: str) -> None:
        self.sim.subscribe(pick(self.running(), i) if self.running() else "n0", f)

    @precondition(lambda self: bool(self.running()))
    @rule(i=PICK, f=st.sampled_from(FILTERS))
    def publish(self, i: int, f: str) -> None:
        self.sim.publish(pick(self.running(), i), f)

    @precondition(lambda self: len(self.sim.nodes) < MAX_NODES)
    @rule()
    def join(self) -> None:
        self.sim.join()

    @rule()
    def settle(self) -> None:
        self.sim.settle(max_rounds=80)

    @precondition(lambda self: len(self.alive()) > 2 and self.calm())
    @rule(i=PICK)
    def crash(self, i: int) -> None:
        self.sim.crash(pick(self.alive(), i))

    @precondition(lambda self: len(self.running()) > 1 and self.calm())
    @rule(i=PICK)
    def pause(self, i: int) -> None:
        self.sim.pause(pick(self.running(), i))

    @precondition(lambda self: any(n.paused and not n.crashed for n in self.sim.nodes.values()))
    @rule(i=PICK)
    def resume(self, i: int) -> None:
        self.sim.resume(pick(sorted(n for n, node in self.sim.nodes.items() if node.paused), i))

    @precondition(lambda self: len(self.running()) > 1 and self.calm())
    @rule(i=PICK)
    def partition(self, i: int) -> None:
        self.sim.partition(pick(self.running(), i))

    @precondition(lambda self: any(n.partitioned for n in self.sim.nodes.values()))
    @rule(i=PICK)
    def heal(self, i: int) -> None:
        self.sim.heal(pick(sorted(n for n, node in self.sim.nodes.items() if node.partitioned), i))

    @precondition(lambda self: self.calm())
    @rule(i=PICK)
    def restart(self, i: int) -> None:
        """kill -9 + immediate restart under the same id (any node: a crashed one comes back)."""
        self.sim.restart(pick(sorted(self.sim.nodes), i))

    @precondition(lambda self: self.sim.etcd_reachable and self.calm())
    @rule(dt=st.sampled_from([0.5, 1.5, 2.5, 4.0]))
    def etcd_down(self, dt: float) -> None:
        """etcd unreachable for every node for ``dt`` seconds at least (until ``etcd_up``)."""
        self.sim.etcd_down()
        while dt > 0:
            self.sim.tick(min(dt, 1.0), renew=True)
            dt -= 1.0

    @precondition(lambda self: not self.sim.etcd_reachable)
    @rule()
    def etcd_up(self) -> None:
        self.sim.etcd_up()

    @precondition(lambda self: bool(self.sim.interrupted) and bool(self.running()))
    @rule(i=PICK, j=PICK)
    def resubscribe(self, i: int, j: int) -> None:
        """A client whose session ended subscribes again through some running node."""
        self.sim.resubscribe(i % len(self.sim.interrupted), pick(self.running(), j))

    @invariant()
    def safety(self) -> None:
        self.check.check_history()
        self.check.check_fencing()

    @invariant()
    def no_route_loss_when_quiescent(self) -> None:
        if self.strict and self.sim.quiescent():
            assert not self.check.route_losses(), self.check.route_losses()

    def teardown(self) -> None:
        self.sim.etcd_reachable = True
        for node in self.sim.nodes.values():
            node.paused = False
            node.partitioned = False
        self.check.check_converged()
        self.check.resubscribe_all()
        self.check.check_history()
        self.check.check_fencing()
        if self.strict:
            assert not self.check.route_losses(), self.check.route_losses()
            assert not self.check.publish_misses(), self.check.publish_misses()


class StrictCluster(ClusterBase):
    strict = True


class ChaosCluster(ClusterBase):
    strict = False


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestStrictCluster = StrictCluster.TestCase
TestStrictCluster.settings = SETTINGS
TestChaosCluster = ChaosCluster.TestCase
TestChaosCluster.settings = SETTINGS


# ---------------------------------------------------------------------- fixed scenarios
def started(nodes: int = 3, config: SimConfig = CONFIG) -> Sim:
    sim = Sim(config)
    for _ in range(nodes):
        sim.join()
    assert sim.settle()
    return sim


def subscribed_cluster(subscriber: str = "n0") -> tuple[Sim, Checker]:
    """A settled 3-node cluster where ``subscriber``'s clients subscribed to every filter."""
    sim = started()
    check = Checker(sim)
    for f in FILTERS:
        sim.subscribe(subscriber, f)
    assert sim.settle()
    assert all(sim.acked.get(f) == {subscriber} for f in FILTERS)
    return sim, check


def deliver_kind(sim: Sim, kind: bytes) -> None:
    """Deliver every queued frame of ``kind`` that heads its channel (FIFO is kept)."""
    for (src, dst), q in sorted(sim.channels.items()):
        while q and q[0][0] == kind and sim.nodes[dst].up:
            sim.deliver(src, dst)


def test_fixed_sequence_replays_identically() -> None:
    """A fixed step list (join, subscribe, crash...) runs to the same trace, document and acks twice."""

    def run() -> tuple[list[str], bytes, dict[str, set[str]]]:
        sim = started()
        check = Checker(sim)
        for i, f in enumerate(FILTERS):
            sim.subscribe(f"n{i % 3}", f)
        sim.join()
        for _ in range(3):
            sim.tick(0.5)
            sim.refresh("n0")
            sim.lead(sim.leader_node().node_id)
            for src, dst in sim.deliverable():
                sim.deliver(src, dst)
        assert sim.settle()
        sim.crash("n1")
        assert sim.settle()
        check.check_history()
        check.check_fencing()
        assert not check.route_losses()
        check.check_converged()
        assert sim.etcd.doc is not None
        return sim.trace, sim.etcd.doc.to_json(), sim.acked

    first, second = run(), run()
    assert first == second
    assert first[2] and any(first[2].values())


def test_publishes_reach_subscribers_across_joins_and_a_crash() -> None:
    sim, check = subscribed_cluster("n1")
    sim.join()
    assert sim.settle()
    assert not check.publish_misses(), check.publish_misses()
    sim.crash("n2")
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_new_replica_fill_outlasts_the_coordinators_deadline() -> None:
    """The coordinator times a move from ``StartHandoff`` and may flip it up to ``handoff_timeout`` later; the
    new replica times its fill from the first SNAPSHOT. A slow fill that flips just before the coordinator's
    deadline must not be abandoned by the replica (its timer is twice the coordinator's, and it decides on a
    fresh read of the assignment): no acknowledged route is lost."""
    sim, check = subscribed_cluster()
    new = sim.join()
    leader = sim.leader_node()
    assert leader is not None
    sim.refresh(leader.node_id)  # sees the newcomer: the coordinator starts its hand-offs
    deliver_kind(sim, codec.HANDOFF)
    sim.tick(1.0)
    deliver_kind(sim, codec.SNAPSHOT)
    for _ in range(5):
        sim.tick(1.0)
    deliver_kind(sim, codec.HANDOFF_READY)  # a slow fill: ready just before the coordinator's deadline
    sim.lead(leader.node_id)
    for _ in range(4):
        sim.session_poll(leader.node_id, read=False)  # the commit's answer
    sim.tick(1.0)
    assert sim.settle()
    assert sim.etcd.doc is not None and sim.etcd.doc.shards_of(new)
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_refused_move_reaches_the_coordinator() -> None:
    """A fenced source refuses HANDOFF by move id to the coordinator, which forgets the move
    (``Coordinator.on_refused``) instead of waiting for its timeout."""
    sim = started()
    sim.join()
    leader = sim.leader_node()
    assert leader is not None and leader.core.coordinator is not None
    sim.refresh(leader.node_id)
    coordinator = leader.core.coordinator
    flights = dict(coordinator.in_flight)
    source = next(f.move.source for f in flights.values() if f.move.source != leader.node_id)
    while not sim.fenced(sim.nodes[source]):  # etcd slow for the source only
        sim.now += 0.25
        sim.etcd.expire(sim.now)
        for other in sorted(sim.nodes):
            if other != source:
                sim.session_poll(other, read=False)
    assert sim.nodes[source].lease_id in sim.etcd.leases
    deliver_kind(sim, codec.HANDOFF)
    assert sim.nodes[source].core.metrics["fencing.refused.fenced"] >= 1
    refused = {f.move_id for f in flights.values() if f.move.source == source}
    deliver_kind(sim, codec.ERROR)
    assert not refused & {f.move_id for f in coordinator.in_flight.values()}
    assert sim.settle()


def test_stale_items_are_never_applied() -> None:
    """Fencing at the sink: a ROUTE_ADD item older than the owner's shard epoch is not applied, and the
    ROUTE_ACK says so (``stale``) so the sender re-sends to the current owners."""
    sim = started()
    shard = sim.shard_of(FILTERS[0])
    owner = sim.nodes[sim.etcd.doc.owners(shard)[0]]
    shard_epoch = owner.core.view.shard_epoch(shard)
    sender = next(n for n in sorted(sim.nodes) if n != owner.node_id)
    header = {"id": 9, "node": sender, "routes": [[shard, shard_epoch - 1, FILTERS[0]]]}
    core = owner.enter()
    core.on_peer_parts([sender.encode(), *codec.encode(codec.ROUTE_ADD, header)])
    core.flush()
    assert not sim.has_route(owner.node_id, shard, FILTERS[0], sender)
    ack = codec.decode(sim.channels[(owner.node_id, sender)][-1])
    assert ack.type == codec.ROUTE_ACK and ack.header["stale"] == [[shard, shard_epoch]]


def test_restart_retires_the_previous_incarnation() -> None:
    """The new process revokes the old lease (the member key goes at once), waits while the leader promotes the
    survivors, registers only once the assignment lists it nowhere, and is filled by ordinary hand-offs. No
    route is lost, and every publish reaches every acknowledged subscriber."""
    sim, check = subscribed_cluster()
    created = sim.etcd.members["n1"].create_revision
    sim.restart("n1")
    n1 = sim.nodes["n1"]
    assert n1.retiring and "n1" not in sim.etcd.members and n1.lease_id is None
    for _ in range(40):
        if not n1.retiring:
            break
        sim.tick(0.25)
        sim.refresh("n0")
        sim.refresh("n2")
        sim.drain()
    assert not n1.retiring and "n1" in sim.etcd.members
    registered = sim.etcd.members["n1"].create_revision
    assert registered > created  # a new member: peers see it join
    doc_then = [doc for rev, doc in sim.etcd.history if rev < registered][-1]
    assert "n1" not in doc_then.nodes()  # it registered only once the assignment listed it nowhere
    assert sim.settle()
    assert sim.etcd.doc.shards_of("n1")  # it owns shards again, filled by hand-offs
    check.check_history()
    check.check_fencing()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_route_change_from_an_unseen_registration_is_deferred() -> None:
    """n2 restarts; n1 reads no member list meanwhile. n2 registers again (a new incarnation and create_revision)
    and its client subscribes to a filter of a shard n1 owns; n1, whose view still shows n2's old registration,
    gets the ROUTE_ADD with a newer ``member_rev`` and defers it until its view shows the registration, so the
    view that drops the old registration's routes cannot drop the new route after it was acknowledged."""
    sim = started()
    check = Checker(sim)
    sim.restart("n2")
    sim.refresh("n0")  # the leader sees n2 gone and commits the promotion
    for _ in range(4):
        sim.tick(0.25)
        sim.session_poll("n0", read=True)
        if not sim.nodes["n2"].retiring:
            break
    assert not sim.nodes["n2"].retiring
    sim.refresh("n2")
    doc = sim.etcd.doc
    filt = next(f for f in FILTERS if "n1" in doc.owners(sim.shard_of(f)))
    assert sim.nodes["n1"].core.view.members["n2"].revision < sim.etcd.members["n2"].create_revision
    assert sim.subscribe("n2", filt)
    sim.drain()
    assert sim.nodes["n1"].core.metrics["routes.deferred_for_view"] >= 1
    sim.refresh("n1")
    sim.drain()
    assert sim.acked.get(filt) == {"n2"}
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_sub_for_an_ownerless_shard_is_not_acknowledged() -> None:
    """A counterexample StrictCluster found: etcd unreachable past the TTL, every lease and the leader key expire;
    back up, a newcomer registers first, leads alone and promotes over itself: every shard is left without an
    owner. A SUB made then has no owner to confirm it and must fail, not be acknowledged."""
    state = StrictCluster()
    state.settle()
    state.etcd_down(dt=4.0)
    state.etcd_up()
    state.join()
    state.subscribe(f="t/0", i=3)
    state.settle()
    assert not state.check.route_losses(), state.check.route_losses()


def test_fenced_node_ends_its_client_sessions() -> None:
    """n0 is partitioned from etcd and peers; once fenced, it ends every client session (SESSION_END fenced:
    their acks are void until subscribed again). The clients subscribe again through n1 and every owner has the
    new routes; after the heal n0 rejoins as an empty node."""
    sim, check = subscribed_cluster()
    sim.partition("n0")
    while not sim.fenced(sim.nodes["n0"]):
        assert sim.acked.get(FILTERS[0]) == {"n0"}
        sim.tick(0.25)
    sim.tick(0.25)  # the fence tick runs when the lease comes into doubt
    assert sorted(f for f, node, why in sim.interrupted if node == "n0" and why == "fenced") == sorted(FILTERS)
    assert not any(sim.acked.get(f) for f in FILTERS)
    assert not sim.subscribe("n0", FILTERS[0])  # fenced: takes no subscription
    sim.settle(max_rounds=20)
    assert "n0" not in sim.live_members()
    for i in range(len(sim.interrupted) - 1, -1, -1):
        assert sim.resubscribe(i, "n1")
    assert sim.settle(max_rounds=20) is False  # n0 still partitioned
    assert not sim.interrupted and all(sim.acked.get(f) == {"n1"} for f in FILTERS)
    assert not check.route_losses(), check.route_losses()
    sim.heal("n0")
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_etcd_outage_longer_than_the_ttl() -> None:
    """Every node is fenced and ends its client sessions; etcd expires every lease. Back up, every session
    registers again, the cluster re-forms, and the clients subscribe again: nothing acknowledged after that is
    missing."""
    sim, check = subscribed_cluster(subscriber="n1")
    sim.etcd_down()
    for _ in range(2 * int(CONFIG.lease_ttl)):
        sim.tick(0.5)
        check.check_history()
        check.check_fencing()
    assert not sim.etcd.members and sim.etcd.leader is None
    assert all(sim.fenced(n) for n in sim.nodes.values())
    assert len(sim.interrupted) == len(FILTERS) and not any(sim.acked.get(f) for f in FILTERS)
    sim.etcd_up()
    assert sim.settle()
    check.check_history()
    check.check_fencing()
    check.resubscribe_all()
    assert not sim.interrupted
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_short_etcd_outage_fences_without_losing_leases() -> None:
    """An outage longer than 2/3 of the TTL but shorter than the TTL: nodes fence themselves (and end their client
    sessions) but every lease survives; back up, keep-alives succeed and nothing is re-registered or moved."""
    sim, check = subscribed_cluster(subscriber="n2")
    leases = {n: node.lease_id for n, node in sim.nodes.items()}
    history = len(sim.etcd.history)
    sim.etcd_down()
    sim.tick(1.0)
    sim.tick(1.0)
    sim.tick(0.5)
    assert all(sim.fenced(n) for n in sim.nodes.values()) and sim.interrupted
    sim.etcd_up()
    assert sim.settle()
    assert {n: node.lease_id for n, node in sim.nodes.items()} == leases
    assert len(sim.etcd.history) == history
    check.resubscribe_all()
    assert not check.route_losses() and not check.publish_misses()


def test_relayed_addition_lost_on_a_broken_connection_is_sent_again() -> None:
    """A hand-off source relays a new route to the target filling the shard; the connection breaks and the relay
    is gone (seed 231 of the seed sweep: the target was partitioned for 0.7 s). The subscriber is not told it is
    subscribed until the target holds the route: the source sends the relay again, the target acknowledges it,
    and after the flip the new owner has the route."""
    sim = started()
    check = Checker(sim)
    new = sim.join()
    leader = sim.leader_node()
    assert leader is not None and leader.core.coordinator is not None
    sim.refresh(leader.node_id)  # the coordinator starts its hand-offs to the newcomer
    moves = {f.move.shard: f.move for f in leader.core.coordinator.in_flight.values() if new in f.move.add}
    deliver_kind(sim, codec.HANDOFF)
    deliver_kind(sim, codec.SNAPSHOT)  # the newcomer is filling; no shard has flipped yet
    filt, move = next((f, moves[s]) for f in (f"r/{i}" for i in range(200)) if (s := sim.shard_of(f)) in moves)
    subscriber = next(n for n in sorted(sim.nodes) if n not in (move.source, new))
    source = sim.nodes[move.source]
    assert sim.subscribe(subscriber, filt)
    while (subscriber, move.source) in sim.channels:
        sim.deliver(subscriber, move.source)  # the ROUTE_ADD reaches the source, which relays it
    relays = [codec.decode(p) for p in sim.channels.get((move.source, new), ()) if p[0] == codec.ROUTE_ADD]
    assert any(r.header.get("fwd") and r.header["routes"][0][2] == filt for r in relays)
    sim.channels.pop((move.source, new))  # the connection broke: what was queued on it is gone
    sim.drain()
    assert subscriber not in sim.acked.get(filt, set())  # not confirmed while the target lacks the route
    sim.tick(sim.cfg.request_timeout / 2)
    sim.drain()
    assert source.core.metrics["handoff.relays_resent"] >= 1
    assert sim.acked.get(filt) == {subscriber}
    assert sim.has_route(new, sim.shard_of(filt), filt, subscriber)
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()


def test_no_relay_to_a_target_that_already_owns_the_shard() -> None:
    """A counterexample StrictCluster found: a hand-off source kept a stream (begun at an epoch the shard had
    already left) to a target that owns the shard now and accepts no forwards any more. Relayed, every addition
    was refused, answered as stale and retried until the subscription failed. A target that owns the shard in the
    source's view got the addition from its sender directly, so nothing is relayed to it."""
    state = StrictCluster()
    state.settle()
    state.crash(i=1)
    state.settle()
    state.subscribe(f="t/2", i=0)
    state.settle()
    state.pause(i=0)
    state.settle()
    for _ in range(3):
        state.join()
    state.coordinator_step(i=30)
    state.tick(dt=1.0, renew=True)
    state.renew_leases()
    state.settle()
    state.teardown()  # heals, settles, subscribes every interrupted client again and checks convergence


SUB_ANSWERS = (codec.SUBACK, codec.ERROR)


def test_sub_waits_for_every_route_add_still_installing_its_filters() -> None:
    """Fault schedule seed 17 (etcd_cut): a node that lost its lease registers again and re-announces every local
    route a second later, the filters of a SUB still waiting for an owner among them. The re-announcement was
    confirmed first and took the filters' "still installing" record with it, so the client's SUB again on the
    same session (its SDK stopped waiting for the first SUBACK) found nothing installing and was acknowledged at
    once; then the first SUB failed and was undone, unsubscribing what the second was acknowledged for: every
    message acknowledged after that missed the client. A SUB waits for every ROUTE_ADD still installing its
    filters, so the second SUB fails with the first."""
    sim = started()
    check = Checker(sim)
    node, publisher = "n1", "n0"
    sim.partition(node)
    sim.settle(max_rounds=40)  # its lease expires: the others promote the survivors and refill without it
    assert node not in sim.live_members()
    sim.heal(node)
    sim.refresh(node)  # it registers again
    for n in sorted(sim.nodes):  # and the others see the new registration (no deferral)
        sim.refresh(n)
    core = sim.nodes[node].core
    assert not sim.fenced(sim.nodes[node]) and core.subscriptions.announcements_due == 1
    filt = FILTERS[0]
    assert core.view.assignment is not None
    silent = next(o for o in core.view.assignment.owners(sim.shard_of(filt)) if o != node)
    client = b"c-seed17"
    sim.client_send(client, node, codec.SUB, {"id": 1, "filters": [filt], "qos": 1})
    sim.channels.pop((node, silent), None)  # the connection broke: that owner never answers the first SUB
    sim.drain()
    sim.tick(REANNOUNCE_DELAY)  # every local route goes to the owners again, this filter's too
    sim.drain()
    assert core.metrics["routes.reannounced"] >= 1 and not core.subscriptions.announcements_due
    sim.client_send(client, node, codec.SUB, {"id": 2, "filters": [filt], "qos": 1})
    sim.drain()
    sim.tick(sim.cfg.request_timeout)  # the first SUB's waiter expires: that SUB fails and is undone
    sim.drain()
    sc = sim.session_clients[client]
    answers = {f.header.get("id", f.header.get("ref")): f.type for f in sc.frames if f.type in SUB_ANSWERS}
    assert sim.check_publish(publisher, filt) is not None
    pid = max(sim.publishes)
    if answers.get(2) == codec.SUBACK:  # acknowledged: it must get what is published from then on
        assert any(payload == b"%d" % pid for _, payload, _ in sc.got), f"acked SUB 2, message {pid} missed it"
    assert answers == {1: codec.ERROR, 2: codec.ERROR}
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()


def test_publish_through_a_view_without_the_restarted_subscriber_node_is_not_acknowledged() -> None:
    """Fault schedule seed 18 (restart_same): n2 is killed and restarted under its id; the entry node n1 sees the
    old registration go, but not yet the new one. n2's wildcard subscriber subscribes again there and the owner of
    its filter's shard, whose view shows the new n2, confirms the route: SUBACK. A QoS 1 publish through n1 is
    answered with n2 by that owner; n1, which cannot tell a node that left from one it has not seen come back,
    must not skip n2 and acknowledge the message undelivered: it fails (``unavailable``), and once n1's view
    shows n2 again the publish reaches the subscriber."""
    sim = started(4)
    check = Checker(sim)
    entry, owner, restarted = "n1", "n0", "n2"
    assert sim.etcd.leader is not None and sim.etcd.leader[0] == owner  # it promotes, and we refresh it at will
    doc = sim.etcd.doc
    assert doc is not None
    # A wildcard filter keyed by its first level, in a shard of the owner and the restarted node only, which no
    # move gives the entry node while the restarted node is away (it would defer its new route: no SUBACK yet).
    without = target_table({n: Member(1, False) for n in ("n0", "n1", "n3")}, CONFIG.shard_count, CONFIG.replication)
    level = next(
        f"w{i}" for i in range(500)
        if set(doc.owners(s := sim.shard_of(f"w{i}/+"))) == {owner, restarted} and entry not in without[s]
    )  # fmt: skip
    filt, topic = f"{level}/+", f"{level}/x"
    assert sim.subscribe(restarted, filt)
    assert sim.settle()
    sim.restart(restarted)
    sim.refresh(entry)  # the old registration is gone from the entry node's view ...
    for _ in range(8):
        sim.tick(0.25)
        sim.refresh(owner)
        sim.drain()
        if not sim.nodes[restarted].retiring:
            break
    assert not sim.nodes[restarted].retiring
    for other in sorted(set(sim.nodes) - {entry}):
        sim.refresh(other)  # ... and stays so while the others see the new one
    entry_core = sim.nodes[entry].enter()
    entry_core.refresh_assignment(lambda _ok: None, force=True)  # the promotion: the owner is asked at its epoch
    entry_core.flush()
    sim.session_poll(entry, read=False)  # answers that read, not the member view
    assert restarted not in entry_core.view.members
    assert entry_core.view.assignment is not None and entry_core.view.assignment.owners(sim.shard_of(filt)) == (owner,)
    assert sim.resubscribe(0, restarted)
    sim.drain()
    assert sim.acked.get(filt) == {restarted}  # SUBACK: the subscription is live
    pid = sim.publish(entry, topic)
    assert pid is not None
    sim.drain()
    outcome, reached = sim.publishes[pid][4], sim.publishes[pid][5]
    assert outcome == "unavailable" or restarted in reached, f"publish {pid} {outcome}, reached {sorted(reached)}"
    sim.refresh(entry)  # its view shows n2 again: the publisher's retry reaches the subscriber
    assert sim.check_publish(entry, topic) == frozenset({restarted})
    assert sim.settle()
    assert not check.route_losses(), check.route_losses()
    assert not check.publish_misses(), check.publish_misses()
