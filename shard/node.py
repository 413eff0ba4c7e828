"""The shard node process: a single-threaded zmq.Poller loop around the pure cores.

Rules of this file:
- One thread owns every socket and every piece of routing state. The etcd session thread only hands member
  snapshots in over an inproc PULL socket.
- Sockets: a ROUTER for clients (``client_endpoint``), a ROUTER for peers (``peer_endpoint``) and one DEALER per
  peer whose routing id is this node's id, so a peer's ROUTER knows who is talking. Requests and replies between
  nodes both travel DEALER -> ROUTER. ``ROUTER_MANDATORY`` turns a send to a vanished client into an error we act
  on instead of a silent drop; ``ROUTER_HANDOVER`` lets a reconnecting client keep its routing id.
- The loop drains each ready socket in bounded NOBLOCK batches, then runs due timers, then polls with the next
  timer deadline as timeout: no socket can starve another or the timers.
- Routes: a client's subscription lives only on its own node (``local_q0``/``local_q1``). When a filter gets its
  first local subscriber the node sends ROUTE_ADD(filter -> this node) to every owner of the filter's shard (to
  every member for root filters), and ROUTE_DEL when the last one leaves: reference counting per node.
- Publish: the entry node asks the primary owner of each shard a topic can be stored in (at most two, see
  ``shardmq.router.partition``) which nodes have matching routes, adds its own root-set matches, then sends one
  FWD to each such node. Each destination matches the topic against its local subscribers once, so a client
  gets exactly one copy per publish. Publishes wait in a per-topic FIFO until their lookups finish, so the order
  of publishes to one topic is the order they are forwarded in.
- QoS 1: the publisher's PUBACK is sent after every destination answered FWD_ACK; destinations deliver QoS 1
  messages with a message id and redeliver until the client DACKs it or goes away.
- Every rejected input is answered with an ERROR frame (when the sender can be addressed), counted in
  ``metrics`` under ``errors.<code>`` and logged; the node keeps serving.
"""

from __future__ import annotations

import heapq
import itertools
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
import zmq

from shardmq.ring import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT, ShardMap
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.matching import FilterIndex
from shardmq.router.partition import lookup_keys, placement_key
from shardmq.router.routes import RouteTable
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

from .membership import EtcdSession, MemberInfo, ensure_cluster_config, etcd_client

log = structlog.get_logger("shardmq.node")

DRAIN_BATCH = 256
HELD_PER_PEER = 10_000
HELD_PEERS = 16
HEARTBEAT_MS = 2000


@dataclass(slots=True)
class NodeConfig:
    node_id: str
    client_endpoint: str
    peer_endpoint: str
    etcd_url: str
    cluster: str = "default"
    weight: int = 1
    shard_count: int = DEFAULT_SHARD_COUNT
    replication: int = DEFAULT_REPLICATION
    lease_ttl: int = 5
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    request_timeout: float = 5.0
    redelivery_interval: float = 2.0
    client_idle_check: float = 10.0


@dataclass(slots=True)
class Session:
    """What a node knows of one connected client."""

    rid: bytes
    last_seen: float
    filters: dict[str, int] = field(default_factory=dict)  # filter -> granted qos
    inflight: dict[int, tuple[str, bytes, float]] = field(default_factory=dict)  # mid -> (topic, payload, due)
    next_mid: int = 1


@dataclass(slots=True)
class Publish:
    client: bytes | None
    ref: int | None
    topic: str
    qos: int
    payload: bytes
    lookups_left: int = 0
    acks_left: int = 0
    dests: set[str] = field(default_factory=set)
    failed: bool = False


@dataclass(slots=True)
class Waiter:
    """Something waiting for a set of peer replies, e.g. a SUBACK waiting for every owner's ROUTE_ACK."""

    pending: set[str]
    callbacks: list[Callable[[list[str]], None]]
    filters: list[str] = field(default_factory=list)  # ROUTE_ADD filters this waiter installs
    failures: list[str] = field(default_factory=list)


