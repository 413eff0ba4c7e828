"""The entry side: a client's publish, from its frame to the forwards that carry it to the destination nodes.

Rules of this file:
- A publish is resolved per shard its topic can be stored in (at most two, see ``router.partition``): owned
  here, the table answers; else the route cache (``router.route_cache``); else a LOOKUP already on its way for
  the same topic and shard; else a LOOKUP to the shard's primary, then its replicas in order (a dead primary
  costs one ``lookup_timeout``, not a failed publish). Lookups are sent when the core flushes, one frame per
  owner (LOOKUPS; a lone one as the plain LOOKUP), with one timer per frame. Root-set routes (filters without a
  placement key) live on every node and are matched here. Then one FWD goes to each node with a match; a node's
  own clients get it from ``destination`` directly. A shard we own that is being refilled (filled from nobody,
  its members' routes not all back yet: ``owner``) is not answered from our table: its other owners are asked,
  and refuse as well until it is complete, so the publish fails ``unavailable`` rather than reach nobody.
- A topic's first level: the shard of a multi-level topic's first level (when not the topic's own shard) holds
  only wildcard filters under that level that could match. The owner says so when there are none (``clear``),
  and that answer is cached once for the first level (key ``<first level>/#``, never a topic name) and serves
  every topic under it, so many topics under one first level cost one lookup each, not two.
- Order per topic: publishes wait in a per-topic FIFO until their lookups finish, so the order of publishes to
  one topic is the order they are forwarded in.
- A cached answer used after half its ttl is asked for again while it still serves (refresh ahead): a hot topic
  keeps one hop and never waits behind an expired answer's new LOOKUP. An owner's INVALIDATE drops the cached
  answers of its shards; an answer from an owner that has not seen our shard epoch yet is not cached.
- The fast path: in a PUBS batch (a lone QoS 0 PUB is a batch of one), a topic whose first publish was routed
  at once (owned, cached or root set only, nothing queued before it) sends its later publishes in the frame to
  the same nodes without resolving them again, and a QoS 0 run (many messages to one topic) travels on as one
  item. It sits beside the general path (``_route_runs`` beside ``publish``) and does what ``forward`` does,
  without a record per message.
- Resolved topics (``resolved``): such a topic's nodes are also kept across frames, so a publisher cycling
  through many topics (one publish per topic per frame) is not resolved again per message: validation, shards,
  owners, cache entries. An entry serves only while nothing it was derived from may have changed: the same
  assignment and member view (objects), the same owned route table (``RouteTable.version``), no cache
  invalidation or clear (``RouteCache.version``), before the earliest expiry or refresh time of the cached
  answers it used (``RouteCache.until``), not fenced, and no publish of the topic waits for a lookup. A new
  answer stored for the topic drops its entry. Anything else (a refresh due, an expired answer) takes the
  general path, which resolves, refreshes and keeps the topic again. First levels found clear (cached, or owned
  here without a wildcard filter under them) are kept the same way (``heads_clear``), so a topic under one is
  resolved with one shard, not two.
- QoS 1: the publisher's PUBACK is sent once every destination answered FWD_ACK; a destination that refuses
  (``overloaded``), leaves or does not answer within ``request_timeout`` fails the publish with an ERROR
  instead. Nothing is acknowledged that a destination did not take. A destination outside our member view fails a
  client's QoS 1 publish at once (``unavailable``), before anything is forwarded: it may have left, or have
  registered again (a restart under its id) with subscribers an owner with a newer view already confirmed, and we
  cannot tell which until our view catches up. QoS 0 publishes, wills and internal publishes skip it (nobody
  would send them again).
- While the node is fenced, publishes are refused: it cannot vouch for its routes.
- QoS 0 publishes this node fails (no assignment, no owner answered a lookup, a destination node that left the
  cluster, a frame of forwards or a SHARED_FWD that zmq would not queue) or refuses at intake without an ``id``
  that an ERROR could name (``_refuse``: invalid qos or topic, not authorized, fenced) are counted on their
  client's session (``Session.publish_failed``, per code) and reported at the flush as one ERROR with ``count``
  per code, never one frame per message, and logged once per report, with the count (wills and internal
  publishes have no client: counted and logged only). A QoS 0 forward names its client (``Forward.client``, one
  field per run), so a frame that is not sent is counted to whoever published in it; a message is counted once,
  however many of its destinations it missed. A refusal of a publish with an ``id`` (or of QoS 1) is an ERROR
  naming it.
- The barrier (``on_ping``): a client's PING is answered once every publish it sent before has left ``topic_queues``
  (``waiting_of``: its publishes there; its PONGs wait in ``pongs_due``), and after the report of those that
  failed, so the PONG says each was forwarded or reported. A PONG due while forwards wait in the outbox is held
  (``pongs_held``) until the flush has sent them and reported those in frames zmq would not queue. Other
  clients' publishes never hold it, and it comes: every lookup ends (answered, or failed after ``lookup_timeout``
  at each of at most 4 owners).
- A retain publish (PUB ``retain``, a PUBS item's 4th element) is routed to current subscribers like any other
  (live messages never carry ``retain``) and also sent to its shard's primary as the topic's retained message
  (``retained``). It never takes the fast paths (``on_pubs`` runs, ``resolved``): each one is handled on its own.
  Its QoS 1 PUBACK waits for the forwards and the RETAIN_ACK alike (``Publish.routed``: a RETAIN_ACK that comes
  before the forwards left does not acknowledge it); a QoS 0 one is stored all the same, and a failure to store
  it is reported to the client as an ERROR without ``ref``.
- A QoS 1 publish gets a publish id (``Publish.pid``, a counter of this node), sent with each of its forwards:
  a node taking over a persistent session delivers a message that reached both it and the old holder once.
  Topics under ``$session/`` (the session directory) are refused ``not_authorized``.
- Shared subscriptions (``router.shared``): an answer's slot members (``node NUL share NUL slot``) are grouped by
  share, and ``forward`` picks ONE node per share per message, round robin over the share's slot members sorted
  (so in proportion to each node's members; one node's messages keep their order on its one connection), and
  sends it SHARED_FWD naming the share; plain routes get their FWD as before. A QoS 1 one is a ``SharedForward``:
  the PUBACK waits for its FWD_ACK like any forward; after that the entry node keeps the message until SHARED_DONE
  (a member acknowledged it), and if the destination leaves the view first, sends it to another node of the group
  (``redispatch_shared``, ``dup``): node loss loses nothing acknowledged that this node still holds. A destination
  that leaves before its FWD_ACK fails the publish, as a plain forward does (the publisher retries).
- The entry node's own member (``_deliver_here``): a QoS 1 message given to a member here is backed up at another
  node (``SharedCopy``, SHARED_COPY; a node with members of the share first) and the PUBACK waits for that node's
  FWD_ACK or the member's DACK, whichever comes first; the DACK releases the backup (SHARED_RELEASE). The holder
  keeps a ``HeldCopy`` waiting on the entry node: if the entry node leaves the view first, it sends the message on
  (``_entry_lost``). A holder that leaves is replaced by another. With no member connected here, the message goes
  on through the cluster and the PUBACK waits until the next node holds it. Not a PUBACK held until the member's
  DACK: that would tie the publisher to its consumer's pace (docs/PROTOCOL.md §3.11 says what each costs).
- ``redispatch_shared`` is also how a destination with no member left for a share sends a message back through
  the cluster: an internal publish (no client) limited to that share and to nodes outside ``exclude``, whose
  ``then(outcome)`` says whether a member took it (``SHARED_OK``), no other node has members (``NO_MEMBER``), or
  what error stopped it, and whose ``placed()`` runs once the next node answered FWD_ACK. Topics whose routes
  include a share never take the QoS 0 fast path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.partition import lookup_keys
from shardmq.router.route_cache import RouteCache
from shardmq.router.shared import SEP, member_node, member_session, member_share
from shardmq.router.topics import TopicError, validate_topic_name

from .outbox import Forward
from .records import (
    NO_MEMBER,
    RESERVED_REASON,
    SHARED_OK,
    HeldCopy,
    Lookup,
    PendingForward,
    Publish,
    Session,
    SharedCopy,
    SharedForward,
    is_reserved,
)
from .view import ROOT

if TYPE_CHECKING:
    from .node import NodeCore

# A cached answer used after this share of its ttl is asked for again while it still serves (refresh ahead).
REFRESH_AFTER = 0.5
MAX_OWNERS_TRIED = 3
INF = float("inf")
HEAD_KEY = "/#"  # a first level's cached "no match under it" answer: "<level>/#", which no topic name can be
# Codes of QoS 0 publishes refused at intake: sent again, they are refused again (the report says so).
REFUSALS = frozenset({codec.E_INVALID_TOPIC, codec.E_INVALID_QOS, codec.E_NOT_AUTHORIZED})


class Entry:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.route_cache = RouteCache(core.cfg.route_cache_size)
        self.topic_queues: dict[str, deque[Publish]] = {}
        self.queued_publishes = 0  # publishes in topic_queues: waiting for a lookup, or behind one that waits
        self.waiting_of: dict[bytes, int] = {}  # client -> its publishes in topic_queues (none: absent)
        self.pongs_due: dict[bytes, list[Any]] = {}  # client -> ids of its PINGs waiting for those (the barrier)
        self.pongs_held: list[tuple[bytes, Any]] = []  # (client, PING id) answered once this flush sent the forwards
        self.failure_reports: dict[bytes, Session] = {}  # sessions owed a report of failed QoS 0 publishes
        self.lookups_in_flight: dict[tuple[str, int], int] = {}  # (topic, shard) -> id of its first-try LOOKUP
        self.unexpired_fwds: list[int] = []  # QoS 1 forwards queued in this batch, before their timer is set
        # topic -> (its nodes, serves until): see "Resolved topics" above; valid for ``_resolved_for`` only.
        self.resolved: dict[str, tuple[frozenset[str], float]] = {}
        self.heads_clear: dict[str, float] = {}  # first level -> serves until (see "Resolved topics")
        self._resolved_for: tuple[Any, ...] = ()
        self._until = INF  # while ``publish`` resolves: when the cached answers it used stop serving as they are
        self.lookups_out: dict[str, list[int]] = {}  # owner -> ids of lookups to send at the flush
        self.next_pid = 0  # the last QoS 1 publish id given here (``Publish.pid``)
        self.share_turns: dict[str, int] = {}  # share -> messages placed for it here (its round robin)
        self.copies_held: dict[tuple[str, int], int] = {}  # (entry node, its SHARED_COPY id) -> our HeldCopy's id

    # ------------------------------------------------------------------ client frames
    def on_pub(self, session: Session, frame: Frame) -> None:
        h = frame.header
        ref, topic, qos, retain = h.get("id"), h["topic"], h["qos"], h.get("retain") is True
        if qos == 0 and not retain:  # a lone QoS 0 message: a one-item batch, to take the fast path
            self._route_runs(session, [([topic, 0, ref], None, frame.payload)])
            return
        self._publish_one(session, ref, topic, qos, frame.payload, retain=retain)

    def on_pubs(self, session: Session, frame: Frame) -> None:
        """Many publishes in one frame (the SDK's batches): each is handled like a PUB, in order, with the fast
        path of the rules above (nothing else runs while one frame is handled, so routes cannot change in it)."""
        try:
            runs = codec.split_runs(frame)
        except ProtocolError as exc:
            self.core.reject_client(session.rid, exc.code, exc.reason, exc.ref)
            return
        self._route_runs(session, runs)

    def _route_runs(self, session: Session, runs: list[codec.Run]) -> None:
        core = self.core
        routed: dict[str, frozenset[str] | set[str]] = {}
        queues: dict[str, list[list[Forward]]] = {}  # QoS 0 to peers only: the outbox lists of a topic's peers
        rid, me, members, outbox, now = session.rid, core.me, core.view.members, core.outbox, core.now
        resolved = self._resolved_now()
        topic_queues = self.topic_queues
        fast = hops = queued = dead = kept = 0
        acl = session.acl
        shared_topics: dict[str, bool] = {}  # topic -> its routes include a shared subscription (no fast path)
        for item, sizes, payload in runs:
            topic, qos, ref = item[0], item[1], item[2]
            if acl is not None and not acl.may_publish(topic):
                reason = core.access.refusal(session, f"publish to {topic!r}")
                self._refuse(session, ref, qos, codec.E_NOT_AUTHORIZED, reason, 1 if sizes is None else len(sizes))
                continue
            if len(item) > 3 and item[3]:  # a retain publish: the general path, one by one (see the rules)
                for data in codec.cut(payload, sizes):
                    self._publish_one(session, ref, topic, qos, data, retain=True)
                continue
            dests = routed.get(topic)
            if dests is None and resolved is not None:
                known = resolved.get(topic)
                if known is not None and now < known[1] and topic not in topic_queues:
                    dests = routed[topic] = known[0]
                    kept += 1
            if dests is None:
                head = payload if sizes is None else payload[: sizes[0]]
                pub = self._publish_one(session, ref, topic, qos, head, resolved is not None)
                if pub is not None and not pub.lookups_left and not pub.failed and topic not in topic_queues:
                    dests = routed[topic] = pub.dests
                    if resolved is not None and not pub.asked_remote:
                        self._keep_resolved(topic, pub.dests)
                if sizes is None:
                    continue
                payload, sizes = payload[sizes[0] :], sizes[1:]
                if dests is None:  # refused, failed or queued behind a lookup: the rest follows one by one
                    for data in codec.cut(payload, sizes):
                        self._publish_one(session, ref, topic, qos, data)
                    continue
            shared = shared_topics.get(topic)
            if shared is None:
                shared = shared_topics[topic] = any(SEP in d for d in dests)
            if qos or me in dests or shared:  # acks to track, a local match or a share to pick: the general path
                for data in codec.cut(payload, sizes):
                    core.metrics["publishes.in"] += 1
                    self.forward(Publish(rid, ref, topic, qos, data, dests=dests))
                continue
            lists = queues.get(topic)
            if lists is None:
                lists = queues[topic] = [outbox.forward_queue(d) for d in dests if d in members]
            gone = len(dests) - len(lists)
            item = Forward(0, topic, 0, payload, sizes, None if gone else rid)
            for queue in lists:
                queue.append(item)
            n = item.count
            fast += n
            if lists:
                hops += n
            queued += len(lists) * n
            if gone:  # counted failed here, once per message: not again if the live nodes' frame is not sent
                dead += gone * n
                self._dead_destinations(rid, dests, n)
        if kept:
            core.metrics["publishes.resolved_kept"] += kept
        if fast:
            m = core.metrics
            m["publishes.in"] += fast
            m["publishes.routed"] += fast
            m["publishes.hops"] += hops
            if dead:
                m["drops.dead_destination"] += dead
            outbox.queued += queued

    def _resolved_now(self) -> dict[str, tuple[frozenset[str], float]] | None:
        """The resolved topics, emptied first when what they were derived from changed; None while fenced."""
        core = self.core
        if core.fenced():
            return None
        basis = (core.view.assignment, core.view.members, core.owner.routes.version, self.route_cache.version)
        was = self._resolved_for
        if not was or was[0] is not basis[0] or was[1] is not basis[1] or was[2:] != basis[2:]:
            self.resolved.clear()
            self.heads_clear.clear()
            self._resolved_for = basis
        return self.resolved

    def _keep_resolved(self, topic: str, dests: set[str]) -> None:
        """Keep a topic ``publish`` just routed at once (see the rules), until ``_until``."""
        resolved = self.resolved
        if topic not in resolved and len(resolved) >= max(1, self.core.cfg.route_cache_size):
            del resolved[next(iter(resolved))]
        resolved[topic] = (frozenset(dests), self._until)

    def _publish_one(
        self, session: Session, ref: int | None, topic: str, qos: int, payload: bytes, kept: bool = False,
        retain: bool = False,
    ) -> Publish | None:
        """Validate and route one publish; returns it, or None when it was refused. ``kept``: ``heads_clear``
        may be used (``on_pubs`` checked it at the start of its frame)."""
        core = self.core
        if qos not in (0, 1):
            self._refuse(session, ref, qos, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}")
            return None
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            self._refuse(session, ref, qos, exc.code, exc.reason)
            return None
        if session.acl is not None and not session.acl.may_publish(topic):
            reason = core.access.refusal(session, f"publish to {topic!r}")
            self._refuse(session, ref, qos, codec.E_NOT_AUTHORIZED, reason)
            return None
        if is_reserved(topic):
            core.metrics["sessions.reserved_refused"] += 1
            self._refuse(session, ref, qos, codec.E_NOT_AUTHORIZED, RESERVED_REASON)
            return None
        if core.fenced():
            reason = "this node lost contact with etcd and cannot vouch for routes; use another node"
            self._refuse(session, ref, qos, codec.E_FENCED, reason)
            return None
        core.metrics["publishes.in"] += 1
        pub = Publish(session.rid, ref, topic, qos, payload, retain=retain)
        self.publish(pub, kept and not retain)
        return pub

    def _refuse(self, session: Session, ref: int | None, qos: int, code: str, reason: str, count: int = 1) -> None:
        """Refuse ``count`` publishes at intake: an ERROR naming the publish (``ref``), or, for QoS 0 ones without an
        id (which no ERROR could name), a count in the client's report (see the rules)."""
        if ref is not None or qos == 1:
            self.core.reject_client(session.rid, code, reason, ref)
            return
        self.core.metrics[f"errors.{code}"] += count
        self._count_failed(session.rid, code, reason, count)

    # ------------------------------------------------------------------ resolve
    def publish(self, pub: Publish, kept: bool = False) -> None:
        core = self.core
        a = core.view.assignment
        if a is None:
            self._fail_publish(pub, codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry shortly")
            return
        if pub.retain:
            core.metrics["publishes.retain"] += 1
            pub.acks_left += 1  # the RETAIN_ACK (see the rules)
            core.retained.publish(pub, lambda code, reason: self._retained(pub, code, reason))
            if pub.failed:
                return
        pub.dests |= core.owner.routes.match(ROOT, pub.topic)
        self._until = INF
        keys = lookup_keys(pub.topic)
        shard = shard_for_key(keys[0], a.shard_count)
        self._lookup(pub, shard, [])
        if len(keys) == 2:  # (topic, its first level): the second shard holds only filters under that level
            until = self.heads_clear.get(keys[1]) if kept else None
            if until is not None and core.now < until:
                self._until = min(self._until, until)
            else:
                head_shard = shard_for_key(keys[1], a.shard_count)
                if head_shard != shard:
                    self._lookup(pub, head_shard, [], head=keys[1])
        queue = self.topic_queues.get(pub.topic)
        if queue is None:
            if pub.lookups_left == 0:  # answered here (owned, cached, or failed at once): nothing to wait behind
                if not pub.failed:
                    self.forward(pub)
                return
            queue = self.topic_queues[pub.topic] = deque()
        queue.append(pub)
        self.queued_publishes += 1
        if pub.client is not None:
            self.waiting_of[pub.client] = self.waiting_of.get(pub.client, 0) + 1
        self._dispatch(pub.topic)

    def _lookup(
        self, pub: Publish, shard: int, tried: list[str], group: list[Publish] | None = None, head: str | None = None
    ) -> None:
        """Find the nodes with routes matching ``pub.topic`` in ``shard`` (see the rules). ``group``: publishes
        to the same topic that share a retried lookup (``pub`` is one of them). ``head``: the topic's first
        level, when ``shard`` is that level's shard and not the topic's own."""
        core = self.core
        a = core.view.assignment
        assert a is not None
        pubs = group or [pub]
        state = a.state(shard)
        owners = state.owners
        # A shard we own that is being refilled answers no lookup, ours included (``owner``): the other owners
        # are asked, as if we had refused.
        table_answers = shard not in core.owner.refilling
        if not tried and owners and owners[0] == core.me and table_answers:
            routes = core.owner.routes
            pub.dests |= routes.match(shard, pub.topic)
            if head is not None and not routes.wild_under(shard, head):
                self.heads_clear[head] = INF
            return
        shard_epoch = state.epoch
        if not tried:
            if head is not None:  # every topic under this first level has no match here (see the rules)
                key = head + HEAD_KEY
                if self.route_cache.get(key, shard, shard_epoch, core.now) is not None:
                    if self.route_cache.claim_refresh(key, shard, shard_epoch, core.now):
                        self._refresh_lookup(pub.topic, shard, shard_epoch, head)
                    until = self.heads_clear[head] = self.route_cache.until(key, shard)
                    self._until = min(self._until, until)
                    return
            cached = self.route_cache.get(pub.topic, shard, shard_epoch, core.now)
            if cached is not None:
                pub.dests.update(cached)
                if self.route_cache.claim_refresh(pub.topic, shard, shard_epoch, core.now):
                    self._refresh_lookup(pub.topic, shard, shard_epoch, head)
                self._until = min(self._until, self.route_cache.until(pub.topic, shard))
                return
            lid = self.lookups_in_flight.get((pub.topic, shard))
            if lid is not None:  # a burst to one topic: every publish waits for the one answer
                core.requests.get(lid).pubs.append(pub)
                pub.lookups_left += 1
                return
        members = core.view.members
        candidates = [n for n in owners if n not in tried and n in members and (table_answers or n != core.me)]
        if not candidates or len(tried) > MAX_OWNERS_TRIED:
            for p in pubs:
                self._fail_publish(p, codec.E_UNAVAILABLE, f"no owner of shard {shard} answered ({tried})", shard)
            return
        owner = candidates[0]
        if owner == core.me:
            nodes = core.owner.routes.match(shard, pub.topic)
            for p in pubs:
                p.dests |= nodes
            return
        for p in pubs:
            p.asked_remote = True
            p.lookups_left += 1
        self._send_lookup(Lookup(pubs, pub.topic, shard, owner, [*tried, owner], shard_epoch, head=head))

    def _refresh_lookup(self, topic: str, shard: int, shard_epoch: int, head: str | None) -> None:
        """Ask the shard's primary again for a cached answer that still serves; publishes that miss meanwhile
        wait for this LOOKUP rather than send their own."""
        core = self.core
        assert core.view.assignment is not None
        owner = (core.view.assignment.owners(shard) or [core.me])[0]
        if owner != core.me and owner in core.view.members and (topic, shard) not in self.lookups_in_flight:
            core.metrics["route_cache.refreshes"] += 1
            self._send_lookup(Lookup([], topic, shard, owner, [owner], shard_epoch, head=head))

    def _send_lookup(self, lookup: Lookup) -> None:
        """Open the lookup now (its ticket and time are taken now); it leaves with the flush (``send_lookups``)."""
        core = self.core
        lookup.ticket, lookup.sent_at = self.route_cache.ticket(lookup.shard), core.now
        lid = core.requests.open(lookup, self)
        self.lookups_in_flight[(lookup.topic, lookup.shard)] = lid
        self.lookups_out.setdefault(lookup.owner, []).append(lid)

    def send_lookups(self) -> None:
        """Send the lookups opened since the last flush: one frame per owner, one timer per frame."""
        core = self.core
        requests = core.requests
        while self.lookups_out:  # a failed send retries at the next owner, which queues again
            out, self.lookups_out = self.lookups_out, {}
            for owner, lids in out.items():
                items = []
                for lid in lids:
                    lookup = requests.get(lid)
                    if isinstance(lookup, Lookup):  # not failed meanwhile (its owner left)
                        items.append([lid, lookup.shard, lookup.shard_epoch, lookup.topic, lookup.head is not None])
                if not items:
                    continue
                if len(items) == 1:
                    lid, shard, shard_epoch, topic, head = items[0]
                    header = {"id": lid, "shard": shard, "shard_epoch": shard_epoch, "topic": topic}
                    if head:
                        header["head"] = True
                    parts = codec.encode(codec.LOOKUP, header)
                else:
                    for item in items:
                        item[4] = int(item[4])
                    parts = codec.encode(codec.LOOKUPS, {"items": items})
                    core.metrics["batches.lookups"] += 1
                if not core.effects.send_peer(owner, parts):
                    for item in items:
                        self._lookup_failed(item[0], f"owner {owner} of shard {item[1]} is unreachable")
                    continue
                reason = f"owner {owner} did not answer"
                ids = [item[0] for item in items]
                core.effects.call_later(
                    core.cfg.lookup_timeout, lambda ids=ids, why=reason: self._expire_lookups(ids, why)
                )

    def _expire_lookups(self, lids: list[int], reason: str) -> None:
        requests = self.core.requests
        for lid in lids:
            if lid in requests:  # not answered meanwhile
                self._lookup_failed(lid, reason)

    def _end_lookup(self, lid: int) -> Lookup | None:
        lookup = self.core.requests.close(lid)
        if isinstance(lookup, Lookup):
            key = (lookup.topic, lookup.shard)
            if self.lookups_in_flight.get(key) == lid:
                del self.lookups_in_flight[key]
            for p in lookup.pubs:
                p.lookups_left -= 1
            return lookup
        return None

    def _lookup_failed(self, lid: int, reason: str, refresh: bool = False) -> None:
        core = self.core
        lookup = self._end_lookup(lid)
        if lookup is None:
            return
        core.metrics["lookups.retried"] += 1
        core.log.info("lookup_retry", shard=lookup.shard, owner=lookup.owner, reason=reason)
        waiting = [p for p in lookup.pubs if not p.failed]
        if refresh and waiting:
            # The owner has seen a newer shard epoch than we have: ask again once we have read the assignment
            # (the publishes keep waiting, in order, behind this lookup; its other owners may well be old too).
            for p in waiting:
                p.lookups_left += 1

            def retry(_ok: bool) -> None:
                for p in waiting:
                    p.lookups_left -= 1
                still = [p for p in waiting if not p.failed]
                if still:
                    self._lookup(still[0], lookup.shard, lookup.tried, still, lookup.head)
                self._dispatch(lookup.topic)

            core.refresh_assignment(retry, force=True)
            return
        if refresh:
            core.refresh_assignment(lambda _ok: None)
        if waiting:  # a refresh nobody waits for is not retried: the answer it refreshes still serves
            self._lookup(waiting[0], lookup.shard, lookup.tried, waiting, lookup.head)
        self._dispatch(lookup.topic)

    def on_lookup_reply(self, sender: str, frame: Frame) -> None:
        h = frame.header
        self._answered(h["id"], h["shard_epoch"], h["nodes"], h.get("clear") is True)

    def on_lookups_reply(self, sender: str, frame: Frame) -> None:
        """``_answered`` for each item, its steps inlined (a LOOKUPS_REPLY carries hundreds)."""
        close, in_flight, resolved = self.core.requests.close, self.lookups_in_flight, self.resolved
        put, ttl = self.route_cache.put, self.core.cfg.route_cache_ttl
        refresh_ttl = ttl * REFRESH_AFTER
        for lid, shard_epoch, nodes, clear in frame.header["items"]:
            lookup = close(lid)
            if not isinstance(lookup, Lookup):
                continue
            topic = lookup.topic
            key = (topic, lookup.shard)
            if in_flight.get(key) == lid:
                del in_flight[key]
            resolved.pop(topic, None)
            for pub in lookup.pubs:
                pub.lookups_left -= 1
                pub.dests.update(nodes)
            if shard_epoch == lookup.shard_epoch:
                cached = lookup.head + HEAD_KEY if clear and lookup.head is not None and not nodes else topic
                sent = lookup.sent_at
                put(cached, lookup.shard, shard_epoch, lookup.ticket, sent + ttl, nodes, sent + refresh_ttl)
            if lookup.pubs:
                self._dispatch(topic)

    def _answered(self, lid: int, shard_epoch: int, nodes: list[str], clear: bool) -> None:
        lookup = self._end_lookup(lid)
        if lookup is None:
            return
        topic = lookup.topic
        self.resolved.pop(topic, None)  # resolved from the answer this one replaces: resolve it again
        for pub in lookup.pubs:
            pub.dests.update(nodes)
        if shard_epoch == lookup.shard_epoch:  # an owner behind our epoch is not cached
            ttl = self.core.cfg.route_cache_ttl
            expires, refresh_at = lookup.sent_at + ttl, lookup.sent_at + ttl * REFRESH_AFTER
            key = lookup.head + HEAD_KEY if clear and lookup.head is not None and not nodes else topic
            self.route_cache.put(key, lookup.shard, lookup.shard_epoch, lookup.ticket, expires, nodes, refresh_at)
        self._dispatch(topic)

    def on_invalidate(self, sender: str, frame: Frame) -> None:
        """An owner's routes changed: drop our cached answers for those shards, then say so if it waits."""
        core = self.core
        core.metrics["route_cache.invalidations_in"] += 1
        self.route_cache.invalidate(frame.header["shards"])
        if frame.header["id"]:
            core.effects.send_peer(sender, codec.encode(codec.INVALIDATE_ACK, {"id": frame.header["id"]}))

    def _dispatch(self, topic: str) -> None:
        queue = self.topic_queues.get(topic)
        while queue and (queue[0].lookups_left == 0 or queue[0].failed):
            pub = queue.popleft()
            self.queued_publishes -= 1
            if not pub.failed:
                self.forward(pub)
            if pub.client is not None:  # after the forward: a failure there is reported before a PONG it frees
                self._left_queue(pub.client)
        if queue is not None and not queue:
            del self.topic_queues[topic]

    # ------------------------------------------------------------------ forward
    def forward(self, pub: Publish) -> None:
        core = self.core
        # Hops on the way to the last destination node: a remote lookup is two (ask, answer), a forward one.
        core.metrics["publishes.routed"] += 1
        dests = pub.dests
        shares: dict[str, list[str]] | None = None
        moved: dict[str, list[list[str]]] = {}
        if pub.share_only is not None or any(SEP in d for d in dests):
            dests, shares, moved = self._split_members(pub)
            if pub.failed:
                return
        members = core.view.members
        if pub.qos and pub.client is not None:
            unseen = sorted(d for d in dests if d != core.me and d not in members)
            if unseen:
                # A node outside our view left the cluster, or registered again (a restart under its id) and our
                # view has not shown it yet, while the owner that answered has seen it and confirmed its new
                # subscribers' routes: skipped, their message would be acknowledged undelivered. We cannot tell
                # the two apart, so the publisher sends it again once our view has caught up.
                core.metrics["drops.dead_destination"] += len(unseen)
                core.effects.poll_view()
                reason = (
                    f"destination node(s) {', '.join(unseen)} not in {core.me}'s view of the members (left, "
                    "or registered again and not seen here yet): retry"
                )
                self._fail_publish(pub, codec.E_UNAVAILABLE, reason)
                return
        core.metrics["publishes.hops"] += 2 * pub.asked_remote + any(d != core.me for d in dests)
        if pub.qos and not pub.pid:
            self.next_pid += 1
            pub.pid = self.next_pid
        item: Forward | None = None  # QoS 0: one item for every destination node (nothing in it differs)
        gone: list[str] = []
        for dest in dests:
            if dest == core.me:
                persisted: list[Session] = []
                pid = (core.me, pub.pid)
                refused = core.sessions.claim(moved[dest]) if pub.qos and dest in moved else None
                if refused is not None:
                    self._fail_publish(pub, codec.E_UNAVAILABLE, refused)
                elif not core.destination.deliver(pub.topic, pub.qos, pub.payload, pid=pid, persisted=persisted):
                    self._fail_publish(pub, codec.E_OVERLOADED, f"a subscriber on {core.me} has a full backlog")
                elif persisted and pub.qos:  # the PUBACK waits for their replicated session queues
                    pub.acks_left += 1
                    core.sessions.append(persisted, pub.topic, pub.payload, pid,
                                         lambda c, r, p=pub: self._part_held(p, c, r))  # fmt: skip
                continue
            if dest not in members:  # QoS 0, a will or an internal publish: nobody here to retry it
                core.metrics["drops.dead_destination"] += 1
                gone.append(dest)
                continue
            if pub.qos:
                fid = core.requests.open(PendingForward(dest, pub), self)
                pub.acks_left += 1
                self.unexpired_fwds.append(fid)  # the flush sets one timer for all forwarded in this batch
                forward = Forward(fid, pub.topic, pub.qos, pub.payload, pid=pub.pid, sessions=moved.get(dest))
                core.outbox.forward(dest, forward)
                continue
            if item is None:
                item = Forward(0, pub.topic, 0, pub.payload, None, pub.client)
            core.outbox.forward(dest, item)
        lost = False
        if gone and not pub.qos and pub.client is not None:
            self._dead_destinations(pub.client, gone, 1)
            lost = True
        if shares:
            for share, slots in shares.items():
                self._forward_shared(pub, share, slots)
        elif pub.share_only is not None:  # a redispatch that found no other node with members of its share
            core.metrics["shared.no_member"] += 1
            core.log.warning("shared_no_member", topic=pub.topic, share=pub.share_only, excluded=sorted(pub.exclude))
            reason = f"no other node has members of {pub.share_only!r}"
            self._fail_publish(pub, codec.E_UNAVAILABLE, reason, outcome=NO_MEMBER)
        if item is not None and (lost or pub.failed):
            item.client = None  # counted failed already: not again if the frame to a live node is not sent
        pub.routed = True
        self._maybe_puback(pub)

    def _split_members(self, pub: Publish) -> tuple[set[str], dict[str, list[str]], dict[str, list[list[str]]]]:
        """(plain destination nodes, share -> the nodes of its slot routes that may get it, one per slot, node ->
        the [client id, origin] of the persistent sessions it gets the message for through moved routes). A QoS 1
        publish matching the session route of a node that left the view fails ``unavailable`` here (the answer
        predates the move of its routes to the adopter): acknowledged, it would reach nobody."""
        core = self.core
        members, me = core.view.members, core.me
        plain: set[str] = set()
        shares: dict[str, list[str]] = {}
        moved: dict[str, list[list[str]]] = {}
        for d in pub.dests:
            if SEP not in d:
                if pub.share_only is None:
                    plain.add(d)
                continue
            session = member_session(d)
            if session is not None:
                if pub.share_only is not None:
                    continue
                node = member_node(d)
                if node != me and node not in members:
                    if pub.qos:
                        core.metrics["sessions.publish_refused_holder_gone"] += 1
                        self._fail_publish(pub, codec.E_UNAVAILABLE, f"node {node}, holding persistent session "
                                           f"{session[0]!r}, left the cluster; its adopter takes it over: retry")
                    continue
                plain.add(node)
                if session[1] is not None:
                    moved.setdefault(node, []).append([session[0], session[1]])
                continue
            share, node = member_share(d), member_node(d)
            assert share is not None
            if pub.share_only is not None and share != pub.share_only:
                continue
            if node in pub.exclude or (node != me and node not in members):
                continue
            shares.setdefault(share, []).append(d)
        return plain, {share: [member_node(m) for m in sorted(slots)] for share, slots in shares.items()}, moved

    def _forward_shared(self, pub: Publish, share: str, slots: list[str]) -> None:
        """Give the message to one node of ``share``: round robin over its slots (see the rules)."""
        core = self.core
        turn = self.share_turns.get(share, 0)
        self.share_turns[share] = turn + 1
        node = slots[turn % len(slots)]
        core.metrics["shared.placed"] += 1
        if node == core.me:
            self._deliver_here(pub, share, slots)
            return
        header: dict[str, Any] = {"id": 0, "topic": pub.topic, "qos": pub.qos, "share": share}
        if pub.qos:
            header["id"] = core.requests.open(SharedForward(node, pub, share), self)
            pub.acks_left += 1
            self.unexpired_fwds.append(header["id"])
            header["pid"] = pub.pid
        if pub.share_only is not None:
            header["dup"] = True  # it may have reached a member before (the one that left, or the node that died)
        if not core.effects.send_peer(node, codec.encode(codec.SHARED_FWD, header, pub.payload)):
            if header["id"]:
                core.requests.close(header["id"])
            self._fail_publish(pub, codec.E_UNAVAILABLE, f"destination node {node} is unreachable")

    def _deliver_here(self, pub: Publish, share: str, slots: list[str]) -> None:
        """This node was picked for ``share``: a QoS 1 message goes to a local member with a backup at another
        node (``SharedCopy``), or, with no member connected here, on through the cluster; either way the PUBACK
        waits until another node holds it (see the rules)."""
        core = self.core
        destination = core.destination
        if not pub.qos:
            destination.deliver_shared(share, pub.topic, 0, pub.payload)
            return
        pub.acks_left += 1
        if not destination.shared_member_here(share):
            destination.send_on_new(share, pub.topic, pub.payload, (lambda: self._shared_done(pub)),
                                    lambda code, reason: self._part_held(pub, code, reason))  # fmt: skip
            return
        copy = SharedCopy("", pub, share, slots=slots)

        def done() -> None:
            self._release_copy(copy)
            self._shared_done(pub)

        if not destination.deliver_shared(share, pub.topic, 1, pub.payload, done):
            self._fail_publish(pub, codec.E_OVERLOADED, f"members of {share!r} on {core.me} have no room")
        elif not self._back_up(copy):  # a cluster of one: nowhere else to keep it, as for any message there
            copy.acked = copy.released = True
            pub.acks_left -= 1
            core.metrics["shared.no_backup"] += 1

    def _part_held(self, pub: Publish, code: str | None, reason: str) -> None:
        """One thing a publish's PUBACK waits for besides the forwards answered: held (``code`` None: a persistent
        session's replicated queue holds it, or the next node holds a shared message sent on for it), or not."""
        if code is not None:
            self._fail_publish(pub, code, reason)
            return
        pub.acks_left -= 1
        if pub.routed:
            self._maybe_puback(pub)

    def _back_up(self, copy: SharedCopy) -> bool:
        """Send SHARED_COPY to another node: one with members of the share first (it can deliver the copy itself
        if this node dies), else any; False when there is none left to try."""
        core = self.core
        me, members = core.me, core.view.members
        nodes = [n for n in dict.fromkeys(copy.slots) if n != me and n in members and n not in copy.tried]
        if not nodes:
            nodes = [n for n in sorted(members) if n != me and n not in copy.tried]
        turn = self.share_turns.get(copy.share, 0)
        while nodes:
            node = nodes.pop(turn % len(nodes))
            copy.dest = node
            copy.fid = core.requests.open(copy, self)
            header = {"id": copy.fid, "topic": copy.pub.topic, "share": copy.share}
            if core.effects.send_peer(node, codec.encode(codec.SHARED_COPY, header, copy.pub.payload)):
                if not copy.acked:
                    self.unexpired_fwds.append(copy.fid)
                core.metrics["shared.copies_out"] += 1
                return True
            core.requests.close(copy.fid)
            copy.tried.add(node)
        copy.fid = 0
        return False

    def _release_copy(self, copy: SharedCopy) -> None:
        """The local member acknowledged the message (or it went on to another member): the backup goes."""
        copy.released = True
        if copy.fid and self.core.requests.close(copy.fid) is copy:
            if not copy.acked:  # acknowledged by the member before the backup answered: delivered
                copy.pub.acks_left -= 1
                self._maybe_puback(copy.pub)
            if copy.dest in self.core.view.members:
                self.core.destination.copies_released.setdefault(copy.dest, []).append(copy.fid)

    def on_shared_copy(self, sender: str, frame: Frame) -> None:
        """Keep another node's backup of a shared message its member holds, until SHARED_RELEASE (or its loss)."""
        core = self.core
        h = frame.header
        rid = core.requests.open(HeldCopy(sender, h["id"], h["share"], h["topic"], frame.payload), self)
        self.copies_held[(sender, h["id"])] = rid
        core.metrics["shared.copies_in"] += 1
        core.outbox.ack(sender, h["id"])

    def on_shared_release(self, sender: str, frame: Frame) -> None:
        requests = self.core.requests
        for fid in frame.header["ids"]:
            rid = self.copies_held.pop((sender, fid), None)
            if rid is not None:
                requests.close(rid)

    def _copy_holder_lost(self, record: SharedCopy, node: str) -> None:
        """The node keeping our backup left: keep one at another node; with none, an unacknowledged publish fails
        (the publisher sends it again) and an acknowledged one is held here only (counted)."""
        record.tried.add(node)
        if record.released or self._back_up(record):
            return
        if not record.acked:
            self._fail_publish(record.pub, codec.E_UNAVAILABLE, f"node {node}, keeping a copy, left the cluster")
            return
        self.core.metrics["shared.backup_lost"] += 1
        self.core.log.warning("shared_backup_lost", peer=node, share=record.share, topic=record.pub.topic)

    def _entry_lost(self, record: HeldCopy, node: str) -> None:
        """The entry node whose backup we keep left the view: its member's message goes to another node."""
        core = self.core
        self.copies_held.pop((record.origin, record.fid), None)
        core.metrics["shared.redispatched_entry_lost"] += 1
        core.log.warning("shared_entry_lost", peer=node, share=record.share, topic=record.topic)
        self.redispatch_shared(record.share, record.topic, 1, record.payload, {node},
                               self._lost_after_ack(record.share, record.topic))  # fmt: skip

    def redispatch_shared(
        self, share: str, topic: str, qos: int, payload: bytes, exclude: set[str],
        then: Callable[[str], None] | None, placed: Callable[[], None] | None = None,
    ) -> None:
        """Send a shared message on to a node of ``share`` outside ``exclude`` (see the rules)."""
        core = self.core
        core.metrics["shared.redispatched"] += 1
        if core.fenced():
            core.metrics["errors.fenced"] += 1  # counted as ``_fail_publish`` counts the other refusals
            if then is not None:
                then(codec.E_FENCED)
            return
        self.publish(Publish(None, None, topic, qos, payload, share_only=share, exclude=frozenset(exclude), then=then,
                             placed=placed))  # fmt: skip

    def _shared_done(self, pub: Publish) -> None:
        then, pub.then = pub.then, None
        if then is not None:
            then(SHARED_OK)

    def shared_copies(self) -> int:
        """Shared messages acknowledged to their publisher that this node keeps until a member acknowledges them:
        requests that wait, by design, as long as a member holds the message (not work left to finish): our copies
        (``SharedForward``), backups elsewhere (``SharedCopy``) and the backups kept for others (``HeldCopy``)."""
        return sum(
            1 for r, _ in self.core.requests._open.values()
            if (type(r) is SharedForward or type(r) is SharedCopy) and r.acked or type(r) is HeldCopy
        )  # fmt: skip

    def on_shared_done(self, sender: str, frame: Frame) -> None:
        """Members acknowledged these SHARED_FWDs: drop our copies."""
        requests = self.core.requests
        for fid in frame.header["ids"]:
            record = requests.get(fid)
            if isinstance(record, SharedForward) and record.dest == sender:
                requests.close(fid)
                if not record.acked:  # SHARED_DONE overtook nothing: FWD_ACK always goes first, but be safe
                    record.pub.acks_left -= 1
                    self._maybe_puback(record.pub)
                self.core.metrics["shared.done"] += 1
                self._shared_done(record.pub)

    def _shared_node_lost(self, record: SharedForward, node: str) -> None:
        """A destination holding an acknowledged shared message left the view: another node of the group gets it."""
        core = self.core
        core.metrics["shared.redispatched_node_lost"] += 1
        core.log.warning("shared_node_lost", peer=node, share=record.share, topic=record.pub.topic)
        pub = record.pub
        then = pub.then
        pub.then = None  # the copy's obligation moves to the new publish
        self.redispatch_shared(record.share, pub.topic, pub.qos, pub.payload, {node, *pub.exclude},
                               then if then is not None else self._lost_after_ack(record.share, pub.topic))  # fmt: skip

    def _lost_after_ack(self, share: str, topic: str) -> Callable[[str], None]:
        def counted(outcome: str) -> None:
            if outcome != SHARED_OK:  # acknowledged to its publisher, and no member anywhere took it: counted, logged
                self.core.metrics["shared.lost_after_ack"] += 1
                self.core.log.error("shared_message_lost", share=share, topic=topic, outcome=outcome)

        return counted

    def _retained(self, pub: Publish, code: str | None, reason: str) -> None:
        """The primary's answer to a retain publish's change (``code`` None: stored and replicated)."""
        core = self.core
        if code is None:
            pub.acks_left -= 1
            if pub.routed:
                self._maybe_puback(pub)
            return
        if pub.qos:
            self._fail_publish(pub, code, reason)
            return
        core.metrics[f"errors.{code}"] += 1
        core.log.warning("retain_failed", topic=pub.topic, code=code, reason=reason)
        if pub.client is not None:
            core.send_client(pub.client, codec.error_parts(code, f"retained message for {pub.topic!r}: {reason}"))

    def _maybe_puback(self, pub: Publish) -> None:
        if pub.qos and pub.acks_left == 0 and not pub.failed and pub.client is not None:
            self.core.metrics["publishes.acked"] += 1
            self.core.outbox.puback(pub.client, pub.ref)
        elif pub.will and pub.acks_left == 0 and not pub.failed and pub.routed:
            self.core.metrics["wills.delivered"] += 1  # every destination took it (and the retained copy is stored)
        if pub.placed is not None and pub.acks_left == 0 and not pub.failed and pub.routed:
            placed, pub.placed = pub.placed, None  # a message sent on: every node it went to holds it now
            placed()

    def _fail_publish(
        self, pub: Publish, code: str, reason: str, shard: int | None = None, outcome: str | None = None
    ) -> None:
        core = self.core
        if pub.failed:
            return
        pub.failed = True
        pub.placed = None
        if pub.then is not None:  # an internal redispatch: its sender decides what becomes of the message
            then, pub.then = pub.then, None
            then(outcome or code)
        core.metrics[f"errors.{code}"] += 1
        if pub.will:
            core.metrics["wills.failed"] += 1  # its client is gone: counted and logged, nobody to tell
        if pub.client is None or pub.qos:  # one log line per publish, as per ERROR (a QoS 0 one: per report)
            core.log.warning("publish_failed", topic=pub.topic, code=code, reason=reason, shard=shard)
        if pub.client is None:
            return
        if pub.qos:
            core.send_client(pub.client, codec.error_parts(code, reason, pub.ref))
            return
        self._count_failed(pub.client, code, reason)

    def _dead_destinations(self, rid: bytes, dests: Any, count: int) -> None:
        """``count`` QoS 0 publishes of client ``rid`` went to ``dests``, some of which left the cluster."""
        members = self.core.view.members
        gone = ", ".join(sorted(d for d in dests if d not in members))
        reason = f"destination node(s) {gone} left the cluster (their subscribers there did not get it)"
        self.core.metrics["errors.unavailable"] += count
        self._count_failed(rid, codec.E_UNAVAILABLE, reason, count)

    def _count_failed(self, rid: bytes, code: str, reason: str, count: int = 1) -> None:
        """Count ``count`` QoS 0 publishes of client ``rid`` that failed (or were refused) with ``code`` on its
        session, for its report at the flush (see the rules); the caller counted them in ``errors.<code>``."""
        session = self.core.destination.sessions.get(rid)
        if session is None:  # its client is gone: counted and logged, nobody to tell
            self.core.log.warning("publish_failed", client=rid.decode(errors="replace"), code=code, count=count,
                                  reason=reason)  # fmt: skip
            return
        failed = session.publish_failed
        if failed is None:
            failed = session.publish_failed = {}
        counted = failed.get(code)
        if counted is None:
            failed[code] = [count, reason, count]
        else:
            counted[0] += count
            counted[1] = reason
            counted[2] += count
        self.failure_reports[rid] = session

    # ------------------------------------------------------------------ QoS 0 failures and the barrier
    def report_failures(self) -> None:
        """At the flush: each session owed a report gets it (one ERROR per code, see the rules)."""
        due, self.failure_reports = self.failure_reports, {}
        for session in due.values():
            self._report(session)

    def _report(self, session: Session) -> bool:
        """Send ``session`` its ERROR with ``count`` per code; False when zmq would not take one: what was not
        sent stays owed, for the next report or the client's next PING (whose PONG waits for it). Logged here,
        one line per code with the count since the last one, sent or not."""
        core = self.core
        failed = session.publish_failed
        if failed is None:
            return True
        client = None
        for code, counted in failed.items():
            if counted[2]:
                client = client or session.rid.decode(errors="replace")
                core.log.warning("publish_failed", client=client, code=code, count=counted[2], reason=counted[1])
                counted[2] = 0
        if core.destination.sessions.get(session.rid) is not session:
            return True  # the session ended (or was replaced): its failures ended with it
        while failed:
            code, (count, reason, _) = next(iter(failed.items()))
            what = "publish" if count == 1 else "publishes"
            if code in REFUSALS:
                reason = (f"{count} QoS 0 {what} refused at node {core.me}, the last: {reason}; not delivered, and "
                          "refused again if sent again: publish with QoS 1 to learn which")  # fmt: skip
            else:
                reason = (f"{count} QoS 0 {what} failed at node {core.me}, the last: {reason}; not delivered: "
                          "publish again, or with QoS 1 to learn which fail")  # fmt: skip
            if not core.send_client(session.rid, codec.error_parts(code, reason, count=count)):
                return False
            del failed[code]
            core.metrics["publishes.failed_reported"] += count
        session.publish_failed = None
        return True

    def on_ping(self, session: Session, frame: Frame) -> None:
        """A client's PING: the PONG waits for the publishes it sent before (see the rules)."""
        ping_id = frame.header.get("id")
        if self.waiting_of.get(session.rid):
            self.pongs_due.setdefault(session.rid, []).append(ping_id)
            return
        self._pong(session.rid, ping_id)

    def _pong(self, rid: bytes, ping_id: Any) -> None:
        core = self.core
        if core.outbox.forwards:  # after them, and after the report of any frame zmq would not queue (the flush)
            self.pongs_held.append((rid, ping_id))
            return
        session = core.destination.sessions.get(rid)
        if session is not None and session.publish_failed:
            self.failure_reports.pop(rid, None)
            if not self._report(session):  # the PONG would vouch for publishes whose failure the client misses
                return
        core.send_client(rid, codec.encode(codec.PONG, {"id": ping_id}))

    def send_held_pongs(self) -> None:
        """At the flush, once the forwards left and the reports of those that could not went: the held PONGs."""
        held, self.pongs_held = self.pongs_held, []
        for rid, ping_id in held:
            self._pong(rid, ping_id)

    def _left_queue(self, rid: bytes) -> None:
        waiting = self.waiting_of[rid] - 1
        if waiting:
            self.waiting_of[rid] = waiting
            return
        del self.waiting_of[rid]
        pongs = self.pongs_due.pop(rid, None)
        if pongs is not None:
            for ping_id in pongs:
                self._pong(rid, ping_id)

    def forwards_unsent(self, dest: str, forwards: list[Forward]) -> None:
        """A frame of forwards could not be queued to ``dest``: the publishes among them fail now, QoS 1 ones each
        with its ERROR, QoS 0 ones counted for their clients' reports (the flush sends them before held PONGs)."""
        reason = f"destination node {dest} is unreachable"
        for f in forwards:
            if f.fid:
                pending = self.core.requests.close(f.fid)
                if isinstance(pending, PendingForward):
                    self._fail_publish(pending.pub, codec.E_UNAVAILABLE, reason)
            elif f.client is not None:
                count = f.count
                self.core.metrics["errors.unavailable"] += count
                self._count_failed(f.client, codec.E_UNAVAILABLE, reason, count)
                f.client = None  # the same item in another node's frame: these messages are counted already

    def take_unexpired(self) -> None:
        """One timer per batch of QoS 1 forwards, not one per forward."""
        if self.unexpired_fwds:
            fids, self.unexpired_fwds = self.unexpired_fwds, []
            self.core.effects.call_later(self.core.cfg.request_timeout, lambda: self._expire_fwds(fids))

    def _expire_fwds(self, fids: list[int]) -> None:
        for fid in fids:
            found = self.core.requests.get(fid)
            if isinstance(found, (SharedForward, SharedCopy)) and found.acked:
                continue  # our copy of a message a member has not acknowledged yet: kept until SHARED_DONE
            pending = self.core.requests.close(fid)
            if isinstance(pending, (PendingForward, SharedForward, SharedCopy)):
                reason = f"node {pending.dest} did not confirm delivery in time"
                self._fail_publish(pending.pub, codec.E_TIMEOUT, reason)

    def on_fwd_ack(self, sender: str, frame: Frame) -> None:
        requests = self.core.requests
        for fid in frame.header["ids"]:
            pending = requests.get(fid)
            if isinstance(pending, PendingForward) and pending.dest == sender:
                requests.close(fid)
                pub = pending.pub
                pub.acks_left -= 1
                self._maybe_puback(pub)
            elif isinstance(pending, (SharedForward, SharedCopy)) and pending.dest == sender and not pending.acked:
                pending.acked = True  # kept as our copy until SHARED_DONE / SHARED_RELEASE (see the rules)
                pending.pub.acks_left -= 1
                self._maybe_puback(pending.pub)

    # ------------------------------------------------------------------ requests failing
    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None:
        reason = f"node {sender} refused: {reason}"
        if isinstance(request, HeldCopy):
            return  # nothing was asked of its origin: an ERROR naming it is not about it
        if isinstance(request, Lookup):
            self._lookup_failed(rid, reason, refresh=code == codec.E_STALE_EPOCH)
        elif self.core.requests.close(rid) is not None:
            self._fail_publish(request.pub, code, reason)

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None:
        if isinstance(request, SharedForward) and request.acked:
            self.core.requests.close(rid)
            self._shared_node_lost(request, node)
            return
        if isinstance(request, (SharedCopy, HeldCopy)):
            self.core.requests.close(rid)
            if isinstance(request, SharedCopy):
                self._copy_holder_lost(request, node)
            else:
                self._entry_lost(request, node)
            return
        if isinstance(request, Lookup):
            self._lookup_failed(rid, f"route owner {node} left the cluster")
        elif self.core.requests.close(rid) is not None:
            self._fail_publish(request.pub, codec.E_UNAVAILABLE, f"destination node {node} left the cluster")
