"""The owner side: the route table of the shards this node owns, and every answer it gives about them.

Rules of this file:
- The route table holds, per shard, which nodes have subscribers for which filters. Route changes come as
  ROUTE_ADD/ROUTE_DEL from the node whose clients subscribed (``subscriptions``), and as relays from the source
  of a hand-off this node is filling.
- Fencing at the sink: a direct item is applied only if we hold the shard at the item's shard epoch (owner, or
  hand-off source still streaming it), or its shard epoch is newer than ours (the sender saw a flip we have not
  seen yet). An item at an older shard epoch is not applied: the ROUTE_ACK says so (``stale``) and the sender
  re-sends to the current owners. Relayed items come only from the source of a fill we hold
  (``HandoffTarget.may_forward``) and are applied whatever their shard epoch. A target that is itself the
  source of a later hand-off of the shard relays them on, when they changed its table. A direct change is not
  relayed to a target that owns the shard in our view: its sender, whose view is ours or newer (an older one
  is refused as stale), sent it the change directly.
- A relayed addition is acknowledged by each target, and the source confirms the addition to the subscriber's
  node only once every target filling the shard holds it: a relay queued on a connection that broke (a
  partition, a target's connection re-made) is gone, and a target that flips to owner without it would have
  lost a confirmed route. Unacknowledged, it is sent again (what the target still fills and we still hold) up
  to ``RELAY_ATTEMPTS`` times within half a ``request_timeout``. A relay that could not be delivered (given up,
  refused, or the target's fill ended first) is answered as stale for its shards: the subscriber's node re-reads
  the assignment and sends the addition to the current owners itself, which reaches a target that flipped in the
  meantime directly. A target that left fills nothing: nothing waits for it. Removals are relayed
  unacknowledged: a lost one leaves a route to a node that no longer wants the messages, which costs forwards,
  not messages.
- Routes are stored even while we are fenced: storing is not answering. If our lease survives we hold the
  route; if not, the survivors do. LOOKUPs are refused while fenced.
- A route change or a snapshot that names a member registration our view has not shown yet is deferred, with
  every later one, in arrival order, until the view shows it (or ``request_timeout`` passed). Each names the
  registrations it relies on as its sender saw them: ``member_rev`` (the create_revision of the route's node's
  member key; for a direct change that is the sender itself) and a snapshot's ``member_revs``. Otherwise the
  late view that drops the old registration's routes (a restart, a lost lease) would drop the new routes after
  they were confirmed or copied (found by the simulation, for relays and snapshots as well as direct changes).
  A node absent from our view counts as unseen when its registration is newer than every one our view shows
  (``view.registration_unseen``); one that is not newer had left when our view was read, and a snapshot's routes
  of nodes absent from our view are not taken.
- LOOKUP and LOOKUPS (many in one frame, answered by one LOOKUPS_REPLY) are answered item by item alike; a
  refused item gets its own ERROR. An item flagged ``head`` asks about the shard of the topic's first level only
  (not the topic's own shard): the answer says ``clear`` when no wildcard filter of the shard starts with that
  level (or with ``+``/``#``), so no topic under that first level has a match in this shard, and the entry node
  may cache that for all of them (same epoch, ticket, expiry and INVALIDATE rules as any answer).
- Answers are cached by entry nodes (``router.route_cache``). An owner records who asked (``LookupWatchers``)
  and, when a shard's routes change, sends them INVALIDATE; an added route is confirmed (ROUTE_ACK) only once
  every INVALIDATE still open for its shard was acknowledged or waited out (twice the cache ttl), so no entry
  node publishes from an answer without the route after the subscriber was told it is subscribed.
- Hand-offs: as source, the shard is snapshotted to the targets, then its changes streamed
  (``rebalance.handoff``); as target, snapshots fill the table and HANDOFF_READY goes to the coordinator.
- A shard filled from nobody (``view.filled_from_nobody``, the rule the subscribers' nodes re-add their routes
  by) starts with no routes: while *refilling* (``refilling``) its LOOKUP/LOOKUPS items are refused
  ``unavailable`` (the entry node asks the next owner, then fails the publish), and our own entry side does not
  answer from it either. It waits for every other member in our view when the assignment arrived to report its
  routes there complete (ROUTE_ADD ``refilled``, sent after those routes on the same connection, so the report is
  applied after the routes it covers); a member that leaves the view (or registers again) is dropped from the
  wait (its routes went with it); one that joined later held no routes there. A report at a shard epoch our view
  has not reached is kept (``early_reports``) until it does. After ``request_timeout`` the shard answers anyway
  (``shard_refill_timed_out``, ``routes.refill_timeouts``): a member whose view disagrees, or a lost frame, does
  not keep it unavailable. A refilling shard is no hand-off source (HANDOFF refused ``unavailable``, the
  coordinator plans it again): a copy of an incomplete table would hand the gap on to a target that waits for
  nobody.
- A shard we no longer own is dropped from the table only once nothing needs it: no fill, no stream, the
  flip's grace over. Its retained messages (``retained``, a ``RetainedTable`` beside the route table; written
  by ``protocol.retained``) go with it: the SNAPSHOT carries them after its routes (chunks bounded by count and
  by ``max_payload`` bytes, the payloads in the frame's payload part), and ``release`` drops them too. A retained
  change applied during the stream reaches the targets from the primary, or from the source when the source is
  a replica (``retained``), as route changes do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress
from operator import is_not
from typing import TYPE_CHECKING, Any

import orjson

from shardmq.rebalance.handoff import HandoffSource, HandoffTarget
from shardmq.ring import Assignment
from shardmq.router import codec
from shardmq.router.codec import Frame
from shardmq.router.retained_table import RetainedMessage, RetainedTable
from shardmq.router.route_cache import LookupWatchers
from shardmq.router.routes import RouteTable
from shardmq.router.shared import member_node
from shardmq.router.topics import first_level

from .records import Invalidation, Relay, gate
from .view import ROOT

if TYPE_CHECKING:
    from .node import NodeCore

_CHANGED: dict[tuple[int, int], tuple[Assignment, Assignment, list[int]]] = {}  # oldest first
_CHANGED_MAX = 64


def epochs_changed(old: Assignment, new: Assignment) -> list[int]:
    """Shards whose epoch differs between two documents, computed once per pair (the nodes of a simulated
    cluster share their documents; a walk over 16,384 shards per node per commit dominated its run time)."""
    key = (id(old), id(new))
    found = _CHANGED.get(key)
    if found is None or found[0] is not old or found[1] is not new:
        a, b = old.states, new.states
        if len(a) != len(b):
            raise ValueError(f"cannot compare assignments of {len(a)} and {len(b)} shards")
        # with_states keeps the state objects of unchanged shards, so between a document and one derived from it
        # only the changed shards need a look; the identity test runs in C.
        maybe = compress(range(len(a)), map(is_not, a, b))
        changed = [s for s in maybe if a[s].epoch != b[s].epoch]
        # Nodes that read views at different times compare different pairs: keep the last few, not one.
        _CHANGED.pop(key, None)
        while len(_CHANGED) >= _CHANGED_MAX:
            del _CHANGED[next(iter(_CHANGED))]
        found = _CHANGED[key] = (old, new, changed)
    return found[2]


# How long an owner waits for INVALIDATE_ACKs, in route-cache ttls: more than one, so that an entry node the
# INVALIDATE does not reach has dropped the answer on its own before the route is confirmed without it.
INVALIDATE_WAIT = 2
RELAY_ATTEMPTS = 3  # sends of a relayed addition after the first, before it is given up (see _relay_due)


@dataclass(slots=True)
class Refill:
    """A shard we own that was filled from nobody, waiting for the members' reports (see the rules)."""

    shard_epoch: int  # the shard's epoch when it was filled: reports for it or later count
    waiting: set[str]  # members that have not reported yet


