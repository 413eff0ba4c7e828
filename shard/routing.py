"""Routes and publish: this node's routes at the shard owners, and each publish to the nodes with matching routes.

Rules of this file:
- Routes: a client's subscription lives only on its own node (``local_q0``/``local_q1``). When a filter gets its
  first local subscriber the node sends ROUTE_ADD(filter -> this node) to every owner of the filter's shard (to
  every member for root filters), and ROUTE_DEL when the last one leaves: reference counting per node.
- Fencing at the sink: an item is applied only if we hold the shard (owner, new replica being filled, or
  hand-off source in its grace period) or the sender has seen a newer epoch than we have. A stale sender is told
  so in the ROUTE_ACK and re-sends to the owners of the current epoch.
- Publish: the entry node asks the primary owner of each shard a topic can be stored in (at most two, see
  ``shardmq.router.partition``) which nodes have matching routes, adds its own root-set matches, then sends one
  FWD to each such node. Each destination matches the topic against its local subscribers once, so a client
  gets exactly one copy per publish. Publishes wait in a per-topic FIFO until their lookups finish, so the order
  of publishes to one topic is the order they are forwarded in. Answers are cached (``router.route_cache``) and
  refreshed ahead of their expiry while they are used.
- QoS 1: the publisher's PUBACK is sent after every destination answered FWD_ACK; destinations deliver QoS 1
  messages with a message id and redeliver until the client DACKs it or goes away. A destination whose
  recipient has no room left (``clients.py``: flow control) answers ERROR ``overloaded`` instead of FWD_ACK:
  the publish then fails instead of being acknowledged.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.partition import lookup_keys, placement_key

from .base import NodeBase
from .outbox import Delivery, Forward
from .state import ROOT, Invalidation, Lookup, Publish, Waiter, gate

# How long an owner waits for INVALIDATE_ACKs, in route-cache ttls: more than one, so that an entry node the
# INVALIDATE does not reach has dropped the answer on its own before the route is confirmed without it.
INVALIDATE_WAIT = 2
# A cached answer used after this share of its ttl is asked for again while it still serves (route_cache: refresh
# ahead): a hot topic keeps one hop and never waits behind an expired answer's new LOOKUP.
REFRESH_AFTER = 0.5


class RoutingMixin(NodeBase):
    if TYPE_CHECKING:  # from ClientsMixin

        def local_recipients(self, topic: str, qos: int) -> tuple[set[bytes], set[bytes]]: ...

        def deliver_local(
            self,
            topic: str,
            qos: int,
            payload: bytes,
            recipients: tuple[set[bytes], set[bytes]] | None = None,
        ) -> bool: ...

    if TYPE_CHECKING:  # from OwnershipMixin

        def fenced(self) -> bool: ...

        def _refresh_assignment(self, force: bool = False) -> bool: ...
    # ------------------------------------------------------------------ routes
    def _route_item(self, filt: str) -> list[Any]:
        """[shard, epoch, filter] for a filter: its shard (ROOT for the root set) and that shard's epoch."""
        assert self.assignment is not None
        key = placement_key(filt)
        if key is None:
            return [ROOT, 0, filt]
        shard = shard_for_key(key, self.assignment.shard_count)
        return [shard, self.assignment.epoch(shard), filt]

    def _targets(self, shard: int) -> tuple[str, ...]:
        assert self.assignment is not None
        return tuple(sorted(self.members)) if shard == ROOT else self.assignment.owners(shard)

    def _change_routes(self, kind: bytes, filters: list[str], on_done: Callable[[list[str]], None]) -> None:
        """Apply ROUTE_ADD/ROUTE_DEL for this node's filters at every owner; ``on_done`` once, when all confirmed."""
        if not filters or self.assignment is None:  # without an assignment no route was ever installed
            on_done([])
            return
        wid = self._send_route_items(kind, [self._route_item(f) for f in filters], on_done)
        if wid is not None and kind == codec.ROUTE_ADD:
            self.waiters[wid].filters = filters
            for filt in filters:
                self.route_add_waiters[filt] = wid

    def _send_route_items(
        self, kind: bytes, items: list[list[Any]], on_done: Callable[[list[str]], None], attempt: int = 0
    ) -> int | None:
        """Send items to the owners of their shards; returns the waiter id, or None when all was local."""
        by_node: dict[str, list[list[Any]]] = {}
        ownerless: list[str] = []
        for item in items:
            targets = self._targets(item[0])
            if not targets and item[0] != ROOT:
                # Every owner was lost (etcd lost every lease at once): nobody can hold the route, so it cannot be
                # confirmed; the owners the leader appoints next start empty (found by the simulation).
                ownerless.append(f"shard {item[0]} has no owner")
            for owner in targets:
                by_node.setdefault(owner, []).append(item)
        local = by_node.pop(self.me, None)
        wid = next(self.ids)
        waiter = Waiter(set(by_node), [on_done], kind, by_node, attempt, failures=sorted(set(ownerless)))
        if local:
            self._apply_route_items(kind, self.me, local, forwarded=False)
            # We own some of these shards: entry nodes caching their answers must drop them before we confirm.
            settle = (lambda: self._settle_waiter(wid, self.me)) if kind == codec.ROUTE_ADD else None
            if self._invalidate_caches((item[0] for item in local), settle):
                waiter.pending.add(self.me)
        if not waiter.pending:
            on_done(waiter.failures)
            return None
        self.waiters[wid] = waiter
        for node, routes in by_node.items():
            header = {
                "id": wid, "node": self.me, "epoch": self.epoch, "routes": routes, "member_rev": self.member_revision,
            }  # fmt: skip
            if not self.send_peer(node, codec.encode(kind, header)):
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        self.call_later(self.cfg.request_timeout, lambda: self._expire_waiter(wid))
        return wid

    def _apply_route_items(self, kind: bytes, node: str, items: list[list[Any]], forwarded: bool) -> list[list[int]]:
        """Apply route changes for ``node``; returns [shard, our epoch] for items sent with an older epoch.

        Fencing at the sink: a direct (not forwarded) item whose epoch is older than the newest we have seen for
        its shard is never applied; the sender is told so in the ROUTE_ACK and re-sends to the owners of the
        current epoch. An item at our epoch is applied if we hold the shard (owner, or hand-off source in its
        grace period); one with a newer epoch is applied (the sender knows of a flip we have not seen yet).
        Forwarded items come from the source of a hand-off we are receiving, and only from it (checked by the
        caller); they are applied whatever their epoch.
        """
        change = self.routes.add if kind == codec.ROUTE_ADD else self.routes.remove
        a = self.assignment
        stale: list[list[int]] = []
        relay: dict[str, list[list[Any]]] = {}
        newer = False
        newer_shards: set[int] = set()
        for item in items:
            shard, epoch, filt = item
            if shard == ROOT:
                change(ROOT, filt, node)
                continue
            ours = a.epoch(shard) if a is not None else 0
            holds = a is not None and (self.me in a.owners(shard) or shard in self.forwarding)
            if forwarded or epoch > ours or (epoch == ours and holds):
                change(shard, filt, node)
                fw = self.forwarding.get(shard)
                if fw is not None and not forwarded:
                    for target in fw.targets:
                        relay.setdefault(target, []).append(item)
            else:
                stale.append([shard, ours])
            if epoch > ours:
                newer = True
                newer_shards.add(shard)
        for target, routes in relay.items():
            self.metrics["handoff.changes_forwarded"] += len(routes)
            header = {"id": 0, "node": node, "epoch": self.epoch, "routes": routes, "fwd": True}
            self.send_peer(target, codec.encode(kind, header))
        if newer:
            self.session.poll_now()
            # The owners changed and we have not seen how: entry nodes may cache answers of an owner that is gone.
            self.watch_everywhere(newer_shards)
        if stale:
            self.metrics["fencing.stale_route_items"] += len(stale)
        return stale

    def watch_everywhere(self, shards: Iterable[int]) -> None:
        """Count every member as caching answers for ``shards``: the owner that answered their lookups is gone
        (it died, or our view lags), and with it the record of who caches them, so the next route change in
        these shards invalidates every entry node before it is confirmed."""
        nodes = [n for n in self.members if n != self.me]
        for shard in shards:
            for node in nodes:
                self.lookup_watchers.watch(shard, node)

    def _invalidate_caches(self, shards: Iterable[int], then: Callable[[], None] | None = None) -> bool:
        """Tell the entry nodes caching answers for ``shards`` to drop them (see router.route_cache).

        Every INVALIDATE is acknowledged. With ``then`` (an added route), it runs once every INVALIDATE still
        unacknowledged for these shards is, this one's and earlier ones' alike (an earlier one took the watches,
        and until it is acknowledged an entry node may still hold an answer without the new route); True is
        returned when there is something to wait for.
        """
        shards = {s for s in shards if s != ROOT}
        told = self.lookup_watchers.take(shards)
        if told:
            iid = next(self.ids)
            for node, told_shards in told.items():
                self.metrics["route_cache.invalidations_out"] += 1
                header = {"id": iid, "epoch": self.epoch, "shards": told_shards}
                self.send_peer(node, codec.encode(codec.INVALIDATE, header))  # unsent: waits out the timeout too
            inv = self.invalidations[iid] = Invalidation(set(told), sorted({s for ss in told.values() for s in ss}))
            for shard in inv.shards:
                self.invalidating.setdefault(shard, set()).add(iid)
            wait = INVALIDATE_WAIT * self.cfg.route_cache_ttl
            self.call_later(wait, lambda: self._expire_invalidation(iid))
        if then is None:
            return False
        waits = {iid for shard in shards for iid in self.invalidating.get(shard, ())}
        if not waits:
            return False
        done = gate(len(waits), lambda _failures: then())
        for iid in waits:
            self.invalidations[iid].callbacks.append(done)
        return True

    def _settle_invalidation(self, iid: int, node: str) -> None:
        inv = self.invalidations.get(iid)
        if inv is not None:
            inv.pending.discard(node)
            if not inv.pending:
                self._finish_invalidation(iid)

    def _finish_invalidation(self, iid: int) -> None:
        inv = self.invalidations.pop(iid)
        for shard in inv.shards:
            waiting = self.invalidating.get(shard)
            if waiting is not None:
                waiting.discard(iid)
                if not waiting:
                    del self.invalidating[shard]
        for callback in inv.callbacks:
            callback([])

    def _expire_invalidation(self, iid: int) -> None:
        inv = self.invalidations.get(iid)
        if inv is not None:  # its answers expired at the entry nodes that did not acknowledge (see route_cache)
            self.metrics["route_cache.invalidate_timeouts"] += 1
            self.log.warning("invalidate_timeout", nodes=sorted(inv.pending), epoch=self.epoch)
            self._finish_invalidation(iid)

    def _settle_waiter(self, wid: int, node: str) -> None:
        waiter = self.waiters.get(wid)
        if waiter is None:
            return
        waiter.pending.discard(node)
        if not waiter.pending:
            self._finish_waiter(wid)

    def _expire_waiter(self, wid: int) -> None:
        waiter = self.waiters.get(wid)
        if waiter is not None:
            self.metrics["errors.route_timeout"] += 1
            waiter.failures.append("timeout")
            self._finish_waiter(wid)

    def _retry_stale(self, wid: int, sender: str, stale: list[list[int]]) -> bool:
        """An owner said our epoch for some shards is old: re-send those items to the current owners."""
        waiter = self.waiters.get(wid)
        if waiter is None or waiter.attempt >= 3:
            return False
        self._refresh_assignment()
        shards = {s for s, _ in stale}
        retry = [self._route_item(f) for s, _, f in waiter.sent.get(sender, []) if s in shards]
        if not retry:
            return False
        self.metrics["fencing.route_retries"] += 1

        def done(failures: list[str]) -> None:
            if wid in self.waiters:
                self.waiters[wid].failures.extend(failures)
            self._settle_waiter(wid, sender)

        self._send_route_items(waiter.kind, retry, done, waiter.attempt + 1)
        return True

    def _finish_waiter(self, wid: int) -> None:
        waiter = self.waiters.pop(wid)
        for filt in waiter.filters:
            if self.route_add_waiters.get(filt) == wid:
                del self.route_add_waiters[filt]
        for callback in waiter.callbacks:
            callback(waiter.failures)

    # ------------------------------------------------------------------ publish
    def publish(self, pub: Publish) -> None:
        a = self.assignment
        if a is None:
            self._fail_publish(pub, codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry shortly")
            return
        pub.dests |= self.routes.match(ROOT, pub.topic)
        for shard in {shard_for_key(key, a.shard_count) for key in lookup_keys(pub.topic)}:
            self._lookup(pub, shard, [])
        queue = self.topic_queues.get(pub.topic)
        if queue is None:
            if pub.lookups_left == 0:  # answered here (owned, cached, or failed at once): nothing to wait behind
                if not pub.failed:
                    self.forward(pub)
                return
            queue = self.topic_queues[pub.topic] = deque()
        queue.append(pub)
        self.queued_publishes += 1
        self._dispatch(pub.topic)

    def _lookup(self, pub: Publish, shard: int, tried: list[str], group: list[Publish] | None = None) -> None:
        """Find the nodes with routes matching ``pub.topic`` in ``shard``: locally if we own it, from the route
        cache, from a LOOKUP already on its way for the same topic and shard, or else by asking an owner (the
        primary first, then the replicas in order, skipping those that already failed). ``group``: publishes to
        the same topic that share a retried lookup (``pub`` is one of them)."""
        a = self.assignment
        assert a is not None
        pubs = group or [pub]
        if not tried:
            owners = a.owners(shard)
            if owners and owners[0] == self.me:
                pub.dests |= self.routes.match(shard, pub.topic)
                return
        epoch = a.epoch(shard)
        if not tried:
            now = time.monotonic()
            cached = self.route_cache.get(pub.topic, shard, epoch, now)
            if cached is not None:
                pub.dests.update(cached)
                if self.route_cache.claim_refresh(pub.topic, shard, epoch, now):
                    self._refresh_lookup(pub.topic, shard, epoch)
                return
            lid = self.lookups_in_flight.get((pub.topic, shard))
            if lid is not None:  # a burst to one topic: every publish waits for the one answer
                self.pending_lookups[lid].pubs.append(pub)
                pub.lookups_left += 1
                return
        candidates = [n for n in a.owners(shard) if n not in tried and n in self.members]
        if not candidates or len(tried) > 3:
            for p in pubs:
                self._fail_publish(p, codec.E_UNAVAILABLE, f"no owner of shard {shard} answered ({tried})", shard)
            return
        owner = candidates[0]
        if owner == self.me:
            nodes = self.routes.match(shard, pub.topic)
            for p in pubs:
                p.dests |= nodes
            return
        for p in pubs:
            p.asked_remote = True
            p.lookups_left += 1
        self._send_lookup(Lookup(pubs, pub.topic, shard, owner, [*tried, owner], epoch))

    def _refresh_lookup(self, topic: str, shard: int, epoch: int) -> None:
        """Ask the shard's primary again for a cached answer that still serves (route_cache: refresh ahead);
        publishes that miss meanwhile wait for this LOOKUP rather than send their own."""
        assert self.assignment is not None
        owner = (self.assignment.owners(shard) or [self.me])[0]
        if owner != self.me and owner in self.members and (topic, shard) not in self.lookups_in_flight:
            self.metrics["route_cache.refreshes"] += 1
            self._send_lookup(Lookup([], topic, shard, owner, [owner], epoch))

    def _send_lookup(self, lookup: Lookup) -> None:
        lid = next(self.ids)
        lookup.ticket, lookup.sent_at = self.route_cache.ticket(lookup.shard), time.monotonic()
        self.pending_lookups[lid] = lookup
        self.lookups_in_flight[(lookup.topic, lookup.shard)] = lid
        header = {"id": lid, "shard": lookup.shard, "epoch": lookup.epoch, "topic": lookup.topic}
        owner = lookup.owner
        if not self.send_peer(owner, codec.encode(codec.LOOKUP, header)):
            self._lookup_failed(lid, f"owner {owner} of shard {lookup.shard} is unreachable")
            return
        self.call_later(self.cfg.lookup_timeout, lambda: self._lookup_failed(lid, f"owner {owner} did not answer"))

    def _end_lookup(self, lid: int) -> Lookup | None:
        lookup = self.pending_lookups.pop(lid, None)
        if lookup is not None:
            key = (lookup.topic, lookup.shard)
            if self.lookups_in_flight.get(key) == lid:
                del self.lookups_in_flight[key]
            for p in lookup.pubs:
                p.lookups_left -= 1
        return lookup

    def _lookup_failed(self, lid: int, reason: str, refresh: bool = False) -> None:
        lookup = self._end_lookup(lid)
        if lookup is None:
            return
        self.metrics["lookups.retried"] += 1
        self.log.info("lookup_retry", shard=lookup.shard, owner=lookup.owner, reason=reason, epoch=self.epoch)
        if refresh:
            self._refresh_assignment()
        waiting = [p for p in lookup.pubs if not p.failed]
        if waiting:  # a refresh nobody waits for is not retried: the answer it refreshes still serves
            self._lookup(waiting[0], lookup.shard, lookup.tried, waiting)
        self._dispatch(lookup.topic)

    def _dispatch(self, topic: str) -> None:
        queue = self.topic_queues.get(topic)
        while queue and (queue[0].lookups_left == 0 or queue[0].failed):
            pub = queue.popleft()
            self.queued_publishes -= 1
            if not pub.failed:
                self.forward(pub)
        if queue is not None and not queue:
            del self.topic_queues[topic]

    def forward(self, pub: Publish) -> None:
        # Hops on the way to the last destination node: a remote lookup is two (ask, answer), a forward one.
        self.metrics["publishes.routed"] += 1
        self.metrics["publishes.hops"] += 2 * pub.asked_remote + any(d != self.me for d in pub.dests)
        for dest in pub.dests:
            if dest == self.me:
                if not self.deliver_local(pub.topic, pub.qos, pub.payload):
                    self._fail_publish(pub, codec.E_OVERLOADED, f"a subscriber on {self.me} has a full backlog")
                continue
            if dest not in self.members:  # a route left behind by a node that is gone: nobody to deliver to
                self.metrics["drops.dead_destination"] += 1
                continue
            fid = next(self.ids)
            self.outbox.forward(dest, Forward(fid, pub.topic, pub.qos, pub.payload))  # sent by Node._flush
            if pub.qos:
                self.pending_fwds[fid] = (dest, pub)
                pub.acks_left += 1
                self.unexpired_fwds.append(fid)  # Node._flush sets one timer for all forwarded in this drain
        self._maybe_puback(pub)

    def _maybe_puback(self, pub: Publish) -> None:
        if pub.qos and pub.acks_left == 0 and not pub.failed and pub.client is not None:
            self.metrics["publishes.acked"] += 1
            self.outbox.puback(pub.client, pub.ref)  # sent by Node._flush, batched per client

    def _fail_publish(self, pub: Publish, code: str, reason: str, shard: int | None = None) -> None:
        if pub.failed:
            return
        pub.failed = True
        self.metrics[f"errors.{code}"] += 1
        self.log.warning("publish_failed", topic=pub.topic, code=code, reason=reason, shard=shard, epoch=self.epoch)
        if pub.client is not None and pub.qos:
            self.send_client(pub.client, codec.error_parts(code, reason, pub.ref))

    def expire_fwds(self, fids: list[int]) -> None:
        """The timer of one drain's QoS 1 forwards: fail the publishes whose forward is still unconfirmed."""
        for fid in fids:
            pending = self.pending_fwds.pop(fid, None)
            if pending is not None:
                reason = f"node {pending[0]} did not confirm delivery in time"
                self._fail_publish(pending[1], codec.E_TIMEOUT, reason)

    # ------------------------------------------------------------------ peer frames
    def _on_route_change(self, sender: str, frame: Frame) -> None:
        h = frame.header
        forwarded = bool(h.get("fwd"))
        if not forwarded and (self._registration_unseen(sender, h) or self.deferred_route_changes):
            # The sender registered again (a restart, or a lost lease) and we have not seen that registration yet:
            # the view that drops its old registration's routes is still on its way to us and would remove this
            # route after we confirmed it. Apply it once we have seen the registration (or after request_timeout),
            # in arrival order.
            self.deferred_route_changes.append((time.monotonic(), sender, frame))
            self.metrics["routes.deferred_for_view"] += 1
            self.session.poll_now()
            if len(self.deferred_route_changes) == 1:
                self.call_later(self.cfg.request_timeout, self.replay_route_changes)
            return
        self._change_routes_now(sender, frame)

    def replay_route_changes(self) -> None:
        """Apply deferred route changes whose sender's view we now have (or that waited request_timeout)."""
        deferred = self.deferred_route_changes
        now = time.monotonic()
        oldest_allowed = now - self.cfg.request_timeout
        while deferred and (not self._registration_unseen(deferred[0][1], deferred[0][2].header)
                            or deferred[0][0] <= oldest_allowed):  # fmt: skip
            _, sender, frame = deferred.popleft()
            if sender in self.members:
                self._change_routes_now(sender, frame)
        if deferred:
            self.call_later(min(1.0, self.cfg.request_timeout), self.replay_route_changes)

    def _registration_unseen(self, sender: str, header: dict[str, Any]) -> bool:
        member = self.members.get(sender)
        return member is not None and type(rev := header.get("member_rev")) is int and rev > member.revision

    def _change_routes_now(self, sender: str, frame: Frame) -> None:
        h = frame.header
        forwarded = bool(h.get("fwd"))
        # Applied even while we are fenced: storing a route is not answering for the shard (lookups are refused
        # then). If our lease survives we hold the route; if not, the survivors hold it and we lose the shard.
        # Refusing instead would keep the subscribers of a node cut from etcd from subscribing elsewhere until
        # our lease ran out, since every owner must confirm.
        if not self._shards_ok(item[0] for item in h["routes"]):
            self._refuse_peer(sender, frame, codec.E_BAD_HEADER, "a route names a shard outside this cluster")
            return
        if forwarded:
            # Only the source of a hand-off we receive may forward changes to us, and only for that shard.
            if any(self.snapshot_sources.get(item[0]) != sender for item in h["routes"]):
                self._refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} is not handing these shards to us")
                return
        elif h["node"] != sender:
            self._refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} may only change its own routes")
            return
        stale = self._apply_route_items(frame.type, h["node"], h["routes"], forwarded)
        shards = {item[0] for item in h["routes"]}
        if forwarded or not h["id"]:
            self._invalidate_caches(shards)
            return
        ack = codec.encode(codec.ROUTE_ACK, {"id": h["id"], "epoch": self.epoch, "stale": stale})

        def confirm() -> None:
            self.send_peer(sender, ack)

        # An added route is confirmed once no entry node can still publish from an answer without it.
        if not self._invalidate_caches(shards, confirm if frame.type == codec.ROUTE_ADD else None):
            confirm()

    def _on_route_ack(self, sender: str, frame: Frame) -> None:
        wid = frame.header["id"]
        stale = frame.header.get("stale")
        if stale:
            if self._retry_stale(wid, sender, stale):
                return
            if wid in self.waiters:  # retried enough: do not confirm a route that no current owner holds
                self.waiters[wid].failures.append(f"{sender} (epoch still stale)")
        self._settle_waiter(wid, sender)

    def _on_lookup(self, sender: str, frame: Frame) -> None:
        h = frame.header
        shard = h["shard"]
        if self.fenced():
            self._refuse_peer(sender, frame, codec.E_FENCED, f"{self.me} cannot renew its etcd lease", shard=shard)
            return
        if not self._shards_ok([shard]):
            self._refuse_peer(sender, frame, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return
        a = self.assignment
        ours = a.epoch(shard) if a is not None else 0
        if h["epoch"] < ours:  # fence at the sink: the asker must learn the new owners first
            reason = f"shard {shard} is at epoch {ours}, not {h['epoch']}: re-read the assignment"
            self._refuse_peer(sender, frame, codec.E_STALE_EPOCH, reason, shard=shard, current_epoch=ours)
            return
        if h["epoch"] > ours:
            self.session.poll_now()
        nodes = sorted(self.routes.match(shard, h["topic"]))
        self.lookup_watchers.watch(shard, sender)  # it may cache this answer: tell it when the shard's routes change
        reply = {"id": h["id"], "shard": shard, "epoch": ours, "nodes": nodes}
        self.send_peer(sender, codec.encode(codec.LOOKUP_REPLY, reply))

    def _on_lookup_reply(self, sender: str, frame: Frame) -> None:
        lookup = self._end_lookup(frame.header["id"])
        if lookup is not None:
            nodes = frame.header["nodes"]
            topic = lookup.topic
            for pub in lookup.pubs:
                pub.dests.update(nodes)
            if frame.header["epoch"] == lookup.epoch:  # an owner that has not seen our epoch yet is not cached
                ttl = self.cfg.route_cache_ttl
                expires, refresh_at = lookup.sent_at + ttl, lookup.sent_at + ttl * REFRESH_AFTER
                self.route_cache.put(topic, lookup.shard, lookup.epoch, lookup.ticket, expires, nodes, refresh_at)
            self._dispatch(topic)

    def _on_fwd(self, sender: str, frame: Frame) -> None:
        h = frame.header
        self.metrics["forwards.in"] += 1
        if not h["qos"]:
            self.deliver_local(h["topic"], 0, frame.payload)
            return
        self._take_qos1(sender, h["id"], h["topic"], frame.payload, None)

    def _take_qos1(
        self, sender: str, fid: int, topic: str, payload: bytes, found: tuple[set[bytes], set[bytes]] | None
    ) -> None:
        """A forwarded QoS 1 message: FWD_ACK once every local recipient took it, or ``overloaded``."""
        if self.deliver_local(topic, 1, payload, found):
            self.outbox.ack(sender, fid)
        else:
            reason = f"a subscriber of {topic!r} on {self.me} has a full backlog of unacknowledged messages"
            self.send_peer(sender, codec.error_parts(codec.E_OVERLOADED, reason, fid))

    def _on_fwds(self, sender: str, frame: Frame) -> None:
        """A batch of forwards: the same as that many FWD frames, in order. A QoS 0 run goes to each recipient as
        one item (codec.Run)."""
        try:
            runs = codec.split_runs(frame)
        except ProtocolError as exc:
            self._refuse_peer(sender, frame, exc.code, exc.reason)
            return
        # Subscriptions cannot change while one frame is handled: find each topic's recipients once.
        recipients: dict[tuple[str, int], tuple[set[bytes], set[bytes]]] = {}
        queues: dict[str, list[list[Delivery]]] = {}  # QoS 0: the outbox lists of a topic's clients
        queued = received = 0
        for (fid, topic, qos), sizes, payload in runs:
            if qos:  # never a run (codec.split_runs)
                found = recipients.get((topic, qos))
                if found is None:
                    found = recipients[(topic, qos)] = self.local_recipients(topic, qos)
                self._take_qos1(sender, fid, topic, payload, found)
                received += 1
                continue
            lists = queues.get(topic)
            if lists is None:  # the hot path: what deliver_local() does for QoS 0, list by list
                lists = queues[topic] = [self.outbox.delivery_queue(r) for r in self.local_recipients(topic, 0)[0]]
            item = Delivery(topic, 0, None, False, payload, sizes)
            for queue in lists:
                queue.append(item)
            received += item.count
            queued += len(lists) * item.count
        self.metrics["forwards.in"] += received
        self.outbox.queued += queued

    def _on_fwd_ack(self, sender: str, frame: Frame) -> None:
        ids = frame.header.get("ids")
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            ids = [frame.header["id"]]
        for fid in ids:
            pending = self.pending_fwds.pop(fid, None)
            if pending is not None:
                pub = pending[1]
                pub.acks_left -= 1
                self._maybe_puback(pub)

    def _on_invalidate(self, sender: str, frame: Frame) -> None:
        """An owner's routes changed: drop our cached answers for those shards, then say so if it waits."""
        self.metrics["route_cache.invalidations_in"] += 1
        self.route_cache.invalidate(frame.header["shards"])
        if frame.header["id"]:
            self.send_peer(sender, codec.encode(codec.INVALIDATE_ACK, {"id": frame.header["id"]}))

    def _on_invalidate_ack(self, sender: str, frame: Frame) -> None:
        self._settle_invalidation(frame.header["id"], sender)
