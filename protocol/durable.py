"""Durability: what of a node's state must survive a restart, handed to the shell's store, and the acks it gates.

Rules of this file:
- What is stored: every record of the retained store this node holds (``owner.retained``, a ``RetainedTable``:
  retained messages and the ``$session/`` directory records, by shard), and the persistent sessions this node
  holds (``destination``): their filters with granted QoS, their expiry, and their QoS 1 queue (the inflight
  messages by message id, the backlog by position). Routes are soft state (announced again), never stored.
- How: the core journals each change as it makes it (``Change``, plain tuples; the table journals its own writes
  through ``RetainedTable.journal``). At the end of every batch of events (``NodeCore.flush``) the changes of
  that batch go to the shell in one ``Effects.persist`` call, whose completion (``then``) is the event that
  releases what waited: the frames of that batch (PUBACK, FWD_ACK, MSG: the outbox) and the replies registered
  with ``after`` (RETAIN_ACK, which is sent directly). The shell commits the batch as one transaction (one
  fsync with ``--fsync batch``): an acknowledgement never leaves before the change it confirms is stored. While
  a batch is being stored nothing of the outbox leaves; later batches wait behind it.
- Off (no data directory: ``ProtocolConfig.durable`` False) nothing is journaled and ``after`` runs at once.
- Restart: the shell loads the store before the node registers and hands it to ``restore``. Retained records go
  back into the table as they were (their shards are served once the assignment names this node again, or
  merged by stamp into a hand-off that brings the shard back: ``RetainedTable.set`` keeps the newer copy). The
  primary's write sequence continues after the highest stored one, so a stamp is never reused. Sessions come
  back offline, with their filters subscribed locally and every stored message in the backlog (the inflight
  ones first, flagged ``dup``), their expiry counted again from the restart; once this node is a member with an
  assignment, their routes are announced again and their directory records rewritten with the new registration
  (``holder_rev``), retried every ``request_timeout`` until written (``restoring`` counts those left).
- Known limit: messages that reach a session being taken over wait in ``Session.live`` until the old holder's
  tail arrives; they are stored when they join the backlog, so a crash of the new holder in that window loses
  them (the old holder answered the forwards).
- Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from shardmq.router.retained_table import RetainedMessage

from .records import SESSION_PREFIX, Queued, Session

if TYPE_CHECKING:
    from .node import NodeCore

# A change, as a tuple whose first item names it (the shell's store applies them in order):
#   ("retained", shard, topic, qos, epoch, seq, payload)   store (or replace) a retained record
#   ("retained_del", shard, topic)                         forget one
#   ("retained_drop", shard)                               forget every record of a shard (released)
#   ("session", client_id, expiry, {filter: qos}, principal)   a persistent session's settings (upsert)
#   ("session_del", client_id)                             the session and its messages are gone
#   ("message", client_id, kind, n, topic, payload, retain, pid, dup)   one queued message (upsert);
#                                                          kind INFLIGHT (n = message id) or BACKLOG (n = position)
#   ("message_del", client_id, kind, n)
#   ("messages_del", client_id)                            every message of the session
Change = tuple[Any, ...]
INFLIGHT, BACKLOG = 0, 1
RESTORE_CHECK = 0.5  # seconds between checks whether restored sessions can be announced (see ``_announce_tick``)


@dataclass(slots=True)
class StoredSession:
    """One persistent session as the store gives it back: messages in order, inflight ones first."""

    client_id: str
    expiry: float
    filters: dict[str, int]
    messages: list[Queued] = field(default_factory=list)
    principal: str | None = None  # who opened it (access control): only that principal may resume it


class Durability:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.on = core.cfg.durable
        self.changes: list[Change] = []  # this batch's, in order
        self.waiting: list[Callable[[], None]] = []  # replies that wait for this batch to be stored
        self.in_flight = False  # a batch is being stored: the outbox waits
        self.restoring: set[bytes] = set()  # restored sessions whose routes and directory record are not redone
        self._announce_started = False
        if self.on:
            core.owner.retained.journal = self.changes

    # ------------------------------------------------------------------ gating
    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a reply that confirms a stored change) once this batch's changes are stored."""
        if not self.on or (not self.changes and not self.in_flight and not self.waiting):
            fn()
        else:
            self.waiting.append(fn)

    def pending(self) -> bool:
        return self.on and bool(self.changes or self.waiting or self.in_flight)

    def commit(self, then: Callable[[], None]) -> None:
        """Hand this batch to the shell; once stored, release what waited and ``then`` (the outbox)."""
        if self.in_flight:
            return  # the batch being stored ends with ``then`` itself
        batch = list(self.changes)
        self.changes.clear()  # cleared in place: the retained table journals into this very list
        waiting, self.waiting = self.waiting, []
        core = self.core

        def stored() -> None:
            self.in_flight = False
            core.metrics["store.batches"] += 1
            core.metrics["store.changes"] += len(batch)
            for fn in waiting:
                fn()
            if self.changes or self.waiting:  # what the released replies changed: stored before anything leaves
                self.commit(then)
            else:
                then()

        if not batch:
            stored()
            return
        self.in_flight = True
        core.effects.persist(batch, stored)

    # ------------------------------------------------------------------ sessions (called by destination/sessions)
    def session_saved(self, s: Session) -> None:
        """A persistent session's settings and its whole queue, written afresh (it became persistent here, was
        taken over or restored): the backlog's stored positions start again at 0."""
        if not self.on or not s.persistent:
            return
        cid = s.rid.decode("utf-8", "replace")
        add = self.changes.append
        add(("session", cid, s.expiry, dict(s.filters), s.principal))
        add(("messages_del", cid))
        for mid, (topic, payload, _) in s.inflight.items():
            add(("message", cid, INFLIGHT, mid, topic, payload, mid in s.retained_mids, s.pids.get(mid), True))
        s.backlog_base = 0
        for n, (topic, payload, retain, pid, dup) in enumerate(s.backlog):
            add(("message", cid, BACKLOG, n, topic, payload, retain, pid, dup))

    def filters_changed(self, s: Session) -> None:
        if self.on and s.persistent:
            self.changes.append(("session", s.rid.decode("utf-8", "replace"), s.expiry, dict(s.filters), s.principal))

    def session_gone(self, s: Session) -> None:
        if self.on and s.persistent:
            self.changes.append(("session_del", s.rid.decode("utf-8", "replace")))

    def appended(self, s: Session) -> None:
        """The backlog's last entry is new."""
        if self.on and s.persistent:
            topic, payload, retain, pid, dup = s.backlog[-1]
            n = s.backlog_base + len(s.backlog) - 1
            self.changes.append(("message", s.rid.decode("utf-8", "replace"), BACKLOG, n, topic, payload, retain,
                                 pid, dup))  # fmt: skip

    def popped(self, s: Session) -> None:
        """The backlog's first entry left it (to the window)."""
        if self.on and s.persistent:
            self.changes.append(("message_del", s.rid.decode("utf-8", "replace"), BACKLOG, s.backlog_base))
            s.backlog_base += 1

    def written(self, s: Session, mid: int, topic: str, payload: bytes, retain: bool, dup: bool) -> None:
        """A message entered the window as ``mid``."""
        if self.on and s.persistent:
            self.changes.append(("message", s.rid.decode("utf-8", "replace"), INFLIGHT, mid, topic, payload, retain,
                                 s.pids.get(mid), dup))  # fmt: skip

    def acked(self, s: Session, mid: int) -> None:
        if self.on and s.persistent:
            self.changes.append(("message_del", s.rid.decode("utf-8", "replace"), INFLIGHT, mid))

    def queue_taken(self, s: Session) -> None:
        """Everything the session held was handed over (a takeover)."""
        if self.on and s.persistent:
            self.changes.append(("messages_del", s.rid.decode("utf-8", "replace")))
            s.backlog_base = 0

    # ------------------------------------------------------------------ restart
    def restore(self, retained: Iterable[tuple[int, str, int, int, int, bytes]],
                sessions: Iterable[StoredSession]) -> None:  # fmt: skip
        """Take back what the store held (the shell calls this before the node registers; see the rules)."""
        core = self.core
        table = core.owner.retained
        table.journal = None  # already stored
        count = top = 0
        for shard, topic, qos, epoch, seq, payload in retained:
            table.set(shard, topic, RetainedMessage(payload, qos, (epoch, seq)))
            count += 1
            top = max(top, seq)
        core.retained.seq = max(core.retained.seq, top)
        table.journal = self.changes if self.on else None
        destination, subs = core.destination, core.subscriptions
        restored = queued = 0
        for stored in sessions:
            rid = stored.client_id.encode()
            s = Session(rid, core.now, persistent=True, expiry=stored.expiry, greeted=True, restored=True,
                        principal=stored.principal)  # its ACL comes with the views (``_check_access``)
            s.backlog = deque(stored.messages)
            s.held_bytes = sum(len(m[1]) for m in stored.messages)
            destination.sessions[rid] = s
            for filt, qos in sorted(stored.filters.items()):
                subs._subscribe_local(s, filt, qos)
            destination.go_offline(s)
            self.session_saved(s)  # the stored positions of its backlog start again at 0
            self.restoring.add(rid)
            restored += 1
            queued += len(s.backlog)
        if self.restoring:
            core.effects.call_later(RESTORE_CHECK, self._announce_tick)
        core.metrics["store.retained_loaded"] += count
        core.metrics["store.sessions_loaded"] += restored
        core.log.info("store_loaded", retained=count, sessions=restored, queued=queued, retained_seq=top,
                      membership_epoch=core.view.membership_epoch)  # fmt: skip

    def announce_restored(self) -> None:
        """Once a member with an assignment: the restored sessions' routes, and their directory records."""
        core = self.core
        view = core.view
        if not self.restoring or self._announce_started:
            return
        if view.assignment is None or core.me not in view.members or not view.registration_seen or core.fenced():
            return
        if core.access.enabled and not core.access.acls:
            return  # the principals have not come with a view yet: none could be judged
        self._announce_started = True
        self._check_access()
        subs = core.subscriptions
        filters = sorted({r for rid in self.restoring if (s := core.destination.sessions.get(rid))
                          for f in s.filters for r in (f, *subs.session_routes(s, [f]))})  # fmt: skip
        core.log.info("sessions_restored_announce", sessions=len(self.restoring), filters=len(filters),
                      membership_epoch=view.membership_epoch)  # fmt: skip
        core.subscriptions.announce_again(filters)
        for rid in sorted(self.restoring):
            self._rewrite_record(rid)

    def _check_access(self) -> None:
        """A restored session whose principal lost the right to one of its filters (or was removed) while this
        node was down ends here, as a live one would have when the ACL changed (``access``)."""
        core = self.core
        if not core.access.enabled:
            return
        for rid in sorted(self.restoring):
            s = core.destination.sessions.get(rid)
            if s is None:
                continue
            acl = core.access.acls.get(s.principal) if s.principal is not None else None
            if acl is None or acl.refused_filters(s.filters):
                core.metrics["sessions.restored_not_authorized"] += 1
                core.log.warning("restored_session_not_authorized", client=rid.decode(errors="replace"),
                                 principal=s.principal)  # fmt: skip
                core.destination.drop_session(rid, reason="not_authorized")
                self.restoring.discard(rid)
            else:
                s.acl = acl

    def _announce_tick(self) -> None:
        """Views come when etcd changes; this checks again for a node that was fenced when its view came."""
        self.announce_restored()
        if self.restoring and not self._announce_started:
            self.core.effects.call_later(RESTORE_CHECK, self._announce_tick)

    def _rewrite_record(self, rid: bytes) -> None:
        """Read the session's directory record: if it names another holder the session moved on while this node
        was down (its client connected elsewhere) and the copy here goes; else this node writes itself as holder
        (no record: the shard's copy may not be back yet, and a newer write replaces an older copy there)."""
        core = self.core
        s = core.destination.sessions.get(rid)
        if s is None or not s.persistent or s.moving_to is not None or not s.restored:
            self._restored(rid)
            return
        client_id = rid.decode("utf-8", "replace")

        def written(code: str | None, reason: str) -> None:
            if code is None or core.destination.sessions.get(rid) is not s:
                self._restored(rid)
            else:
                core.effects.call_later(core.cfg.request_timeout, lambda: self._rewrite_record(rid))

        def found(payload: bytes | None) -> None:
            if core.destination.sessions.get(rid) is not s:
                self._restored(rid)
                return
            holder = holder_of(payload)
            if holder is not None and holder != core.me:
                core.metrics["sessions.restored_moved"] += 1
                core.log.info("restored_session_moved", client=client_id, holder=holder)
                core.destination.drop_session(rid, reason="moved_while_down")
                self._restored(rid)
                return
            core.sessions.write_holder(s, written)

        core.retained.read_record(SESSION_PREFIX + client_id, found)

    def _restored(self, rid: bytes) -> None:
        if rid in self.restoring:
            self.restoring.discard(rid)
            s = self.core.destination.sessions.get(rid)
            if s is not None:
                s.restored = False
            if not self.restoring:
                self.core.log.info("sessions_restored", membership_epoch=self.core.view.membership_epoch)

    def stop(self) -> None:
        """The node stops: what its shutdown changes (its sessions end here) is not stored, so they come back."""
        self.on = False
        self.core.owner.retained.journal = None
        self.changes.clear()


def holder_of(payload: bytes | None) -> str | None:
    """The holder a directory record names (None: no record, or not one we can read)."""
    if not payload:
        return None
    try:
        holder = orjson.loads(payload).get("holder")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return holder if isinstance(holder, str) else None
