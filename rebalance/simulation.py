"""A deterministic, in-memory model of a shardmq cluster around the real pure cores, for simulation tests.

What is real and what is modelled:

* Real: ``Coordinator`` (and through it ``plan``/``next_batch``/``apply_flip``/``promote_survivors``),
  ``Assignment`` and ``ShardMap``. The leader's ``StartHandoff``/``Commit`` actions are carried out by the model.
* Modelled after ``shard/membership.py``: one etcd (``Etcd``) with leases (TTL in fake seconds), member keys, the
  assignment document with its mod revision and ``write_assignment``'s compare-and-swap, and a leader key held by
  a lease (the first live campaigner wins while it is absent). ``EtcdSession``'s loop (register, keep-alive every
  TTL/3, re-register after a lost lease, read the snapshot) and ``EtcdSession.fenced`` (a third of the TTL before
  the lease runs out). A snapshot pushed after a re-registration reaches the node only at its next read
  (``refresh``, ``settle``): until then the node has registered again but not seen the view that goes with it.
  A put of a member key that still exists keeps its create_revision (etcd semantics); ``Etcd.revoke`` deletes a
  lease with its keys at once. A view shows each member as a ``MemberKey``: the incarnation in its value and the
  key's create_revision (``read_members``: ``MemberInfo.revision``), so every registration (a restart, or a new
  key after a lost lease) is a new revision.
* Modelled after issue 9 as ``shard/`` does it (``SimConfig`` flags switch each off, to compare with the old
  behaviour): ``restart`` (kill -9, start under the same id: a new incarnation with no in-memory state). With
  ``retire_previous_incarnation`` the new process's session revokes the old incarnation's lease (member key and,
  if held, leader key go), then, while other members are live, stays ``retiring`` (advanced by each session
  poll: ticks, reads) until the assignment lists it in no shard's owners or joining, and only then registers.
  Peers treat a replaced member (``MemberInfo.same_process`` false: another incarnation or create_revision; the
  model has no endpoints) as gone + joined: what waits on it fails and, with ``incarnation_change_drops_routes``,
  its routes go (``routes.remove_node``). With ``defer_unseen_registrations`` every direct ROUTE_ADD carries
  ``member_rev`` (the sender's own key revision in its view) and a receiver whose view shows the sender with an
  older revision defers it, and every later route change, in arrival order, until its view shows that revision
  (replayed after each snapshot) or request_timeout passed (a timer), so the late view that drops the old
  registration's routes comes first. ``retire_previous_incarnation`` off: the old restart (the member key is
  re-put under a new lease, the node keeps its shards with an empty table). With ``end_sessions_when_fenced`` a node
  whose loop notices it is fenced (at timers, client requests, peer frames, snapshots) ends every client
  session: those subscriptions go from ``acked`` to ``interrupted`` until their client subscribes again
  (``resubscribe``, through any node that takes it); a restart ends its sessions the same way. ``etcd_down``/
  ``etcd_up``: no node reaches etcd (no keep-alive, read, campaign or commit) while etcd's clock runs on, so
  leases expire if it lasts past the TTL.
* Modelled after ``shard/node.py``, ``shard/ownership.py`` and ``shard/routing.py``: ``fenced`` (the session's
  fencing, or a registration whose view the node has not processed yet), the node's view (``on_snapshot`` with
  its re-announce after a re-registration, ``on_members``, ``_set_assignment``), ``_lead``/``_start_handoff``/
  ``_commit``, the hand-off handlers (``_on_handoff``, ``_on_snapshot``, ``_on_handoff_ready``,
  ``_abandon_incoming``, ``_refuse_move``, ``_stop_abandoned``), ``_release``/``_stop_forwarding`` with their
  grace timers, ``_on_peer_error`` (waiter failures; refused moves to ``Coordinator.on_refused`` by move id),
  ``_reannounce_routes``, and the route path (``_change_routes``/``_send_route_items`` with ``member_rev``/
  ``_apply_route_items``/``_on_route_change``/``_registration_unseen``/``replay_route_changes``/
  ``_change_routes_now``/``_on_route_ack``/``_retry_stale`` with waiters and their timeouts). Publishes are one
  synchronous lookup (``_lookup``/``_lookup_failed``/``_on_lookup``): the model only records which subscribers
  the answering owner named.
* Simplified: exact topic filters only (a filter's shard is ``shard_for_key(filter)``; no root set, no ROUTE_DEL),
  one subscription per (node, filter), one snapshot chunk, every message is an in-memory object, clocks never
  drift, an etcd call is atomic (it succeeds iff etcd is reachable and the node is neither partitioned, paused
  nor crashed). A client is a (filter, node) pair: interrupted clients have no identity beyond that, no message
  payloads (so no stalled consumer). The member check on peer frames only as far as a node with no view yet (a
  retiring process) ignores every peer frame and a deferred route change whose sender left the view is dropped.
  Not modelled: ``_shards_ok`` (the model never names a shard outside the cluster), the member check for a known
  view, ``session.poll_now`` and the session's poll interval (a view is only read by ``refresh``/``settle``/
  ``_refresh_assignment``, so a view may lag longer than the real session lets it, past request_timeout too),
  the bound on the retire wait (it waits as long as it takes).

Pure: no sockets, threads, real clocks or randomness; whoever drives the model (a hypothesis state machine)
chooses every step, so a run is a function of its step list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shardmq.rebalance.coordinator import Commit, Coordinator, Member, StartHandoff
from shardmq.ring import Assignment, ShardMap, shard_for_key

__all__ = ["Etcd", "MemberKey", "Msg", "Sim", "SimConfig", "SimNode", "Waiter"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    shard_count: int = 16
    replication: int = 2
    lease_ttl: float = 3.0
    handoff_grace: float = 1.0
    handoff_timeout: float = 6.0
    request_timeout: float = 2.0
    refresh_min_interval: float = 0.1  # Node._refresh_assignment's rate limit
    settle: float = 1.0  # Coordinator(settle=...)
    reannounce_delay: float = 1.0  # Node: REANNOUNCE_DELAY
    # Issue 9, "Restart with the same id": a new process retires its previous incarnation (revokes the old lease,
    # waits until the assignment lists it nowhere, then registers) and member values carry the incarnation, so
    # peers see a changed one as gone+joined. False: the old behaviour (re-put the member key under a new lease,
    # keep owning the old incarnation's shards with an empty table; no incarnation in the member value).
    retire_previous_incarnation: bool = True
    # ``OwnershipMixin.on_members``: a member that was replaced (``MemberInfo.same_process`` is false: a new
    # incarnation, or a new create_revision of its member key, i.e. a registration after a lost lease or a restart)
    # is gone + joined: what waits on it fails AND its routes are dropped (``routes.remove_node``). False: a replaced
    # member's routes go only when its key is seen gone (what waits on it still fails).
    incarnation_change_drops_routes: bool = True
    # ``RoutingMixin._on_route_change``: a direct ROUTE_ADD carries ``member_rev`` (the create_revision of the
    # sender's member key in the sender's view); a receiver whose view shows an older revision for the sender has
    # not seen that registration: it defers the frame, and every later route change, in arrival order, until its
    # view shows it (``replay_route_changes`` after each snapshot) or request_timeout passed. Without it, a peer
    # that missed the gap applies the new registration's route, acknowledges it, and then drops it when its view
    # shows the replacement (``test_replacement_drops_new_routes_unless_deferred``).
    defer_unseen_registrations: bool = True
    # Issue 9, "Lease loss of a live node": a node that becomes fenced ends every client session (its clients
    # resubscribe through another node, or through it once it is unfenced). False: sessions survive the fence and
    # the node re-announces their routes after re-registering (the behaviour before issue 9).
    end_sessions_when_fenced: bool = True


@dataclass(slots=True)
class Lease:
    lease_id: int
    expires_at: float
    create_revision: int
    incarnation: int = 0  # MemberInfo.incarnation (0: the member value carries none)


class Etcd:
    """The etcd keys shardmq uses: members (leased), assignment (CAS on mod revision) and leader (leased)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.revision = 1
        self.members: dict[str, Lease] = {}
        self.leases: dict[int, float] = {}  # lease id -> expiry
        self._next_lease = 1
        self.doc: Assignment | None = None
        self.doc_revision = 0
        self.leader: tuple[str, int] | None = None  # (node, lease id)
        self.history: list[tuple[int, Assignment]] = []  # every committed document, in order
        self.expired: dict[str, int] = {}  # node -> etcd revision at which its last lease expired
        self.expired_time: dict[str, float] = {}  # node -> fake time of that expiry

    def expire(self, now: float) -> list[str]:
        gone = [lid for lid, until in self.leases.items() if until <= now]
        for lid in gone:
            del self.leases[lid]
        return self._drop_keys_without_lease(now)

    def revoke(self, lid: int, now: float) -> list[str]:
        """``lease.revoke()``: the lease and every key attached to it (member key, leader key) are deleted at once;
        recorded like an expiry (the member is gone for its peers)."""
        self.leases.pop(lid, None)
        return self._drop_keys_without_lease(now)

    def _drop_keys_without_lease(self, now: float) -> list[str]:
        dropped = []
        for node, lease in list(self.members.items()):
            if lease.lease_id not in self.leases:
                del self.members[node]
                self.revision += 1
                self.expired[node] = self.revision
                self.expired_time[node] = now
                dropped.append(node)
        if self.leader is not None and self.leader[1] not in self.leases:
            self.leader = None
            self.revision += 1
        return dropped

    def grant(self, now: float) -> int:
        lid = self._next_lease
        self._next_lease += 1
        self.leases[lid] = now + self.ttl
        return lid

    def put_member(self, node: str, lid: int, incarnation: int = 0) -> None:
        """A put attaches the key to ``lid``; a key that still exists keeps its create_revision (etcd semantics:
        the old incarnation's key re-put under a new lease is not a new member)."""
        self.revision += 1
        old = self.members.get(node)
        created = old.create_revision if old is not None else self.revision
        self.members[node] = Lease(lid, self.leases[lid], created, incarnation)

    def refresh(self, lid: int, now: float) -> bool:
        if lid not in self.leases:
            return False
        self.leases[lid] = now + self.ttl
        return True

    def campaign(self, node: str, lid: int | None) -> str | None:
        """``EtcdSession._leader``: read the key; create it with our lease when absent."""
        if self.leader is None and lid is not None and lid in self.leases:
            self.revision += 1
            self.leader = (node, lid)
        return self.leader[0] if self.leader else None

    def write_assignment(self, doc: Assignment, expected_revision: int) -> int | None:
        """``membership.write_assignment``: 0 means create-if-absent, else compare the mod revision."""
        if expected_revision == 0:
            if self.doc is not None:
                return None
        elif self.doc_revision != expected_revision:
            return None
        self.revision += 1
        self.doc, self.doc_revision = doc, self.revision
        self.history.append((self.revision, doc))
        return self.revision