class OwnerSide:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.routes = RouteTable()
        self.retained = RetainedTable()  # shard -> retained messages (see ``protocol.retained``)
        self.lookup_watchers = LookupWatchers()
        self.invalidating: dict[int, set[int]] = {}  # shard -> INVALIDATEs not yet acknowledged for it
        # Route changes from peers registered more recently than our view of them shows, waiting (see the rules).
        self.deferred_route_changes: deque[tuple[float, str, Frame]] = deque()
        self.source = HandoffSource()
        self.target = HandoffTarget()
        self.refilling: dict[int, Refill] = {}  # shards filled from nobody whose routes are not complete yet
        # Reports for a shard epoch our view has not shown yet: (shard, shard epoch) -> members that reported.
        self.early_reports: dict[tuple[int, int], set[str]] = {}

    # ------------------------------------------------------------------ route changes
    def on_route_change(self, sender: str, frame: Frame) -> None:
        if self._defer(sender, frame):
            return
        self.change_routes_now(sender, frame)

    def _unseen(self, frame: Frame) -> bool:
        """The frame names a member registration our view has not shown yet (see the rules)."""
        h = frame.header
        unseen = self.core.view.registration_unseen
        if frame.type == codec.SNAPSHOT:
            revs = h.get("member_revs")
            return isinstance(revs, dict) and any(unseen(node, rev) for node, rev in revs.items())
        return unseen(h["node"], h.get("member_rev"))

    def _defer(self, sender: str, frame: Frame) -> bool:
        """Keep a route change or snapshot that names a registration our view has not shown yet (and anything
        after one, in arrival order) until the view shows it; True when deferred."""
        core = self.core
        if not self.deferred_route_changes and not self._unseen(frame):
            return False
        self.deferred_route_changes.append((core.now, sender, frame))
        core.metrics["routes.deferred_for_view"] += 1
        core.effects.poll_view()
        if len(self.deferred_route_changes) == 1:
            core.effects.call_later(core.cfg.request_timeout, self.replay_route_changes)
        return True

    def replay_route_changes(self) -> None:
        """Apply deferred route changes whose sender's view we now have (or that waited request_timeout)."""
        core = self.core
        deferred = self.deferred_route_changes
        oldest_allowed = core.now - core.cfg.request_timeout
        while deferred and (not self._unseen(deferred[0][2]) or deferred[0][0] <= oldest_allowed):
            _, sender, frame = deferred.popleft()
            if sender in core.view.members:
                if frame.type == codec.SNAPSHOT:
                    self.take_snapshot(sender, frame)
                else:
                    self.change_routes_now(sender, frame)
        if deferred:
            core.effects.call_later(min(1.0, core.cfg.request_timeout), self.replay_route_changes)

    def change_routes_now(self, sender: str, frame: Frame) -> None:
        core = self.core
        h = frame.header
        forwarded = bool(h.get("fwd"))
        if not core.view.shards_ok(item[0] for item in h["routes"]):
            core.refuse_peer(sender, frame, codec.E_BAD_HEADER, "a route names a shard outside this cluster")
            return
        if forwarded:
            if not all(self.target.may_forward(item[0], sender) for item in h["routes"]):
                core.refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} is not handing these shards to us")
                return
        elif h["node"] != sender:
            core.refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} may only change its own routes")
            return
        stale, relay_id = self.apply_route_items(frame.type, h["node"], h["routes"], forwarded)
        if "refilled" in h and not forwarded:  # after the routes it covers (see the rules)
            self.refill_reported(sender, h["refilled"])
        shards = {item[0] for item in h["routes"]}
        if not h["id"] or frame.type != codec.ROUTE_ADD:  # a relayed removal waits for nothing
            self.invalidate_caches(shards)
            if h["id"]:
                core.effects.send_peer(sender, codec.encode(codec.ROUTE_ACK, {"id": h["id"], "stale": stale}))
            return

        def confirm(relay_failed: list[int]) -> None:
            # Shards whose relay failed are stale to the sender: it sends to the current owners itself.
            answer = stale + [[shard, core.view.shard_epoch(shard)] for shard in relay_failed]
            core.effects.send_peer(sender, codec.encode(codec.ROUTE_ACK, {"id": h["id"], "stale": answer}))

        if not self.confirm_when_safe(shards, relay_id, confirm):
            confirm([])

    def confirm_when_safe(
        self, shards: Iterable[int], relay_id: int | None, then: Callable[[list[int]], None]
    ) -> bool:
        """Run ``then`` (confirming added routes) once no entry node can still publish from an answer without them
        and every hand-off target they were relayed to (``relay_id``) answered; it gets the shards whose relay
        failed. True when there is something to wait for."""
        relay = self.core.requests.get(relay_id) if relay_id is not None else None
        if not isinstance(relay, Relay):
            return self.invalidate_caches(shards, lambda: then([]))
        done = gate(2, lambda _failures: then(sorted(relay.failed)))
        relay.callbacks.append(done)
        if not self.invalidate_caches(shards, lambda: done([])):
            done([])
        return True

    def apply_route_items(
        self, kind: bytes, node: str, items: list[list[Any]], forwarded: bool
    ) -> tuple[list[list[int]], int | None]:
        """Apply route changes for ``node`` (fencing at the sink, see the rules); returns [shard, our shard
        epoch] for the items sent with an older one, and the request id of the additions relayed to hand-off
        targets (None if none)."""
        core = self.core
        change = self.routes.add if kind == codec.ROUTE_ADD else self.routes.remove
        a = core.view.assignment
        me = core.me
        stale: list[list[int]] = []
        relay: dict[str, list[list[Any]]] = {}
        newer_shards: set[int] = set()
        for item in items:
            shard, shard_epoch, filt = item
            if shard == ROOT:
                change(ROOT, filt, node)
                continue
            ours = a.epoch(shard) if a is not None else 0
            holds = a is not None and (me in a.owners(shard) or shard in self.source)
            if forwarded or shard_epoch > ours or (shard_epoch == ours and holds):
                changed = change(shard, filt, node)
                targets = self.source.relay_targets(shard)
                # A relayed change goes on to the targets of our own stream too (a target that is itself handing
                # the shard on): only if it changed our table, so relays between two streams cannot circle.
                if targets and (changed or not forwarded):
                    # A target that owns the shard in our view already got a direct change from its sender,
                    # whose view is ours or newer (an older one was refused above as stale). A relayed change
                    # was sent by a node with an older view: it goes on to every target.
                    owners = a.owners(shard) if a is not None and not forwarded else ()
                    for target in targets:
                        if target not in owners:
                            relay.setdefault(target, []).append(item)
            else:
                stale.append([shard, ours])
            if shard_epoch > ours:
                newer_shards.add(shard)
        relay_id = self._relay(kind, node, relay) if relay else None
        if newer_shards:
            core.effects.poll_view()
            # The owners changed and we have not seen how: entry nodes may cache answers of an owner that is gone.
            self.watch_everywhere(newer_shards)
        if stale:
            core.metrics["fencing.stale_route_items"] += len(stale)
        return stale, relay_id

    # ------------------------------------------------------------------ relays to hand-off targets
    def _relay(self, kind: bytes, node: str, relay: dict[str, list[list[Any]]]) -> int | None:
        """Send route changes to the targets filling their shards. Additions wait for every target's ROUTE_ACK
        (see the rules); removals go unacknowledged. Returns the additions' request id."""
        core = self.core
        member = core.view.members.get(node)
        header: dict[str, Any] = {"id": 0, "node": node, "fwd": True, "member_rev": member.revision if member else 0}
        for routes in relay.values():
            core.metrics["handoff.changes_forwarded"] += len(routes)
        if kind != codec.ROUTE_ADD:
            for target, routes in relay.items():
                core.effects.send_peer(target, codec.encode(kind, {**header, "routes": routes}))
            return None
        record = Relay(set(relay), header, relay)
        rid = header["id"] = core.requests.open(record, self)
        for target, routes in relay.items():
            if not core.effects.send_peer(target, codec.encode(kind, {**header, "routes": routes})):
                self._settle_relay(rid, target)  # not a member: it fills nothing any more
        if rid in core.requests:
            core.effects.call_later(self._relay_interval(), lambda: self._relay_due(rid))
        return rid if rid in core.requests else None

    def _relay_interval(self) -> float:
        # Every attempt and the last wait fit in half a request_timeout: the subscriber's node, which waits one,
        # has the other half to send a failed relay's routes to the current owners.
        return self.core.cfg.request_timeout / (2 * (RELAY_ATTEMPTS + 1))

    def _relay_due(self, rid: int) -> None:
        """A relay still unacknowledged: send it again to the targets that still fill its shards (a frame queued
        on a connection that broke is gone), or give up after ``RELAY_ATTEMPTS``."""
        core = self.core
        record = core.requests.get(rid)
        if not isinstance(record, Relay):
            return
        if record.attempt >= RELAY_ATTEMPTS:
            core.metrics["handoff.relay_timeouts"] += 1
            core.log.warning("relay_timeout", targets=sorted(record.pending), node_of_routes=record.header["node"])
            for target in sorted(record.pending):
                self._settle_relay(rid, target, failed=True)
            return
        record.attempt += 1
        node = record.header["node"]
        for target in sorted(record.pending):
            sent = record.sent[target]
            if any(target not in (self.source.relay_targets(item[0]) or ()) for item in sent):
                # Its fill ended (the flip's grace is over, or the move was abandoned) before it answered: it may
                # own the shard without the routes, so the subscriber's node must send them to the owners itself.
                self._settle_relay(rid, target, failed=True)
                continue
            # Only what we still hold: a removal relayed since must not be undone.
            routes = [item for item in sent if self.routes.has(item[0], item[2], node)]
            if not routes:
                self._settle_relay(rid, target)
                continue
            core.metrics["handoff.relays_resent"] += 1
            if not core.effects.send_peer(target, codec.encode(codec.ROUTE_ADD, {**record.header, "routes": routes})):
                self._settle_relay(rid, target)
        if rid in core.requests:
            core.effects.call_later(self._relay_interval(), lambda: self._relay_due(rid))

    def on_relay_ack(self, sender: str, rid: int) -> None:
        self._settle_relay(rid, sender)

    def _settle_relay(self, rid: int, node: str, failed: bool = False) -> None:
        record = self.core.requests.get(rid)
        if isinstance(record, Relay) and node in record.pending:
            record.pending.discard(node)
            if failed:
                record.failed.update(item[0] for item in record.sent[node])
            if not record.pending:
                self._finish_relay(rid)

    def _finish_relay(self, rid: int) -> None:
        record = self.core.requests.close(rid)
        for callback in record.callbacks:
            callback([])

    # ------------------------------------------------------------------ cached answers
    def watch_everywhere(self, shards: Iterable[int]) -> None:
        """Count every member as caching answers for ``shards``: the owner that answered their lookups is gone
        (it died, or our view lags), and with it the record of who caches them, so the next route change in
        these shards invalidates every entry node before it is confirmed."""
        core = self.core
        nodes = [n for n in core.view.members if n != core.me]
        for shard in shards:
            for node in nodes:
                self.lookup_watchers.watch(shard, node)

    def invalidate_caches(self, shards: Iterable[int], then: Callable[[], None] | None = None) -> bool:
        """Tell the entry nodes caching answers for ``shards`` to drop them (see router.route_cache).

        With ``then`` (an added route), it runs once every INVALIDATE still unacknowledged for these shards is,
        this one's and earlier ones' alike (an earlier one took the watches, and until it is acknowledged an
        entry node may still hold an answer without the new route); True is returned when there is something to
        wait for.
        """
        core = self.core
        shards = set(shards)
        shards.discard(ROOT)
        told = self.lookup_watchers.take(shards)
        if told:
            inv = Invalidation(set(told), sorted({s for ss in told.values() for s in ss}))
            iid = core.requests.open(inv, self)
            for node, told_shards in told.items():
                core.metrics["route_cache.invalidations_out"] += 1
                # Unsent: it waits out the timeout like one that was lost.
                core.effects.send_peer(node, codec.encode(codec.INVALIDATE, {"id": iid, "shards": told_shards}))
            for shard in inv.shards:
                self.invalidating.setdefault(shard, set()).add(iid)
            # Bound now: ``iid`` names other invalidations below (a late-bound closure expired the wrong one and
            # left this one waiting for ever; found by the simulation).
            core.effects.call_later(INVALIDATE_WAIT * core.cfg.route_cache_ttl,
                                    lambda iid=iid: self._expire_invalidation(iid))  # fmt: skip
        if then is None:
            return False
        waits = {waiting for shard in shards for waiting in self.invalidating.get(shard, ())}
        if not waits:
            return False
        done = gate(len(waits), lambda _failures: then())
        for waiting in waits:
            core.requests.get(waiting).callbacks.append(done)
        return True

    def settle_invalidation(self, iid: int, node: str) -> None:
        inv = self.core.requests.get(iid)
        if isinstance(inv, Invalidation):
            inv.pending.discard(node)
            if not inv.pending:
                self._finish_invalidation(iid)

    def _finish_invalidation(self, iid: int) -> None:
        inv = self.core.requests.close(iid)
        for shard in inv.shards:
            waiting = self.invalidating.get(shard)
            if waiting is not None:
                waiting.discard(iid)
                if not waiting:
                    del self.invalidating[shard]
        for callback in inv.callbacks:
            callback([])

    def _expire_invalidation(self, iid: int) -> None:
        inv = self.core.requests.get(iid)
        if inv is not None:  # its answers expired at the entry nodes that did not acknowledge (see route_cache)
            self.core.metrics["route_cache.invalidate_timeouts"] += 1
            self.core.log.warning("invalidate_timeout", nodes=sorted(inv.pending))
            self._finish_invalidation(iid)

    # A target that refused a relay may own the shard without the routes (see the rules); one that left fills
    # nothing and will own nothing.
    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None:
        if isinstance(request, Relay):
            self._settle_relay(rid, sender, failed=True)
        else:
            self.settle_invalidation(rid, sender)

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None:
        if isinstance(request, Relay):
            self._settle_relay(rid, node)
        else:
            self.settle_invalidation(rid, node)

    def on_invalidate_ack(self, sender: str, frame: Frame) -> None:
        self.settle_invalidation(frame.header["id"], sender)

    # ------------------------------------------------------------------ shards filled from nobody
    def begin_refills(self, orphaned: Iterable[int]) -> None:
        """After a new assignment: shards of it filled from nobody (``view.filled_from_nobody``) that we own answer
        no lookup until every other member reported its routes there complete (see the rules). Reports that came
        ahead of our view count now."""
        core = self.core
        a = core.view.assignment
        assert a is not None
        others: set[str] | None = None  # built only when needed: this runs at every assignment
        for shard in orphaned:
            if core.me not in a.owners(shard):
                continue
            if others is None:
                others = {n for n in core.view.members if n != core.me}
            shard_epoch = a.epoch(shard)
            refill = self.refilling[shard] = Refill(shard_epoch, set(others))
            core.metrics["routes.refills"] += 1
            core.log.warning("shard_refilling", shard=shard, shard_epoch=shard_epoch, members=len(refill.waiting))
            core.effects.call_later(core.cfg.request_timeout, lambda s=shard, r=refill: self._refill_due(s, r))
        early = [k for k in self.early_reports if k[1] <= a.epoch(k[0])]
        for key in early:
            for sender in self.early_reports.pop(key):
                self.refill_reported(sender, [list(key)])
        for shard in [s for s in orphaned if s in self.refilling and not self.refilling[s].waiting]:
            self._end_refill(shard)  # every other member reported ahead of our view, or there is none

    def refill_reported(self, sender: str, reports: list[list[int]]) -> None:
        """``sender``'s routes in these [shard, shard epoch] are complete (it applied them just before)."""
        for shard, shard_epoch in reports:
            refill = self.refilling.get(shard)
            ours = self.core.view.shard_epoch(shard)
            if shard_epoch > ours:  # its view is ahead of ours: counted when ours gets there
                self.early_reports.setdefault((shard, shard_epoch), set()).add(sender)
            elif refill is not None and shard_epoch >= refill.shard_epoch:
                refill.waiting.discard(sender)
                if not refill.waiting:
                    self._end_refill(shard)

    def refill_member_gone(self, node: str) -> None:
        """A member left the view (or registered again): its routes here went with it, so it owes no report."""
        for shard in [s for s, r in self.refilling.items() if node in r.waiting]:
            self.refilling[shard].waiting.discard(node)
            if not self.refilling[shard].waiting:
                self._end_refill(shard)

    def _end_refill(self, shard: int) -> None:
        del self.refilling[shard]
        self.core.log.info("shard_refilled", shard=shard, shard_epoch=self.core.view.shard_epoch(shard))

    def _refill_due(self, shard: int, refill: Refill) -> None:
        """Reports did not all come within ``request_timeout`` (a member whose view disagrees, a lost frame): answer
        from what we have rather than keep the shard unavailable."""
        if self.refilling.get(shard) is not refill:
            return
        core = self.core
        core.metrics["routes.refill_timeouts"] += 1
        core.log.warning("shard_refill_timed_out", shard=shard, shard_epoch=core.view.shard_epoch(shard),
                         missing=sorted(refill.waiting))  # fmt: skip
        del self.refilling[shard]

    # ------------------------------------------------------------------ lookups
    def on_lookup(self, sender: str, frame: Frame) -> None:
        h = frame.header
        answer = self._answer_lookup(sender, h["id"], h["shard"], h["shard_epoch"], h["topic"], h.get("head") is True)
        if answer is not None:
            reply = {"id": h["id"], "shard": h["shard"], "shard_epoch": answer[1], "nodes": answer[2]}
            if answer[3]:
                reply["clear"] = True
            self.core.effects.send_peer(sender, codec.encode(codec.LOOKUP_REPLY, reply))

    def on_lookups(self, sender: str, frame: Frame) -> None:
        """Many LOOKUPs in one frame: one LOOKUPS_REPLY with the answered ones, an ERROR for each refused one."""
        core = self.core
        items = frame.header["items"]
        answers = []
        shards = [item[1] for item in items]
        if core.fenced() or not core.view.shards_ok(shards) or ROOT in shards:
            for lid, shard, shard_epoch, topic, head in items:  # each refused, or answered, as a LOOKUP would be
                answer = self._answer_lookup(sender, lid, shard, shard_epoch, topic, head == 1)
                if answer is not None:
                    answers.append(answer)
        else:  # the same checks as _answer_lookup, those that hold for the whole frame made once
            epoch_of, match, wild_under = core.view.shard_epoch, self.routes.match, self.routes.wild_under
            watched: set[int] = set()
            refilling = self.refilling
            for lid, shard, shard_epoch, topic, head in items:
                ours = epoch_of(shard)
                if shard_epoch != ours or shard in refilling:
                    answer = self._answer_lookup(sender, lid, shard, shard_epoch, topic, head == 1)
                    if answer is not None:
                        answers.append(answer)
                    continue
                if shard not in watched:
                    watched.add(shard)
                    self.lookup_watchers.watch(shard, sender)
                nodes = match(shard, topic)
                clear = 1 if head and not wild_under(shard, topic.partition("/")[0]) else 0
                answers.append([lid, ours, sorted(nodes) if len(nodes) > 1 else list(nodes), clear])
        if answers:
            self.core.effects.send_peer(sender, codec.encode(codec.LOOKUPS_REPLY, {"items": answers}))

    def _answer_lookup(
        self, sender: str, lid: int, shard: int, shard_epoch: int, topic: str, head: bool
    ) -> list[Any] | None:
        """[id, our shard epoch, nodes, clear] for one lookup, or None when refused (the ERROR is sent)."""
        core = self.core
        if core.fenced():
            core.refuse_request(sender, lid, codec.E_FENCED, f"{core.me} cannot renew its etcd lease", shard=shard)
            return None
        if shard == ROOT or not core.view.shards_ok([shard]):  # the root set is on every node: never looked up
            core.refuse_request(sender, lid, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return None
        ours = core.view.shard_epoch(shard)
        if shard_epoch < ours:  # fence at the sink: the asker must learn the new owners first
            reason = f"shard {shard} is at shard epoch {ours}, not {shard_epoch}: re-read the assignment"
            core.refuse_request(sender, lid, codec.E_STALE_EPOCH, reason, shard=shard, current_shard_epoch=ours)
            return None
        if shard_epoch > ours:
            core.effects.poll_view()
        if shard in self.refilling:  # an answer now could miss a subscriber whose node has not reported yet
            reason = f"shard {shard} was filled from nobody and its routes are not all back yet: ask again"
            core.refuse_request(sender, lid, codec.E_UNAVAILABLE, reason, shard=shard)
            return None
        nodes = sorted(self.routes.match(shard, topic))
        self.lookup_watchers.watch(shard, sender)  # it may cache this answer: tell it when the shard's routes change
        clear = 1 if head and not self.routes.wild_under(shard, first_level(topic)) else 0
        return [lid, ours, nodes, clear]

    # ------------------------------------------------------------------ assignment changes
    def on_assignment(self, old: Assignment | None, new: Assignment) -> list[int]:
        """The assignment changed: end fills that flipped, invalidate answers of flipped shards, schedule the
        release of shards we lost and the end of streams whose shard flipped. Returns the shards whose epoch
        changed."""
        core = self.core
        me = core.me
        grace = core.cfg.handoff_grace
        mine = set(new.shards_of(me))
        for shard in mine:
            source = self.target.flipped(shard)
            if source is not None:
                # The fill flipped: the source keeps forwarding until it sees the flip plus its grace period.
                core.effects.call_later(2 * grace, lambda s=shard, src=source: self.target.forget_source(s, src))
        if old is None:
            return []
        changed = epochs_changed(old, new)
        self.invalidate_caches(changed)
        for shard in [s for s in self.refilling if s not in mine]:
            del self.refilling[shard]  # we answer for it no more
        # An owner that left took with it the record of who caches its answers (a promotion): every entry node
        # may, and the next route change in such a shard invalidates them all.
        members = core.view.members
        promoted = [s for s in changed if s in mine and any(o not in members for o in old.owners(s))]
        if promoted:
            self.watch_everywhere(promoted)
        for shard in set(old.shards_of(me)) - mine:
            core.effects.call_later(grace, lambda shard=shard: self.release(shard))
        for shard, shard_epoch in self.source.flipped(new.epoch):
            # Flipped: stale senders have a grace period to catch up.
            core.effects.call_later(grace, lambda s=shard, e=shard_epoch: self._stop_stream(s, e))
        return changed

    def _stop_stream(self, shard: int, shard_epoch: int) -> None:
        if self.source.stop(shard, shard_epoch):
            self.release(shard)

    def release(self, shard: int) -> None:
        """Drop our copy of a shard we no longer own, once nothing (hand-off, grace) still needs it."""
        core = self.core
        a = core.view.assignment
        if a is None or core.me in a.owners(shard) or shard in self.target or shard in self.source:
            return
        dropped = self.routes.drop_shard(shard)
        retained = self.retained.drop_shard(shard)
        core.metrics["handoff.shards_released"] += 1
        core.log.info("shard_released", shard=shard, shard_epoch=a.epoch(shard), routes_dropped=dropped,
                      retained_dropped=retained)  # fmt: skip
        core.maybe_finish_leaving()

    # ------------------------------------------------------------------ hand-offs
    def on_handoff(self, sender: str, frame: Frame, reread: bool = True) -> None:
        """We are the source of a move: snapshot the shard to the new replicas, then stream its changes."""
        core = self.core
        h = frame.header
        shard, shard_epoch = h["shard"], h["shard_epoch"]
        if shard == ROOT or not core.view.shards_ok([shard]):  # the root set never moves (found by fuzzing)
            self._refuse_move(frame, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return
        if core.fenced():
            self._refuse_move(frame, codec.E_FENCED, f"{core.me} cannot renew its etcd lease")
            return
        a = core.view.assignment
        if reread and (a is None or a.epoch(shard) < shard_epoch):
            # The coordinator saw a newer assignment than ours: decide on a fresh read, not on our lagging view.
            core.refresh_assignment(lambda _ok: self.on_handoff(sender, frame, reread=False), force=True)
            return
        if a is None or a.epoch(shard) != shard_epoch or core.me not in a.owners(shard):
            reason = f"{core.me} does not own shard {shard} at shard epoch {shard_epoch}"
            self._refuse_move(frame, codec.E_STALE_EPOCH, reason)
            return
        if shard in self.refilling:
            # Our copy may still lack routes that members are adding again: it is no source. The coordinator plans
            # the move again at a later tick, once the refill ended.
            self._refuse_move(frame, codec.E_UNAVAILABLE, f"shard {shard} is being refilled on {core.me}")
            return
        targets = [t for t in h["targets"] if t != core.me]
        unknown = [t for t in targets if t not in core.view.members]
        if unknown:
            # Our view has not caught up with a target that (re)joined: a snapshot sent now would be dropped and
            # the move would wait out handoff_timeout. Refused, the coordinator plans it again at its next tick.
            self._refuse_move(frame, codec.E_UNAVAILABLE, f"{core.me} does not know {unknown} as members yet")
            core.effects.poll_view()
            return
        move_id = h["id"]
        self.source.begin(shard, shard_epoch, move_id, targets)
        # A move the coordinator abandons never flips: stop streaming to its targets after the timeout.
        core.effects.call_later(
            core.cfg.handoff_timeout + core.cfg.handoff_grace,
            lambda: self._stop_abandoned(shard, shard_epoch, move_id),
        )
        routes = [[filt, list(nodes)] for filt, nodes in self.routes.shard_routes(shard)]
        retained = self.retained.shard_items(shard)
        members = core.view.members
        size = 0
        chunks: list[tuple[list[list[Any]], list[tuple[str, RetainedMessage]]]] = [
            (chunk, []) for chunk, _ in self.source.snapshot_chunks(routes, core.cfg.snapshot_chunk)
        ]
        if retained:
            chunks += [([], part) for part in self._retained_chunks(retained)]
        for i, (chunk, part) in enumerate(chunks):
            named = {member_node(m) for _, nodes in chunk for m in nodes}  # a slot route names its node too
            header = {
                "id": move_id, "shard": shard, "shard_epoch": shard_epoch, "routes": chunk,
                "last": i == len(chunks) - 1, "coordinator": h["coordinator"],
                "member_revs": {node: members[node].revision for node in sorted(named) if node in members},
            }  # fmt: skip
            payload = b""
            if part:
                header["retained"] = [[topic, m.qos, *m.stamp] for topic, m in part]
                header["retained_sizes"] = [len(m.payload) for _, m in part]
                payload = b"".join(m.payload for _, m in part)
            for target in targets:
                parts = codec.encode(codec.SNAPSHOT, header, payload)
                size += len(parts[1]) + len(payload)
                core.effects.send_peer(target, parts)
        core.metrics["handoff.snapshots_sent"] += len(targets)
        core.metrics["handoff.routes_sent"] += len(routes) * len(targets)
        core.metrics["handoff.retained_sent"] += len(retained) * len(targets)
        core.metrics["handoff.bytes_sent"] += size
        core.log.info("handoff_snapshot", shard=shard, shard_epoch=shard_epoch, targets=targets, routes=len(routes),
                      retained=len(retained), bytes=size)  # fmt: skip

    def _retained_chunks(
        self, retained: list[tuple[str, RetainedMessage]]
    ) -> list[list[tuple[str, RetainedMessage]]]:
        """Retained messages in SNAPSHOT chunks of at most ``snapshot_chunk`` messages and ``max_payload`` bytes."""
        cfg = self.core.cfg
        chunks: list[list[tuple[str, RetainedMessage]]] = [[]]
        size = 0
        for topic, m in retained:
            if chunks[-1] and (len(chunks[-1]) >= cfg.snapshot_chunk or size + len(m.payload) > cfg.max_payload):
                chunks.append([])
                size = 0
            chunks[-1].append((topic, m))
            size += len(m.payload)
        return chunks

    def _stop_abandoned(self, shard: int, shard_epoch: int, move_id: int) -> None:
        if self.source.stop_abandoned(shard, shard_epoch, move_id, self.core.view.shard_epoch(shard)):
            self.core.metrics["handoff.abandoned_streams"] += 1

    def on_snapshot(self, sender: str, frame: Frame) -> None:
        """We are a new replica: take the snapshot; when complete, tell the coordinator we are ready."""
        core = self.core
        h = frame.header
        shard, shard_epoch = h["shard"], h["shard_epoch"]
        if shard == ROOT or not core.view.shards_ok([shard]):  # the root set never moves (found by fuzzing)
            self._refuse_move(frame, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return
        ours = core.view.shard_epoch(shard)
        if core.view.assignment is not None and ours > shard_epoch:
            reason = f"snapshot of shard {shard} is for shard epoch {shard_epoch}, it is at {ours}"
            self._refuse_move(frame, codec.E_STALE_EPOCH, reason)
            return
        try:
            codec.split_retained(frame)  # checked before anything of it is applied (or deferred)
        except codec.ProtocolError as exc:
            core.metrics[f"errors.{exc.code}"] += 1
            self._refuse_move(frame, exc.code, exc.reason)
            return
        if not self._defer(sender, frame):
            self.take_snapshot(sender, frame)

    def take_snapshot(self, sender: str, frame: Frame) -> None:
        core = self.core
        h = frame.header
        shard, shard_epoch, move_id = h["shard"], h["shard_epoch"], h["id"]
        retained = codec.split_retained(frame)
        for topic, qos, epoch, seq, payload in retained:
            self.retained.set(shard, topic, RetainedMessage(payload, qos, (epoch, seq)))
        if retained:
            core.metrics["handoff.retained_received"] += len(retained)
            core.metrics["handoff.bytes_received"] += len(frame.payload)
        if self.target.take_snapshot(shard, move_id, sender):
            # Twice the coordinator's timeout: it may flip the move up to handoff_timeout after starting it, and
            # we must not give up on a fill that is about to become ours.
            core.effects.call_later(2 * core.cfg.handoff_timeout, lambda: self._abandon_fill(shard, move_id, sender))
        members = core.view.members
        for filt, nodes in h["routes"]:
            for node in nodes:
                # Not a member here: it left before our view was read (a newer registration was deferred above),
                # and the source's view lagged. Kept, the route would outlive the departure that drops such routes,
                # and entry nodes fail every QoS 1 publish it matches (``entry``).
                if member_node(node) in members:
                    self.routes.add(shard, filt, node)
        core.metrics["handoff.routes_received"] += len(h["routes"])
        core.metrics["handoff.bytes_received"] += len(orjson.dumps(h["routes"]))
        if h["last"]:
            ready = codec.encode(codec.HANDOFF_READY, {"id": move_id, "shard": shard, "shard_epoch": shard_epoch,
                                                       "node": core.me})  # fmt: skip
            # Once the copy is stored (``durable``): after the flip the source drops its own.
            core.durable.after(lambda: core.effects.send_peer(h["coordinator"], ready))

    def _abandon_fill(self, shard: int, move_id: int, source: str) -> None:
        if not self.target.still_filling(shard, move_id):
            return  # the move flipped, or a newer fill replaced it
        core = self.core

        def decide(ok: bool) -> None:
            if not ok:
                core.effects.call_later(core.cfg.handoff_grace, lambda: self._abandon_fill(shard, move_id, source))
            elif self.target.abandon(shard, move_id, source):  # the fresh view may have made us the owner
                self.release(shard)

        # Our view may not show the flip yet (it lags by a poll): decide on a fresh read, never on a stale one.
        core.refresh_assignment(decide, force=True)

    def _refuse_move(self, frame: Frame, code: str, reason: str) -> None:
        """Tell the coordinator (not whoever relayed the frame) that this move cannot proceed, by move id."""
        core = self.core
        h = frame.header
        core.metrics[f"fencing.refused.{code}"] += 1
        core.log.warning("move_refused", shard=h.get("shard"), code=code, reason=reason)
        extra = {"move_id": h.get("id"), "shard": h.get("shard")}
        if h.get("coordinator") == core.me and core.coordinator is not None:
            core.coordinator.on_refused(h["id"])
        elif isinstance(h.get("coordinator"), str):
            core.effects.send_peer(h["coordinator"], codec.error_parts(code, reason, None, **extra))
