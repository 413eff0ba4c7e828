"""The node's protocol core: every frame, timer and view a node handles, as one object that does no I/O.

``NodeCore`` takes events (client and peer frames, the etcd session's views and lease, timers it asked for,
answers to its etcd requests) and acts through ``Effects`` (frames out, timers, etcd requests). The shell
(``shardmq.shard.node``) owns the sockets, the loop, the clock and the etcd session; the simulation
(``shardmq.testing.simulation``) drives the same object over an in-memory network, etcd and clock.

Rules of this file:
- This file dispatches and holds the cluster-wide parts: the view from etcd (members, assignment, leader,
  lease), fencing, and the leader's rebalancer. A message's journey has a room per step: ``entry`` (a client's
  publish, resolved and forwarded), ``owner`` (the route table and its answers, hand-offs), ``destination``
  (delivery to local clients, QoS 1), ``subscriptions`` (local filters and their routes at the owners),
  ``retained`` (retained messages: the primary's writes, their replicas, a new subscription's fetch),
  ``sessions`` (persistent sessions: HELLO, the session directory, the takeover between nodes), ``wills`` (a
  client's will: kept in its directory record, claimed and published once when the client is gone).
- The clock is ``now``, set by whoever drives the core before each event; nothing here reads a clock.
- One registry (``requests``) holds everything that waits on a peer; a peer's ERROR and a peer's loss reach
  what waits on it through it.
- Only members may talk to a node: a peer frame from a routing id not in the view is dropped and counted.
- A node that is fenced (its lease in doubt, or a registration whose view it has not seen yet) ends its client
  sessions (they fail over), refuses lookups, subscriptions and publishes, and does not lead.
- Every rejected input is answered with an ERROR frame (when the sender can be addressed), counted in
  ``metrics`` under ``errors.<code>`` and logged; the node keeps serving.
- Logs name the node (bound by the shell), and ``shard`` with ``shard_epoch`` or the ``membership_epoch``,
  never a bare ``epoch``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shardmq.rebalance import Commit, Coordinator, Member, StartHandoff, target_table
from shardmq.ring import Assignment
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError

from .access import AccessControl
from .config import ProtocolConfig
from .destination import Destination
from .durable import Durability
from .effects import Effects
from .entry import Entry
from .outbox import Outbox
from .owner import OwnerSide
from .records import Lookup, Session
from .requests import PendingRequests
from .retained import RetainedSide
from .sessions import SessionSide
from .subscriptions import Subscriptions
from .view import ClusterView, MemberInfo, SessionView, filled_from_nobody
from .wills import WillSide

# The fence check runs when the lease would come into doubt (and at least this often): a fixed 100 ms tick woke
# every node ten times a second and, measured, made a saturated subscriber's node send smaller batches and drop.
FENCE_CHECK_INTERVAL = 1.0
FENCE_CHECK_MIN = 0.02
LEAD_TICK = 0.05  # while moves are in flight the leader steps its coordinator this often
REFRESH_MIN_INTERVAL = 0.1  # an assignment read asked for by a peer's answer, at most this often


_PARSED: dict[bytes, Assignment] = {}  # the latest documents, oldest first (Assignment is immutable)
_PARSED_MAX = 4


def parse_assignment(document: bytes) -> Assignment:
    """One parse per document: views repeat it, a simulated cluster's nodes share it, and a document this
    process wrote is known without one (``remember_assignment``)."""
    found = _PARSED.get(document)
    if found is None:
        found = Assignment.from_json(document)
        remember_assignment(document, found)
    return found


def remember_assignment(document: bytes, assignment: Assignment) -> None:
    """``document`` is ``assignment.to_json()``: at 16,384 shards a parse costs a tenth of a second, and the
    leader would otherwise parse back every document it commits."""
    _PARSED[document] = assignment
    while len(_PARSED) > _PARSED_MAX:
        del _PARSED[next(iter(_PARSED))]


@dataclass(frozen=True, slots=True)
class MembersChange:
    """What changed between two member mappings, as any node sees it (``NodeCore._on_members`` takes itself out)."""

    joined: frozenset[str]  # in the new mapping only
    gone: frozenset[str]  # in the old mapping only
    # In both, but another process or registration: a restart (new incarnation), a move (new endpoints) or a
    # registration made again. What was known of the old one goes, as if it had left and joined.
    replaced: frozenset[str]
    # Those of ``replaced`` that are the same process at the same address, registered again after a lost lease:
    # a connection to it is still right, and closing it would drop what was queued on it just before (a
    # hand-off's SNAPSHOT, measured: 86 moves then waited out handoff_timeout).
    same_socket: frozenset[str]
    members: tuple[str, ...]  # the new mapping's ids, sorted (for the log)


_MEMBERS_CHANGES: dict[tuple[int, int], tuple[Mapping[str, MemberInfo], Mapping[str, MemberInfo], MembersChange]] = {}
_MEMBERS_CHANGES_MAX = 16


def members_change(old: Mapping[str, MemberInfo], new: Mapping[str, MemberInfo]) -> MembersChange:
    """The change from ``old`` to ``new``, computed once per pair of mappings: a view's parts are never changed
    (``SessionView``), and the nodes of a simulated cluster share them (a walk over a thousand members per node
    per view was a large part of that run's time)."""
    key = (id(old), id(new))
    found = _MEMBERS_CHANGES.get(key)
    if found is not None and found[0] is old and found[1] is new:
        return found[2]
    replaced = frozenset(
        n for n, m in new.items() if (was := old.get(n)) is not None and m is not was and not m.same_process(was)
    )
    same_socket = frozenset(
        n for n in replaced
        if (new[n].incarnation, new[n].peer_endpoint) == (old[n].incarnation, old[n].peer_endpoint)
    )  # fmt: skip
    joined, gone = frozenset(new.keys() - old.keys()), frozenset(old.keys() - new.keys())
    change = MembersChange(joined, gone, replaced, same_socket, tuple(sorted(new)))
    _MEMBERS_CHANGES.pop(key, None)
    while len(_MEMBERS_CHANGES) >= _MEMBERS_CHANGES_MAX:
        del _MEMBERS_CHANGES[next(iter(_MEMBERS_CHANGES))]
    _MEMBERS_CHANGES[key] = (old, new, change)
    return change


class NodeCore:
    def __init__(self, cfg: ProtocolConfig, effects: Effects, log: Any, incarnation: str = "") -> None:
        self.cfg = cfg
        self.me = cfg.node_id
        self.incarnation = incarnation
        self.effects = effects
        self.log = log
        self.now = 0.0
        self.metrics: Counter[str] = Counter()
        self.outbox = Outbox(max_payload=cfg.max_payload)
        self.view = ClusterView(self.me, cfg.shard_count, cfg.replication)
        self.requests = PendingRequests()
        self.entry = Entry(self)
        self.owner = OwnerSide(self)
        self.destination = Destination(self)
        self.subscriptions = Subscriptions(self)
        self.retained = RetainedSide(self)
        self.sessions = SessionSide(self)
        self.wills = WillSide(self)
        self.access = AccessControl(self)
        self.durable = Durability(self)  # after ``owner``: it journals the owner's retained table
        self.coordinator: Coordinator | None = None
        self.sessions_ended_fenced = False  # SESSION_END sent to every client since the lease became doubtful
        self._lead_scheduled = False
        self._commit_in_flight = False
        self._last_progress_log = 0.0
        self._last_refresh = float("-inf")
        self._refresh_in_flight = False  # an assignment read is on its way
        self._refresh_next: list[Callable[[bool], None]] = []  # what waits for the read after it
        self._shard_view_cache: tuple[Assignment | None, dict[str, Any]] | None = None
        self._client_handlers: dict[bytes, Callable[[Session, Frame], None]] = {
            codec.HELLO: self.destination.on_hello,
            codec.PING: self.entry.on_ping,
            codec.PONG: lambda session, frame: None,
            codec.BYE: self.destination.on_bye,
            codec.STATUS: self._on_status,
            codec.SUB: self.subscriptions.on_sub,
            codec.UNSUB: self.subscriptions.on_unsub,
            codec.DACK: self.destination.on_dack,
            codec.PUB: self.entry.on_pub,
            codec.PUBS: self.entry.on_pubs,
            codec.LEAVE: self._on_leave,
        }
        self._peer_handlers: dict[bytes, Callable[[str, Frame], None]] = {
            codec.ROUTE_ADD: self.owner.on_route_change,
            codec.ROUTE_DEL: self.owner.on_route_change,
            codec.ROUTE_ACK: self.subscriptions.on_route_ack,
            codec.LOOKUP: self.owner.on_lookup,
            codec.LOOKUP_REPLY: self.entry.on_lookup_reply,
            codec.LOOKUPS: self.owner.on_lookups,
            codec.LOOKUPS_REPLY: self.entry.on_lookups_reply,
            codec.FWD: self.destination.on_fwd,
            codec.FWDS: self.destination.on_fwds,
            codec.FWD_ACK: self.entry.on_fwd_ack,
            codec.HANDOFF: self.owner.on_handoff,
            codec.SNAPSHOT: self.owner.on_snapshot,
            codec.HANDOFF_READY: self._on_handoff_ready,
            codec.INVALIDATE: self.entry.on_invalidate,
            codec.INVALIDATE_ACK: self.owner.on_invalidate_ack,
            codec.ERROR: self._on_peer_error,
            codec.RETAIN: self.retained.on_retain,
            codec.RETAINS: self.retained.on_retains,
            codec.RETAINM: self.retained.on_retainm,
            codec.RETAINM_ACK: self.retained.on_retainm_ack,
            codec.RETAIN_ACK: self.retained.on_retain_ack,
            codec.RETAINED_GET: self.retained.on_get,
            codec.RETAINED_REPLY: self.retained.on_reply,
            codec.SESSION_TAKE: self.sessions.on_take,
            codec.SESSION_STATE: self.sessions.on_state,
            codec.SESSION_TAKEN: self.sessions.on_taken,
            codec.SHARED_FWD: self.destination.on_shared_fwd,
            codec.SHARED_DONE: self.entry.on_shared_done,
            codec.SHARED_COPY: self.entry.on_shared_copy,
            codec.SHARED_RELEASE: self.entry.on_shared_release,
        }

    def start(self, now: float) -> None:
        """Set the periodic timers (the shell calls this once, when its sockets are up)."""
        self.now = now
        later = self.effects.call_later
        later(self.cfg.redelivery_interval, self.destination.redeliver_tick)
        later(self.cfg.client_idle_check, self.destination.idle_tick)
        later(self.cfg.redelivery_interval, self.destination.drops_tick)
        later(self.cfg.redelivery_interval, self.sessions.trim_tick)
        later(FENCE_CHECK_INTERVAL, self._fence_tick)

    # ------------------------------------------------------------------ lease and fencing
    def on_lease(self, fenced_from: float, registrations: int) -> None:
        """The etcd session's lease: in doubt from ``fenced_from``; ``registrations`` made so far."""
        self.view.fenced_from = fenced_from
        self.view.registrations = registrations

    def fenced(self) -> bool:
        return self.view.fenced(self.now)

    def _fence_tick(self) -> None:
        """Clients of a node that cannot vouch for its lease move elsewhere at once: peers drop this node's
        routes when the lease expires, and a subscriber left here would then miss messages without knowing."""
        if self.fenced() and self.view.registration_seen:  # registered once: before that no client subscribed
            if not self.sessions_ended_fenced:
                self.sessions_ended_fenced = True
                self.log.warning("lease_in_doubt_clients_told", clients=len(self.destination.sessions),
                                 membership_epoch=self.view.membership_epoch)  # fmt: skip
                self.destination.end_sessions(codec.E_FENCED, f"node {self.me} lost contact with etcd; "
                                              "connect to another node")  # fmt: skip
        else:
            self.sessions_ended_fenced = False
        until_doubt = self.view.fenced_from - self.now
        self.effects.call_later(min(FENCE_CHECK_INTERVAL, max(FENCE_CHECK_MIN, until_doubt)), self._fence_tick)

    # ------------------------------------------------------------------ client frames
    def on_client_parts(self, parts: list[bytes], principal: str | None = None) -> None:
        """A client's frame; ``principal``: who the shell says sent it (with ``access_control`` on)."""
        self.metrics["frames_in.client"] += 1
        rid, rest = parts[0], parts[1:]
        try:
            frame = codec.decode(rest, max_payload=self.cfg.max_payload, allowed=codec.CLIENT_REQUESTS)
        except ProtocolError as exc:
            self.reject_client(rid, exc.code, exc.reason, exc.ref)
            return
        if self.access.enabled:
            ref = frame.header.get("id")
            session = self.access.admit(rid, principal, ref if type(ref) is int else None)
            if session is None:
                return
        else:
            session = self.destination.attach(rid)
        self._client_handlers[frame.type](session, frame)

    def send_client(self, rid: bytes, parts: list[bytes]) -> bool:
        if not self.effects.send_client(rid, parts):
            return False
        if self.destination.drop_reports and rid in self.destination.drop_reports:
            self.destination.report_drops(rid)  # zmq takes its frames again: tell it now what it missed
        return True

    def client_unreachable(self, rid: bytes) -> None:
        """The shell found a client's connection gone (a send to it failed that way)."""
        self.destination.detach(rid)

    def reject_client(self, rid: bytes, code: str, reason: str, ref: int | None = None) -> None:
        self.metrics[f"errors.{code}"] += 1
        self.log.info("client_error", client=rid.decode(errors="replace"), code=code, reason=reason)
        self.send_client(rid, codec.error_parts(code, reason, ref))

    def _on_status(self, session: Session, frame: Frame) -> None:
        detail = frame.header.get("detail") is True
        if detail and session.acl is not None and not session.acl.admin:
            self.access.refuse(session, "ask for detailed status (admin only)", frame.header["id"])
            return
        status = {**self.effects.shell_status(), **self.status()}
        a = self.view.assignment
        if detail and a is not None:
            routes_of = self.owner.routes.shard_routes
            status["routes_per_shard"] = {
                str(shard): [len(routes), sum(len(f) + sum(len(n) for n in nodes) for f, nodes in routes)]
                for shard in a.primaries_of(self.me)
                if (routes := routes_of(shard))
            }
        self.send_client(session.rid, codec.encode(codec.STATUS_REPLY, {"id": frame.header["id"], "status": status}))

    def _on_leave(self, session: Session, frame: Frame) -> None:
        """Graceful leave: flag ourselves in etcd; the leader drains every shard away, then we exit."""
        if session.acl is not None and not session.acl.admin:
            self.access.refuse(session, "make the node leave (admin only)", frame.header["id"])
            return
        self.view.leaving = True
        self.effects.set_leaving()
        self.log.info("leaving", membership_epoch=self.view.membership_epoch)
        self.send_client(session.rid, codec.encode(codec.LEAVING, {"id": frame.header["id"]}))

    # ------------------------------------------------------------------ peer frames
    def on_peer_parts(self, parts: list[bytes]) -> None:
        self.metrics["frames_in.peer"] += 1
        sender, rest = parts[0].decode("utf-8", "replace"), parts[1:]
        try:
            frame = codec.decode(rest, max_payload=self.cfg.max_payload, allowed=codec.PEER_REQUESTS)
        except ProtocolError as exc:
            self.metrics[f"errors.{exc.code}"] += 1
            self.log.warning("peer_frame_rejected", peer=sender, code=exc.code, reason=exc.reason)
            if sender in self.view.members:  # a stranger gets no reply: we have no address for it, by design
                self.effects.send_peer(sender, codec.error_parts(exc.code, exc.reason, exc.ref))
            return
        if sender not in self.view.members:
            self.metrics["errors.not_member"] += 1
            self.log.warning("peer_not_member", peer=sender, type=frame.type.decode())
            return
        self._peer_handlers[frame.type](sender, frame)

    def refuse_peer(self, sender: str, frame: Frame, code: str, reason: str, **extra: Any) -> None:
        self.refuse_request(sender, frame.header.get("id"), code, reason, **extra)

    def refuse_request(self, sender: str, ref: int | None, code: str, reason: str, **extra: Any) -> None:
        """Refuse one request of a peer (a frame, or one item of a batch such as LOOKUPS) with an ERROR."""
        self.metrics[f"fencing.refused.{code}"] += 1
        ref = ref if type(ref) is int else None  # only an int names a request (FWDS carries no id: anything goes)
        self.effects.send_peer(sender, codec.error_parts(code, reason, ref, **extra))

    def _on_peer_error(self, sender: str, frame: Frame) -> None:
        """A peer refused one of our requests: fail what waits on it now rather than at its timeout."""
        h = frame.header
        self.metrics["errors.from_peer"] += 1
        self.log.warning("peer_error", peer=sender, code=h["code"], reason=h["reason"], ref=h.get("ref"))
        if "move_id" in h:  # a hand-off refused: move ids are the coordinator's, never confused with request ids
            if self.coordinator is not None:
                self.coordinator.on_refused(h["move_id"])
        elif type(h.get("ref")) is int:  # a list or object is no request id, nor even a key (found by fuzzing)
            self.requests.refused(h["ref"], sender, h["code"], h["reason"])

    def _on_handoff_ready(self, sender: str, frame: Frame) -> None:
        if self.coordinator is not None:
            # Only mark it: the next coordinator tick flips every ready move in one etcd commit.
            self.coordinator.on_ready(frame.header["id"], frame.header["node"])

    # ------------------------------------------------------------------ the outbox
    def flush(self) -> None:
        """Send what the last batch of events queued: one frame per destination and kind (see outbox.py), the
        lookups, one frame per owner, and the reports of failed QoS 0 publishes, one ERROR per client and code (see
        entry.py; after the forwards, those of frames zmq would not queue, then the PONGs held for them), and the
        batched record writes, one frame per shard (see retained.py)."""
        self.retained.send_batched()
        self.entry.send_lookups()
        self.entry.take_unexpired()
        if self.entry.failure_reports:
            self.entry.report_failures()
        durable = self.durable
        if durable.on and (durable.changes or durable.waiting or durable.in_flight):
            # What this batch changed is stored before anything that acknowledges it leaves (``durable``).
            durable.commit(self._send_outbox)
            return
        self._send_outbox()

    def _send_outbox(self) -> None:
        outbox = self.outbox
        if not outbox:
            return
        metrics = self.metrics
        entry = self.entry
        for dest, parts, forwards in outbox.peer_frames():
            sent = sum(f.count for f in forwards)
            if sent > 1:
                metrics["batches.fwds"] += 1
            metrics["forwards.out"] += sent
            if not self.effects.send_peer(dest, parts):
                entry.forwards_unsent(dest, forwards)
        if entry.failure_reports:  # QoS 0 publishes in frames zmq would not queue: reported now, before held PONGs
            entry.report_failures()
        if entry.pongs_held:
            entry.send_held_pongs()
        for rid, parts, deliveries in outbox.client_frames():  # PUBACKs first: they carry no deliveries
            if len(deliveries) > 1 or (deliveries and deliveries[0].sizes):
                metrics["batches.msgs"] += 1
            self.destination.delivered(rid, deliveries, self.send_client(rid, parts))

    # ------------------------------------------------------------------ the view from etcd
    def on_view(self, session_view: SessionView) -> None:
        """A new view from the etcd session: members, leader, our registration and the assignment document."""
        view = self.view
        members = session_view.members
        if self.me not in members and view.members.get(self.me) is not None:
            self.log.warning("removed_from_cluster", membership_epoch=view.membership_epoch)
            self.effects.stop()  # `shardmq cluster remove` deleted our key
            return
        view.leader = session_view.leader
        registration = session_view.registration
        if registration > view.registration_seen:
            if view.registration_seen:
                # We lost our lease and registered again: peers saw us gone and dropped our routes, so messages
                # for our clients were lost meanwhile. They are told (their sessions end) unless the fence check
                # already did; subscriptions made since are announced again once everyone has seen us back.
                if not self.sessions_ended_fenced:
                    self.destination.end_sessions(codec.E_FENCED, f"node {self.me} lost its etcd lease; "
                                                  "connect to another node")  # fmt: skip
                self.subscriptions.reannounce_later()
                # Owners that saw us gone forgot which of their answers we cache: ask them all again.
                self.entry.route_cache.clear()
            view.registration_seen = registration
        if members is not view.members and members != view.members:
            self._on_members(members, session_view.membership_epoch)
        self.access.set_principals(session_view.principals)
        me = members.get(self.me)
        view.member_revision = me.revision if me is not None else 0
        revision = session_view.assignment_revision
        if session_view.document and revision > view.assignment_revision:
            self.set_assignment(parse_assignment(session_view.document), revision)
        if self.owner.deferred_route_changes:
            self.owner.replay_route_changes()
        if self.durable.restoring:
            self.durable.announce_restored()
        if view.leader == self.me and self.coordinator is None:
            self.coordinator = Coordinator(
                int(view.settings["shard_count"]), int(view.settings["replication"]),
                handoff_timeout=self.cfg.handoff_timeout,
            )  # fmt: skip
            self.log.info("leader_elected", membership_epoch=view.membership_epoch)
        elif view.leader != self.me:
            self.coordinator = None
        self.lead()
        self.maybe_finish_leaving()

    def _on_members(self, members: Mapping[str, MemberInfo], membership_epoch: int) -> None:
        view = self.view
        old = view.members
        change = members_change(old, members)
        replaced = change.replaced - {self.me}
        joined = (change.joined - {self.me}) | replaced
        gone = change.gone | replaced
        same_socket = change.same_socket
        had_members = bool(old)
        view.members = members
        view.membership_epoch = membership_epoch
        if gone:
            # Cached answers may name a process that is gone: a restarted one under the same id would take (and
            # acknowledge) forwards for subscribers it never had. Ask the owners again, who drop its routes.
            self.entry.route_cache.clear()
        for node in gone:
            if node not in same_socket:
                self.effects.forget_peer(node)
            # A persistent session's routes go to the node that adopts it (its session shard's first live owner),
            # not away: a publish resolved before the adopter announces its own is not acknowledged unseen.
            moved = self.owner.routes.retarget_sessions(node, self.sessions.adopter_of)
            if moved:
                self.metrics["routes.sessions_retargeted"] += sum(moved.values())
                self.owner.invalidate_caches(moved)
            removed = self.owner.routes.remove_node(node)
            self.owner.refill_member_gone(node)
            self._peer_lost(node)
            self.log.warning("member_lost", peer=node, routes_removed=removed, membership_epoch=membership_epoch)
        if had_members and joined:
            self.subscriptions.announce_root_routes(joined)
        if gone:
            self.wills.scan_soon()  # the wills of sessions held by a node that left: their primary publishes them
            self.sessions.holders_lost({n: old[n].revision for n in gone if n in old})  # their sessions: to primaries
        self.log.info("membership", membership_epoch=membership_epoch, members=change.members,
                      joined=sorted(joined), gone=sorted(gone))  # fmt: skip

    def _peer_lost(self, node: str) -> None:
        """A gone peer will answer nothing: fail what waits on it now instead of at its timeout."""
        self.metrics["peers.lost"] += 1
        self.requests.peer_lost(node)
        self.owner.lookup_watchers.forget(node)

    def set_assignment(self, new: Assignment, revision: int) -> None:
        view = self.view
        if revision <= view.assignment_revision:
            return
        old = view.assignment
        old_members, view.assignment_members = view.assignment_members, view.members
        view.assignment, view.assignment_revision = new, revision
        changed = self.owner.on_assignment(old, new)
        if old is not None and changed:
            orphaned = filled_from_nobody(old, new, changed, old_members, view.members)
            # Our owner side starts waiting before our own routes reach it (at once, in reannounce_orphaned).
            self.owner.begin_refills(orphaned)
            if orphaned:
                self.subscriptions.reannounce_orphaned(orphaned)
        if changed:
            self.wills.scan_soon()  # a shard this node became primary of may hold wills of a gone holder
        if self.sessions.orphans_possible:
            self.sessions.adopt_orphans()
        self.log.info(
            "assignment", version=new.version, revision=revision, shards_held=len(new.shards_of(self.me)),
            primaries=len(new.primaries_of(self.me)), membership_epoch=view.membership_epoch,
        )  # fmt: skip

    def refresh_assignment(self, then: Callable[[bool], None], force: bool = False) -> None:
        """Read the assignment from etcd (a peer told us our view is old), at most every 100 ms unless
        ``force``; ``then(ok)`` once the answer is in (at once when rate-limited). Reads are coalesced: while
        one is on its way, a request waits for the next one (one more read, however many asked), so a burst
        of refusals costs etcd two reads, not hundreds."""
        if self._refresh_in_flight:
            self._refresh_next.append(then)
            return
        if self.now - self._last_refresh < REFRESH_MIN_INTERVAL and not force:
            then(True)
            return
        self._read_assignment([then])

    def _read_assignment(self, waiting: list[Callable[[bool], None]]) -> None:
        self._last_refresh = self.now
        self._refresh_in_flight = True

        def done(document: bytes | None, revision: int, ok: bool) -> None:
            self._refresh_in_flight = False
            if not ok:
                self.log.warning("etcd_read_failed", what="assignment")
            elif document:
                self.set_assignment(parse_assignment(document), revision)
            for then in waiting:
                then(ok)
            if self._refresh_next and not self._refresh_in_flight:
                following, self._refresh_next = self._refresh_next, []
                self._read_assignment(following)

        self.effects.read_assignment(done)

    def maybe_finish_leaving(self) -> None:
        a = self.view.assignment
        if not self.view.leaving or a is None or self.owner.source or self.owner.target:
            return
        if not a.shards_of(self.me):
            self.log.info("left_cluster", membership_epoch=self.view.membership_epoch)
            self.effects.stop()

    # ------------------------------------------------------------------ rebalance (leader only)
    def lead(self) -> None:
        """Run the coordinator: the leader turns its decisions into hand-offs and assignment commits."""
        c = self.coordinator
        view = self.view
        if c is None or view.leader != self.me or self.fenced() or self._commit_in_flight:
            return
        now = self.now
        c.observe(view.assignment, view.assignment_revision,
                  {n: Member(m.weight, m.leaving) for n, m in view.members.items()}, now)  # fmt: skip
        for action in c.step(now):
            if isinstance(action, StartHandoff):
                self._start_handoff(action)
            else:
                self._commit(c, action)
        for shard, why in c.abandoned:
            self.log.warning("move_abandoned", shard=shard, reason=why)
        c.abandoned.clear()
        busy = bool(c.in_flight or c.remaining or view.assignment is None)
        if busy and now - self._last_progress_log > 1.0:
            self._last_progress_log = now
            self.log.info("rebalance_progress", **c.progress(), membership_epoch=view.membership_epoch)
        if busy and not self._lead_scheduled:
            self._lead_scheduled = True
            self.effects.call_later(LEAD_TICK, self._lead_tick)

    def _lead_tick(self) -> None:
        self._lead_scheduled = False
        self.lead()

    def _start_handoff(self, action: StartHandoff) -> None:
        move = action.move
        header = {
            "id": action.move_id, "shard": move.shard, "shard_epoch": action.epoch,
            "targets": list(move.add), "coordinator": self.me,
        }  # fmt: skip
        self.log.info("handoff_start", shard=move.shard, shard_epoch=action.epoch, source=move.source,
                      targets=move.add)  # fmt: skip
        if move.source == self.me:
            self.owner.on_handoff(self.me, Frame(codec.HANDOFF, header))
        else:
            self.effects.send_peer(move.source, codec.encode(codec.HANDOFF, header))

    def _commit(self, c: Coordinator, commit: Commit) -> None:
        self._commit_in_flight = True

        def done(revision: int | None) -> None:
            self._commit_in_flight = False
            durations = c.on_commit(commit, revision, self.now)
            if revision is None:
                self.effects.poll_view()
            else:
                self.metrics[f"rebalance.commits.{commit.reason}"] += 1
                for shard, took in durations.items():  # every move, at debug level; the commit line sums them up
                    self.log.debug("move_done", shard=shard, shard_epoch=commit.assignment.epoch(shard),
                                   ms=round(took * 1000))  # fmt: skip
                self.log.info(
                    "assignment_committed", reason=commit.reason, shards=len(commit.flipped),
                    handoffs=len(durations), handoff_ms_max=round(1000 * max(durations.values(), default=0)),
                    version=commit.assignment.version, membership_epoch=self.view.membership_epoch,
                )  # fmt: skip
                self.set_assignment(commit.assignment, revision)
            if self.coordinator is c and not self._lead_scheduled:
                self._lead_scheduled = True
                self.effects.call_later(0.0, self._lead_tick)

        document = commit.assignment.to_json()
        remember_assignment(document, commit.assignment)
        self.effects.write_assignment(document, commit.expected_revision, done)

    def target_table(self) -> tuple[tuple[str, ...], ...] | None:
        """The balanced placement for the current live (non-leaving) members."""
        view = self.view
        members = {n: Member(m.weight, m.leaving) for n, m in view.members.items()}
        return target_table(members, int(view.settings["shard_count"]), int(view.settings["replication"]))

    # ------------------------------------------------------------------ stopping
    def shutdown(self) -> None:
        self.log.info("node_stopping", membership_epoch=self.view.membership_epoch)
        self.durable.stop()  # the sessions ending below stay stored: they come back with the node
        # Clients move to another node now instead of after their request timeout.
        self.destination.end_sessions(codec.E_SHUTDOWN, f"node {self.me} is stopping; connect to another node")

    # ------------------------------------------------------------------ status
    def _shard_view(self) -> dict[str, Any]:
        """This node's shards, primaries and shard epochs, computed once per assignment (status runs every
        second for the metrics endpoint, and a walk over every shard took 1.4 ms of the loop each time)."""
        a = self.view.assignment
        cached = self._shard_view_cache
        if cached is not None and cached[0] is a:
            return cached[1]
        shards = a.shards_of(self.me) if a else []
        epochs = {s: a.epoch(s) for s in shards} if a else {}
        shard_view = {
            "shards": len(shards),
            "primary_shards": len(a.primaries_of(self.me)) if a else 0,
            "max_shard_epoch": max(epochs.values(), default=0),
            "shard_epochs": {str(s): e for s, e in epochs.items()},
        }
        self._shard_view_cache = (a, shard_view)
        return shard_view

    def status(self) -> dict[str, Any]:
        view = self.view
        a = view.assignment
        table = self.target_table()
        entry, owner = self.entry, self.owner
        status: dict[str, Any] = {
            "node": self.me,
            "incarnation": self.incarnation,
            "alive": True,
            "membership_epoch": view.membership_epoch,
            "members": sorted(view.members),
            "leaving_members": sorted(n for n, m in view.members.items() if m.leaving),
            "leader": view.leader,
            "fenced": self.fenced(),
            "leaving": view.leaving,
            "shard_count": view.shard_count,
            "replication": a.replication if a else int(view.settings["replication"]),
            "assignment_version": a.version if a else 0,
            "settled": bool(a is not None and table is not None and a.table == table),
            **self._shard_view(),
            "handoffs_out": sorted(owner.source.streams),
            "handoffs_in": sorted(owner.target.incoming),
            "routes": owner.routes.route_count,
            "hops_per_publish": round(self.metrics["publishes.hops"] / max(1, self.metrics["publishes.routed"]), 3),
            "route_cache": {
                "entries": len(entry.route_cache),
                "hits": entry.route_cache.hits,
                "misses": entry.route_cache.misses,
                "watchers": len(owner.lookup_watchers),
            },
            "lookups_in_flight": self.requests.count(Lookup),
            "requests_pending": len(self.requests),
            "publishes_waiting": entry.queued_publishes,  # queued behind lookups at this entry node
            "root_set_size": owner.routes.root_size,
            "retained": len(owner.retained),
            "retained_bytes": owner.retained.bytes,
            "clients": len(self.destination.sessions),
            "sessions_persistent": sum(1 for s in self.destination.sessions.values() if s.persistent),
            "sessions_offline": len(self.destination.offline),
            **self.destination.flow_view(),
            "local_filters": len(self.subscriptions.local_q0) + len(self.subscriptions.local_q1),
            "shared_subscriptions": {share: len(m) for share, m in sorted(self.subscriptions.shared.items())[:10]},
            "shared_pending": sum(len(q) for q in self.destination.shared_pending.values()),
            "metrics": dict(self.metrics),
            "clients_dropped": self.destination.drops_view(),
            "store": {"durable": self.durable.on, "sessions_restoring": len(self.durable.restoring),
                      "batches": self.metrics["store.batches"], "changes": self.metrics["store.changes"]},
        }
        if self.coordinator is not None:
            status["rebalance"] = self.coordinator.progress()
        return status
