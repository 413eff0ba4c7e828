"""The destination side: this node's client sessions and the delivery of messages to them.

Rules of this file:
- A forwarded message (FWD, FWDS) is matched once against this node's local subscriptions, so a client gets
  exactly one copy per publish, whichever filters of its matched.
- QoS 1: messages go with a message id and stay ``inflight`` until the client DACKs them or the session ends.
  A message zmq could not queue (the client's send queue is full) is retried every ``redelivery_interval``;
  when a client says HELLO again on the same session (it reconnected, and its old pipe may have lost messages)
  everything unacknowledged is resent with ``dup``. A message written to a live connection is not resent on a
  timer: that would only duplicate it for a client that is slow to read.
- QoS 1 flow control: a session has at most ``max_inflight`` messages written and unacknowledged; further ones
  wait, accepted, in its backlog and are written as acknowledgements make room. A message that would take a
  backlog past ``max_queued`` messages or the session past ``max_session_bytes`` is refused for every local
  recipient (``deliver`` returns False before giving it to anyone): the forward is answered ``overloaded``
  instead of FWD_ACK, the publish fails instead of being acknowledged, and the SDK retries it until its
  timeout, so a publisher slows to its slowest subscriber. Nothing acknowledged is dropped while the session
  lives; a session that ends (its client was told with SESSION_END, or is gone) counts what it held.
- Sessions end with SESSION_END when the node can no longer vouch for its routes (fenced) or stops: the client
  fails over, subscribes again and reports the gap. WELCOME says whether the node still had the session
  (``session_present``).
- A session whose connection is gone (a send found the client unreachable) is detached, not dropped, for
  ``client_idle_check`` seconds: a client whose connection zmq re-makes says HELLO again within that time and
  finds its session. Any frame from the client attaches it again.
- Retained messages for a new subscription (``deliver_retained``) go to that one client only, with ``retain``, through
  the same QoS 1 window and backlog; one that finds no room is refused (the caller reports it to the client).
- QoS 0 messages zmq would not queue for a client are dropped, counted per message (``drops.client_hwm``) and
  per session, and the client is told: a DROPPED frame goes with its next successful send, or from the drops
  tick for a client nothing else is sent to.
- A persistent session (``sessions``) is not dropped by BYE or a lost connection: it goes offline (``offline``),
  keeps its routes, queues its QoS 1 messages in its backlog (bounded as above: at the bound the forward is
  refused ``overloaded``) and drops QoS 0 ones, counted (``drops.session_offline``, as mosquitto does by default),
  until its client says HELLO again (everything unacknowledged again with ``dup``, then the backlog) or it
  expires ``expiry`` seconds after it went offline (``deliveries.session_expired``). A QoS 1 message a persistent
  session takes (connected or not) is acknowledged to its sender only once the session's replicated queue holds
  it (``sessions.append``); the client's DACK trims it there (``sessions.trim``).
- Shared subscriptions (SHARED_FWD, ``deliver_shared``): a message for a share goes to ONE local member: among the
  connected members (not detached, offline or moving) with room in their QoS 1 window, the one with the fewest
  unacknowledged, ties in round robin; with none that has room it waits in the share's queue here
  (``shared_pending``, bounded by ``max_queued``: past it the forward is refused ``overloaded``) and goes to the
  first member whose window opens. No connected member at all, or no member left here (a route the entry node
  read before it went): it goes back through the cluster to another node of the group (``Entry.redispatch_shared``),
  and if none has members it waits here for a member that returns (counted and logged as lost when there is none).
  A SHARED_FWD that arrives to no connected member is answered FWD_ACK only once the next node holds it, members
  here may return, or no node has any (acknowledged like a publish with no subscriber); any other failure is
  answered with its ERROR (``send_on_new``): the publisher is told instead of losing it after its PUBACK.
  A member's acknowledgement runs the message's ``done`` (SHARED_DONE to the entry node that keeps its copy). A
  member that unsubscribes, ends, goes offline, vanishes or is taken over gives its unacknowledged shared messages
  to another member the same way (``dup``), instead of holding them: MQTT 5 4.8.2 (mosquitto loses them).
- Wills (``wills``): BYE clears the client's will before anything else; a session that ends here otherwise
  (``drop_session``: unreachable after the grace, taken over, ended by this node) has its will claimed and
  published, and a persistent session's connection found gone has it published ``client_idle_check`` later unless
  the client came back.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError

from .outbox import Delivery
from .records import NO_MEMBER, SHARED_OK, Pid, Queued, Session, SharedMessage

if TYPE_CHECKING:
    from .node import NodeCore

DROPS_SHOWN = 10  # clients listed in status under ``clients_dropped`` (those with the most QoS 0 drops)
CLIENTS_SHOWN = 10  # clients listed by name in status (the ones with the most QoS 1 messages kept for them)


class Destination:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.sessions: dict[bytes, Session] = {}
        self.drop_reports: dict[bytes, Session] = {}  # sessions owed a DROPPED frame
        self.offline: set[bytes] = set()  # persistent sessions with no connection (or being taken over)
        self.shared_pending: dict[str, deque[SharedMessage]] = {}  # share -> messages waiting for a member's window
        self.shared_turns: dict[str, int] = {}  # share -> its round robin among local members
        self.shared_done_out: dict[str, list[int]] = {}  # entry node -> SHARED_FWD ids a member acknowledged
        self.copies_released: dict[str, list[int]] = {}  # backup node -> our SHARED_COPY ids it may drop

    # ------------------------------------------------------------------ sessions
    def attach(self, rid: bytes) -> Session:
        """The session of the client that sent a frame, made if new; any frame attaches it again."""
        core = self.core
        session = self.sessions.get(rid)
        if session is None:
            session = self.sessions[rid] = Session(rid, core.now)
            core.metrics["clients.connected"] += 1
        session.last_seen = core.now
        if session.moving_to is None:  # a session being handed over stays offline here
            session.detached_at = None
            if self.offline:
                self.offline.discard(rid)
        return session

    def on_hello(self, session: Session, frame: Frame) -> None:
        self.core.sessions.on_hello(session, frame)

    def welcome(self, session: Session, present: bool, ref: Any) -> None:
        """WELCOME, then (a session present) everything unacknowledged again with ``dup``, then the backlog."""
        core = self.core
        session.greeted = True
        header = {
            "id": ref, "node": core.me, "max_payload": core.cfg.max_payload,
            "membership_epoch": core.view.membership_epoch, "session_present": present, "fenced": core.fenced(),
        }  # fmt: skip
        core.send_client(session.rid, codec.encode(codec.WELCOME, header))
        if present:
            self._redeliver(session, everything=True)  # a reconnect: its old pipe may have lost what was in it
        self.fill(session)

    def on_bye(self, session: Session, frame: Frame) -> None:
        if session.will is not None:  # a clean close: the will is cleared first, never published (``wills``)
            will, session.will = session.will, None
            self.core.wills.clear(session.rid.decode("utf-8", "replace"), will)
        if session.persistent:
            self.go_offline(session)  # MQTT: a DISCONNECT keeps a persistent session
            return
        self.drop_session(session.rid, reason="bye")

    def go_offline(self, session: Session) -> None:
        """A persistent session's client left: keep it, queue for it, end it ``expiry`` seconds from now."""
        core = self.core
        if session.rid in self.offline:
            return
        since = session.detached_at = core.now
        self.offline.add(session.rid)
        core.metrics["sessions.offline"] += 1
        self.release_shared(session)

        def expire() -> None:
            found = self.sessions.get(session.rid)
            if found is session and found.detached_at == since and found.moving_to is None:
                self.drop_session(session.rid, reason="expired", counted="deliveries.session_expired")
                core.sessions.forget_queue(session)
                core.sessions.record_gone(session.rid)

        core.effects.call_later(session.expiry, expire)

    def drop_session(self, rid: bytes, reason: str, counted: str = "deliveries.session_ended") -> None:
        core = self.core
        session = self.sessions.pop(rid, None)
        if session is None:
            return
        self.offline.discard(rid)
        if session.will is not None:
            core.wills.session_dropped(session, reason)
        routes_dropped = core.subscriptions.forget(session)
        unsent = len(session.backlog) + len(session.live)
        core.metrics["clients.disconnected"] += 1
        core.metrics[counted] += unsent + len(session.inflight)
        core.log.info("client_gone", client=rid.decode(errors="replace"), reason=reason, routes_dropped=routes_dropped,
                      unacknowledged=len(session.inflight), backlog=unsent)  # fmt: skip
        core.durable.session_gone(session)

    def detach(self, rid: bytes) -> None:
        """The client's connection is gone: keep its session ``client_idle_check`` seconds for it to come back."""
        core = self.core
        session = self.sessions.get(rid)
        if session is None or session.detached_at is not None:
            return
        if session.persistent:
            self.go_offline(session)
            core.wills.vanished(session)
            return
        since = session.detached_at = core.now
        core.metrics["clients.vanished"] += 1
        self.release_shared(session)

        def expire() -> None:
            found = self.sessions.get(rid)
            if found is not None and found.detached_at == since:
                self.drop_session(rid, reason="unreachable")

        core.effects.call_later(core.cfg.client_idle_check, expire)

    def end_sessions(self, code: str, reason: str) -> None:
        """Tell every client its session here is over (it fails over and subscribes again), then forget them."""
        for rid in list(self.sessions):
            self.end_session(rid, code, reason)
        self.core.metrics[f"sessions.ended.{code}"] += 1

    def end_session(self, rid: bytes, code: str, reason: str) -> None:
        """Tell one client its session here is over, then forget it."""
        self.core.send_client(rid, codec.encode(codec.SESSION_END, {"code": code, "reason": reason}))
        self.drop_session(rid, reason=code)

    def idle_tick(self) -> None:
        """Probe idle clients: a send to a vanished one finds it unreachable and detaches its session."""
        core = self.core
        cutoff = core.now - core.cfg.client_idle_check
        for session in list(self.sessions.values()):
            if session.last_seen < cutoff and session.rid not in self.offline:
                core.send_client(session.rid, codec.encode(codec.PING, {}))
        core.effects.call_later(core.cfg.client_idle_check, self.idle_tick)

    # ------------------------------------------------------------------ forwarded messages
    def on_fwd(self, sender: str, frame: Frame) -> None:
        h = frame.header
        self.core.metrics["forwards.in"] += 1
        if not h["qos"]:
            self.deliver(h["topic"], 0, frame.payload)
            return
        pid = h.get("pid")
        self._take_qos1(sender, h["id"], h["topic"], frame.payload, None, (sender, pid) if pid else None,
                        h.get("sessions"))  # fmt: skip

    def _take_qos1(
        self, sender: str, fid: int, topic: str, payload: bytes, found: tuple[set[bytes], set[bytes]] | None,
        pid: Pid | None = None, moved: list[list[str]] | None = None,
    ) -> None:
        """A forwarded QoS 1 message: FWD_ACK once every local recipient took it, or ``overloaded``. ``moved``: the
        persistent sessions it came for through routes moved here from a node that left (``sessions.claim``: a
        session not held here is adopted now, or the forward is refused ``unavailable``)."""
        core = self.core
        if moved:
            adopted = len(self.sessions)
            refused = core.sessions.claim(moved)
            if refused is not None:
                core.effects.send_peer(sender, codec.error_parts(codec.E_UNAVAILABLE, refused, fid))
                return
            if len(self.sessions) != adopted:
                found = None  # a session adopted just now: its subscriptions are new
        persisted: list[Session] = []
        if not self.deliver(topic, 1, payload, found, pid, persisted):
            reason = f"a subscriber of {topic!r} on {core.me} has a full backlog of unacknowledged messages"
            core.effects.send_peer(sender, codec.error_parts(codec.E_OVERLOADED, reason, fid))
        elif not persisted or pid is None:
            core.outbox.ack(sender, fid)
        else:  # acknowledged once the persistent sessions' replicated queues hold it (``sessions.append``)

            def written(code: str | None, reason: str) -> None:
                if code is None:
                    core.outbox.ack(sender, fid)
                else:
                    core.effects.send_peer(sender, codec.error_parts(code, reason, fid))

            core.sessions.append(persisted, topic, payload, pid, written)

    def on_fwds(self, sender: str, frame: Frame) -> None:
        """A batch of forwards: the same as that many FWD frames, in order. A QoS 0 run goes to each recipient as
        one item (codec.Run)."""
        core = self.core
        try:
            runs = codec.split_runs(frame)
        except ProtocolError as exc:
            core.refuse_peer(sender, frame, exc.code, exc.reason)
            return
        # Subscriptions cannot change while one frame is handled: find each topic's recipients once.
        local_recipients = core.subscriptions.local_recipients
        outbox = core.outbox
        recipients: dict[tuple[str, int], tuple[set[bytes], set[bytes]]] = {}
        queues: dict[str, list[list[Delivery]]] = {}  # QoS 0: the outbox lists of a topic's clients
        queued = received = 0
        offline = self.offline
        for (fid, topic, qos, *rest), sizes, payload in runs:
            if qos:  # never a run (codec.split_runs)
                item_pid = (sender, rest[0]) if rest and rest[0] else None
                if len(rest) > 1:  # sessions reached through moved routes: one may be adopted (recipients change)
                    self._take_qos1(sender, fid, topic, payload, None, item_pid, rest[1])
                    recipients.clear()
                    received += 1
                    continue
                found = recipients.get((topic, qos))
                if found is None:
                    found = recipients[(topic, qos)] = local_recipients(topic, qos)
                self._take_qos1(sender, fid, topic, payload, found, item_pid)
                received += 1
                continue
            lists = queues.get(topic)
            if lists is None:  # the fast path of ``deliver`` for QoS 0, list by list
                rids = local_recipients(topic, 0)[0]
                if offline and not offline.isdisjoint(rids):
                    core.metrics["drops.session_offline"] += len(rids & offline) * (1 if sizes is None else len(sizes))
                    rids = rids - offline
                lists = queues[topic] = [outbox.delivery_queue(r) for r in rids]
            item = Delivery(topic, 0, None, False, payload, sizes)
            for queue in lists:
                queue.append(item)
            received += item.count
            queued += len(lists) * item.count
        core.metrics["forwards.in"] += received
        outbox.queued += queued

    # ------------------------------------------------------------------ delivery
    def deliver(
        self, topic: str, qos: int, payload: bytes, recipients: tuple[set[bytes], set[bytes]] | None = None,
        pid: Pid | None = None, persisted: list[Session] | None = None,
    ) -> bool:
        """Queue a message for this node's matching clients; ``recipients`` when already known for the topic;
        ``pid``: a QoS 1 message's publish id (a session taken over gets a message both nodes had once);
        ``persisted``: gets the persistent sessions that took it (their replicated queues must hold it before
        the forward is acknowledged: ``sessions.append``).

        False when a QoS 1 recipient has no room left (see the rules above): then nobody here got it."""
        core = self.core
        q0, q1 = recipients or core.subscriptions.local_recipients(topic, qos)
        outbox = core.outbox
        offline = self.offline
        for rid in q0:  # queued, and sent by the flush at the end of this batch of frames (one frame per client)
            if offline and rid in offline:
                core.metrics["drops.session_offline"] += 1
                continue
            outbox.deliver(rid, Delivery(topic, 0, None, False, payload))
        if not q1:
            return True
        cfg = core.cfg
        sessions = [s for rid in q1 if (s := self.sessions.get(rid)) is not None]
        size = len(payload)
        for s in sessions:
            if s.held_bytes + size > cfg.max_session_bytes or len(s.backlog) + len(s.live) >= cfg.max_queued:
                core.metrics["qos1.refused_overloaded"] += 1
                return False
        for s in sessions:
            if s.moved_pids and pid in s.moved_pids:  # the old holder handed it over already
                core.metrics["sessions.duplicates_dropped"] += 1
                continue
            s.held_bytes += size
            if s.persistent and persisted is not None:
                persisted.append(s)
            if s.waiting_tail:  # a takeover: after what the old holder still sends
                s.live.append((topic, payload, False, pid, False))
            # Behind a backlog even with room in the window: a newer message must not overtake older ones.
            elif s.backlog or len(s.inflight) >= cfg.max_inflight or (offline and s.rid in offline):
                s.backlog.append((topic, payload, False, pid, False))
                core.durable.appended(s)
                core.metrics["qos1.backlogged"] += 1
            else:
                self._write_qos1(s, topic, payload, False, pid)
        return True

    def deliver_retained(self, session: Session, topic: str, qos: int, payload: bytes) -> bool:
        """A retained message for one client's new subscription; False when its QoS 1 backlog has no room."""
        core = self.core
        if not qos:
            core.outbox.deliver(session.rid, Delivery(topic, 0, None, False, payload, retain=True))
            return True
        cfg = core.cfg
        if session.held_bytes + len(payload) > cfg.max_session_bytes or len(session.backlog) >= cfg.max_queued:
            return False
        session.held_bytes += len(payload)
        if session.backlog or len(session.inflight) >= cfg.max_inflight:
            session.backlog.append((topic, payload, True, None, False))
            core.durable.appended(session)
            core.metrics["qos1.backlogged"] += 1
        else:
            self._write_qos1(session, topic, payload, True)
        return True

    def _write_qos1(
        self, session: Session, topic: str, payload: bytes, retain: bool = False, pid: Pid | None = None,
        dup: bool = False,
    ) -> None:
        mid = session.next_mid
        session.next_mid += 1
        session.inflight[mid] = (topic, payload, False)  # written once the flush got it into zmq
        if retain:
            session.retained_mids.add(mid)
        if session.persistent:
            if pid is not None:
                session.pids[mid] = pid
            self.core.durable.written(session, mid, topic, payload, retain, dup)
        self.core.outbox.deliver(session.rid, Delivery(topic, 1, mid, dup, payload, retain=retain))

    def fill(self, session: Session) -> None:
        """Write backlogged messages while the window has room (a connected session only)."""
        if session.rid in self.offline:
            return
        limit = self.core.cfg.max_inflight
        backlog, inflight = session.backlog, session.inflight
        durable = self.core.durable
        while backlog and len(inflight) < limit:
            item = backlog.popleft()
            durable.popped(session)
            self._write_qos1(session, *item)
        if self.shared_pending and not backlog and session.moving_to is None and session.detached_at is None:
            for share in [f for f in session.filters if f in self.shared_pending]:
                pending = self.shared_pending[share]
                while pending and len(inflight) < limit:
                    message = pending.popleft()
                    self._write_shared(session, message, message.dup)
                if not pending:
                    del self.shared_pending[share]

    def take_queue(self, session: Session) -> list[Queued]:
        """Everything a session holds, to hand over (a takeover): unacknowledged messages first, by message id,
        flagged ``dup``, then the backlog in order. The session holds nothing afterwards. Its shared messages go to
        another member instead (``release_shared``): the copy they are owed to is tracked here."""
        self.release_shared(session)
        out: list[Queued] = [
            (topic, payload, mid in session.retained_mids, session.pids.get(mid), True)
            for mid, (topic, payload, _) in sorted(session.inflight.items())
        ]
        out.extend(session.backlog)
        session.inflight.clear()
        session.backlog.clear()
        session.pids.clear()
        session.retained_mids.clear()
        session.held_bytes = 0
        self.core.durable.queue_taken(session)
        return out

    def on_dack(self, session: Session, frame: Frame) -> None:
        inflight = session.inflight
        for mid in frame.header["mids"]:
            found = inflight.pop(mid, None)
            if found is not None:
                session.held_bytes -= len(found[1])
                if session.retained_mids:
                    session.retained_mids.discard(mid)
                if session.pids:
                    pid = session.pids.pop(mid, None)
                    if pid is not None:
                        self.core.sessions.trim(session, pid)  # its replicated queue record goes (lazily)
                if session.shared_mids:
                    shared = session.shared_mids.pop(mid, None)
                    if shared is not None and shared.done is not None:
                        shared.done()
                if session.persistent:
                    self.core.durable.acked(session, mid)
                self.core.metrics["deliveries.acked"] += 1
        if session.backlog or self.shared_pending:
            self.fill(session)  # acknowledgements made room: fill the window
        self.send_shared_done()

    def redeliver_tick(self) -> None:
        for session in list(self.sessions.values()):
            if session.rid not in self.offline:
                self._redeliver(session, everything=False)
        self.core.effects.call_later(self.core.cfg.redelivery_interval, self.redeliver_tick)

    def _redeliver(self, session: Session, everything: bool) -> None:
        core = self.core
        for mid, (topic, payload, written) in list(session.inflight.items()):
            if (written and not everything) or session.rid not in self.sessions:
                continue
            header = {"topic": topic, "qos": 1, "mid": mid, "dup": True}
            if mid in session.retained_mids:
                header["retain"] = True
            if core.send_client(session.rid, codec.encode(codec.MSG, header, payload)):
                session.inflight[mid] = (topic, payload, True)
                core.metrics["deliveries.redelivered"] += 1

    def delivered(self, rid: bytes, deliveries: list[Delivery], written: bool) -> None:
        """What became of one flushed frame of deliveries: QoS 1 messages zmq took are marked written (not
        resent on a timer); QoS 0 ones it refused are gone, counted and owed to the client."""
        session = self.sessions.get(rid)
        metrics = self.core.metrics
        for d in deliveries:
            if d.mid is not None and session is not None and d.mid in session.inflight:
                session.inflight[d.mid] = (d.topic, d.payload, written)
            if written:
                metrics["deliveries.qos1" if d.qos else "deliveries.qos0"] += d.count
        if not written and session is not None and (lost := sum(d.count for d in deliveries if not d.qos)):
            self._count_drops(session, lost)

    # ------------------------------------------------------------------ shared subscriptions
    def on_shared_fwd(self, sender: str, frame: Frame) -> None:
        """One message for one member of a share (see the rules): FWD_ACK once placed here, or ``overloaded``."""
        core = self.core
        h = frame.header
        core.metrics["forwards.in"] += 1
        core.metrics["shared.in"] += 1
        qos, fid = (1 if h["qos"] else 0), h["id"]
        done = None
        if qos and fid:

            def done() -> None:
                self.shared_done_out.setdefault(sender, []).append(fid)

            if not self.shared_member_here(h["share"]):  # FWD_ACK once the next node holds it (see the rules)

                def answer(code: str | None, reason: str) -> None:
                    if code is None:
                        core.outbox.ack(sender, fid)
                    else:
                        core.effects.send_peer(sender, codec.error_parts(code, reason, fid))

                self.send_on_new(h["share"], h["topic"], frame.payload, done, answer, dup=h.get("dup") is True)
                return

        if self.deliver_shared(h["share"], h["topic"], qos, frame.payload, done, dup=h.get("dup") is True):
            if qos and fid:
                core.outbox.ack(sender, fid)
            self.send_shared_done()  # a message handed on at once may already be done (never for a remote one)
        else:
            reason = f"the members of {h['share']!r} on {core.me} have no room for more unacknowledged messages"
            core.effects.send_peer(sender, codec.error_parts(codec.E_OVERLOADED, reason, fid))

    def send_shared_done(self) -> None:
        out, self.shared_done_out = self.shared_done_out, {}
        for node, ids in out.items():
            self.core.effects.send_peer(node, codec.encode(codec.SHARED_DONE, {"ids": ids}))
        if self.copies_released:
            released, self.copies_released = self.copies_released, {}
            for node, ids in released.items():
                self.core.effects.send_peer(node, codec.encode(codec.SHARED_RELEASE, {"ids": ids}))

    def shared_member_here(self, share: str) -> bool:
        """Whether a member of ``share`` connected here could take a message now or later."""
        return bool(self._shared_candidates(share))

    def send_on_new(
        self, share: str, topic: str, payload: bytes, done: Any, answer: Any, dup: bool = False
    ) -> None:
        """A QoS 1 message for ``share`` that no member here can take, not yet acknowledged upstream: sent on,
        and ``answer(code, reason)`` once the next node holds it (code None) or it could not be placed."""
        self._send_on(SharedMessage(share, topic, 1, payload, done, dup), answer)
        self.send_shared_done()

    def _shared_candidates(self, share: str) -> list[Session]:
        members = self.core.subscriptions.shared.get(share)
        if not members:
            return []
        sessions, offline = self.sessions, self.offline
        return [
            s for rid in members
            if (s := sessions.get(rid)) is not None and s.detached_at is None and s.moving_to is None
            and rid not in offline
        ]  # fmt: skip

    def deliver_shared(
        self, share: str, topic: str, qos: int, payload: bytes, done: Any = None, dup: bool = False,
        accepted: bool = False,
    ) -> bool:
        """Give a message to one local member of ``share`` (see the rules); False when it was refused for lack of
        room (never when ``accepted``: it was taken before, and is only moving on)."""
        core = self.core
        message = SharedMessage(share, topic, qos, payload, done, dup)
        candidates = self._shared_candidates(share)
        if not candidates:
            self._send_on(message)
            return True
        turn = self.shared_turns.get(share, 0)
        self.shared_turns[share] = turn + 1
        if not qos:
            chosen = candidates[turn % len(candidates)]
            core.outbox.deliver(chosen.rid, Delivery(topic, 0, None, False, payload))
            core.metrics["shared.delivered"] += 1
            return True
        limit = core.cfg.max_inflight
        pending = self.shared_pending.get(share)
        with_room = [s for s in candidates if len(s.inflight) < limit and not s.backlog]
        if with_room and not pending:
            fewest = min(len(s.inflight) for s in with_room)
            least = [s for s in with_room if len(s.inflight) == fewest]
            self._write_shared(least[turn % len(least)], message, dup)
            return True
        if pending is None:
            pending = self.shared_pending[share] = deque()
        if len(pending) >= core.cfg.max_queued and not accepted:
            core.metrics["qos1.refused_overloaded"] += 1
            return False
        pending.append(message)
        core.metrics["shared.queued"] += 1
        return True

    def _write_shared(self, session: Session, message: SharedMessage, dup: bool) -> None:
        session.held_bytes += len(message.payload)
        mid = session.next_mid
        self._write_qos1(session, message.topic, message.payload, dup=dup)
        session.shared_mids[mid] = message
        self.core.metrics["shared.delivered"] += 1

    def _send_on(self, message: SharedMessage, answer: Any = None) -> None:
        """No connected member here: to another node of the group; if none has one, wait here for a member that
        returns, or count the loss when the share has no member here at all. ``answer(code, reason)``: the message
        is not acknowledged upstream yet (arrival): it is once the next node holds it, a member here may return, or
        no member exists anywhere (as a plain publish with no subscriber is); any other failure refuses it."""
        core = self.core
        core.metrics["shared.sent_on"] += 1

        def reply(code: str | None, reason: str = "") -> None:
            nonlocal answer
            if answer is not None:
                told, answer = answer, None
                told(code, reason)

        def placed(outcome: str) -> None:
            if outcome == SHARED_OK:
                reply(None)
                if message.done is not None:
                    message.done()
                    self.send_shared_done()
                return
            if core.subscriptions.shared.get(message.share):  # members here, none connected: one may return
                self.shared_pending.setdefault(message.share, deque()).append(message)
                core.metrics["shared.queued"] += 1
                reply(None)
                return
            if answer is not None:  # not acknowledged upstream yet: nothing is lost that was acknowledged
                if outcome != NO_MEMBER:
                    reply(outcome, f"no member of {message.share!r} is connected to {core.me}, and sending the "
                                   f"message on to another node failed ({outcome}): retry")  # fmt: skip
                    return
                core.metrics["shared.no_member_acked"] += 1  # like a plain publish with no subscriber
                core.log.info("shared_no_member_acked", share=message.share, topic=message.topic)
                reply(None)
                if message.done is not None:
                    message.done()
                    self.send_shared_done()
                return
            if message.qos:
                core.metrics["shared.lost"] += 1
                core.log.error("shared_message_lost", share=message.share, topic=message.topic,
                               reason="no member of the group anywhere")  # fmt: skip
            if message.done is not None:  # nobody can take it: the copy upstream is released, the loss counted
                message.done()
                self.send_shared_done()

        core.entry.redispatch_shared(message.share, message.topic, message.qos, message.payload, {core.me},
                                     placed if message.qos else None, (lambda: reply(None)) if answer else None)

    def release_shared(self, session: Session, share: str | None = None) -> None:
        """The member stops receiving (``share``, or all its shares): its unacknowledged shared messages go to
        another member, flagged ``dup`` (see the rules)."""
        if not session.shared_mids:
            return
        moving = [(mid, m) for mid, m in sorted(session.shared_mids.items()) if share is None or m.share == share]
        for mid, _ in moving:
            del session.shared_mids[mid]
            found = session.inflight.pop(mid, None)
            if found is not None:
                session.held_bytes -= len(found[1])
            session.pids.pop(mid, None)
        if moving:
            self.core.metrics["shared.redispatched_member_lost"] += len(moving)
            self.core.log.info("shared_member_released", client=session.rid.decode(errors="replace"),
                               messages=len(moving))  # fmt: skip
        for _, message in moving:
            self.deliver_shared(message.share, message.topic, 1, message.payload, message.done, dup=True,
                                accepted=True)  # fmt: skip
        self.send_shared_done()

    def member_left(self, session: Session, share: str) -> None:
        """``session`` is no longer a member of ``share`` (``subscriptions``): its messages of it move on."""
        self.release_shared(session, share)

    # ------------------------------------------------------------------ QoS 0 drops
    def _count_drops(self, session: Session, count: int) -> None:
        self.core.metrics["drops.client_hwm"] += count
        session.dropped += count
        session.dropped_unreported += count
        self.drop_reports[session.rid] = session

    def report_drops(self, rid: bytes) -> None:
        """Send the client its DROPPED frame (the count since the last one); kept for later if zmq refuses it."""
        session = self.drop_reports.pop(rid, None)  # popped first: a successful send must not report again
        if session is None or self.sessions.get(rid) is not session:
            return  # the session ended (or was replaced): its drops ended with it
        count, session.dropped_unreported = session.dropped_unreported, 0
        if self.core.send_client(rid, codec.encode(codec.DROPPED, {"count": count})):
            self.core.metrics["drops.client_hwm_reported"] += count
        elif self.sessions.get(rid) is session:  # still full: owed until the next successful send or tick
            session.dropped_unreported += count
            self.drop_reports[rid] = session

    def drops_tick(self) -> None:
        """A client that stopped reading gets no more sends that could carry its report; this retries them."""
        for rid in list(self.drop_reports):
            self.report_drops(rid)
        self.core.effects.call_later(self.core.cfg.redelivery_interval, self.drops_tick)

    # ------------------------------------------------------------------ status
    def drops_view(self) -> list[dict[str, Any]]:
        """The clients with the most QoS 0 drops, for status (bounded, so status stays small)."""
        worst = heapq.nlargest(DROPS_SHOWN, (s for s in self.sessions.values() if s.dropped), key=lambda s: s.dropped)
        return [
            {"client": s.rid.decode(errors="replace"), "dropped": s.dropped, "unreported": s.dropped_unreported}
            for s in worst
        ]

    def flow_view(self) -> dict[str, Any]:
        """QoS 1 flow control: totals, and the clients with the most kept for them (bounded: status is cheap)."""
        sessions = self.sessions.values()
        busiest = heapq.nlargest(
            CLIENTS_SHOWN, (s for s in sessions if s.inflight or s.backlog), key=lambda s: s.held_bytes
        )
        return {
            "qos1_inflight": sum(len(s.inflight) for s in sessions),
            "qos1_backlog": sum(len(s.backlog) for s in sessions),
            "qos1_held_bytes": sum(s.held_bytes for s in sessions),
            "clients_busiest": [
                {"client": s.rid.decode(errors="replace"), "inflight": len(s.inflight), "backlog": len(s.backlog),
                 "held_bytes": s.held_bytes}  # fmt: skip
                for s in busiest
            ],
        }
