"""Client frames: sessions, local subscriptions and delivery to this node's own clients (``ClientsMixin``).

Rules of this file:
- Routes: a client's subscription lives only on its own node (``local_q0``/``local_q1``). When a filter gets its
  first local subscriber the node sends ROUTE_ADD(filter -> this node) to every owner of the filter's shard (to
  every member for root filters), and ROUTE_DEL when the last one leaves: reference counting per node.
- QoS 1: the publisher's PUBACK is sent after every destination answered FWD_ACK; destinations deliver QoS 1
  messages with a message id and keep them until the client DACKs them or goes away. A message zmq could not
  queue (the client's send queue is full) is retried every ``redelivery_interval``; when a client says HELLO
  again on the same session (it reconnected, and its old pipe may have lost messages) everything still
  unacknowledged is resent with ``dup``. A message written to a live connection is not resent on a timer:
  that would only duplicate it for a client that is slow to read.
- QoS 1 flow control: a session has at most ``max_inflight`` messages written and unacknowledged; further ones
  wait, accepted, in its backlog and are written as acknowledgements make room. A message that would take a
  backlog past ``max_queued`` messages or the session past ``max_session_bytes`` is refused for every local
  recipient (``deliver_local`` returns False before giving it to anyone): the publish fails with
  ``overloaded`` instead of being acknowledged, and the SDK retries it until its timeout, so a publisher slows
  to its slowest subscriber. Memory per client is bounded and nothing acknowledged is dropped while the
  session lives; a session that ends (its client was told with SESSION_END, or is gone) counts what it held.
- Sessions end with a SESSION_END frame to the client when the node can no longer vouch for its routes (its
  etcd lease is in doubt, ``fenced``) or stops: the client fails over, subscribes again and reports the gap.
  WELCOME says whether the node still had the client's session (``session_present``); when it did not, the
  client's subscriptions had a gap too.
- A session whose connection is gone (a send fails with EHOSTUNREACH: the client died, or zmq is re-making
  the connection) is detached, not dropped, for ``client_idle_check`` seconds: a client whose connection zmq
  re-makes says HELLO again within that time, finds its session present and gets every unacknowledged QoS 1
  message again. Any frame from the client attaches it again; a session still detached then is dropped.
- QoS 0 messages zmq would not queue for a client (its send queue is full) are dropped, counted per message
  (``drops.client_hwm``; a run of k messages is k) and per session (``Session.dropped``), and the client is told:
  a ``DROPPED {count}`` frame goes with its next successful send, or from the drops tick (every
  ``redelivery_interval``) for a client nothing else is sent to.
- Every rejected input is answered with an ERROR frame (when the sender can be addressed), counted in
  ``metrics`` under ``errors.<code>`` and logged; the node keeps serving.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

from .base import NodeBase
from .outbox import Delivery, Forward
from .state import Publish, Session, gate

DROPS_SHOWN = 10  # clients listed in status under ``clients_dropped`` (those with the most QoS 0 drops)


class ClientsMixin(NodeBase):
    if TYPE_CHECKING:  # from OwnershipMixin

        def fenced(self) -> bool: ...

    if TYPE_CHECKING:  # from RoutingMixin

        def _change_routes(self, kind: bytes, filters: list[str], on_done: Callable[[list[str]], None]) -> None: ...

        def publish(self, pub: Publish) -> None: ...

        def forward(self, pub: Publish) -> None: ...
    # ------------------------------------------------------------------ client frames
    def on_client_parts(self, parts: list[bytes]) -> None:
        self.metrics["frames_in.client"] += 1
        rid, rest = parts[0], parts[1:]
        try:
            frame = codec.decode(rest, max_payload=self.cfg.max_payload, allowed=codec.CLIENT_REQUESTS)
        except ProtocolError as exc:
            self.reject_client(rid, exc.code, exc.reason, exc.ref)
            return
        session = self.sessions.get(rid)
        if session is None:
            session = self.sessions[rid] = Session(rid, time.monotonic())
            self.metrics["clients.connected"] += 1
        session.last_seen = time.monotonic()
        session.detached_at = None
        handler = self._client_handlers[frame.type]
        handler(self, session, frame)

    def _on_hello(self, session: Session, frame: Frame) -> None:
        cfg = self.cfg
        present, session.greeted = session.greeted, True
        header = {
            "id": frame.header.get("id"), "node": self.me, "max_payload": cfg.max_payload, "epoch": self.epoch,
            "session_present": present, "fenced": self.fenced(),
        }  # fmt: skip
        self.send_client(session.rid, codec.encode(codec.WELCOME, header))
        if present:
            self._redeliver(session, everything=True)  # a reconnect: its old pipe may have lost what was in it

    def _on_ping(self, session: Session, frame: Frame) -> None:
        self.send_client(session.rid, codec.encode(codec.PONG, {"id": frame.header.get("id")}))

    def _on_bye(self, session: Session, frame: Frame) -> None:
        self._drop_session(session.rid, reason="bye")

    def _on_status(self, session: Session, frame: Frame) -> None:
        status = self.status()
        if frame.header.get("detail") is True and self.assignment is not None:
            status["routes_per_shard"] = {
                str(shard): [len(routes), sum(len(f) + sum(len(n) for n in nodes) for f, nodes in routes)]
                for shard in self.assignment.primaries_of(self.me)
                if (routes := self.routes.shard_routes(shard))
            }
        self.send_client(session.rid, codec.encode(codec.STATUS_REPLY, {"id": frame.header["id"], "status": status}))

    def _on_sub(self, session: Session, frame: Frame) -> None:
        ref = frame.header["id"]
        qos = frame.header["qos"]
        if qos not in (0, 1):
            self.reject_client(session.rid, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}", ref)
            return
        if self.assignment is None:
            self.reject_client(session.rid, codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry", ref)
            return
        if self.fenced():  # peers drop our routes if our lease runs out: subscribe through a node that has one
            reason = "this node lost contact with etcd and cannot keep routes; use another node"
            self.reject_client(session.rid, codec.E_FENCED, reason, ref)
            return
        results: list[Any] = []
        new_filters: list[str] = []
        installing: set[int] = set()  # route adds started by earlier subscribers that this SUBACK must wait for
        added: list[str] = []  # filters this client did not have before this SUB: the ones to undo on failure
        for filt in frame.header["filters"]:
            try:
                if not isinstance(filt, str):
                    raise TopicError("invalid_filter", f"a filter must be a string, got {type(filt).__name__}")
                validate_topic_filter(filt)
            except TopicError as exc:
                self.metrics[f"errors.{exc.code}"] += 1
                shown = filt if isinstance(filt, str) else None
                results.append({"filter": shown, "code": exc.code, "reason": exc.reason})
                continue
            results.append(qos)
            if filt not in session.filters:
                added.append(filt)
            if self._subscribe_local(session, filt, qos):
                new_filters.append(filt)
            elif filt in self.route_add_waiters:
                installing.add(self.route_add_waiters[filt])
        self.metrics["subscriptions"] += len(new_filters)

        def done(failures: list[str]) -> None:
            if failures:
                # All or nothing: undo this SUB so the client is not sent messages for filters it was told failed
                # (subscriptions it already had before this SUB stay).
                if session.rid in self.sessions:
                    gone = [f for f in added if self._unsubscribe_local(session, f)]
                    self._change_routes(codec.ROUTE_DEL, gone, lambda _failures: None)
                reason = "route owners did not confirm: " + ", ".join(sorted(set(failures)))
                self.reject_client(session.rid, codec.E_UNAVAILABLE, reason, ref)
            else:
                self.send_client(session.rid, codec.encode(codec.SUBACK, {"id": ref, "results": results}))

        on_done = gate(len(installing) + 1, done)
        for wid in installing:
            self.waiters[wid].callbacks.append(on_done)
        self._change_routes(codec.ROUTE_ADD, new_filters, on_done)

    def _subscribe_local(self, session: Session, filt: str, qos: int) -> bool:
        """Record the subscription; True when the filter is new on this node (a route must be added)."""
        had_route = self.local_q0.has_filter(filt) or self.local_q1.has_filter(filt)
        old = session.filters.get(filt)
        if old is not None and old != qos:
            (self.local_q1 if old else self.local_q0).remove(filt, session.rid)
        session.filters[filt] = qos
        (self.local_q1 if qos else self.local_q0).add(filt, session.rid)
        return not had_route

    def _unsubscribe_local(self, session: Session, filt: str) -> bool:
        """Forget the subscription; True when no local client has the filter any more (drop the route)."""
        qos = session.filters.pop(filt, None)
        if qos is None:
            return False
        (self.local_q1 if qos else self.local_q0).remove(filt, session.rid)
        return not (self.local_q0.has_filter(filt) or self.local_q1.has_filter(filt))

    def _on_unsub(self, session: Session, frame: Frame) -> None:
        ref = frame.header["id"]
        if not all(isinstance(f, str) for f in frame.header["filters"]):
            self.reject_client(session.rid, codec.E_INVALID_FILTER, "UNSUB filters must all be strings", ref)
            return
        gone = [f for f in frame.header["filters"] if self._unsubscribe_local(session, f)]

        def done(failures: list[str]) -> None:
            self.send_client(session.rid, codec.encode(codec.UNSUBACK, {"id": ref}))

        self._change_routes(codec.ROUTE_DEL, gone, done)

    def _drop_session(self, rid: bytes, reason: str) -> None:
        session = self.sessions.pop(rid, None)
        if session is None:
            return
        gone = [f for f in list(session.filters) if self._unsubscribe_local(session, f)]
        self._change_routes(codec.ROUTE_DEL, gone, lambda failures: None)
        unsent = len(session.backlog)
        self.metrics["clients.disconnected"] += 1
        self.metrics["deliveries.session_ended"] += unsent + len(session.inflight)
        self.log.info("client_gone", client=rid.decode(errors="replace"), reason=reason, routes_dropped=len(gone),
                      unacknowledged=len(session.inflight), backlog=unsent, epoch=self.epoch)  # fmt: skip

    def detach_session(self, rid: bytes) -> None:
        """The client's connection is gone: keep its session ``client_idle_check`` seconds for it to come back."""
        session = self.sessions.get(rid)
        if session is None or session.detached_at is not None:
            return
        since = session.detached_at = time.monotonic()
        self.metrics["clients.vanished"] += 1

        def expire() -> None:
            found = self.sessions.get(rid)
            if found is not None and found.detached_at == since:
                self._drop_session(rid, reason="unreachable")

        self.call_later(self.cfg.client_idle_check, expire)

    def end_sessions(self, code: str, reason: str) -> None:
        """Tell every client its session here is over (it fails over and subscribes again), then forget them."""
        end = codec.encode(codec.SESSION_END, {"code": code, "reason": reason})
        for rid in list(self.sessions):
            self.send_client(rid, end)
            self._drop_session(rid, reason=code)
        self.metrics[f"sessions.ended.{code}"] += 1

    def _on_dack(self, session: Session, frame: Frame) -> None:
        inflight = session.inflight
        for mid in frame.header["mids"]:
            found = inflight.pop(mid, None)
            if found is not None:
                session.held_bytes -= len(found[1])
                self.metrics["deliveries.acked"] += 1
        if session.backlog:
            self._fill_window(session)

    def _on_pub(self, session: Session, frame: Frame) -> None:
        self._publish_one(session, frame.header.get("id"), frame.header["topic"], frame.header["qos"], frame.payload)

    def _on_pubs(self, session: Session, frame: Frame) -> None:
        """Many publishes in one frame (the SDK's batches): each is handled like a PUB, in order.

        Nothing else runs while one frame is handled, so routes cannot change within it: a topic whose first
        publish here was routed at once (owned, cached or root set only, nothing queued before it) sends its
        later publishes in the frame to the same nodes without validating or resolving it again. A QoS 0 run
        (many messages to one topic, codec.Run) to peers only travels on as one item; anything else in a run
        takes the per-message path.
        """
        try:
            runs = codec.split_runs(frame)
        except ProtocolError as exc:
            self.reject_client(session.rid, exc.code, exc.reason, exc.ref)
            return
        routed: dict[str, set[str]] = {}
        queues: dict[str, list[list[Forward]]] = {}  # QoS 0 to peers only: the outbox lists of a topic's peers
        rid, me, members = session.rid, self.me, self.members
        fast = hops = queued = dead = 0
        for (topic, qos, ref), sizes, payload in runs:
            dests = routed.get(topic)
            if dests is None:
                head = payload if sizes is None else payload[: sizes[0]]
                pub = self._publish_one(session, ref, topic, qos, head)
                if pub is not None and not pub.lookups_left and not pub.failed and topic not in self.topic_queues:
                    dests = routed[topic] = pub.dests
                if sizes is None:
                    continue
                payload, sizes = payload[sizes[0] :], sizes[1:]
                if dests is None:  # refused, failed or queued behind a lookup: the rest follows one by one
                    for data in codec.cut(payload, sizes):
                        self._publish_one(session, ref, topic, qos, data)
                    continue
            if qos or me in dests:  # acks to track, or a local match to deliver: the general path
                for data in codec.cut(payload, sizes):
                    self.metrics["publishes.in"] += 1
                    self.forward(Publish(rid, ref, topic, qos, data, dests=dests))
                continue
            # The hot path: what forward() does for QoS 0, without a Publish per message.
            lists = queues.get(topic)
            if lists is None:
                lists = queues[topic] = [self.outbox.forward_queue(d) for d in dests if d in members]
            item = Forward(0, topic, 0, payload, sizes)
            for queue in lists:
                queue.append(item)
            n = item.count
            fast += n
            if lists:
                hops += n
            queued += len(lists) * n
            dead += (len(dests) - len(lists)) * n
        if fast:
            m = self.metrics
            m["publishes.in"] += fast
            m["publishes.routed"] += fast
            m["publishes.hops"] += hops
            if dead:
                m["drops.dead_destination"] += dead
            self.outbox.queued += queued

    def _publish_one(
        self, session: Session, ref: int | None, topic: str, qos: int, payload: bytes
    ) -> Publish | None:
        """Validate and route one publish; returns it, or None when it was refused."""
        if qos not in (0, 1):
            self.reject_client(session.rid, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}", ref)
            return None
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            self.reject_client(session.rid, exc.code, exc.reason, ref)
            return None
        if self.fenced():
            reason = "this node lost contact with etcd and cannot vouch for routes; use another node"
            self.reject_client(session.rid, codec.E_FENCED, reason, ref)
            return None
        self.metrics["publishes.in"] += 1
        pub = Publish(session.rid, ref, topic, qos, payload)
        self.publish(pub)
        return pub

    def _on_leave(self, session: Session, frame: Frame) -> None:
        """Graceful leave: flag ourselves in etcd; the leader drains every shard away, then we exit."""
        self.session.leaving = True
        self.session.poll_now()
        self.log.info("leaving", epoch=self.epoch)
        self.send_client(session.rid, codec.encode(codec.LEAVING, {"id": frame.header["id"]}))

    _client_handlers: dict[bytes, Callable[[ClientsMixin, Session, Frame], None]] = {
        codec.HELLO: _on_hello,
        codec.PING: _on_ping,
        codec.PONG: lambda self, session, frame: None,
        codec.BYE: _on_bye,
        codec.STATUS: _on_status,
        codec.SUB: _on_sub,
        codec.UNSUB: _on_unsub,
        codec.DACK: _on_dack,
        codec.PUB: _on_pub,
        codec.PUBS: _on_pubs,
        codec.LEAVE: _on_leave,
    }

    # ------------------------------------------------------------------ delivery
    def local_recipients(self, topic: str, qos: int) -> tuple[set[bytes], set[bytes]]:
        """This node's clients for a message: (those that get it at QoS 0, those that get it at QoS 1)."""
        if qos:
            q1 = self.local_q1.match(topic)
            return self.local_q0.match(topic) - q1, q1
        return self.local_q0.match(topic) | self.local_q1.match(topic), set()

    def deliver_local(
        self,
        topic: str,
        qos: int,
        payload: bytes,
        recipients: tuple[set[bytes], set[bytes]] | None = None,
    ) -> bool:
        """Queue a message for this node's matching clients; ``recipients`` when already known for the topic.

        False when a QoS 1 recipient has no room left (see the rules above): then nobody here got it."""
        q0, q1 = recipients or self.local_recipients(topic, qos)
        # Queued, and sent by Node._flush at the end of this batch of frames (one frame per client).
        for rid in q0:
            self.outbox.deliver(rid, Delivery(topic, 0, None, False, payload))
        if not q1:
            return True
        cfg = self.cfg
        sessions = [s for rid in q1 if (s := self.sessions.get(rid)) is not None]
        size = len(payload)
        for s in sessions:
            if s.held_bytes + size > cfg.max_session_bytes or len(s.backlog) >= cfg.max_queued:
                self.metrics["qos1.refused_overloaded"] += 1
                return False
        for s in sessions:
            s.held_bytes += size
            # Behind a backlog even with room in the window: a newer message must not overtake older ones.
            if s.backlog or len(s.inflight) >= cfg.max_inflight:
                s.backlog.append((topic, payload))
                self.metrics["qos1.backlogged"] += 1
            else:
                self._write_qos1(s, topic, payload)
        return True

    def _write_qos1(self, session: Session, topic: str, payload: bytes) -> None:
        mid = session.next_mid
        session.next_mid += 1
        session.inflight[mid] = (topic, payload, False)  # written once the flush got it into zmq
        self.outbox.deliver(session.rid, Delivery(topic, 1, mid, False, payload))

    def _fill_window(self, session: Session) -> None:
        """Acknowledgements made room: move backlog messages into the window."""
        limit = self.cfg.max_inflight
        backlog = session.backlog
        while backlog and len(session.inflight) < limit:
            self._write_qos1(session, *backlog.popleft())

    def _redeliver_tick(self) -> None:
        for session in list(self.sessions.values()):
            self._redeliver(session, everything=False)
        self.call_later(self.cfg.redelivery_interval, self._redeliver_tick)

    def _redeliver(self, session: Session, everything: bool) -> None:
        for mid, (topic, payload, written) in list(session.inflight.items()):
            if (written and not everything) or session.rid not in self.sessions:
                continue
            header = {"topic": topic, "qos": 1, "mid": mid, "dup": True}
            if self.send_client(session.rid, codec.encode(codec.MSG, header, payload)):
                session.inflight[mid] = (topic, payload, True)
                self.metrics["deliveries.redelivered"] += 1

    def _idle_tick(self) -> None:
        """Probe idle clients: with ROUTER_MANDATORY a send to a vanished one fails and drops its session."""
        cutoff = time.monotonic() - self.cfg.client_idle_check
        for session in list(self.sessions.values()):
            if session.last_seen < cutoff:
                self.send_client(session.rid, codec.encode(codec.PING, {}))
        self.call_later(self.cfg.client_idle_check, self._idle_tick)

    # ------------------------------------------------------------------ QoS 0 drops
    def _count_drops(self, session: Session, count: int) -> None:
        """``count`` QoS 0 messages for ``session`` were dropped (its send queue was full): counted per message
        and owed to the client, which learns of them in a DROPPED frame once zmq takes its frames again."""
        self.metrics["drops.client_hwm"] += count
        session.dropped += count
        session.dropped_unreported += count
        self.drop_reports[session.rid] = session

    def _report_drops(self, rid: bytes) -> None:
        """Send the client its DROPPED frame (the count since the last one); kept for later if zmq refuses it."""
        session = self.drop_reports.pop(rid, None)  # popped first: send_client's success path must not recurse
        if session is None or self.sessions.get(rid) is not session:
            return  # the session ended (or was replaced): its drops ended with it
        count, session.dropped_unreported = session.dropped_unreported, 0
        if self.send_client(rid, codec.encode(codec.DROPPED, {"count": count})):
            self.metrics["drops.client_hwm_reported"] += count
        elif self.sessions.get(rid) is session:  # still full: owed until the next successful send or tick
            session.dropped_unreported += count
            self.drop_reports[rid] = session

    def _drops_tick(self) -> None:
        """A client that stopped reading gets no more sends that could carry its report; this retries them."""
        for rid in list(self.drop_reports):
            self._report_drops(rid)
        self.call_later(self.cfg.redelivery_interval, self._drops_tick)

    def _drops_view(self) -> list[dict[str, Any]]:
        """The clients with the most QoS 0 drops, for status (bounded, so status stays small)."""
        worst = heapq.nlargest(DROPS_SHOWN, (s for s in self.sessions.values() if s.dropped), key=lambda s: s.dropped)
        return [
            {"client": s.rid.decode(errors="replace"), "dropped": s.dropped, "unreported": s.dropped_unreported}
            for s in worst
        ]
