"""Subscriptions: this node's clients' filters, and the routes that make the owners send their messages here.

Rules of this file:
- A client's subscription lives only on its own node (``local_q0``/``local_q1``, by granted QoS). When a filter
  gets its first local subscriber the node sends ROUTE_ADD(filter -> this node) to every owner of the filter's
  shard (to every member for root-set filters, which have no placement key), and ROUTE_DEL when the last one
  leaves: reference counting per node, so the owners hold one route per (filter, node), not per client.
- A SUBACK waits until every owner confirmed (ROUTE_ACK): from then on every publish finds the route. A client
  subscribing to a filter whose ROUTE_ADD is still on its way waits for that one too: for every one still on its
  way (``route_add_waiters``), a SUB's and a re-announcement's alike. Otherwise a SUB again on the same session,
  once a re-announcement of its filters was confirmed, would be acknowledged while the first SUB still waits, and
  the first one failing would undo what the second was acknowledged for (seen in the fault schedule). All or
  nothing: a SUB whose routes an owner could not confirm is undone and answered with an error.
- An owner that says our shard epoch is old (``stale`` in its ROUTE_ACK) gets nothing applied; we re-read the
  assignment and send those items to the current owners (up to three times), those that still hold: a removal
  is not sent again once its filter was subscribed again, nor an addition once it was unsubscribed, since the
  retry would overtake the newer change.
- A shard with no owner at all (etcd lost every lease at once) cannot hold the route: the SUB fails.
- Once a SUB's SUBACK is sent, its granted filters' retained messages are fetched for that client (``retained``).
- Subscriptions are refused while the node is fenced: peers drop our routes if our lease runs out.
- Shared subscriptions (``$share/GROUP/FILTER``, ``router.shared``): a member is kept in ``shared`` (share -> its
  local members, in joining order), never in ``local_q0``/``local_q1`` (plain matching must not find it). The node
  holds one slot route per local member (``slot_route(share, i)`` for ``i < members``): a member joining adds the
  next slot, one leaving removes the top one, so owners hold as many routes as members and an entry node picks
  nodes in proportion to them. No retained messages are sent for a shared subscription (MQTT 5 4.8.2). A member
  that leaves hands its unacknowledged shared messages to ``destination`` to go to another member.
- Routes are soft state held for the subscribers' nodes: when a shard lost every owner before its routes could be
  copied (R nodes died at once), its new owners start empty (``view.filled_from_nobody``), and every node with
  local subscribers in it adds its routes again (``reannounce_orphaned``), as it does after registering again.
  Every node, with routes there or not, tells each new owner (ROUTE_ADD ``refilled``, after the routes on the
  same connection) that its routes in the shard are complete: the owners answer no lookup for it until every
  member did (``owner``).
- A persistent session's plain filters also get a *session route* each (``session_route(filter, client id)``,
  ``router.shared``), beside the node's reference-counted route: it names the session, so when this node leaves the
  view the route owners move it to the node that adopts the session (``sessions``) instead of dropping it. Added
  and removed with the subscription while the session is persistent (``add_session_routes`` when a session turns
  persistent here); shared filters get none (their members are other sessions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from shardmq.router import codec
from shardmq.router.codec import Frame
from shardmq.router.matching import FilterIndex
from shardmq.router.partition import placement_key
from shardmq.router.shared import (
    is_shared,
    parse_share,
    route_filter_of,
    session_route,
    slot_route,
    validate_share,
)
from shardmq.router.topics import TopicError, validate_topic_filter

from .records import RESERVED_REASON, Relay, Session, Waiter, gate, is_reserved
from .view import ROOT

if TYPE_CHECKING:
    from .node import NodeCore

REANNOUNCE_DELAY = 1.0  # a few member polls: by then every peer has seen us gone and back
REANNOUNCE_ATTEMPTS = 10
STALE_RETRIES = 3


class Subscriptions:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.local_q0: FilterIndex[bytes] = FilterIndex()
        self.local_q1: FilterIndex[bytes] = FilterIndex()
        self.shared: dict[str, dict[bytes, int]] = {}  # share -> its local members (rid -> granted qos), in order
        self.route_add_waiters: dict[str, set[int]] = {}  # filter -> waiters of the ROUTE_ADDs still installing it
        self.announcements_due = 0  # re-announcements scheduled and not yet sent (a driver waits for them)

    def local_recipients(self, topic: str, qos: int) -> tuple[set[bytes], set[bytes]]:
        """This node's clients for a message: (those that get it at QoS 0, those that get it at QoS 1)."""
        if qos:
            q1 = self.local_q1.match(topic)
            return self.local_q0.match(topic) - q1, q1
        return self.local_q0.match(topic) | self.local_q1.match(topic), set()

    def local_filters(self) -> set[str]:
        """The route filters this node holds at the owners: plain filters, shared slot routes and the session
        routes of its persistent sessions."""
        plain = {f for idx in (self.local_q0, self.local_q1) for f in idx.filters()}
        plain |= {slot_route(share, i) for share, members in self.shared.items() for i in range(len(members))}
        for session in self.core.destination.sessions.values():
            if session.persistent:
                plain.update(self.session_routes(session, session.filters))
        return plain

    @staticmethod
    def session_routes(session: Session, filters: Iterable[str]) -> list[str]:
        """The session routes of a persistent session's ``filters`` (none for shared ones)."""
        client_id = session.rid.decode("utf-8", "replace")
        return [session_route(f, client_id) for f in filters if not is_shared(f)]

    def add_session_routes(self, session: Session) -> None:
        """A session held here became persistent: its filters get their session routes (see the rules)."""
        self.change_routes(codec.ROUTE_ADD, self.session_routes(session, sorted(session.filters)), lambda _f: None)

    # ------------------------------------------------------------------ client frames
    def on_sub(self, session: Session, frame: Frame) -> None:
        core = self.core
        ref = frame.header["id"]
        qos = frame.header["qos"]
        if qos not in (0, 1):
            core.reject_client(session.rid, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}", ref)
            return
        if core.view.assignment is None:
            core.reject_client(session.rid, codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry", ref)
            return
        if core.fenced():
            reason = "this node lost contact with etcd and cannot keep routes; use another node"
            core.reject_client(session.rid, codec.E_FENCED, reason, ref)
            return
        results: list[Any] = []
        new_filters: list[str] = []
        installing: set[int] = set()  # route adds started by earlier subscribers that this SUBACK must wait for
        added: list[str] = []  # filters this client did not have before this SUB: the ones to undo on failure
        new_or_changed = False  # a filter or its qos is new for this session (a persistent one's record changes)
        for filt in frame.header["filters"]:
            try:
                if not isinstance(filt, str):
                    raise TopicError("invalid_filter", f"a filter must be a string, got {type(filt).__name__}")
                validate_share(filt) if is_shared(filt) else validate_topic_filter(filt)
            except TopicError as exc:
                core.metrics[f"errors.{exc.code}"] += 1
                shown = filt if isinstance(filt, str) else None
                results.append({"filter": shown, "code": exc.code, "reason": exc.reason})
                continue
            if is_reserved(filt):
                core.metrics[f"errors.{codec.E_NOT_AUTHORIZED}"] += 1
                core.metrics["sessions.reserved_refused"] += 1
                results.append({"filter": filt, "code": codec.E_NOT_AUTHORIZED, "reason": RESERVED_REASON})
                continue
            # A shared subscription is allowed where its FILTER is.
            if session.acl is not None and not session.acl.may_subscribe(parse_share(filt)[1] if is_shared(filt)
                                                                     else filt):
                core.metrics[f"errors.{codec.E_NOT_AUTHORIZED}"] += 1
                reason = f"principal {session.principal!r} may not subscribe to {filt!r}"
                results.append({"filter": filt, "code": codec.E_NOT_AUTHORIZED, "reason": reason})
                continue
            results.append(qos)
            if session.filters.get(filt) != qos:
                new_or_changed = True
            if filt not in session.filters:
                added.append(filt)
            routes = self._subscribe_local(session, filt, qos)
            new_filters.extend(routes)
            if filt not in routes:
                installing |= self.installing(filt)
        core.metrics["subscriptions"] += len(new_filters)

        def done(failures: list[str]) -> None:
            if failures:
                # Undo this SUB so the client is not sent messages for filters it was told failed (subscriptions
                # it had before this SUB stay).
                if core.destination.sessions.get(session.rid) is session:
                    gone = [r for f in added for r in self._unsubscribe_local(session, f)]
                    self.change_routes(codec.ROUTE_DEL, gone, lambda _failures: None)
                reason = "route owners did not confirm: " + ", ".join(sorted(set(failures)))
                core.reject_client(session.rid, codec.E_UNAVAILABLE, reason, ref)
            elif session.persistent and new_or_changed:  # the replicated record holds the filters first
                core.sessions.write_filters(session, suback)
            else:
                suback()

        def suback() -> None:
            core.send_client(session.rid, codec.encode(codec.SUBACK, {"id": ref, "results": results}))
            granted = [
                f for f, r in zip(frame.header["filters"], results, strict=True)
                if type(r) is int and not is_shared(f)  # no retained messages for a shared subscription
            ]  # fmt: skip
            core.retained.fetch(session, granted, qos)

        on_done = gate(len(installing) + 1, done)
        for wid in installing:
            core.requests.get(wid).callbacks.append(on_done)
        self.change_routes(codec.ROUTE_ADD, new_filters, on_done)

    def on_unsub(self, session: Session, frame: Frame) -> None:
        core = self.core
        ref = frame.header["id"]
        if not all(isinstance(f, str) for f in frame.header["filters"]):
            core.reject_client(session.rid, codec.E_INVALID_FILTER, "UNSUB filters must all be strings", ref)
            return
        had = len(session.filters)
        gone = [r for f in frame.header["filters"] for r in self._unsubscribe_local(session, f)]

        def unsuback() -> None:
            core.send_client(session.rid, codec.encode(codec.UNSUBACK, {"id": ref}))

        def done(failures: list[str]) -> None:
            if session.persistent and len(session.filters) != had:
                core.sessions.write_filters(session, unsuback)
            else:
                unsuback()

        self.change_routes(codec.ROUTE_DEL, gone, done)

    def installing(self, filt: str) -> set[int]:
        """The waiters of every ROUTE_ADD of ``filt`` still on its way: a SUB of a filter already routed here is
        acknowledged only once they all are (see the rules)."""
        return set(self.route_add_waiters.get(filt, ()))

    def forget(self, session: Session) -> int:
        """The session ended: drop its subscriptions (and the routes no other local client needs)."""
        gone = [r for f in list(session.filters) for r in self._unsubscribe_local(session, f)]
        self.change_routes(codec.ROUTE_DEL, gone, lambda failures: None)
        return len(gone)

    def _subscribe_local(self, session: Session, filt: str, qos: int) -> list[str]:
        """Record the subscription; the route filters to add: the filter when it is new on this node, or a shared
        subscription's next member slot, and a persistent session's session route for a filter new to it."""
        old = session.filters.get(filt)
        if is_shared(filt):
            members = self.shared.setdefault(filt, {})
            session.filters[filt] = members[session.rid] = qos
            if session.persistent:
                self.core.durable.filters_changed(session)
            return [slot_route(filt, len(members) - 1)] if old is None else []
        had_route = self.local_q0.has_filter(filt) or self.local_q1.has_filter(filt)
        if old is not None and old != qos:
            (self.local_q1 if old else self.local_q0).remove(filt, session.rid)
        session.filters[filt] = qos
        (self.local_q1 if qos else self.local_q0).add(filt, session.rid)
        routes = [] if had_route else [filt]
        if session.persistent:
            self.core.durable.filters_changed(session)
            if old is None:
                routes.extend(self.session_routes(session, [filt]))
        return routes

    def _unsubscribe_local(self, session: Session, filt: str) -> list[str]:
        """Forget the subscription; the route filters to remove: the filter when it was the last local one (for a
        shared subscription: the top member slot), and a persistent session's session route. A shared member's
        unacknowledged messages go to another member (``destination.member_left``)."""
        qos = session.filters.pop(filt, None)
        if qos is None:
            return []
        if is_shared(filt):
            members = self.shared.get(filt, {})
            members.pop(session.rid, None)
            slot = len(members)
            if not members:
                self.shared.pop(filt, None)
            self.core.destination.member_left(session, filt)
            if session.persistent:
                self.core.durable.filters_changed(session)
            return [slot_route(filt, slot)]
        (self.local_q1 if qos else self.local_q0).remove(filt, session.rid)
        routes = [] if (self.local_q0.has_filter(filt) or self.local_q1.has_filter(filt)) else [filt]
        if session.persistent:
            self.core.durable.filters_changed(session)
            routes.extend(self.session_routes(session, [filt]))
        return routes

    # ------------------------------------------------------------------ routes at the owners
    def change_routes(
        self, kind: bytes, filters: list[str], on_done: Callable[[list[str]], None],
        refilled: dict[int, int] | None = None,
    ) -> None:  # fmt: skip
        """Apply ROUTE_ADD/ROUTE_DEL for this node's filters at every owner; ``on_done`` once, when all confirmed.
        ``refilled`` (ROUTE_ADD only): see ``announce_again``."""
        view = self.core.view
        if (not filters and not refilled) or view.assignment is None:  # without an assignment no route was ever
            on_done([])  # installed
            return
        self._send_route_items(kind, [view.route_item(f) for f in filters], on_done,
                               filters=filters if kind == codec.ROUTE_ADD else None, refilled=refilled)  # fmt: skip

    def _send_route_items(
        self, kind: bytes, items: list[list[Any]], on_done: Callable[[list[str]], None], attempt: int = 0,
        filters: list[str] | None = None, refilled: dict[int, int] | None = None,
    ) -> None:
        """Send items to the owners of their shards; ``on_done`` once every owner confirmed (or failed).
        ``filters``: the ROUTE_ADD filters this installs (a SUB of one of them meanwhile waits for it too).
        ``refilled``: shards filled from nobody whose owners are told, in the same frame as the routes it covers
        (an empty ROUTE_ADD where there are none), that our routes there are complete. Our own owner side needs
        no report: it applies our routes here, at once."""
        core = self.core
        by_node: dict[str, list[list[Any]]] = {}
        reports: dict[str, list[list[int]]] = {}
        ownerless: list[str] = []
        for item in items:
            targets = core.view.targets(item[0])
            if not targets and item[0] != ROOT:
                ownerless.append(f"shard {item[0]} has no owner")
            for owner in targets:
                by_node.setdefault(owner, []).append(item)
        for shard, shard_epoch in sorted((refilled or {}).items()):
            for owner in core.view.targets(shard):
                if owner != core.me:
                    by_node.setdefault(owner, [])
                    reports.setdefault(owner, []).append([shard, shard_epoch])
        local = by_node.pop(core.me, None)
        waiter = Waiter(set(by_node), [on_done], kind, by_node, attempt, filters=filters or [],
                        failures=sorted(set(ownerless)))  # fmt: skip
        wid = core.requests.open(waiter, self)
        for filt in waiter.filters:
            self.route_add_waiters.setdefault(filt, set()).add(wid)
        if local:
            _, relay_id = core.owner.apply_route_items(kind, core.me, local, forwarded=False)
            # We own some of these shards: entry nodes caching their answers must drop them, and the targets of
            # our hand-offs must hold the routes, before we confirm.
            shards = {item[0] for item in local}
            if kind != codec.ROUTE_ADD:
                core.owner.invalidate_caches(shards)
            elif core.owner.confirm_when_safe(shards, relay_id, lambda failed: self._settle_local(wid, failed)):
                waiter.pending.add(core.me)
        if not waiter.pending:
            self._finish_waiter(wid)
            return
        for node, routes in by_node.items():
            header = {"id": wid, "node": core.me, "routes": routes, "member_rev": core.view.member_revision}
            if node in reports:
                header["refilled"] = reports[node]
            if not core.effects.send_peer(node, codec.encode(kind, header)):
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        if wid in core.requests:
            core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_waiter(wid))

    def _settle_local(self, wid: int, relay_failed: list[int]) -> None:
        """Our own owner side confirmed; a relay of ours that failed leaves those routes unconfirmed."""
        waiter = self.core.requests.get(wid)
        if isinstance(waiter, Waiter) and relay_failed:
            waiter.failures.append(f"{self.core.me} (hand-off targets of shards {relay_failed} did not answer)")
        self._settle_waiter(wid, self.core.me)

    def _settle_waiter(self, wid: int, node: str) -> None:
        waiter = self.core.requests.get(wid)
        if isinstance(waiter, Waiter):
            waiter.pending.discard(node)
            if not waiter.pending:
                self._finish_waiter(wid)

    def _expire_waiter(self, wid: int) -> None:
        waiter = self.core.requests.get(wid)
        if waiter is not None:
            self.core.metrics["errors.route_timeout"] += 1
            waiter.failures.append("timeout")
            self._finish_waiter(wid)

    def _finish_waiter(self, wid: int) -> None:
        waiter = self.core.requests.close(wid)
        for filt in waiter.filters:
            waiting = self.route_add_waiters.get(filt)
            if waiting is not None:
                waiting.discard(wid)
                if not waiting:
                    del self.route_add_waiters[filt]
        for callback in waiter.callbacks:
            callback(waiter.failures)

    def on_route_ack(self, sender: str, frame: Frame) -> None:
        wid = frame.header["id"]
        stale = frame.header.get("stale")
        waiter = self.core.requests.get(wid)
        if isinstance(waiter, Relay):  # a hand-off target holds additions the owner side relayed
            if waiter.waits_on(sender):
                self.core.owner.on_relay_ack(sender, wid)
            return
        if not isinstance(waiter, Waiter) or sender not in waiter.pending:
            return  # late, or from a node this request never went to
        if stale is not None and not (isinstance(stale, list) and all(
            isinstance(i, list) and len(i) == 2 and type(i[0]) is int and type(i[1]) is int for i in stale
        )):  # fmt: skip
            reason = "ROUTE_ACK stale must be [shard, shard_epoch] pairs"
            self.core.refuse_peer(sender, frame, codec.E_BAD_HEADER, reason)
            waiter.failures.append(f"{sender} (malformed ROUTE_ACK)")
            self._settle_waiter(wid, sender)
            return
        if stale:
            if waiter.attempt < STALE_RETRIES:
                # An owner said our shard epoch is old: re-send to the current owners once our view is at least
                # as new as the owner's (re-read the assignment first when it is not).
                view = self.core.view
                if any(type(e) is int and view.shard_epoch(s) < e for s, e in stale):
                    self.core.refresh_assignment(lambda _ok: self._retry_stale(wid, sender, stale), force=True)
                else:
                    self._retry_stale(wid, sender, stale)
                return
            waiter.failures.append(f"{sender} (shard epoch still stale)")  # never confirm what no owner holds
        self._settle_waiter(wid, sender)

    def _retry_stale(self, wid: int, sender: str, stale: list[list[int]]) -> None:
        waiter = self.core.requests.get(wid)
        if not isinstance(waiter, Waiter):
            return
        view = self.core.view
        shards = {s for s, _ in stale}
        # Only what still holds: a removal whose filter was subscribed again since (its new ROUTE_ADD already went
        # out) must not follow that addition, nor an addition a removal since undid (found by the simulation).
        local = self.local_filters()
        adding = waiter.kind == codec.ROUTE_ADD
        retry = [
            view.route_item(f) for s, _, f in waiter.sent.get(sender, []) if s in shards and (f in local) == adding
        ]
        if not retry:
            waiter.failures.append(f"{sender} (shard epoch still stale)")
            self._settle_waiter(wid, sender)
            return
        self.core.metrics["fencing.route_retries"] += 1

        def done(failures: list[str]) -> None:
            found = self.core.requests.get(wid)
            if isinstance(found, Waiter):
                found.failures.extend(failures)
            self._settle_waiter(wid, sender)

        self._send_route_items(waiter.kind, retry, done, waiter.attempt + 1)

    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None:
        request.failures.append(f"{sender} ({code})")
        self._settle_waiter(rid, sender)

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None:
        request.failures.append(node)
        self._settle_waiter(rid, node)

    # ------------------------------------------------------------------ membership changes
    def announce_root_routes(self, nodes: set[str], attempt: int = 1) -> None:
        """Root-set routes live on every node: give a newcomer ours (every node does the same). Acknowledged and
        retried: a newcomer drops frames from members its first view has not shown it yet (``not_member``), and
        we may see it registered before it sees us."""
        core = self.core
        local = {f for f in self.local_filters() if placement_key(route_filter_of(f)) is None}
        nodes = {n for n in nodes if n in core.view.members and n != core.me}
        if not local or not nodes:
            return
        items = [[ROOT, 0, f] for f in sorted(local)]
        waiter = Waiter(set(nodes), [], codec.ROUTE_ADD, {n: items for n in nodes})

        def done(failures: list[str]) -> None:
            if not failures:
                return
            if attempt >= REANNOUNCE_ATTEMPTS:
                core.metrics["routes.root_announce_failed"] += 1
                core.log.error("root_routes_announce_failed", peers=sorted(nodes), failures=sorted(set(failures)))
                return
            core.metrics["routes.root_announce_retries"] += 1
            self.announce_root_routes(nodes, attempt + 1)  # idempotent at those that did take it

        waiter.callbacks.append(done)
        wid = core.requests.open(waiter, self)
        header = {"id": wid, "node": core.me, "routes": items, "member_rev": core.view.member_revision}
        for node in sorted(nodes):
            if not core.effects.send_peer(node, codec.encode(codec.ROUTE_ADD, header)):
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        if wid in core.requests:
            core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_waiter(wid))

    def reannounce_orphaned(self, orphaned: frozenset[int]) -> None:
        """Add our routes again in shards filled from nobody (``view.filled_from_nobody``): every replica died
        before it could be copied, and we are the one place that still knows which of our clients subscribed. A
        shard whose new owners were filled after all just gets routes it already has: ROUTE_ADD is idempotent.
        Every new owner of such a shard is told that our routes there are complete (``refilled``), also where we
        have none to add: it answers no lookup for the shard until every member said so (``owner``)."""
        view = self.core.view
        assert view.assignment is not None
        filters = sorted(f for f in self.local_filters() if view.route_item(f)[0] in orphaned)
        if filters:
            self.core.log.warning("routes_reannounced_orphaned", shards=len(orphaned), filters=len(filters))
            self.core.metrics["routes.reannounced_orphaned"] += len(filters)
        self.announce_again(filters, refilled={s: view.assignment.epoch(s) for s in orphaned})

    def reannounce_later(self) -> None:
        """After registering again, once every peer has seen us gone and back (``REANNOUNCE_DELAY``)."""
        self.announcements_due += 1
        self.core.effects.call_later(REANNOUNCE_DELAY, self.reannounce_routes)

    def reannounce_routes(self) -> None:
        """After registering again (peers dropped our routes when they saw us gone), add every route again."""
        self.announcements_due -= 1
        filters = sorted(self.local_filters())
        self.core.log.info("routes_reannounced", filters=len(filters))
        self.core.metrics["routes.reannounced"] += len(filters)
        self.announce_again(filters)

    def announce_again(self, filters: list[str], attempt: int = 1, refilled: dict[int, int] | None = None) -> None:
        """ROUTE_ADD for filters our clients still hold; no client waits for it, so a failure (an owner
        unreachable, epochs moving) is retried every ``request_timeout`` with what is still subscribed here.
        ``refilled``: shards filled from nobody (shard -> its epoch then) whose owners are told our routes there
        are complete, again with each retry."""
        core = self.core

        def done(failures: list[str]) -> None:
            if not failures:
                return
            if attempt >= REANNOUNCE_ATTEMPTS:
                core.metrics["routes.reannounce_failed"] += len(filters)
                core.log.error("routes_reannounce_failed", filters=len(filters), failures=sorted(set(failures)))
                return
            self.announcements_due += 1

            def again() -> None:
                self.announcements_due -= 1
                self.announce_again(sorted(set(filters) & self.local_filters()), attempt + 1, refilled)

            core.effects.call_later(core.cfg.request_timeout, again)

        self.change_routes(codec.ROUTE_ADD, filters, done, refilled)