class MemberKey(NamedTuple):
    """A member as a view shows it (``MemberInfo``): the incarnation in its value (0: none) and the key's etcd
    create_revision (``MemberInfo.revision``). Either changing makes it another member (``same_process``)."""

    incarnation: int
    revision: int


@dataclass(slots=True)
class Msg:
    kind: str  # ROUTE_ADD, ROUTE_ACK, ERROR, HANDOFF, SNAPSHOT, HANDOFF_READY (an ERROR for a move has move_id)
    header: dict[str, Any]


@dataclass(slots=True)
class Waiter:
    pending: set[str]
    callbacks: list[Callable[[list[str]], None]]
    sent: dict[str, list[tuple[int, int, str]]]
    attempt: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Forwarding:
    targets: set[str]
    epoch: int
    move_id: int = 0  # the latest move streaming through it (an abandoned move's timer must not stop a newer one)


@dataclass(slots=True)
class SimNode:
    node_id: str
    crashed: bool = False
    paused: bool = False
    partitioned: bool = False
    incarnation: int = 0  # one per process start (``restart`` starts a new one)
    # EtcdSession
    retiring: bool = False  # a restarted process retiring its previous incarnation: not registered yet
    lease_id: int | None = None
    lease_valid_until: float = 0.0
    next_refresh: float = 0.0
    registrations: int = 0
    # Node view
    registration: int = 0  # Node._registration: the registration whose view the node last processed
    members: set[str] = field(default_factory=set)
    member_keys: dict[str, MemberKey] = field(default_factory=dict)  # member -> its key as this view shows it
    member_revision: int = 0  # Node.member_revision: our own key's create_revision in our view (``member_rev``)
    # Node.deferred_route_changes: (arrival time, sender, header) of direct route changes waiting for our view
    deferred: deque[tuple[float, str, dict[str, Any]]] = field(default_factory=deque)
    leader: str | None = None
    assignment: Assignment | None = None
    assignment_revision: int = 0
    coordinator: Coordinator | None = None
    routes: dict[int, set[tuple[str, str]]] = field(default_factory=dict)  # shard -> {(filter, subscriber)}
    forwarding: dict[int, Forwarding] = field(default_factory=dict)
    incoming: dict[int, int] = field(default_factory=dict)
    snapshot_sources: dict[int, str] = field(default_factory=dict)  # shard -> the source streaming it to us
    waiters: dict[int, Waiter] = field(default_factory=dict)
    timers: list[tuple[float, int, str, tuple[Any, ...]]] = field(default_factory=list)
    local_filters: set[str] = field(default_factory=set)
    sessions_ended: int = 0  # how often the node ended every client session (a SUBACK due after that is void)
    fence_noticed: bool = False  # the node's loop saw ``fenced`` (and ended its client sessions)
    last_refresh: float = -1.0
    view_read_at: int = 0  # etcd revision when the node last read its view (snapshot or direct read)

    @property
    def up(self) -> bool:
        """Runs code: not crashed (or stopped) and not paused."""
        return not self.crashed and not self.paused

    @property
    def online(self) -> bool:
        """Can reach etcd and peers."""
        return self.up and not self.partitioned

    def holds(self, shard: int) -> bool:
        """``_apply_route_items``: an owner, or a hand-off source (in its grace period). A shard being filled
        (``incoming``) does not count."""
        a = self.assignment
        return a is not None and (self.node_id in a.owners(shard) or shard in self.forwarding)


