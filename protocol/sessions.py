"""Persistent sessions: HELLO's session rules, the session directory and the takeover of a session between nodes.

Rules of this file:
- The holder. The node a client is connected to holds its session (``destination``). A persistent session (HELLO
  ``clean: false`` with ``expiry`` seconds) stays after BYE or a lost connection, routes and all, offline, until
  its client says HELLO again on any node or it expires (``destination.go_offline``). A clean HELLO (the
  default) keeps today's behaviour and discards any persistent session of that client id, wherever it is held.
- The directory. Which node holds client C's persistent session is the record ``$session/C`` of the retained
  store (``retained``: one writer per shard, the primary, replicated before it answers, handed off with the
  shard), written by the holder through ``RetainedSide.write_record``: {"holder", "holder_rev" (the holder's
  member revision), "expiry"} as JSON; an empty payload deletes it (a clean connect, an expiry). Clients may not
  publish or subscribe under ``$session/`` (``not_authorized``), and wildcards never match ``$`` topics.
- Takeover. HELLO(C, clean false) on node B without a session of C: B reads ``$session/C`` (the exact fetch:
  the primary, then the other owners). No record, a holder that is B itself, a holder not in the view or
  registered again since (``holder_rev`` differs): the session is gone, B starts a fresh one (session_present
  false) and writes itself as holder. Else B sends SESSION_TAKE to the holder A. A ends C's connection there
  (SESSION_END ``taken_over``), stops delivering, keeps its routes and queues what still arrives, and answers
  SESSION_STATE chunks (filters; inflight messages in mid order with ``dup``, then the backlog; ``last`` on the
  final chunk). B subscribes the filters (ROUTE_ADD, confirmed), writes the record holder=B, sends SESSION_TAKEN
  and WELCOME (session_present true), and delivers A's messages. A answers SESSION_TAKEN with its tail (what
  queued since, more SESSION_STATE chunks) and drops the session (its routes by ROUTE_DEL reference counting).
  Live messages that reach B meanwhile wait behind the tail; one whose publish id (``pid``) A handed over is
  delivered once. A holder that does not answer within ``request_timeout`` of the HELLO, or leaves B's view
  first (B saw it alive: an early reconnect after it died), leaves the session to its shard's primary: B asks it
  to rebuild (below). A lookup that does not answer, a holder that refuses, a failed rebuild: B starts a fresh
  session (``sessions.takeover_failed``); over a record naming another holder it first has the primary purge
  the old replica (SESSION_TAKE ``purge``: a copy adopted there ends, the queue records go, before B's own
  writes reach it on the same connection), so none leak. The WELCOME goes within ``request_timeout`` of the
  HELLO (routes an owner is slow to confirm follow it), or, after a silent holder, within the primary's wait.
- Wills (``wills``): HELLO's will is kept in the record (key ``will``; a clean session with a will has a record
  too, ``persistent: false``); every record write here is conditional on the will the writer expects, and a
  pending will it displaces is published (a takeover). A HELLO with a will is welcomed once the record is written.
- Replication (item 2 of docs/DESIGN-SESSIONS.md). The record also holds the session's filters (written again
  before a SUBACK/UNSUBACK that changes them), and every QoS 1 message a persistent session takes is written as
  the queue record ``$sessionq/C/<publish id>`` (``records.queue_topic``; placed by the key ``$session/C``, so it
  lives, moves and is released with the directory record) before the forward that carried it is answered
  (``append``; FWD_ACK, or the PUBACK of a local delivery, waits; a failed write answers the forward with its
  ERROR). A DACK deletes the record lazily (``trim``: TRIM_BATCH at once or each ``redelivery_interval``). Both
  are batched (``retained.queue_write``): the records written and deleted in one batch of events go to each
  session shard's primary in one RETAINS, replicated as one frame per replica and answered by one RETAIN_ACK
  that answers every forward waiting on one of them.
- Holder lost. When members leave, each node adopts the sessions whose records it holds as their shard's primary
  and whose holder left (``adopt_orphans``: a record whose primary left too waits for the next assignment): it
  becomes the holder, rebuilt from the record and its queue records in the primary's write order, all ``dup``,
  offline; it names itself in the record only once its routes are confirmed. A HELLO on B that finds a record
  with a dead holder asks the shard's primary (SESSION_TAKE ``rebuild``; B rebuilds itself when it is that
  primary): the primary adopts it, once its own view agrees the holder is gone (it waits up to the lease TTL and
  ``REBUILD_MARGIN``), and hands it over as any holder. Only the primary rebuilds, so a session has one holder.
- Moved routes. A persistent session's plain filters also have session routes (``subscriptions``); route owners
  that see the holder leave move them to ``adopter_of`` (the session shard's first live owner), marked with the
  origin. A QoS 1 forward on such a route names [client id, origin] (FWD ``sessions``) and goes through
  ``claim``: held here, adopted on the spot (this node is the primary and sees the origin gone), or moved on
  (the record names another holder, or the primary holds no record): taken, and the moved routes removed;
  otherwise refused ``unavailable`` (the publisher retries), never acknowledged into a session nobody holds. We
  refuse rather than queue for a pending adoption: a lagging view cannot tell one from a session that moved on.
- Known limits: a holder that handed its state to a B that then died loses it; a silent but live holder keeps
  its copy while its client gets a fresh session (the replica is purged); a moved route of a session that ended
  stays at its owners until its node leaves (forwards on it are taken).
- Pure: no I/O, no clock (``core.now``); chunks are in a fixed order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.shared import is_shared, session_route
from shardmq.router.topics import TopicError, validate_topic_name

from .records import (
    SESSION_PREFIX,
    Pid,
    Queued,
    Session,
    Takeover,
    decode_queued,
    encode_queued,
    gate,
    queue_filter,
    queue_topic,
)
from .wills import CONFLICT, WillRefused, is_clean_record, pending_will, same_will

if TYPE_CHECKING:
    from .node import NodeCore

STATE_CHUNK = 1000  # messages per SESSION_STATE frame at most (and max_payload bytes)
TRIM_BATCH = 256  # acknowledged queue records deleted at once when this many wait (else at the trim tick)
REBUILD_WAIT = 0.1  # a rebuild asked for a holder our view still shows: look again this often ...
# ... for up to the lease TTL and this margin: a holder that died is out of every view once its lease expired (a
# client reconnects at once, through a node that still sees it).
REBUILD_MARGIN = 1.0


class SessionSide:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.takeovers: dict[bytes, int] = {}  # client rid -> id of its takeover in ``core.requests``
        self.trims: dict[str, list[Pid]] = {}  # client id -> publish ids acknowledged, their records not deleted yet
        self.trims_waiting = 0
        self.orphans_possible = False  # a member left: sessions it held may wait for their shard's primary
        # node -> the newest registration (member revision) we saw leave: a record naming it is a dead holder's
        self.gone_revisions: dict[str, int] = {}
        # Routes moved here from a dead holder (``claim``), per (client id, origin): those being checked at the
        # session's primary, those found stale (forwards on them are taken), those whose removal was sent.
        self.moved_checks: set[tuple[str, str]] = set()
        self.moved_on: set[tuple[str, str]] = set()
        self.moved_dropped: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ HELLO
    def on_hello(self, session: Session, frame: Frame) -> None:
        core = self.core
        h = frame.header
        ref = h.get("id")
        destination = core.destination
        try:
            will = core.wills.from_hello(session, h, frame.payload)
        except WillRefused as exc:
            core.reject_client(session.rid, exc.code, exc.reason, ref if type(ref) is int else None)
            return
        if h.get("clean") is not False:
            if session.persistent:  # a clean connect ends the persistent session held here
                destination.drop_session(session.rid, reason="clean_session")
                self.forget_queue(session)
                self.record_gone(session.rid)
                session = destination.attach(session.rid)
                session.will = will
                if will is not None:  # welcomed once the will is stored (see ``_will_stored``)
                    self._write_holder(session, on_result=self._will_stored(session, ref, False))
                    return
            elif not session.greeted:
                session.will = will
                self._discard_elsewhere(session.rid, ref)
                if will is not None:
                    return  # welcomed once the will is stored
            else:
                self._replace_will(session, will)
            destination.welcome(session, session.greeted, ref)
            return
        expiry = h.get("expiry")
        client_id = session.rid.decode("utf-8", "replace")
        try:
            if type(expiry) not in (int, float) or not expiry > 0:
                raise TopicError(codec.E_BAD_HEADER, f"a persistent session needs expiry > 0 seconds, got {expiry!r}")
            validate_topic_name(SESSION_PREFIX + client_id)
        except TopicError as exc:
            core.reject_client(session.rid, exc.code, f"HELLO: {exc.reason}", ref if type(ref) is int else None)
            return
        was_persistent, session.persistent, session.expiry = session.persistent, True, float(expiry)
        core.durable.session_saved(session)
        if session.greeted:  # the same node: resume (a clean session becomes persistent here)
            destination.welcome(session, True, ref)
            if not was_persistent:
                core.subscriptions.add_session_routes(session)
                old = session.will
                session.will = old if same_will(old, will) else will
                self._write_holder(session, prior=old, keep=old["id"] if old is not None else None)
            else:
                self._replace_will(session, will)
            return
        if session.rid in self.takeovers:
            return  # a HELLO again while the first one's takeover runs: its WELCOME answers both
        session.will = will
        takeover = Takeover(session, client_id, started=core.now, ref=ref)
        tid = self.takeovers[session.rid] = core.requests.open(takeover, self)
        core.effects.call_later(core.cfg.request_timeout, lambda: self._deadline(tid))

        def found(payload: bytes | None) -> None:
            if core.requests.get(tid) is takeover and takeover.phase == "lookup":
                self._found(tid, takeover, payload)

        core.retained.read_record(SESSION_PREFIX + client_id, found)

    def _found(self, tid: int, t: Takeover, payload: bytes | None) -> None:
        core = self.core
        t.prior_will = pending_will(payload)  # the old connection's will: the new holder's record displaces it
        holder = self._live_holder(payload) if not is_clean_record(payload) else None
        found = self._record(payload) if not is_clean_record(payload) else None
        t.replica = found is not None and found.get("holder") != core.me
        if holder is None and payload and not is_clean_record(payload) and self._record(payload) is not None:
            # The holder is gone but the session's state is replicated at its shard's owners: its primary rebuilds
            # it (and hands it over), so exactly one node ever rebuilds a session (see the rules).
            primary = self._primary_of(t.client_id)
            if primary == core.me:
                record = self._local_record(t.client_id)
                if record is not None and self._holder_state(record) == "dead":
                    self._rebuild_here(tid, t, record)
                    return
            elif primary is not None:
                self._take(tid, t, primary, rebuild=True)
                return
        if holder is None or holder == core.me:
            self._fresh(tid, t)
            return
        self._take(tid, t, holder)

    def rebuild_patience(self) -> float:
        """How long a session shard's primary waits for its view to show a holder gone before it rebuilds."""
        return self.core.cfg.lease_ttl + REBUILD_MARGIN

    def _take(self, tid: int, t: Takeover, holder: str, rebuild: bool = False) -> None:
        core = self.core
        t.phase, t.holder, t.rebuild = "state", holder, rebuild
        core.metrics["sessions.rebuilds_asked" if rebuild else "sessions.takeovers_started"] += 1
        header: dict[str, Any] = {"id": tid, "client_id": t.client_id}
        if rebuild:
            header["rebuild"] = True
            # The primary may wait out the holder's lease before it answers (``on_take``): so do we.
            t.deadline = core.now + self.rebuild_patience() + core.cfg.request_timeout
            core.effects.call_later(t.deadline - core.now, lambda: self._deadline(tid))
        if not core.effects.send_peer(holder, codec.encode(codec.SESSION_TAKE, header)):
            self._failed(tid, f"holder {holder} is unreachable", answered=False)

    def _rebuild_when_gone(self, tid: int, t: Takeover, tries: int = 0) -> None:
        """This node is the session shard's primary and the holder did not answer: rebuild here once our view shows
        the holder gone (for up to ``rebuild_patience``), as ``on_take`` does for another asker."""
        core = self.core
        if core.requests.get(tid) is not t:
            return
        t.phase, t.holder, t.rebuild = "state", core.me, True
        record = self._local_record(t.client_id)
        state = self._holder_state(record) if record is not None else "none"
        if state == "dead":
            self._rebuild_here(tid, t, record)  # type: ignore[arg-type]
        elif state in ("alive", "unseen") and tries * REBUILD_WAIT < self.rebuild_patience():
            core.effects.poll_view()
            core.effects.call_later(REBUILD_WAIT, lambda: self._rebuild_when_gone(tid, t, tries + 1))
        else:
            self._fresh(tid, t)

    def _rebuild_here(self, tid: int, t: Takeover, record: dict[str, Any]) -> None:
        """This node is the session shard's primary and the holder is gone: the session comes from the replica
        here, then as a takeover's state would (routes confirmed, directory written, WELCOME present)."""
        core = self.core
        core.metrics["sessions.rebuilt"] += 1
        t.phase, t.holder = "state", core.me
        t.filters = [list(fq) for fq in record.get("filters", [])]
        t.items = self._replica_items(t.client_id)
        core.log.info("session_rebuilt", client=t.client_id, filters=len(t.filters), queued=len(t.items),
                      dead_holder=record.get("holder"))  # fmt: skip
        self._subscribe(tid, t)

    # ------------------------------------------------------------------ the replica: records and queue
    @staticmethod
    def _record(payload: bytes | None) -> dict[str, Any] | None:
        if not payload:
            return None
        try:
            record = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("holder"), str) else None

    def _primary_of(self, client_id: str) -> str | None:
        a = self.core.view.assignment
        if a is None:
            return None
        owners = a.owners(shard_for_key(SESSION_PREFIX + client_id, a.shard_count))
        return owners[0] if owners and (owners[0] == self.core.me or owners[0] in self.core.view.members) else None

    def _local_record(self, client_id: str) -> dict[str, Any] | None:
        topic = SESSION_PREFIX + client_id
        a = self.core.view.assignment
        if a is None:
            return None
        held = self.core.owner.retained.get(shard_for_key(topic, a.shard_count), topic)
        return None if held is None else self._record(held.payload)

    def _holder_state(self, record: dict[str, Any]) -> str:
        """"alive" (the process that wrote the record is a member), "dead" (it is not: gone, or registered again
        since), or "unseen" (it registered after the newest registration our view knows: maybe alive)."""
        view = self.core.view
        holder, rev = record.get("holder"), record.get("holder_rev")
        if not isinstance(holder, str) or type(rev) is not int:
            return "dead"
        member = view.members.get(holder)
        if member is not None:
            return "alive" if member.revision == rev else ("unseen" if rev > member.revision else "dead")
        if holder == self.core.me:
            return "alive" if rev == view.member_revision else "dead"
        if self.gone_revisions.get(holder, -1) >= rev:
            return "dead"  # we saw it leave
        newest = max((m.revision for m in view.members.values()), default=0)
        return "unseen" if rev > newest else "dead"

    def _replica_items(self, client_id: str) -> list[tuple[list[Any], bytes]]:
        """The session's replicated queue held here, in the primary's write order (the stamps), as SESSION_STATE
        items, every one flagged ``dup`` (it may have reached the client before its holder died)."""
        core = self.core
        found = sorted(core.owner.retained.match(queue_filter(client_id)), key=lambda tm: tm[1].stamp)
        items: list[tuple[list[Any], bytes]] = []
        for _topic, message in found:
            decoded = decode_queued(message.payload)
            if decoded is None:
                core.metrics["sessions.bad_queue_records"] += 1
                continue
            topic, retain, pid, payload = decoded
            items.append(([topic, True, retain, list(pid)], payload))
        return items

    def adopt(self, client_id: str, record: dict[str, Any]) -> Session:
        """Become the holder of a session whose holder is gone (this node is its shard's primary): rebuilt from
        the replica, offline, routing and queueing here until its client comes back or it expires."""
        core = self.core
        rid = client_id.encode()
        destination = core.destination
        found = destination.sessions.get(rid)
        if found is not None and found.persistent:
            return found
        session = destination.attach(rid)
        expiry = record.get("expiry")
        session.persistent, session.greeted = True, True
        principal = record.get("principal")
        if isinstance(principal, str) and core.access.enabled:  # the client's principal finds its session here
            session.principal, session.acl = principal, core.access.acls.get(principal)
        session.expiry = float(expiry) if type(expiry) in (int, float) and expiry > 0 else 60.0
        for (topic, dup, retain, pid), payload in self._replica_items(client_id):
            session.backlog.append((topic, payload, retain, (pid[0], pid[1]), dup))
            session.held_bytes += len(payload)
        subs = core.subscriptions
        new = [r for f, q in sorted((f, q) for f, q in record.get("filters", []))
               if isinstance(f, str) and q in (0, 1) for r in subs._subscribe_local(session, f, q)]  # fmt: skip
        destination.go_offline(session)
        core.metrics["sessions.adopted"] += 1
        core.log.warning("session_adopted", client=client_id, dead_holder=record.get("holder"),
                         filters=len(session.filters), queued=len(session.backlog))  # fmt: skip

        def routed(failures: list[str]) -> None:
            # The record names this node only once its routes are confirmed: a node that finds a route moved to it
            # for this session takes a record naming another holder as that holder's routes being in place.
            if failures:
                core.metrics["sessions.adopt_route_failures"] += 1
                subs.announce_again(sorted(set(new) & subs.local_filters()))
            if destination.sessions.get(rid) is session and session.moving_to is None:  # (a handover writes its own)
                self._write_holder(session)

        subs.change_routes(codec.ROUTE_ADD, new, routed)
        return session

    # ------------------------------------------------------------------ routes moved from a dead holder
    def adopter_of(self, client_id: str) -> str | None:
        """Where route owners move a persistent session's routes when its holder leaves (``RouteTable.
        retarget_sessions``): the first owner of its session shard that is a member, in assignment order: its
        primary, or the replica that the next assignment promotes when the primary left too."""
        view = self.core.view
        a = view.assignment
        if a is None:
            return None
        for owner in a.owners(shard_for_key(SESSION_PREFIX + client_id, a.shard_count)):
            if owner in view.members:
                return owner
        return None

    def claim(self, moved: list[list[str]]) -> str | None:
        """A QoS 1 message reached this node for persistent sessions through routes the owners moved here from
        their dead holder (``moved``: [client id, origin] pairs). None: take it, every session being held here
        (adopted now if this node is its primary and sees the holder gone) or known to have moved on to a holder
        whose own routes are in place. Else why it is refused ``unavailable`` (the publish fails and is sent again
        by its publisher): acknowledged, it would reach nobody."""
        core = self.core
        refused: str | None = None
        for client_id, origin in moved:
            session = core.destination.sessions.get(client_id.encode())
            if session is not None and session.persistent:
                self._drop_moved(client_id, origin, list(session.filters))  # held here: the moved route is extra
                continue
            why = self._unheld(client_id, origin)
            if why is not None and refused is None:
                refused = why
        if refused is not None:
            core.metrics["sessions.moved_refused"] += 1
        return refused

    def _unheld(self, client_id: str, origin: str) -> str | None:
        """``claim`` for one session not held here: None (adopted now, or moved on) or why to refuse."""
        core = self.core
        record = self._local_record(client_id)
        if record is None:
            if (client_id, origin) in self.moved_on:
                return None
            if self._primary_of(client_id) == core.me:
                return None  # its primary holds no record: the session ended (a clean connect, its expiry)
            self._check_moved(client_id, origin)  # not an owner of its shard: ask its primary
            return f"persistent session {client_id!r} is moving to its new holder; retry"
        if record.get("holder") != origin:
            # Moved on: a holder writes the record only once its own routes are confirmed (takeover, ``adopt``).
            self._drop_moved(client_id, origin, [f for f, _ in record.get("filters", []) if isinstance(f, str)])
            return None
        if self._holder_state(record) == "dead":
            if self._primary_of(client_id) == core.me:
                core.metrics["sessions.adopted_on_forward"] += 1
                self.adopt(client_id, record)
                return None
            core.effects.poll_view()  # the primary left too: the next assignment promotes the adopter
            return f"the holder of persistent session {client_id!r} left and its adopter is not settled yet; retry"
        core.effects.poll_view()  # the route owners saw the holder leave before we did
        return f"{core.me} has not seen the holder of persistent session {client_id!r} leave yet; retry"

    def _check_moved(self, client_id: str, origin: str) -> None:
        """Read the session's record from its shard (this node holds none): a record naming another holder, or
        none, means the moved route here is stale (forwards on it are taken, and it is removed)."""
        key = (client_id, origin)
        if key in self.moved_checks:
            return
        self.moved_checks.add(key)
        core = self.core

        def found(payload: bytes | None) -> None:
            self.moved_checks.discard(key)
            record = self._record(payload) if not is_clean_record(payload) else None
            if record is not None and record.get("holder") == origin:
                return  # its primary adopts it: refused until then
            self.moved_on.add(key)
            core.effects.call_later(core.cfg.request_timeout, lambda: self.moved_on.discard(key))
            if record is not None:
                self._drop_moved(client_id, origin, [f for f, _ in record.get("filters", []) if isinstance(f, str)])

        core.retained.read_record(SESSION_PREFIX + client_id, found)

    def _drop_moved(self, client_id: str, origin: str, filters: list[str]) -> None:
        """Remove this node's moved routes of a session (``filter NUL NUL client NUL origin``): held here now, or
        moved on. Once per ``request_timeout`` per session and origin (forwards on it may still be on their way)."""
        key = (client_id, origin)
        core = self.core
        if key in self.moved_dropped:
            return
        self.moved_dropped.add(key)
        core.effects.call_later(core.cfg.request_timeout, lambda: self.moved_dropped.discard(key))
        routes = [session_route(f, client_id, origin) for f in sorted(filters) if not is_shared(f)]
        core.metrics["sessions.moved_routes_dropped"] += len(routes)
        core.subscriptions.change_routes(codec.ROUTE_DEL, routes, lambda _failures: None)

    def holders_lost(self, gone: dict[str, int]) -> None:
        """Members left (node -> its registration's revision): the sessions they held wait for their shard's
        primary (``adopt_orphans``)."""
        for node, rev in gone.items():
            self.gone_revisions[node] = max(rev, self.gone_revisions.get(node, -1))
        self.orphans_possible = True
        self.adopt_orphans()

    def adopt_orphans(self) -> None:
        """Adopt every session whose directory record, held here as its shard's primary, names a dead holder.
        Runs when members leave and at each assignment while some orphan's primary is not settled (a dead
        primary's shard is promoted by the next assignment)."""
        core = self.core
        a = core.view.assignment
        if not self.orphans_possible or a is None or core.fenced():
            return
        waiting = False
        members = core.view.members
        for topic, message in core.owner.retained.match(SESSION_PREFIX + "#"):
            record = self._record(message.payload)
            if record is None or self._holder_state(record) != "dead":
                continue
            owners = a.owners(shard_for_key(topic, a.shard_count))
            if not owners or (owners[0] != core.me and owners[0] not in members):
                waiting = True  # its primary is gone too: the next assignment names another
            elif owners[0] == core.me:
                self.adopt(topic[len(SESSION_PREFIX):], record)
        self.orphans_possible = waiting

    def append(self, sessions: list[Session], topic: str, payload: bytes, pid: Pid,
               then: Callable[[str | None, str], None]) -> None:  # fmt: skip
        """A QoS 1 message queued for persistent ``sessions`` here: written to each one's replicated queue (its
        shard's primary, replicated before it answers); ``then(code, reason)`` once all are (code None) or one
        failed. The forward that carried it is answered only then (see the rules). The writes of one batch of
        events go together, one RETAINS per session shard (``retained.queue_write``)."""
        core = self.core
        failed: list[tuple[str, str]] = []

        def done(_: list[str]) -> None:
            if failed:
                core.metrics["sessions.queue_write_failed"] += 1
                then(*failed[0])
            else:
                core.metrics["sessions.queue_written"] += len(sessions)
                then(None, "")

        each = gate(len(sessions), done)

        def one(code: str | None, reason: str) -> None:
            if code is not None:
                failed.append((code, f"the replicated session queue refused it: {reason}"))
            each([])

        value = encode_queued(topic, False, pid, payload)
        for session in sessions:  # batched: one RETAINS per shard at the flush (``retained.send_batched``)
            core.retained.queue_write(queue_topic(session.rid.decode("utf-8", "replace"), pid), value, one)

    def trim(self, session: Session, pid: Pid) -> None:
        """The client acknowledged ``pid``: its queue record goes, lazily (a batch at TRIM_BATCH or the tick; a
        holder lost before then leaves it to be sent again, with ``dup``: at least once)."""
        self.trims.setdefault(session.rid.decode("utf-8", "replace"), []).append(pid)
        self.trims_waiting += 1
        if self.trims_waiting >= TRIM_BATCH:
            self.flush_trims()

    def flush_trims(self) -> None:
        trims, self.trims, self.trims_waiting = self.trims, {}, 0
        for client_id, pids in trims.items():
            self._delete_queue(client_id, pids)

    def trim_tick(self) -> None:
        self.flush_trims()
        self.core.effects.call_later(self.core.cfg.redelivery_interval, self.trim_tick)

    def _delete_queue(self, client_id: str, pids: list[Pid]) -> None:
        core = self.core

        def done(code: str | None, reason: str) -> None:
            if code is not None:
                core.metrics["sessions.trim_failed"] += 1  # harmless: sent again (dup) if the holder dies
            else:
                core.metrics["sessions.trimmed"] += 1

        for pid in pids:  # batched with the appends: one RETAINS per shard at the flush
            core.retained.queue_write(queue_topic(client_id, pid), b"", done)

    def forget_queue(self, session: Session) -> None:
        """The session ends for good (clean connect, expiry): its replicated queue goes with its record."""
        client_id = session.rid.decode("utf-8", "replace")
        pids = {q[3] for q in session.backlog if q[3] is not None} | set(session.pids.values())
        pids |= {q[3] for q in session.live if q[3] is not None}
        pids |= set(self.trims.pop(client_id, []))
        self._delete_queue(client_id, sorted(pids))

    def _purge_replica(self, client_id: str) -> None:
        """A fresh session replaces one whose replica is still stored (its holder and primary did not hand it
        over): the primary drops the old queue records (and a copy it adopted meanwhile) before our record and
        our own queue records reach it (one connection, in order), so none leak and none of ours go."""
        core = self.core
        primary = self._primary_of(client_id)
        core.metrics["sessions.replica_purged"] += 1
        if primary == core.me:
            self._purge_here(client_id)
        elif primary is not None:
            core.effects.send_peer(primary, codec.encode(codec.SESSION_TAKE,
                                                         {"id": 0, "client_id": client_id, "purge": True}))

    def _purge_here(self, client_id: str) -> None:
        """SESSION_TAKE ``purge``: the client was given a fresh session elsewhere. A copy held here (adopted) ends;
        every queue record of the session stored here goes (deleted through the primary, this node)."""
        core = self.core
        rid = client_id.encode()
        session = core.destination.sessions.get(rid)
        if session is not None and session.persistent and session.moving_to is None:
            core.destination.drop_session(rid, reason="replaced_by_fresh")
            self.forget_queue(session)
        found = [topic for topic, _ in core.owner.retained.match(queue_filter(client_id))]
        core.metrics["sessions.queue_purged"] += len(found)
        core.log.info("session_replica_purged", client=client_id, queued=len(found))

        def done(code: str | None, reason: str) -> None:
            if code is not None:
                core.metrics["sessions.purge_failed"] += 1

        for topic in found:
            core.retained.write_record(topic, b"", done)

    def _live_holder(self, payload: bytes | None) -> str | None:
        """The node a directory record names, if it is still the process that wrote it."""
        if not payload:
            return None
        try:
            record = orjson.loads(payload)
            holder, rev = record["holder"], record["holder_rev"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.core.metrics["sessions.bad_records"] += 1
            return None
        member = self.core.view.members.get(holder) if isinstance(holder, str) else None
        if member is None or member.revision != rev:
            self.core.metrics["sessions.holder_gone"] += 1
            return None
        return holder

    def _fresh(self, tid: int, t: Takeover) -> None:
        """No session to take over: a fresh one, with this node as its holder."""
        core = self.core
        core.requests.close(tid)
        if self.takeovers.get(t.session.rid) == tid:
            del self.takeovers[t.session.rid]
        session = t.session
        if core.destination.sessions.get(session.rid) is not session:
            return
        core.metrics["sessions.fresh"] += 1
        if t.replica:
            self._purge_replica(t.client_id)
        if session.will is not None:  # welcomed once the will is stored
            t.welcomed = True
            self._write_holder(session, prior=t.prior_will, on_result=self._will_stored(session, t.ref, False))
            return
        self._welcome(t, False)
        self._write_holder(session, prior=t.prior_will)

    def _deadline(self, tid: int) -> None:
        """The WELCOME is due ``request_timeout`` after the HELLO (the SDK waits that long and a margin)."""
        t = self.core.requests.get(tid)
        if not isinstance(t, Takeover):
            return
        if t.phase == "state" and t.rebuild and self.core.now < t.deadline:
            return  # a rebuild's answer is due later (``_take``)
        if t.phase in ("lookup", "state"):
            self._failed(tid, f"no answer within {self.core.cfg.request_timeout}s ({t.phase})", answered=False)
        elif t.phase == "subscribe" and not t.welcomed:
            # The session is here (A handed it over) but an owner has not confirmed its routes yet: welcome the
            # client with what it has; the routes, the directory and the tail follow.
            self.core.metrics["sessions.welcomed_before_routes"] += 1
            self.core.log.warning("session_routes_slow", client=t.client_id, holder=t.holder)
            self._welcome(t, True)

    def _failed(self, tid: int, reason: str, answered: bool = True) -> None:
        """The takeover cannot go on. A holder that did not answer (dead, with our view still showing it) leaves
        the session to its shard's primary: ask it to rebuild from the replica (it waits until it sees the holder
        gone). A refusal, a failed rebuild, or no replica at all: a fresh session."""
        core = self.core
        t = core.requests.get(tid)
        if not isinstance(t, Takeover):
            return
        core.metrics["sessions.takeover_failed"] += 1
        core.log.warning("session_takeover_failed", client=t.client_id, holder=t.holder, phase=t.phase, reason=reason)
        if not answered and t.phase == "state" and not t.rebuild and t.replica:
            primary = self._primary_of(t.client_id)
            if primary is not None and primary != t.holder:
                core.metrics["sessions.takeover_fell_back"] += 1
                if primary == core.me:
                    self._rebuild_when_gone(tid, t)
                else:
                    self._take(tid, t, primary, rebuild=True)
                return
        self._fresh(tid, t)

    # ------------------------------------------------------------------ the new holder: state, routes, tail
    def on_state(self, sender: str, frame: Frame) -> None:
        core = self.core
        h = frame.header
        tid = h["id"]
        t = core.requests.get(tid)
        if not isinstance(t, Takeover) or t.holder != sender or t.client_id != h["client_id"]:
            return  # late (the takeover failed meanwhile), or not for us
        if t.phase not in ("state", "tail"):
            return
        try:
            pairs = codec.split_batch(frame)
        except ProtocolError as exc:
            core.refuse_peer(sender, frame, exc.code, exc.reason)
            if t.phase == "state":
                self._failed(tid, f"malformed SESSION_STATE: {exc.reason}")
            else:
                self._tail_done(tid)
            return
        t.filters.extend(h["filters"])
        t.items.extend(pairs)
        if not h["last"]:
            return
        if t.phase == "state":
            self._subscribe(tid, t)
        else:
            self._tail_done(tid)

    def _subscribe(self, tid: int, t: Takeover) -> None:
        """The state is in: subscribe its filters here (confirmed), then write the directory and say TAKEN."""
        core = self.core
        session = t.session
        if core.destination.sessions.get(session.rid) is not session:
            self._abandon(tid, t)
            return
        t.phase = "subscribe"
        session.waiting_tail = True  # from now live messages may arrive: they wait behind the tail
        self._queue(session, t.items)
        t.items = []
        subs = core.subscriptions
        new: list[str] = []
        installing: set[int] = set()
        for filt, qos in sorted((f, q) for f, q in t.filters):
            routes = subs._subscribe_local(session, filt, qos)
            new.extend(routes)
            if filt not in routes:
                installing |= subs.installing(filt)

        def routed(failures: list[str]) -> None:
            if failures:
                core.metrics["sessions.takeover_route_failures"] += 1
                core.log.warning("session_routes_unconfirmed", client=t.client_id, failures=sorted(set(failures)))
                subs.announce_again(sorted(set(new) & subs.local_filters()))
            self._write_holder(session, lambda: self._taken(tid, t), prior=t.prior_will)

        on_done = gate(len(installing) + 1, routed)
        for wid in installing:
            core.requests.get(wid).callbacks.append(on_done)
        subs.change_routes(codec.ROUTE_ADD, new, on_done)

    def _taken(self, tid: int, t: Takeover) -> None:
        core = self.core
        if core.requests.get(tid) is not t:
            return
        session = t.session
        if self.takeovers.get(session.rid) == tid:
            del self.takeovers[session.rid]
        t.phase = "tail"
        rebuilt = t.holder == core.me  # from the replica here (``_rebuild_here``): no old holder, no tail
        if not rebuilt:
            core.effects.send_peer(t.holder, codec.encode(codec.SESSION_TAKEN, {"id": tid, "client_id": t.client_id}))
            core.effects.call_later(core.cfg.request_timeout, lambda: self._tail_expired(tid))
        core.metrics["sessions.taken_over"] += 1
        core.log.info("session_taken_over", client=t.client_id, holder=t.holder, filters=len(session.filters),
                      queued=len(session.backlog), ms=round(1000 * (core.now - t.started)))  # fmt: skip
        self._welcome(t, True)
        if rebuilt:
            self._tail_done(tid)

    def _welcome(self, t: Takeover, present: bool) -> None:
        if t.welcomed:
            return
        t.welcomed = True
        if self.core.destination.sessions.get(t.session.rid) is t.session:
            self.core.destination.welcome(t.session, present, t.ref)

    def _queue(self, session: Session, items: list[tuple[list[Any], bytes]]) -> None:
        for (topic, dup, retain, pid), payload in items:
            p = (pid[0], pid[1]) if pid is not None else None
            session.backlog.append((topic, payload, retain, p, dup))
            self.core.durable.appended(session)
            session.held_bytes += len(payload)
            if p is not None:
                session.moved_pids.add(p)

    def _tail_expired(self, tid: int) -> None:
        t = self.core.requests.get(tid)
        if isinstance(t, Takeover):
            self.core.metrics["sessions.tail_timeouts"] += 1
            self.core.log.warning("session_tail_timeout", client=t.client_id, holder=t.holder)
            self._tail_done(tid)

    def _tail_done(self, tid: int) -> None:
        """The old holder's tail is in (or will not come): then the live messages that waited, each once."""
        core = self.core
        t = core.requests.close(tid)
        if not isinstance(t, Takeover):
            return
        session = t.session
        self._queue(session, t.items)
        session.waiting_tail = False
        live, session.live = session.live, []
        for topic, payload, retain, pid, dup in live:
            if pid is not None and pid in session.moved_pids:
                session.held_bytes -= len(payload)
                core.metrics["sessions.duplicates_dropped"] += 1
            else:
                session.backlog.append((topic, payload, retain, pid, dup))
                core.durable.appended(session)
        if core.destination.sessions.get(session.rid) is session:
            core.destination.fill(session)

        def forget() -> None:  # a forward older than this has timed out at its entry node
            session.moved_pids.clear()

        core.effects.call_later(core.cfg.request_timeout, forget)

    def _abandon(self, tid: int, t: Takeover) -> None:
        self.core.requests.close(tid)
        if self.takeovers.get(t.session.rid) == tid:
            del self.takeovers[t.session.rid]

    # ------------------------------------------------------------------ the old holder
    def on_take(self, sender: str, frame: Frame, tries: int = 0) -> None:
        core = self.core
        h = frame.header
        rid = h["client_id"].encode()
        session = core.destination.sessions.get(rid)
        if h.get("purge") is True:
            self._purge_here(h["client_id"])
            return
        if (session is None or not session.persistent) and h.get("rebuild") is True:
            # The asker found the holder gone, or it did not answer: as the session shard's primary we rebuild it
            # from the replica once our view agrees (it may lag the asker's until the holder's lease expired).
            record = self._local_record(h["client_id"])
            state = self._holder_state(record) if record is not None else "none"
            waited = tries * REBUILD_WAIT < self.rebuild_patience()
            if state in ("alive", "unseen") and waited and sender in core.view.members:
                core.effects.poll_view()
                core.effects.call_later(REBUILD_WAIT, lambda: self.on_take(sender, frame, tries + 1))
                return
            if state == "dead" and self._primary_of(h["client_id"]) == core.me:
                session = self.adopt(h["client_id"], record)  # type: ignore[arg-type]
        if session is None or not session.persistent or session.moving_to is not None:
            reason = f"{core.me} holds no persistent session of client {h['client_id']!r}"
            core.refuse_peer(sender, frame, codec.E_UNAVAILABLE, reason)
            return
        destination = core.destination
        if rid not in destination.offline:
            reason = f"another connection with client id {h['client_id']!r} took this session over (on {sender})"
            core.send_client(rid, codec.encode(codec.SESSION_END, {"code": codec.E_TAKEN_OVER, "reason": reason}))
        session.moving_to = sender
        session.detached_at = core.now
        destination.offline.add(rid)
        if h.get("discard") is True:  # a clean connect elsewhere: the session ends here
            destination.drop_session(rid, reason="clean_session")
            self.forget_queue(session)
            self.record_gone(rid)
            return
        filters = [[f, q] for f, q in sorted(session.filters.items())]
        self._send_state(sender, h["id"], h["client_id"], filters, destination.take_queue(session))

        def abandoned() -> None:  # the new holder never said TAKEN: what queued since has nowhere to go
            if destination.sessions.get(rid) is session and session.moving_to == sender:
                core.metrics["sessions.handover_abandoned"] += 1
                destination.drop_session(rid, reason="takeover_abandoned")

        core.effects.call_later(2 * core.cfg.request_timeout, abandoned)

    def on_taken(self, sender: str, frame: Frame) -> None:
        core = self.core
        h = frame.header
        rid = h["client_id"].encode()
        session = core.destination.sessions.get(rid)
        if session is None or session.moving_to != sender:
            core.refuse_peer(sender, frame, codec.E_UNAVAILABLE, f"{core.me} is not handing this session to {sender}")
            return
        tail = core.destination.take_queue(session)
        self._send_state(sender, h["id"], h["client_id"], [], tail)
        core.metrics["sessions.handed_over"] += 1
        core.destination.drop_session(rid, reason="taken_over")

    def _send_state(self, node: str, tid: int, client_id: str, filters: list[list[Any]], items: list[Queued]) -> None:
        limit = self.core.cfg.max_payload
        chunk: list[Queued] = []
        size = 0
        frames: list[list[bytes]] = []

        def cut(last: bool) -> None:
            header = {
                "id": tid, "client_id": client_id, "filters": filters if not frames else [],
                "items": [[t, dup, retain, list(pid) if pid else None] for t, _, retain, pid, dup in chunk],
                "sizes": [len(q[1]) for q in chunk], "last": last,
            }  # fmt: skip
            frames.append(codec.encode(codec.SESSION_STATE, header, b"".join(q[1] for q in chunk)))

        for item in items:
            if chunk and (len(chunk) >= STATE_CHUNK or size + len(item[1]) > limit):
                cut(False)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item[1])
        cut(True)
        for parts in frames:
            self.core.effects.send_peer(node, parts)

    # ------------------------------------------------------------------ the directory
    def _write_holder(
        self, session: Session, then: Any = None, prior: dict[str, Any] | None = None, keep: str | None = None,
        on_result: Callable[[str | None, str], None] | None = None,
    ) -> None:
        """Write the record naming this node as the holder, with the session's will (``write_holder``): ``then()``
        once answered; ``on_result(code, reason)`` instead, to act on a failure."""
        def answered(code: str | None, reason: str) -> None:
            if on_result is not None:
                on_result(code, reason)
            elif then is not None:
                then()

        self.write_holder(session, answered, prior, keep)

    def write_holder(
        self, session: Session, then: Callable[[str | None, str], None], prior: dict[str, Any] | None = None,
        keep: str | None = None,
    ) -> None:
        """Write the record naming this node as the holder, with the session's will; ``then(code, reason)`` (code
        None: written). ``prior``: the pending will the stored record is known to hold (a displaced one is published
        unless it is ``keep``, see ``wills``)."""
        core = self.core
        record: dict[str, Any] = {"holder": core.me, "holder_rev": core.view.member_revision, "expiry": session.expiry}
        if session.will is not None:
            record["will"] = session.will
        if not session.persistent:
            record["persistent"] = False  # only there for the will: nothing to take over
        else:  # the primary rebuilds the session from them if this holder dies
            record["filters"] = [[f, q] for f, q in sorted(session.filters.items())]
            record["principal"] = session.principal  # the adopter's session belongs to it (access control)
        client_id = session.rid.decode("utf-8", "replace")

        def done(code: str | None, reason: str) -> None:
            if code is not None:
                core.metrics["sessions.record_write_failed"] += 1
                core.log.warning("session_record_failed", client=client_id, code=code, reason=reason)
            then(code, reason)

        core.wills.write(client_id, record, prior, keep, then=done)

    def _will_stored(self, session: Session, ref: Any, present: bool) -> Callable[[str | None, str], None]:
        """A HELLO with a will is welcomed only once the will is in the directory record (replicated): a client
        killed right after its WELCOME still has its will published. Not stored: the HELLO is refused
        ``unavailable`` (the SDK connects again, to the next node) and the session goes."""
        core = self.core

        def result(code: str | None, reason: str) -> None:
            destination = core.destination
            if destination.sessions.get(session.rid) is not session:
                return
            if code is None:
                destination.welcome(session, present, ref)
                return
            core.metrics["wills.not_stored"] += 1
            session.will = None
            core.reject_client(session.rid, codec.E_UNAVAILABLE, f"the will could not be stored ({code}: {reason}); "
                               "connect again", ref if type(ref) is int else None)  # fmt: skip
            destination.drop_session(session.rid, reason="will_not_stored")

        return result

    def _replace_will(self, session: Session, will: dict[str, Any] | None) -> None:
        """HELLO again on the same connection's session: a changed will replaces the old one (not published)."""
        old = session.will
        if same_will(old, will):
            return
        session.will = will
        if will is None:
            assert old is not None
            self.core.wills.clear(session.rid.decode("utf-8", "replace"), old)
        else:
            self._write_holder(session, prior=old, keep=old["id"] if old is not None else None)

    def write_filters(self, session: Session, then: Callable[[], None]) -> None:
        """A persistent session's filters changed (SUB, UNSUB): its replicated record holds them before the client
        is answered, so the session shard's primary can rebuild them if this holder dies. The stored record holds
        this connection's own will (if any): expected, and kept."""
        will = session.will
        self._write_holder(session, then, prior=will, keep=will["id"] if will is not None else None)

    def record_gone(self, rid: bytes, prior: dict[str, Any] | None = None) -> None:
        """The session ended here for good (a clean connect, its expiry): delete its directory record, unless it
        holds a pending will other than ``prior`` (another connection's: its own to publish). A ``prior`` will
        deleted with the record is published."""
        core = self.core
        client_id = rid.decode("utf-8", "replace")

        def done(code: str | None, reason: str) -> None:
            if code is not None and code != CONFLICT:
                core.metrics["sessions.record_write_failed"] += 1
                core.log.warning("session_record_failed", client=client_id, code=code, reason=reason)

        core.wills.write(client_id, None, prior, attempts=1, then=done)

    def _discard_elsewhere(self, rid: bytes, ref: Any = None) -> None:
        """A clean connect on a new connection: end a persistent session of this client id held anywhere (in the
        background: a clean connect's WELCOME does not wait, as before persistent sessions existed), and write the
        record of its will (then the WELCOME goes, ``ref`` its HELLO's id)."""
        core = self.core
        client_id = rid.decode("utf-8", "replace")
        try:
            validate_topic_name(SESSION_PREFIX + client_id)
        except TopicError:
            return  # no persistent session can have this id

        def found(payload: bytes | None) -> None:
            session = core.destination.sessions.get(rid)
            prior = pending_will(payload)
            if session is not None and session.will is not None and not session.persistent:
                # our will's record (displacing a stale one publishes it); the WELCOME waits for it
                self._write_holder(session, prior=prior, on_result=self._will_stored(session, ref, False))
            if not payload:
                return
            holder = self._live_holder(payload)
            if holder is None or (holder == core.me and (session is None or not session.persistent)):
                if session is None or session.will is None:  # else our record replaced it
                    core.metrics["sessions.records_cleared"] += 1
                    self.record_gone(rid, prior)  # a stale record: its holder is gone
            elif holder != core.me and not is_clean_record(payload):
                core.metrics["sessions.discarded_remote"] += 1
                header = {"id": 0, "client_id": client_id, "discard": True}
                core.effects.send_peer(holder, codec.encode(codec.SESSION_TAKE, header))

        core.retained.read_record(SESSION_PREFIX + client_id, found)

    # ------------------------------------------------------------------ requests failing
    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None:
        if isinstance(request, Takeover):
            if request.phase == "state":
                self._failed(rid, f"holder {sender} refused: {code}: {reason}", answered=code != "peer_lost")
            elif request.phase == "tail":
                self._tail_done(rid)

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None:
        self.request_refused(rid, request, node, "peer_lost", f"{node} left the cluster")