def gate(count: int, on_done: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """A callback that calls ``on_done`` (with every failure seen) once it has itself been called ``count`` times."""
    failures: list[str] = []
    left = [count]

    def one(more: list[str]) -> None:
        failures.extend(more)
        left[0] -= 1
        if left[0] == 0:
            on_done(failures)

    return one


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.cfg = config
        self.me = config.node_id
        self.log = log.bind(node=self.me)
        self.ctx = zmq.Context.instance()
        self.metrics: Counter[str] = Counter()
        self.routes = RouteTable()
        self.local_q0: FilterIndex[bytes] = FilterIndex()
        self.local_q1: FilterIndex[bytes] = FilterIndex()
        self.sessions: dict[bytes, Session] = {}
        self.members: dict[str, MemberInfo] = {}
        self.shard_map: ShardMap | None = None
        self.epoch = 0
        self.dealers: dict[str, zmq.Socket] = {}
        self.held_for_peer: dict[str, deque[list[bytes]]] = {}  # frames for peers not yet in the member list
        self.topic_queues: dict[str, deque[Publish]] = {}
        self.pending_lookups: dict[int, tuple[str, int, Publish]] = {}  # id -> (peer asked, shard, publish)
        self.pending_fwds: dict[int, tuple[str, Publish]] = {}
        self.waiters: dict[int, Waiter] = {}
        self.route_add_waiters: dict[str, int] = {}  # filter -> waiter of the ROUTE_ADD still installing it
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.ids = itertools.count(1)
        self.started = time.monotonic()
        self.running = False
        self.settings = {"shard_count": config.shard_count, "replication": config.replication}

    # ------------------------------------------------------------------ sockets
    def _open_sockets(self) -> None:
        self.client_sock = self.ctx.socket(zmq.ROUTER)
        self.peer_sock = self.ctx.socket(zmq.ROUTER)
        for sock in (self.client_sock, self.peer_sock):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MS * 3)
            sock.setsockopt(zmq.LINGER, 0)
            # Frames far beyond our limits are cut off by zmq before they are buffered in full.
            sock.setsockopt(zmq.MAXMSGSIZE, codec.DEFAULT_MAX_HEADER + 2 * self.cfg.max_payload)
        self.client_sock.bind(self.cfg.client_endpoint)
        self.peer_sock.bind(self.cfg.peer_endpoint)
        self.member_pull = self.ctx.socket(zmq.PULL)
        self.member_endpoint = f"inproc://members-{self.me}-{os.getpid()}"
        self.member_pull.bind(self.member_endpoint)

    def _dealer(self, node: str) -> zmq.Socket | None:
        sock = self.dealers.get(node)
        if sock is None:
            info = self.members.get(node)
            if info is None:
                return None
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.me.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MS * 3)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(info.peer_endpoint)
            self.dealers[node] = sock
        return sock

    def send_peer(self, node: str, parts: list[bytes]) -> bool:
        sock = self._dealer(node)
        if sock is None:
            # A peer that just joined can talk before our member list shows it: hold the frames until it does.
            held = self.held_for_peer.get(node)
            if held is None:
                if len(self.held_for_peer) >= HELD_PEERS:
                    self.metrics["drops.peer_unknown"] += 1
                    return False
                held = self.held_for_peer[node] = deque(maxlen=HELD_PER_PEER)
            if len(held) == HELD_PER_PEER:
                self.metrics["drops.peer_unknown"] += 1
            held.append(parts)
            self.metrics["held.peer_unknown"] += 1
            return True
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            self.metrics["drops.peer_hwm"] += 1
            self.log.warning("peer_queue_full", peer=node)
            return False
        self.metrics["frames_out.peer"] += 1
        return True

    def send_client(self, rid: bytes, parts: list[bytes]) -> bool:
        try:
            self.client_sock.send_multipart([rid, *parts], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.metrics["clients.vanished"] += 1
                self._drop_session(rid, reason="unreachable")
            else:
                self.metrics["drops.client_hwm"] += 1
            return False
        self.metrics["frames_out.client"] += 1
        return True

    def reject_client(self, rid: bytes, code: str, reason: str, ref: int | None = None) -> None:
        self.metrics[f"errors.{code}"] += 1
        self.log.info("client_error", client=rid.decode(errors="replace"), code=code, reason=reason)
        self.send_client(rid, codec.error_parts(code, reason, ref))

    # ------------------------------------------------------------------ timers
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.ids), fn))

    def _run_timers(self) -> float | None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()
        return self.timers[0][0] - time.monotonic() if self.timers else None

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self._open_sockets()
        try:
            self.settings = ensure_cluster_config(etcd_client(self.cfg.etcd_url), self.cfg.cluster, self.settings)
        except Exception as exc:
            self.log.error("etcd_unreachable", etcd=self.cfg.etcd_url, error=str(exc))
            raise SystemExit(2) from exc
        me = MemberInfo(self.me, self.cfg.client_endpoint, self.cfg.peer_endpoint, self.cfg.weight)
        self.session = EtcdSession(
            self.ctx, self.cfg.etcd_url, self.cfg.cluster, me, self.member_endpoint, self.cfg.lease_ttl
        )
        self.session.start()
        self.running = True
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.call_later(self.cfg.redelivery_interval, self._redeliver_tick)
        self.call_later(self.cfg.client_idle_check, self._idle_tick)
        cfg = self.cfg
        self.log.info("node_started", client_endpoint=cfg.client_endpoint, peer_endpoint=cfg.peer_endpoint, epoch=0)
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.peer_sock, zmq.POLLIN)
        poller.register(self.member_pull, zmq.POLLIN)
        try:
            while self.running:
                timeout = self._run_timers()
                ready = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))
                if self.member_pull in ready:
                    self._drain(self.member_pull, lambda parts: self.on_members(orjson.loads(parts[0])))
                if self.peer_sock in ready:
                    self._drain(self.peer_sock, self.on_peer_parts)
                if self.client_sock in ready:
                    self._drain(self.client_sock, self.on_client_parts)
        finally:
            self._shutdown()

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[bytes]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(parts)
            except Exception:  # a bug handling one frame must not take the node down
                self.metrics["errors.internal"] += 1
                self.log.exception("handler_failed")

    def stop(self) -> None:
        self.running = False

    def _shutdown(self) -> None:
        self.log.info("node_stopping")
        self.session.stop()
        self.session.join(timeout=3)
        for sock in [self.client_sock, self.peer_sock, self.member_pull, *self.dealers.values()]:
            sock.close(linger=0)

    # ------------------------------------------------------------------ membership
    def on_members(self, snapshot: dict[str, Any]) -> None:
        members = {m["node"]: MemberInfo.from_dict(m) for m in snapshot["members"]}
        if not members:
            return
        gone = set(self.members) - set(members)
        self.members = members
        self.epoch = int(snapshot["epoch"])
        self.shard_map = ShardMap.build(
            {m.node_id: m.weight for m in members.values()},
            shard_count=int(self.settings["shard_count"]),
            replication=int(self.settings["replication"]),
        )
        held, self.held_for_peer = self.held_for_peer, {}
        for node, frames in held.items():
            if node not in members:  # still unknown after a membership change: not a member, drop
                self.metrics["drops.peer_unknown"] += len(frames)
                continue
            for parts in frames:
                self.send_peer(node, parts)
        for node in gone:
            sock = self.dealers.pop(node, None)
            if sock is not None:
                sock.close(linger=0)
            removed = self.routes.remove_node(node)
            self._fail_peer_requests(node)
            self.log.warning("member_lost", peer=node, routes_removed=removed, epoch=self.epoch)
        self.log.info(
            "membership", epoch=self.epoch, members=sorted(members), shards_held=len(self.shard_map.shards_of(self.me))
        )

    def _fail_peer_requests(self, node: str) -> None:
        """A gone peer will answer nothing: fail what waits on it now instead of at its timeout."""
        self.metrics["peers.lost"] += 1
        for wid, waiter in list(self.waiters.items()):
            if node in waiter.pending:
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        for lid, (peer, shard, pub) in list(self.pending_lookups.items()):
            if peer == node:
                del self.pending_lookups[lid]
                self._fail_publish(pub, codec.E_UNAVAILABLE, f"route owner {node} left the cluster", shard)
                self._dispatch(pub.topic)
        for fid, (peer, pub) in list(self.pending_fwds.items()):
            if peer == node:
                del self.pending_fwds[fid]
                self._fail_publish(pub, codec.E_UNAVAILABLE, f"destination node {node} left the cluster")

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
        handler = self._client_handlers[frame.type]
        handler(self, session, frame)

    def _on_hello(self, session: Session, frame: Frame) -> None:
        cfg = self.cfg
        header = {"id": frame.header.get("id"), "node": self.me, "max_payload": cfg.max_payload, "epoch": self.epoch}
        self.send_client(session.rid, codec.encode(codec.WELCOME, header))

    def _on_ping(self, session: Session, frame: Frame) -> None:
        self.send_client(session.rid, codec.encode(codec.PONG, {"id": frame.header.get("id")}))

    def _on_bye(self, session: Session, frame: Frame) -> None:
        self._drop_session(session.rid, reason="bye")

    def _on_status(self, session: Session, frame: Frame) -> None:
        self.send_client(
            session.rid, codec.encode(codec.STATUS_REPLY, {"id": frame.header["id"], "status": self.status()})
        )

    def _on_sub(self, session: Session, frame: Frame) -> None:
        ref = frame.header["id"]
        qos = frame.header["qos"]
        if qos not in (0, 1):
            self.reject_client(session.rid, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}", ref)
            return
        if self.shard_map is None:
            self.reject_client(session.rid, codec.E_UNAVAILABLE, "the node has not joined a cluster yet; retry", ref)
            return
        results: list[Any] = []
        new_filters: list[str] = []
        installing: set[int] = set()  # route adds started by earlier subscribers that this SUBACK must wait for
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
            if self._subscribe_local(session, filt, qos):
                new_filters.append(filt)
            elif filt in self.route_add_waiters:
                installing.add(self.route_add_waiters[filt])
        self.metrics["subscriptions"] += len(new_filters)

        accepted = [f for f, r in zip(frame.header["filters"], results, strict=True) if not isinstance(r, dict)]

        def done(failures: list[str]) -> None:
            if failures:
                # All or nothing: undo this SUB so the client is not sent messages for filters it was told failed.
                if session.rid in self.sessions:
                    gone = [f for f in accepted if self._unsubscribe_local(session, f)]
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
        gone = [f for f in frame.header["filters"] if isinstance(f, str) and self._unsubscribe_local(session, f)]

        def done(failures: list[str]) -> None:
            self.send_client(session.rid, codec.encode(codec.UNSUBACK, {"id": ref}))

        self._change_routes(codec.ROUTE_DEL, gone, done)

    def _drop_session(self, rid: bytes, reason: str) -> None:
        session = self.sessions.pop(rid, None)
        if session is None:
            return
        gone = [f for f in list(session.filters) if self._unsubscribe_local(session, f)]
        self._change_routes(codec.ROUTE_DEL, gone, lambda failures: None)
        self.metrics["clients.disconnected"] += 1
        self.log.info("client_gone", client=rid.decode(errors="replace"), reason=reason, routes_dropped=len(gone))

    def _on_dack(self, session: Session, frame: Frame) -> None:
        for mid in frame.header["mids"]:
            if session.inflight.pop(mid, None) is not None:
                self.metrics["deliveries.acked"] += 1

    def _on_pub(self, session: Session, frame: Frame) -> None:
        ref = frame.header.get("id")
        topic, qos = frame.header["topic"], frame.header["qos"]
        if qos not in (0, 1):
            self.reject_client(session.rid, codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}", ref)
            return
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            self.reject_client(session.rid, exc.code, exc.reason, ref)
            return
        self.metrics["publishes.in"] += 1
        self.publish(Publish(session.rid, ref, topic, qos, frame.payload))

    _client_handlers: dict[bytes, Callable[[Node, Session, Frame], None]] = {
        codec.HELLO: _on_hello,
        codec.PING: _on_ping,
        codec.PONG: lambda self, session, frame: None,
        codec.BYE: _on_bye,
        codec.STATUS: _on_status,
        codec.SUB: _on_sub,
        codec.UNSUB: _on_unsub,
        codec.DACK: _on_dack,
        codec.PUB: _on_pub,
    }

    # ------------------------------------------------------------------ routes
    def _route_targets(self, filt: str) -> tuple[int, tuple[str, ...]]:
        assert self.shard_map is not None
        key = placement_key(filt)
        if key is None:
            return RouteTable.ROOT, tuple(sorted(self.members))
        shard = self.shard_map.shard_of(key)
        return shard, self.shard_map.owners(shard)

    def _change_routes(self, kind: bytes, filters: list[str], on_done: Callable[[list[str]], None]) -> None:
        """Apply ROUTE_ADD/ROUTE_DEL for this node's filters at every owner; ``on_done`` once, when all confirmed."""
        if not filters or self.shard_map is None:  # without a map no route was ever installed
            on_done([])
            return
        by_node: dict[str, list[list[Any]]] = {}
        for filt in filters:
            shard, owners = self._route_targets(filt)
            for owner in owners:
                by_node.setdefault(owner, []).append([shard, filt])
        local = by_node.pop(self.me, None)
        if local:
            self._apply_routes(kind, self.me, local)
        if not by_node:
            on_done([])
            return
        wid = next(self.ids)
        waiter = self.waiters[wid] = Waiter(set(by_node), [on_done])
        if kind == codec.ROUTE_ADD:
            waiter.filters = filters
            for filt in filters:
                self.route_add_waiters[filt] = wid
        for node, routes in by_node.items():
            header = {"id": wid, "node": self.me, "epoch": self.epoch, "routes": routes}
            if not self.send_peer(node, codec.encode(kind, header)):
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        self.call_later(self.cfg.request_timeout, lambda: self._expire_waiter(wid))

    def _apply_routes(self, kind: bytes, node: str, routes: list[list[Any]]) -> None:
        change = self.routes.add if kind == codec.ROUTE_ADD else self.routes.remove
        for shard, filt in routes:
            change(shard, filt, node)

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

    def _finish_waiter(self, wid: int) -> None:
        waiter = self.waiters.pop(wid)
        for filt in waiter.filters:
            if self.route_add_waiters.get(filt) == wid:
                del self.route_add_waiters[filt]
        for callback in waiter.callbacks:
            callback(waiter.failures)

    # ------------------------------------------------------------------ publish
    def publish(self, pub: Publish) -> None:
        smap = self.shard_map
        if smap is None:
            self._fail_publish(pub, codec.E_UNAVAILABLE, "the node has not joined a cluster yet; retry shortly")
            return
        pub.dests |= self.routes.match(RouteTable.ROOT, pub.topic)
        shards = {smap.shard_of(key) for key in lookup_keys(pub.topic)}
        for shard in shards:
            owner = smap.owners(shard)[0]
            if owner == self.me:
                pub.dests |= self.routes.match(shard, pub.topic)
                continue
            lid = next(self.ids)
            header = {"id": lid, "shard": shard, "epoch": self.epoch, "topic": pub.topic}
            if not self.send_peer(owner, codec.encode(codec.LOOKUP, header)):
                self._fail_publish(pub, codec.E_UNAVAILABLE, f"owner {owner} of shard {shard} is unreachable", shard)
                return
            self.pending_lookups[lid] = (owner, shard, pub)
            pub.lookups_left += 1
            self.call_later(self.cfg.request_timeout, lambda lid=lid: self._expire_lookup(lid))
        queue = self.topic_queues.get(pub.topic)
        if queue is None:
            queue = self.topic_queues[pub.topic] = deque()
        queue.append(pub)
        self._dispatch(pub.topic)

    def _dispatch(self, topic: str) -> None:
        queue = self.topic_queues.get(topic)
        while queue and (queue[0].lookups_left == 0 or queue[0].failed):
            pub = queue.popleft()
            if not pub.failed:
                self._forward(pub)
        if queue is not None and not queue:
            del self.topic_queues[topic]

    def _forward(self, pub: Publish) -> None:
        for dest in pub.dests:
            if dest == self.me:
                self.deliver_local(pub.topic, pub.qos, pub.payload)
                continue
            fid = next(self.ids)
            header = {"id": fid, "shard": -1, "epoch": self.epoch, "topic": pub.topic, "qos": pub.qos}
            if not self.send_peer(dest, codec.encode(codec.FWD, header, pub.payload)):
                self._fail_publish(pub, codec.E_UNAVAILABLE, f"destination node {dest} is unreachable")
                continue
            self.metrics["forwards.out"] += 1
            if pub.qos:
                self.pending_fwds[fid] = (dest, pub)
                pub.acks_left += 1
                self.call_later(self.cfg.request_timeout, lambda fid=fid: self._expire_fwd(fid))
        self._maybe_puback(pub)

    def _maybe_puback(self, pub: Publish) -> None:
        if pub.qos and pub.acks_left == 0 and not pub.failed and pub.client is not None:
            self.metrics["publishes.acked"] += 1
            self.send_client(pub.client, codec.encode(codec.PUBACK, {"id": pub.ref}))

    def _fail_publish(self, pub: Publish, code: str, reason: str, shard: int | None = None) -> None:
        if pub.failed:
            return
        pub.failed = True
        self.metrics[f"errors.{code}"] += 1
        self.log.warning("publish_failed", topic=pub.topic, code=code, reason=reason, shard=shard, epoch=self.epoch)
        if pub.client is not None and pub.qos:
            self.send_client(pub.client, codec.error_parts(code, reason, pub.ref))

    def _expire_lookup(self, lid: int) -> None:
        pending = self.pending_lookups.pop(lid, None)
        if pending is not None:
            owner, shard, pub = pending
            self._fail_publish(pub, codec.E_TIMEOUT, f"route owner {owner} did not answer the lookup in time", shard)
            self._dispatch(pub.topic)

    def _expire_fwd(self, fid: int) -> None:
        pending = self.pending_fwds.pop(fid, None)
        if pending is not None:
            self._fail_publish(pending[1], codec.E_TIMEOUT, f"node {pending[0]} did not confirm delivery in time")

    # ------------------------------------------------------------------ delivery
    def deliver_local(self, topic: str, qos: int, payload: bytes) -> None:
        q1 = self.local_q1.match(topic) if qos else set()
        q0 = self.local_q0.match(topic)
        if not qos:
            q0 |= self.local_q1.match(topic)
        msg0 = codec.encode(codec.MSG, {"topic": topic, "qos": 0}, payload)
        for rid in q0 - q1:
            if self.send_client(rid, msg0):
                self.metrics["deliveries.qos0"] += 1
        now = time.monotonic()
        for rid in q1:
            session = self.sessions.get(rid)
            if session is None:
                continue
            mid = session.next_mid
            session.next_mid += 1
            session.inflight[mid] = (topic, payload, now + self.cfg.redelivery_interval)
            if self.send_client(rid, codec.encode(codec.MSG, {"topic": topic, "qos": 1, "mid": mid}, payload)):
                self.metrics["deliveries.qos1"] += 1

    def _redeliver_tick(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            for mid, (topic, payload, due) in list(session.inflight.items()):
                if due <= now and session.rid in self.sessions:
                    session.inflight[mid] = (topic, payload, now + self.cfg.redelivery_interval)
                    header = {"topic": topic, "qos": 1, "mid": mid, "dup": True}
                    if self.send_client(session.rid, codec.encode(codec.MSG, header, payload)):
                        self.metrics["deliveries.redelivered"] += 1
        self.call_later(self.cfg.redelivery_interval, self._redeliver_tick)

    def _idle_tick(self) -> None:
        """Probe idle clients: with ROUTER_MANDATORY a send to a vanished one fails and drops its session."""
        cutoff = time.monotonic() - self.cfg.client_idle_check
        for session in list(self.sessions.values()):
            if session.last_seen < cutoff:
                self.send_client(session.rid, codec.encode(codec.PING, {}))
        self.call_later(self.cfg.client_idle_check, self._idle_tick)

    # ------------------------------------------------------------------ peer frames
    def on_peer_parts(self, parts: list[bytes]) -> None:
        self.metrics["frames_in.peer"] += 1
        sender, rest = parts[0].decode("utf-8", "replace"), parts[1:]
        try:
            frame = codec.decode(rest, max_payload=self.cfg.max_payload, allowed=codec.PEER_REQUESTS)
        except ProtocolError as exc:
            self.metrics[f"errors.{exc.code}"] += 1
            self.log.warning("peer_frame_rejected", peer=sender, code=exc.code, reason=exc.reason, epoch=self.epoch)
            self.send_peer(sender, codec.error_parts(exc.code, exc.reason, exc.ref))
            return
        self._peer_handlers[frame.type](self, sender, frame)

    def _on_route_change(self, sender: str, frame: Frame) -> None:
        h = frame.header
        self._apply_routes(frame.type, h["node"], h["routes"])
        self.send_peer(sender, codec.encode(codec.ROUTE_ACK, {"id": h["id"], "epoch": self.epoch}))

    def _on_route_ack(self, sender: str, frame: Frame) -> None:
        self._settle_waiter(frame.header["id"], sender)

    def _on_lookup(self, sender: str, frame: Frame) -> None:
        h = frame.header
        nodes = sorted(self.routes.match(h["shard"], h["topic"]))
        reply = {"id": h["id"], "shard": h["shard"], "epoch": self.epoch, "nodes": nodes}
        self.send_peer(sender, codec.encode(codec.LOOKUP_REPLY, reply))

    def _on_lookup_reply(self, sender: str, frame: Frame) -> None:
        pending = self.pending_lookups.pop(frame.header["id"], None)
        if pending is not None:
            pub = pending[2]
            pub.dests.update(frame.header["nodes"])
            pub.lookups_left -= 1
            self._dispatch(pub.topic)

    def _on_fwd(self, sender: str, frame: Frame) -> None:
        h = frame.header
        self.metrics["forwards.in"] += 1
        self.deliver_local(h["topic"], h["qos"], frame.payload)
        if h["qos"]:
            self.send_peer(sender, codec.encode(codec.FWD_ACK, {"id": h["id"], "epoch": self.epoch}))

    def _on_fwd_ack(self, sender: str, frame: Frame) -> None:
        pending = self.pending_fwds.pop(frame.header["id"], None)
        if pending is not None:
            pub = pending[1]
            pub.acks_left -= 1
            self._maybe_puback(pub)

    def _on_peer_error(self, sender: str, frame: Frame) -> None:
        """A peer refused one of our requests: fail what waits on it now rather than at its timeout."""
        h = frame.header
        ref = h.get("ref")
        self.metrics["errors.from_peer"] += 1
        self.log.warning("peer_error", peer=sender, code=h["code"], reason=h["reason"], ref=ref, epoch=self.epoch)
        reason = f"node {sender} refused: {h['reason']}"
        if ref in self.waiters:
            self.waiters[ref].failures.append(f"{sender} ({h['code']})")
            self._settle_waiter(ref, sender)
        elif ref in self.pending_lookups:
            _, shard, pub = self.pending_lookups.pop(ref)
            self._fail_publish(pub, h["code"], reason, shard)
            self._dispatch(pub.topic)
        elif ref in self.pending_fwds:
            self._fail_publish(self.pending_fwds.pop(ref)[1], h["code"], reason)

    _peer_handlers: dict[bytes, Callable[[Node, str, Frame], None]] = {
        codec.ROUTE_ADD: _on_route_change,
        codec.ROUTE_DEL: _on_route_change,
        codec.ROUTE_ACK: _on_route_ack,
        codec.LOOKUP: _on_lookup,
        codec.LOOKUP_REPLY: _on_lookup_reply,
        codec.FWD: _on_fwd,
        codec.FWD_ACK: _on_fwd_ack,
        codec.ERROR: _on_peer_error,
    }

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        smap = self.shard_map
        return {
            "node": self.me,
            "client_endpoint": self.cfg.client_endpoint,
            "alive": True,
            "epoch": self.epoch,
            "members": sorted(self.members),
            "shard_count": smap.shard_count if smap else 0,
            "replication": smap.replication if smap else 0,
            "shards": len(smap.shards_of(self.me)) if smap else 0,
            "primary_shards": len(smap.primaries_of(self.me)) if smap else 0,
            "routes": self.routes.route_count,
            "root_set_size": self.routes.root_size,
            "clients": len(self.sessions),
            "local_filters": len(self.local_q0) + len(self.local_q1),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "metrics": dict(self.metrics),
        }