class Sim:
    """The cluster model. Every public method is one step a driver may take; ``trace`` records them."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.now = 0.0
        self.etcd = Etcd(self.cfg.lease_ttl)
        self.nodes: dict[str, SimNode] = {}
        self.channels: dict[tuple[str, str], deque[Msg]] = {}
        self._ids = 0
        self._seq = 0
        self.acked: dict[str, set[str]] = {}  # filter -> subscriber nodes whose SUB was acknowledged
        self.ack_time: dict[tuple[str, str], float] = {}
        self.failed_subs = 0
        self.publishes: list[tuple[float, str, str, frozenset[str] | None, frozenset[str]]] = []
        self.trace: list[str] = []
        self._targets: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {}
        self.notes: list[str] = []  # notable events (abandoned incoming with a stale view, ...)
        self.refused_moves: list[tuple[float, str, int, str]] = []  # (time, refuser, move id, code)
        self.refused_frames: list[tuple[float, str, str, str, str]] = []  # (time, refuser, sender, kind, code)
        # Deferred route changes (an unseen registration, or queued behind one): (time, receiver, sender,
        # member_rev, the sender's revision in the receiver's view)
        self.deferrals: list[tuple[float, str, str, int, int]] = []
        self.deferred_timeouts: list[tuple[float, str, str]] = []  # (time, receiver, sender) applied unseen
        self.etcd_reachable = True  # False during ``etcd_down``: no node can keep alive, read or commit
        self._incarnations = 0
        # Subscriptions whose client session ended (fenced node, restart): (filter, node it was on, why). Their
        # ack is void (removed from ``acked``) until the client subscribes again (``resubscribe``).
        self.interrupted: list[tuple[str, str, str]] = []
        self.interruptions: list[tuple[float, str, str, str]] = []  # log: (time, node, filter, why)

    # ------------------------------------------------------------------ helpers
    def _id(self) -> int:
        self._ids += 1
        return self._ids

    def shard_of(self, filt: str) -> int:
        return shard_for_key(filt, self.cfg.shard_count)

    def fenced(self, n: SimNode) -> bool:
        """``Node.fenced``: ``EtcdSession.fenced`` (two thirds of the lease passed without a keep-alive), or the
        node registered again and has not yet processed the view of its newest registration."""
        return self.now > n.lease_valid_until - self.cfg.lease_ttl / 3 or n.registration < n.registrations

    def live_members(self) -> set[str]:
        return set(self.etcd.members)

    def reaches_etcd(self, n: SimNode) -> bool:
        """An etcd call from ``n`` succeeds: it runs, is not partitioned, and etcd is reachable."""
        return n.online and self.etcd_reachable

    def expired_after_ack(self, filt: str, node: str) -> bool:
        """True when ``node``'s lease expired after its SUB of ``filt`` was acknowledged."""
        acked = self.ack_time.get((filt, node))
        return acked is not None and self.etcd.expired_time.get(node, -1.0) >= acked

    def target(self) -> tuple[tuple[str, ...], ...] | None:
        live = tuple(sorted(self.live_members()))
        if not live:
            return None
        table = self._targets.get(live)
        if table is None:  # building the ring is most of a run's cost: cache it per member set
            table = ShardMap.build(dict.fromkeys(live, 1), self.cfg.shard_count, self.cfg.replication).table
            self._targets[live] = table
        return table

    def _later(self, n: SimNode, delay: float, kind: str, *args: Any) -> None:
        self._seq += 1
        n.timers.append((self.now + delay, self._seq, kind, args))

    def send(self, src: str, dst: str, msg: Msg) -> bool:
        s, d = self.nodes[src], self.nodes.get(dst)
        if not s.online or d is None or d.crashed or d.partitioned:
            return False  # dropped; the sender only finds out by a timeout, like a lost zmq frame
        self.channels.setdefault((src, dst), deque()).append(msg)
        return True

    # ------------------------------------------------------------------ cluster-level steps
    def join(self) -> str:
        node_id = f"n{len(self.nodes)}"
        self._incarnations += 1
        self.nodes[node_id] = SimNode(node_id, incarnation=self._incarnations)
        self.trace.append(f"join {node_id}")
        self.session_poll(node_id, read=True)
        return node_id

    def crash(self, node_id: str) -> None:
        n = self.nodes[node_id]
        n.crashed = True
        n.timers.clear()
        n.waiters.clear()
        n.deferred.clear()
        for key in [k for k in self.channels if node_id in k]:
            del self.channels[key]
        self.trace.append(f"crash {node_id}")

    def restart(self, node_id: str) -> None:
        """kill -9 and an immediate start under the same id: every in-memory state of the node (routes, client
        sessions, waiters, timers, view, coordinator) is lost, frames to and from it are lost; its lease lives on
        in etcd. The new process (a new incarnation; still partitioned if its host was) starts its session at once:
        with ``retire_previous_incarnation`` it is ``retiring`` (see ``_retire_previous``), else it re-puts its
        member key under a new lease (the old behaviour)."""
        old = self.nodes[node_id]
        self.trace.append(f"restart {node_id}")
        acked = {f for f, subs in self.acked.items() if node_id in subs}
        self._end_sessions(old, "restart", acked)
        for key in [k for k in self.channels if node_id in k]:
            del self.channels[key]
        self._incarnations += 1
        self.nodes[node_id] = SimNode(
            node_id,
            partitioned=old.partitioned,
            incarnation=self._incarnations,
            retiring=self.cfg.retire_previous_incarnation,
        )
        self.session_poll(node_id, read=True)

    def etcd_down(self) -> None:
        """etcd becomes unreachable for every node (etcd itself runs on: leases expire on its clock)."""
        self.etcd_reachable = False
        self.trace.append("etcd_down")

    def etcd_up(self) -> None:
        self.etcd_reachable = True
        self.trace.append("etcd_up")

    def pause(self, node_id: str) -> None:
        self.nodes[node_id].paused = True
        self.trace.append(f"pause {node_id}")

    def resume(self, node_id: str) -> None:
        self.nodes[node_id].paused = False
        self.trace.append(f"resume {node_id}")

    def partition(self, node_id: str) -> None:
        self.nodes[node_id].partitioned = True
        for key in [k for k in self.channels if node_id in k]:
            del self.channels[key]
        self.trace.append(f"partition {node_id}")

    def heal(self, node_id: str) -> None:
        self.nodes[node_id].partitioned = False
        self.trace.append(f"heal {node_id}")

    def tick(self, dt: float, renew: bool = True) -> None:
        """Advance the fake clock; etcd expires leases; session threads keep alive (if ``renew``); timers fire."""
        self.now += dt
        self.trace.append(f"tick {dt} renew={renew}")
        self.etcd.expire(self.now)
        if renew:
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=False)
        self.etcd.expire(self.now)
        for node_id in sorted(self.nodes):
            self.run_timers(node_id)

    def run_timers(self, node_id: str) -> None:
        n = self.nodes[node_id]
        self._notice_fence(n)
        while n.up and n.timers:
            n.timers.sort()
            due, _, kind, args = n.timers[0]
            if due > self.now:
                return
            n.timers.pop(0)
            getattr(self, "_timer_" + kind)(n, *args)

    # ------------------------------------------------------------------ EtcdSession
    def session_poll(self, node_id: str, read: bool = True) -> None:
        """One iteration of ``EtcdSession.run`` (keep-alive when due, re-register after a lost lease); with
        ``read`` the snapshot is read and handed to the node (``Node.on_snapshot``)."""
        n = self.nodes[node_id]
        if not self.reaches_etcd(n):
            return
        if n.retiring and not self._retire_previous(n):
            return
        if n.lease_id is not None and self.now >= n.next_refresh:
            if self.etcd.refresh(n.lease_id, self.now):
                n.lease_valid_until = self.now + self.cfg.lease_ttl
                n.next_refresh = self.now + self.cfg.lease_ttl / 3
            else:
                n.lease_id = None
                n.lease_valid_until = 0.0
        if n.lease_id is None:
            n.lease_id = self.etcd.grant(self.now)
            self.etcd.put_member(node_id, n.lease_id, n.incarnation if self.cfg.retire_previous_incarnation else 0)
            n.registrations += 1
            n.lease_valid_until = self.now + self.cfg.lease_ttl
            n.next_refresh = self.now + self.cfg.lease_ttl / 3
            # The session pushes a snapshot right after (re-)registering; the node processes it at its next read
            # (``refresh``/``settle``). Until then ``fenced`` holds (registration < registrations).
        if read:
            leader = self.etcd.campaign(node_id, n.lease_id)
            members = self.member_view()
            self.on_snapshot(n, members, leader, self.etcd.doc, self.etcd.doc_revision, n.registrations)

    def _retire_previous(self, n: SimNode) -> bool:
        """``EtcdSession`` at start (issue 9): revoke the lease of a member key left by a previous incarnation
        (deleting it and, if held, the leader key); then, while other members are live, wait until the assignment
        lists this id in no shard's owners or joining (the leader promotes the survivors). True once the node may
        register: it is then filled by ordinary hand-offs, never an owner of a table it did not receive."""
        key = self.etcd.members.get(n.node_id)
        if key is not None and key.incarnation != n.incarnation:
            self.etcd.revoke(key.lease_id, self.now)
            self.notes.append(f"{self.now}: {n.node_id} revoked the lease of its previous incarnation")
        others = set(self.etcd.members) - {n.node_id}
        doc = self.etcd.doc
        if others and doc is not None and n.node_id in doc.nodes():
            return False
        n.retiring = False
        self.notes.append(f"{self.now}: {n.node_id} retired its previous incarnation; registering")
        return True

    def member_view(self) -> dict[str, MemberKey]:
        """``read_members``: every member key with its value's incarnation and its create_revision."""
        return {m: MemberKey(lease.incarnation, lease.create_revision) for m, lease in self.etcd.members.items()}

    def refresh(self, node_id: str) -> None:
        self.trace.append(f"refresh {node_id}")
        self.session_poll(node_id, read=True)

    # ------------------------------------------------------------------ Node: view
    def on_snapshot(
        self,
        n: SimNode,
        members: dict[str, MemberKey],
        leader: str | None,
        doc: Assignment | None,
        rev: int,
        registration: int,
    ) -> None:
        """``members`` maps each member to its key (incarnation, create_revision). The node's loop processes it:
        a node that registered again (its lease was lost) notices here, at the latest, that it was fenced. As in
        ``OwnershipMixin.on_snapshot``: members first, then our own ``member_revision``, then the deferred route
        changes whose sender's registration this view shows, then the assignment."""
        self._notice_fence(n)
        if n.node_id not in members and n.node_id in n.members:
            n.crashed = True  # Node.on_snapshot: removed_from_cluster -> stop()
            self.notes.append(f"{self.now}: {n.node_id} stopped (removed_from_cluster)")
            return
        n.view_read_at = self.etcd.revision
        n.leader = leader
        if registration > n.registration:
            if n.registration:
                # We lost our lease and registered again: peers dropped our routes; announce them again once
                # everyone has seen us back (``_reannounce_routes``).
                self._later(n, self.cfg.reannounce_delay, "reannounce")
            n.registration = registration
        if members != n.member_keys:
            self.on_members(n, members)
        me = members.get(n.node_id)
        n.member_revision = me.revision if me is not None else 0
        if n.deferred:
            self.replay_route_changes(n)
        if doc is not None and rev > n.assignment_revision:
            self.set_assignment(n, doc, rev)
        if n.leader == n.node_id and n.coordinator is None:
            c = self.cfg
            n.coordinator = Coordinator(
                c.shard_count, c.replication, handoff_timeout=c.handoff_timeout, settle=c.settle
            )
        elif n.leader != n.node_id:
            n.coordinator = None
        self.lead(n.node_id)

    def on_members(self, n: SimNode, members: dict[str, MemberKey]) -> None:
        """A member that left loses its routes here; what waits on it fails. A member that was replaced (its
        incarnation or its key's create_revision changed: a restart, or a registration after a lost lease) is
        gone + joined: what waits on it fails, and with ``incarnation_change_drops_routes`` (the default, as
        ``shard/ownership.py``) its routes are dropped too."""
        left = n.members - set(members)
        replaced = {m for m in n.members & set(members) if m != n.node_id and n.member_keys.get(m) != members[m]}
        gone = left | replaced
        n.members = set(members)
        n.member_keys = dict(members)
        for node in sorted(gone if self.cfg.incarnation_change_drops_routes else left):
            for routes in n.routes.values():
                for item in [r for r in routes if r[1] == node]:
                    routes.discard(item)
        for node in sorted(gone):
            for wid, waiter in list(n.waiters.items()):  # _fail_peer_requests
                if node in waiter.pending:
                    waiter.failures.append(node)
                    self._settle_waiter(n, wid, node)

    def set_assignment(self, n: SimNode, new: Assignment, revision: int) -> None:
        if revision <= n.assignment_revision:
            return
        old = n.assignment
        n.assignment, n.assignment_revision = new, revision
        mine = set(new.shards_of(n.node_id))
        for shard in sorted(mine):
            if n.incoming.pop(shard, None) is not None and shard in n.snapshot_sources:
                # The fill flipped: the source keeps forwarding until it sees the flip plus its grace period.
                self._later(n, 2 * self.cfg.handoff_grace, "forget_source", shard, n.snapshot_sources[shard])
        if old is not None:
            for shard in sorted(set(old.shards_of(n.node_id)) - mine):
                self._later(n, self.cfg.handoff_grace, "release", shard)
            for shard, fw in sorted(n.forwarding.items()):
                if new.epoch(shard) > fw.epoch:
                    self._later(n, self.cfg.handoff_grace, "stop_forwarding", shard, fw.epoch)

    def _timer_stop_forwarding(self, n: SimNode, shard: int, epoch: int) -> None:
        fw = n.forwarding.get(shard)
        if fw is not None and fw.epoch == epoch:
            del n.forwarding[shard]
            self._timer_release(n, shard)

    def _timer_release(self, n: SimNode, shard: int) -> None:
        a = n.assignment
        if a is None or n.node_id in a.owners(shard) or shard in n.incoming or shard in n.forwarding:
            return
        doc = self.etcd.doc
        if doc is not None and n.node_id in doc.owners(shard) and n.routes.get(shard):
            self.notes.append(f"{self.now}: {n.node_id} released shard {shard} that etcd says it owns (stale view)")
        n.routes.pop(shard, None)

    def _timer_forget_source(self, n: SimNode, shard: int, source: str) -> None:
        """``Node._forget_source``: stop accepting forwarded changes from a hand-off source (its stream is over)."""
        if n.snapshot_sources.get(shard) == source:
            del n.snapshot_sources[shard]

    def _timer_abandon_incoming(self, n: SimNode, shard: int, move_id: int, source: str) -> None:
        """``Node._abandon_incoming``: decide on a fresh read of etcd; only a fill really abandoned forgets its
        source (a flipped one was scheduled to by ``set_assignment``)."""
        if n.incoming.get(shard) != move_id:
            return  # the move flipped (the flip schedules forget_source) or a newer fill replaced it
        if not self.refresh_assignment(n, force=True):
            self._later(n, self.cfg.handoff_grace, "abandon_incoming", shard, move_id, source)
            return
        if n.incoming.pop(shard, None) == move_id:  # the fresh view may have made us the owner meanwhile
            self._timer_forget_source(n, shard, source)  # abandoned: the source stopped streaming too
            self._timer_release(n, shard)

    def _timer_reannounce(self, n: SimNode) -> None:
        """``Node._reannounce_routes``: after losing its lease, a node announces its clients' routes again."""
        if n.assignment is None or not n.local_filters:
            return
        self._send_route_items(n, [self._route_item(n, f) for f in sorted(n.local_filters)], lambda failures: None, 0)

    def refresh_assignment(self, n: SimNode, force: bool = False) -> bool:
        """``Node._refresh_assignment``: a direct etcd read, at most every 100 ms unless ``force``; False when
        etcd cannot be reached."""
        if self.now - n.last_refresh < self.cfg.refresh_min_interval and not force:
            return True
        n.last_refresh = self.now
        if not self.reaches_etcd(n):
            return False
        if self.etcd.doc is not None:
            n.view_read_at = max(n.view_read_at, self.etcd.revision)
            self.set_assignment(n, self.etcd.doc, self.etcd.doc_revision)
        return True

    # ------------------------------------------------------------------ Node: leader
    def lead(self, node_id: str) -> None:
        n = self.nodes[node_id]
        c = n.coordinator
        if not n.up or c is None or n.leader != n.node_id or self.fenced(n):
            return
        c.observe(n.assignment, n.assignment_revision, {m: Member() for m in n.members}, self.now)
        for action in c.step(self.now):
            if isinstance(action, StartHandoff):
                self._start_handoff(n, action)
            else:
                self._commit(n, c, action)
        c.abandoned.clear()

    def _start_handoff(self, n: SimNode, action: StartHandoff) -> None:
        move = action.move
        header = {"id": action.move_id, "shard": move.shard, "epoch": action.epoch,
                  "targets": list(move.add), "coordinator": n.node_id}  # fmt: skip
        if move.source == n.node_id:
            self._on_handoff(n, n.node_id, header)
        else:
            self.send(n.node_id, move.source, Msg("HANDOFF", header))

    def _commit(self, n: SimNode, c: Coordinator, commit: Commit) -> None:
        ok = self.reaches_etcd(n)
        revision = self.etcd.write_assignment(commit.assignment, commit.expected_revision) if ok else None
        c.on_commit(commit, revision)
        if revision is not None:
            self.set_assignment(n, commit.assignment, revision)

    # ------------------------------------------------------------------ Node: hand-off
    def _on_handoff(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        shard, epoch = h["shard"], h["epoch"]
        if self.fenced(n):
            self._refuse_move(n, h, "fenced")
            return
        a = n.assignment
        if a is None or a.epoch(shard) < epoch:
            self.refresh_assignment(n)
            a = n.assignment
        if a is None or a.epoch(shard) != epoch or n.node_id not in a.owners(shard):
            self._refuse_move(n, h, "stale_epoch")
            return
        targets = [t for t in h["targets"] if t != n.node_id]
        if any(t not in n.members for t in targets):  # OwnershipMixin._on_handoff: our view lags a (re)joined target
            self._refuse_move(n, h, "unavailable")
            return
        fw = n.forwarding.get(shard)
        if fw is None or fw.epoch != epoch:
            fw = n.forwarding[shard] = Forwarding(set(), epoch)
        fw.targets.update(targets)
        fw.move_id = h["id"]
        # A move the coordinator abandons never flips: stop streaming to its targets after the timeout.
        self._later(n, self.cfg.handoff_timeout + self.cfg.handoff_grace, "stop_abandoned", shard, epoch, h["id"])
        routes = sorted(n.routes.get(shard, ()))
        for target in targets:
            header = {"id": h["id"], "shard": shard, "epoch": epoch, "routes": routes, "coordinator": h["coordinator"]}
            self.send(n.node_id, target, Msg("SNAPSHOT", header))

    def _on_snapshot(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        shard, epoch = h["shard"], h["epoch"]
        a = n.assignment
        if a is not None and a.epoch(shard) > epoch:
            self._refuse_move(n, h, "stale_epoch")
            return
        if n.incoming.get(shard) != h["id"]:
            n.incoming[shard] = h["id"]
            n.snapshot_sources[shard] = sender
            # Twice the coordinator's timeout: it may flip the move up to handoff_timeout after starting it, and
            # the replica must not give up on a fill that is about to become its own.
            self._later(n, 2 * self.cfg.handoff_timeout, "abandon_incoming", shard, h["id"], sender)
        n.routes.setdefault(shard, set()).update(h["routes"])
        ready = {"id": h["id"], "shard": shard, "epoch": epoch, "node": n.node_id}
        if h["coordinator"] == n.node_id:
            self._on_handoff_ready(n, n.node_id, ready)
        else:
            self.send(n.node_id, h["coordinator"], Msg("HANDOFF_READY", ready))

    def _on_handoff_ready(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        if n.coordinator is not None:
            n.coordinator.on_ready(h["id"], h["node"])

    def _refuse_move(self, n: SimNode, h: dict[str, Any], code: str) -> None:
        """``Node._refuse_move``: tell the coordinator (not whoever relayed the frame) by move id."""
        self.refused_moves.append((self.now, n.node_id, h["id"], code))
        if h["coordinator"] == n.node_id and n.coordinator is not None:
            n.coordinator.on_refused(h["id"])
        else:
            header = {"ref": None, "code": code, "move_id": h["id"], "shard": h["shard"]}
            self.send(n.node_id, h["coordinator"], Msg("ERROR", header))

    def _timer_stop_abandoned(self, n: SimNode, shard: int, epoch: int, move_id: int) -> None:
        """``Node._stop_abandoned``: a move that never flipped stops streaming to its targets."""
        fw = n.forwarding.get(shard)
        never_flipped = n.assignment is not None and n.assignment.epoch(shard) == epoch
        if fw is not None and fw.epoch == epoch and fw.move_id == move_id and never_flipped:
            del n.forwarding[shard]

    # ------------------------------------------------------------------ Node: routes
    def subscribe(self, node_id: str, filt: str, resumes: tuple[str, str, str] | None = None) -> bool:
        """A client on ``node_id`` subscribes to ``filt`` (``_on_sub`` -> ``_change_routes``). False if refused
        (with ``end_sessions_when_fenced`` a fenced node takes no subscription: it ends its sessions). ``resumes``: the
        ``interrupted`` entry this SUB re-makes, settled by its acknowledgement."""
        self.trace.append(f"subscribe {node_id} {filt}")
        n = self.nodes[node_id]
        self._notice_fence(n)
        if not n.up or n.assignment is None or filt in n.local_filters:
            return False
        if self.cfg.end_sessions_when_fenced and self.fenced(n):
            return False
        n.local_filters.add(filt)
        generation = n.sessions_ended

        def done(failures: list[str]) -> None:
            if n.sessions_ended != generation:
                return  # the session ended meanwhile: its client was told, and subscribes again elsewhere
            if failures:
                n.local_filters.discard(filt)  # all or nothing: the SUB is refused (its ROUTE_DEL is not modelled)
                self.failed_subs += 1
            else:
                self.acked.setdefault(filt, set()).add(node_id)
                self.ack_time[(filt, node_id)] = self.now
                if resumes in self.interrupted:
                    self.interrupted.remove(resumes)  # a client that lost its session subscribed again

        self._send_route_items(n, [self._route_item(n, filt)], done, 0)
        return True

    def resubscribe(self, index: int, node_id: str) -> bool:
        """The client of interrupted subscription ``index`` subscribes again through ``node_id`` (the SDK on
        SESSION_END fails over and resubscribes everything). It stays interrupted until acknowledged."""
        entry = self.interrupted[index]
        filt = entry[0]
        self.trace.append(f"resubscribe {index} via {node_id}")
        if filt in self.nodes[node_id].local_filters and node_id in self.acked.get(filt, set()):
            del self.interrupted[index]  # joins that node's acknowledged subscription of the filter
            return True
        return self.subscribe(node_id, filt, entry)

    def _notice_fence(self, n: SimNode) -> None:
        """The node's loop checks ``fenced`` at each turn (timers, client requests): on becoming fenced it ends
        every client session (issue 9: ``SESSION_END {"code": "fenced"}``), if so configured."""
        if not n.up:
            return
        if not self.fenced(n):
            n.fence_noticed = False
        elif not n.fence_noticed:
            n.fence_noticed = True
            if self.cfg.end_sessions_when_fenced:
                self._end_sessions(n, "fenced")

    def _end_sessions(self, n: SimNode, why: str, also: set[str] | None = None) -> None:
        """Every client session of ``n`` ends: its subscriptions (``local_filters``, plus ``also``) are no longer
        acknowledged and wait in ``interrupted`` for their client to subscribe again. (The real node also sends
        ROUTE_DEL of its filters; ROUTE_DEL is not modelled, so owners keep those routes: extra, never missing.)"""
        ended = sorted(n.local_filters | (also or set()))
        n.local_filters.clear()
        n.sessions_ended += 1
        for filt in ended:
            subs = self.acked.get(filt)
            if subs is not None:
                subs.discard(n.node_id)
            self.ack_time.pop((filt, n.node_id), None)
            self.interrupted.append((filt, n.node_id, why))
            self.interruptions.append((self.now, n.node_id, filt, why))
        if ended:
            self.trace.append(f"sessions ended on {n.node_id} ({why}): {len(ended)}")

    def _route_item(self, n: SimNode, filt: str) -> tuple[int, int, str]:
        assert n.assignment is not None
        shard = self.shard_of(filt)
        return (shard, n.assignment.epoch(shard), filt)

    def _send_route_items(
        self, n: SimNode, items: list[tuple[int, int, str]], on_done: Callable[[list[str]], None], attempt: int
    ) -> None:
        assert n.assignment is not None
        by_node: dict[str, list[tuple[int, int, str]]] = {}
        ownerless: set[str] = set()
        for item in items:
            owners = n.assignment.owners(item[0])
            if not owners:  # shard/routing.py: nobody can hold it, so it is never confirmed
                ownerless.add(f"shard {item[0]} has no owner")
            for owner in owners:
                by_node.setdefault(owner, []).append(item)
        local = by_node.pop(n.node_id, None)
        if local:
            self._apply_route_items(n, n.node_id, local, forwarded=False)
        if not by_node:
            on_done(sorted(ownerless))
            return
        wid = self._id()
        n.waiters[wid] = Waiter(set(by_node), [on_done], by_node, attempt, failures=sorted(ownerless))
        for node, routes in sorted(by_node.items()):
            # A frame to a peer that is down is not an error for zmq: the waiter's timeout catches it.
            header = {"id": wid, "node": n.node_id, "routes": routes, "member_rev": n.member_revision}
            self.send(n.node_id, node, Msg("ROUTE_ADD", header))
        self._later(n, self.cfg.request_timeout, "expire_waiter", wid)

    def _apply_route_items(
        self, n: SimNode, node: str, items: list[tuple[int, int, str]], forwarded: bool
    ) -> list[tuple[int, int]]:
        """Fencing at the sink: a direct item older than our epoch for its shard is never applied (reported stale);
        one at our epoch is applied if we hold the shard (owner or hand-off source, not a shard being filled); a
        newer one is applied. Forwarded items are applied whatever their epoch (``_on_route_change`` checked their
        sender)."""
        a = n.assignment
        stale: list[tuple[int, int]] = []
        relay: dict[str, list[tuple[int, int, str]]] = {}
        for item in items:
            shard, epoch, filt = item
            ours = a.epoch(shard) if a is not None else 0
            if forwarded or epoch > ours or (epoch == ours and n.holds(shard)):
                n.routes.setdefault(shard, set()).add((filt, node))
                fw = n.forwarding.get(shard)
                if fw is not None and not forwarded:
                    for target in sorted(fw.targets):
                        relay.setdefault(target, []).append(item)
            else:
                stale.append((shard, ours))
        for target, routes in sorted(relay.items()):
            self.send(n.node_id, target, Msg("ROUTE_ADD", {"id": 0, "node": node, "routes": routes, "fwd": True}))
        return stale

    def _on_route_change(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        forwarded = bool(h.get("fwd"))
        deferring = self.cfg.defer_unseen_registrations and not forwarded
        if deferring and (self._registration_unseen(n, sender, h) or n.deferred):
            # The sender registered again and our view does not show it yet: the view that drops its old
            # registration's routes would drop this one after we acknowledged it. Wait for it, in arrival order.
            key = n.member_keys.get(sender)
            self.deferrals.append((self.now, n.node_id, sender, h["member_rev"], key.revision if key else 0))
            n.deferred.append((self.now, sender, h))
            if len(n.deferred) == 1:
                self._later(n, self.cfg.request_timeout, "replay_route_changes")
            return
        self._change_routes_now(n, sender, h)

    def _registration_unseen(self, n: SimNode, sender: str, h: dict[str, Any]) -> bool:
        """``RoutingMixin._registration_unseen``: our view shows the sender with an older member key revision than
        the one its frame carries (a sender our view lacks is not "unseen")."""
        key = n.member_keys.get(sender)
        rev = h.get("member_rev")
        return key is not None and type(rev) is int and rev > key.revision

    def replay_route_changes(self, n: SimNode) -> None:
        """``RoutingMixin.replay_route_changes``: apply deferred changes, oldest first, while the oldest one's
        sender registration is in our view or it waited request_timeout; one from a sender no longer a member is
        dropped unanswered. Called after each snapshot and by a timer while any wait."""
        oldest_allowed = self.now - self.cfg.request_timeout
        while n.deferred and (
            not self._registration_unseen(n, n.deferred[0][1], n.deferred[0][2]) or n.deferred[0][0] <= oldest_allowed
        ):
            _, sender, h = n.deferred.popleft()
            if self._registration_unseen(n, sender, h):
                self.deferred_timeouts.append((self.now, n.node_id, sender))
            if sender in n.members:
                self._change_routes_now(n, sender, h)
        if n.deferred and not any(kind == "replay_route_changes" for _, _, kind, _ in n.timers):
            # (the real node adds a timer at every call; one at a time applies a timed-out change as late as its
            # chain does: at most min(1, request_timeout) after its deadline)
            self._later(n, min(1.0, self.cfg.request_timeout), "replay_route_changes")

    def _timer_replay_route_changes(self, n: SimNode) -> None:
        self.replay_route_changes(n)

    def _change_routes_now(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        forwarded = bool(h.get("fwd"))
        # Applied even while fenced (shard/routing.py): storing a route is not answering for the shard.
        if forwarded:
            # Only the source of a hand-off we receive may forward changes to us, and only for that shard.
            if any(n.snapshot_sources.get(item[0]) != sender for item in h["routes"]):
                self._refuse_peer(n, sender, h, "not_allowed")
                return
        elif h["node"] != sender:
            self._refuse_peer(n, sender, h, "not_allowed")
            return
        stale = self._apply_route_items(n, h["node"], h["routes"], forwarded)
        if not forwarded and h["id"]:
            self.send(n.node_id, sender, Msg("ROUTE_ACK", {"id": h["id"], "stale": stale}))

    def _refuse_peer(self, n: SimNode, sender: str, h: dict[str, Any], code: str) -> None:
        self.refused_frames.append((self.now, n.node_id, sender, "fwd" if h.get("fwd") else "route", code))
        self.send(n.node_id, sender, Msg("ERROR", {"ref": h["id"], "code": code}))

    def _on_route_ack(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        wid = h["id"]
        if h["stale"]:
            if self._retry_stale(n, wid, sender, h["stale"]):
                return
            if wid in n.waiters:  # retried enough: do not confirm a route that no current owner holds
                n.waiters[wid].failures.append(f"{sender} (epoch still stale)")
                self.notes.append(f"{self.now}: {n.node_id} gave up re-sending stale items to {sender}")
        self._settle_waiter(n, wid, sender)

    def _retry_stale(self, n: SimNode, wid: int, sender: str, stale: list[tuple[int, int]]) -> bool:
        waiter = n.waiters.get(wid)
        if waiter is None or waiter.attempt >= 3:
            return False
        self.refresh_assignment(n)
        shards = {s for s, _ in stale}
        retry = [self._route_item(n, f) for s, _, f in waiter.sent.get(sender, []) if s in shards]
        if not retry:
            return False

        def done(failures: list[str]) -> None:
            if wid in n.waiters:
                n.waiters[wid].failures.extend(failures)
            self._settle_waiter(n, wid, sender)

        self._send_route_items(n, retry, done, waiter.attempt + 1)
        return True

    def _on_peer_error(self, n: SimNode, sender: str, h: dict[str, Any]) -> None:
        """``Node._on_peer_error``: a refused move goes to the coordinator by move id; otherwise fail the waiter."""
        if "move_id" in h:
            if n.coordinator is not None:
                n.coordinator.on_refused(h["move_id"])
        elif h["ref"] in n.waiters:
            n.waiters[h["ref"]].failures.append(f"{sender} ({h['code']})")
            self._settle_waiter(n, h["ref"], sender)

    def _settle_waiter(self, n: SimNode, wid: int, node: str) -> None:
        waiter = n.waiters.get(wid)
        if waiter is None:
            return
        waiter.pending.discard(node)
        if not waiter.pending:
            self._finish_waiter(n, wid)

    def _timer_expire_waiter(self, n: SimNode, wid: int) -> None:
        waiter = n.waiters.get(wid)
        if waiter is not None:
            waiter.failures.append("timeout")
            self._finish_waiter(n, wid)

    def _finish_waiter(self, n: SimNode, wid: int) -> None:
        waiter = n.waiters.pop(wid)
        for callback in waiter.callbacks:
            callback(waiter.failures)

    # ------------------------------------------------------------------ messages
    def deliverable(self) -> list[tuple[str, str]]:
        return sorted(k for k, q in self.channels.items() if q and self.nodes[k[1]].up)

    def deliver(self, src: str, dst: str) -> None:
        """Deliver the oldest frame from ``src`` to ``dst`` (dropped if either end is partitioned or crashed)."""
        q = self.channels.get((src, dst))
        if not q:
            return
        msg = q.popleft()
        s, d = self.nodes[src], self.nodes[dst]
        self.trace.append(f"deliver {src}->{dst} {msg.kind}")
        if s.crashed or s.partitioned or d.crashed or d.partitioned or d.paused:
            return
        if not d.members:
            return  # the member check on peer frames: a node with no view yet (a retiring process) knows no member
        self._notice_fence(d)
        handler = {
            "ROUTE_ADD": self._on_route_change,
            "ROUTE_ACK": self._on_route_ack,
            "ERROR": self._on_peer_error,
            "HANDOFF": self._on_handoff,
            "SNAPSHOT": self._on_snapshot,
            "HANDOFF_READY": self._on_handoff_ready,
        }[msg.kind]
        handler(d, src, msg.header)

    # ------------------------------------------------------------------ publish (one lookup)
    def publish(self, node_id: str, topic: str) -> frozenset[str] | None:
        """Which subscribers of ``topic`` the publisher learns about (``_on_pub`` -> ``_lookup`` -> ``_on_lookup``);
        None when the publish fails. Recorded with the acknowledged subscribers at that moment."""
        self.trace.append(f"publish {node_id} {topic}")
        p = self.nodes[node_id]
        self._notice_fence(p)
        if not p.up or self.fenced(p) or p.assignment is None:
            return None
        shard = self.shard_of(topic)
        tried: list[str] = []
        answer: frozenset[str] | None = None
        while answer is None:
            a = p.assignment
            candidates = [o for o in a.owners(shard) if o not in tried and o in p.members]
            if not candidates or len(tried) > 3:
                break
            owner = candidates[0]
            if owner == node_id:
                answer = frozenset(s for f, s in p.routes.get(shard, ()) if f == topic)
                break
            tried.append(owner)
            o = self.nodes[owner]
            if not (p.online and o.online):
                continue  # lookup timeout: ask the next owner
            if self.fenced(o):
                continue  # E_FENCED: the next owner
            ours = o.assignment.epoch(shard) if o.assignment is not None else 0
            if a.epoch(shard) < ours:  # fenced at the sink: any older epoch is refused
                self.refresh_assignment(p)  # E_STALE_EPOCH: refresh, then the next owner
                continue
            answer = frozenset(s for f, s in o.routes.get(shard, ()) if f == topic)
        expected = frozenset(self.acked.get(topic, set()) & self.live_members())
        self.publishes.append((self.now, node_id, topic, answer, expected))
        return answer

    # ------------------------------------------------------------------ settling
    def views_current(self) -> bool:
        return all(
            n.assignment_revision == self.etcd.doc_revision
            and n.member_keys == self.member_view()
            and n.registration == n.registrations
            for n in self.nodes.values()
            if n.up and n.node_id in self.etcd.members
        )

    def leader_node(self) -> SimNode | None:
        if self.etcd.leader is None:
            return None
        return self.nodes[self.etcd.leader[0]]

    def quiescent(self) -> bool:
        """Nothing left to do: views current, no frames or waiters pending, assignment at the target, no moves."""
        doc, target = self.etcd.doc, self.target()
        if not self.etcd_reachable or any(n.retiring and not n.crashed for n in self.nodes.values()):
            return False
        if doc is None or target is None or doc.table != target or not self.views_current():
            return False
        if any(self.channels.values()) or any(n.waiters or n.deferred for n in self.nodes.values() if n.up):
            return False
        if any(kind == "reannounce" for n in self.nodes.values() if n.up for _, _, kind, _ in n.timers):
            return False
        leader = self.leader_node()
        if leader is None or not leader.up or leader.coordinator is None or leader.coordinator.in_flight:
            return False
        return all(
            not n.partitioned and not n.paused if not n.crashed else n.node_id not in self.etcd.members
            for n in self.nodes.values()
        )

    def settle(self, max_rounds: int = 400, dt: float = 0.25) -> bool:
        """Drive the model deterministically towards quiescence: deliver every frame, refresh every view, let the
        leader step, advance the clock. Paused and partitioned nodes stay so. True once quiescent."""
        self.trace.append("settle")
        for _ in range(max_rounds):
            for _ in range(10_000):
                ready = self.deliverable()
                if not ready:
                    break
                for src, dst in ready:
                    self.deliver(src, dst)
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=True)
            leader = self.leader_node()
            if leader is not None:
                self.lead(leader.node_id)
            if self.quiescent():
                return True
            self.now += dt
            self.etcd.expire(self.now)
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=False)
                self.run_timers(node_id)
        return self.quiescent()
