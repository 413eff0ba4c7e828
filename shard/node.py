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

from shardmq.rebalance import Commit, Coordinator, Member, StartHandoff
from shardmq.ring import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT, Assignment, ShardMap, shard_for_key
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.matching import FilterIndex
from shardmq.router.partition import lookup_keys, placement_key
from shardmq.router.routes import RouteTable
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

from .membership import (
    EtcdSession,
    MemberInfo,
    ensure_cluster_config,
    etcd_client,
    read_assignment,
    write_assignment,
)

log = structlog.get_logger("shardmq.node")

DRAIN_BATCH = 256
SNAPSHOT_CHUNK = 5000
ROOT = RouteTable.ROOT
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
    lookup_timeout: float = 1.0  # then ask the next owner: a dead primary costs one timeout, not a failed publish
    handoff_grace: float = 3.0  # an ex-owner keeps serving and forwarding this long after a flip
    handoff_timeout: float = 30.0
    endpoint_file: str | None = None  # where to write the bound endpoints (for launchers using port 0)
    advertise_peer_endpoint: str | None = None  # what peers should connect to, when not the bound one (NAT, proxy)
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
class Lookup:
    pub: Publish
    shard: int
    owner: str
    tried: list[str]


@dataclass(slots=True)
class Waiter:
    """Something waiting for a set of peer replies, e.g. a SUBACK waiting for every owner's ROUTE_ACK."""

    pending: set[str]
    callbacks: list[Callable[[list[str]], None]]
    kind: bytes = codec.ROUTE_ADD
    sent: dict[str, list[list[Any]]] = field(default_factory=dict)  # node -> [shard, epoch, filter] items
    attempt: int = 0
    filters: list[str] = field(default_factory=list)  # ROUTE_ADD filters this waiter installs
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Forwarding:
    """A hand-off source's change stream: route changes for the shard also go to ``targets``."""

    targets: set[str]
    epoch: int  # the shard's epoch when the hand-off started; a higher one means the flip happened


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
        self.epoch = 0  # membership epoch (see membership.py); shard epochs live in the assignment
        self.assignment: Assignment | None = None
        self.assignment_revision = 0
        self.leader: str | None = None
        self.coordinator: Coordinator | None = None
        self.forwarding: dict[int, Forwarding] = {}  # shard -> change stream of a hand-off we are the source of
        self.incoming: dict[int, int] = {}  # shard -> move id of a hand-off we are a new replica in
        self._lead_scheduled = False
        self._last_refresh = 0.0
        self._last_progress_log = 0.0
        self._target_cache: tuple[Any, tuple[tuple[str, ...], ...]] | None = None
        self.dealers: dict[str, zmq.Socket] = {}
        self.topic_queues: dict[str, deque[Publish]] = {}
        self.pending_lookups: dict[int, Lookup] = {}
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
        # "tcp://127.0.0.1:*" binds a free port chosen by the kernel: no race with other processes picking ports.
        self.client_sock.bind(self.cfg.client_endpoint)
        self.peer_sock.bind(self.cfg.peer_endpoint)
        self.cfg.client_endpoint = self.client_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.cfg.peer_endpoint = self.peer_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.cfg.endpoint_file:
            tmp = f"{self.cfg.endpoint_file}.tmp"
            bound = {"client_endpoint": self.cfg.client_endpoint, "peer_endpoint": self.cfg.peer_endpoint}
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(bound))
            os.replace(tmp, self.cfg.endpoint_file)
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
        if sock is None:  # not a member (we only talk to members, and only members may talk to us)
            self.metrics["drops.peer_unknown"] += 1
            return False
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
            self.etcd = etcd_client(self.cfg.etcd_url, timeout=max(0.5, self.cfg.lease_ttl / 4))
            self.settings = ensure_cluster_config(self.etcd, self.cfg.cluster, self.settings)
        except Exception as exc:
            self.log.error("etcd_unreachable", etcd=self.cfg.etcd_url, error=str(exc))
            raise SystemExit(2) from exc
        advertised = self.cfg.advertise_peer_endpoint or self.cfg.peer_endpoint
        me = MemberInfo(self.me, self.cfg.client_endpoint, advertised, self.cfg.weight)
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
                    self._drain(self.member_pull, lambda parts: self.on_snapshot(orjson.loads(parts[0]), parts[1]))
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

    # ------------------------------------------------------------------ membership and ownership
    def fenced(self) -> bool:
        return self.session.fenced(time.monotonic())

    def on_snapshot(self, snapshot: dict[str, Any], document: bytes) -> None:
        """A new view from etcd: members, leader and (when it changed) the assignment document."""
        members = {m["node"]: MemberInfo.from_dict(m) for m in snapshot["members"]}
        if self.me not in members and self.members.get(self.me) is not None:
            self.log.warning("removed_from_cluster", epoch=self.epoch)  # `shardmq cluster remove` deleted our key
            self.stop()
            return
        self.leader = snapshot.get("leader")
        if members != self.members:
            self.on_members(members, int(snapshot["epoch"]))
        if document and snapshot["assignment_revision"] > self.assignment_revision:
            self._set_assignment(Assignment.from_json(document), snapshot["assignment_revision"])
        if self.leader == self.me and self.coordinator is None:
            self.coordinator = Coordinator(
                int(self.settings["shard_count"]),
                int(self.settings["replication"]),
                handoff_timeout=self.cfg.handoff_timeout,
            )
            self.log.info("leader_elected", epoch=self.epoch)
        elif self.leader != self.me:
            self.coordinator = None
        self._lead()
        self._maybe_finish_leaving()

    def on_members(self, members: dict[str, MemberInfo], epoch: int) -> None:
        joined = set(members) - set(self.members) - {self.me}
        gone = set(self.members) - set(members)
        had_members = bool(self.members)
        self.members = members
        self.epoch = epoch
        for node in gone:
            sock = self.dealers.pop(node, None)
            if sock is not None:
                sock.close(linger=0)
            removed = self.routes.remove_node(node)
            self._fail_peer_requests(node)
            self.log.warning("member_lost", peer=node, routes_removed=removed, epoch=self.epoch)
        if had_members and joined:
            self._announce_root_routes(joined)
        self.log.info("membership", epoch=self.epoch, members=sorted(members), joined=sorted(joined), gone=sorted(gone))

    def _announce_root_routes(self, nodes: set[str]) -> None:
        """Root-set routes live on every node: give a newcomer ours (every node does the same)."""
        local = {f for idx in (self.local_q0, self.local_q1) for f in idx.filters() if placement_key(f) is None}
        if not local:
            return
        items = [[ROOT, 0, f] for f in sorted(local)]
        for node in nodes:
            self.send_peer(node, codec.encode(codec.ROUTE_ADD, {"id": 0, "node": self.me, "epoch": 0, "routes": items}))

    def _set_assignment(self, new: Assignment, revision: int) -> None:
        if revision <= self.assignment_revision:
            return
        old = self.assignment
        self.assignment, self.assignment_revision = new, revision
        mine = set(new.shards_of(self.me))
        for shard in mine:
            self.incoming.pop(shard, None)
        if old is not None:
            for shard in set(old.shards_of(self.me)) - mine:
                self.call_later(self.cfg.handoff_grace, lambda shard=shard: self._release(shard))
            for shard, fw in list(self.forwarding.items()):
                if new.epoch(shard) > fw.epoch:  # flipped: stale senders have a grace period to catch up
                    self._stop_forwarding_later(shard, fw.epoch)
        self.log.info(
            "assignment", version=new.version, revision=revision, shards_held=len(mine),
            primaries=len(new.primaries_of(self.me)), epoch=self.epoch,
        )  # fmt: skip

    def _stop_forwarding_later(self, shard: int, epoch: int) -> None:
        self.call_later(self.cfg.handoff_grace, lambda: self._stop_forwarding(shard, epoch))

    def _stop_forwarding(self, shard: int, epoch: int) -> None:
        fw = self.forwarding.get(shard)
        if fw is not None and fw.epoch == epoch:
            del self.forwarding[shard]
            self._release(shard)

    def _release(self, shard: int) -> None:
        """Drop our copy of a shard we no longer own, once nothing (hand-off, grace) still needs it."""
        a = self.assignment
        if a is None or self.me in a.owners(shard) or shard in self.incoming or shard in self.forwarding:
            return
        dropped = self.routes.drop_shard(shard)
        self.metrics["handoff.shards_released"] += 1
        self.log.info("shard_released", shard=shard, epoch=a.epoch(shard), routes_dropped=dropped)
        self._maybe_finish_leaving()

    def _refresh_assignment(self) -> None:
        """Read the assignment from etcd now (a peer told us our view is old); at most every 100 ms."""
        now = time.monotonic()
        if now - self._last_refresh < 0.1:
            return
        self._last_refresh = now
        try:
            document, revision = read_assignment(self.etcd, self.cfg.cluster)
        except Exception as exc:
            self.log.warning("etcd_error", error=str(exc), epoch=self.epoch)
            return
        if document:
            self._set_assignment(Assignment.from_json(document), revision)

    def _maybe_finish_leaving(self) -> None:
        a = self.assignment
        if not self.session.leaving or a is None or self.forwarding or self.incoming:
            return
        if not a.shards_of(self.me):
            self.log.info("left_cluster", epoch=self.epoch)
            self.stop()

    # ------------------------------------------------------------------ rebalance (leader only)
    def _lead(self) -> None:
        """Run the coordinator: the leader turns its decisions into hand-offs and assignment commits."""
        c = self.coordinator
        if c is None or self.leader != self.me or self.fenced():
            return
        now = time.monotonic()
        c.observe(
            self.assignment,
            self.assignment_revision,
            {n: Member(m.weight, m.leaving) for n, m in self.members.items()},
            now,
        )
        for action in c.step(now):
            if isinstance(action, StartHandoff):
                self._start_handoff(action)
            else:
                self._commit(c, action)
        for shard, why in c.abandoned:
            self.log.warning("move_abandoned", shard=shard, reason=why, epoch=self.epoch)
        c.abandoned.clear()
        busy = bool(c.in_flight or c.remaining or self.assignment is None)
        if busy and now - self._last_progress_log > 1.0:
            self._last_progress_log = now
            self.log.info("rebalance_progress", **c.progress(), epoch=self.epoch)
        if busy and not self._lead_scheduled:
            self._lead_scheduled = True
            self.call_later(0.05, self._lead_tick)

    def _lead_tick(self) -> None:
        self._lead_scheduled = False
        self._lead()

    def _start_handoff(self, action: StartHandoff) -> None:
        move = action.move
        header = {
            "id": action.move_id, "shard": move.shard, "epoch": action.epoch,
            "targets": list(move.add), "coordinator": self.me,
        }  # fmt: skip
        self.log.info("handoff_start", shard=move.shard, epoch=action.epoch, source=move.source, targets=move.add)
        if move.source == self.me:
            self._on_handoff(self.me, Frame(codec.HANDOFF, header))
        else:
            self.send_peer(move.source, codec.encode(codec.HANDOFF, header))

    def _commit(self, c: Coordinator, commit: Commit) -> None:
        try:
            revision = write_assignment(
                self.etcd, self.cfg.cluster, commit.assignment.to_json(), commit.expected_revision
            )
        except Exception as exc:
            self.log.warning("etcd_error", error=str(exc), epoch=self.epoch)
            revision = None
        c.on_commit(commit, revision, time.monotonic())
        if revision is None:
            self.session.poll_now()
            return
        self.metrics[f"rebalance.commits.{commit.reason}"] += 1
        self.log.info(
            "assignment_committed", reason=commit.reason, shards=len(commit.flipped),
            version=commit.assignment.version, epoch=self.epoch,
        )  # fmt: skip
        self._set_assignment(commit.assignment, revision)

    def _fail_peer_requests(self, node: str) -> None:
        """A gone peer will answer nothing: fail what waits on it now instead of at its timeout."""
        self.metrics["peers.lost"] += 1
        for wid, waiter in list(self.waiters.items()):
            if node in waiter.pending:
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        for lid, lookup in list(self.pending_lookups.items()):
            if lookup.owner == node:
                self._lookup_failed(lid, f"route owner {node} left the cluster")
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
        if self.fenced():
            reason = "this node lost contact with etcd and cannot vouch for routes; use another node"
            self.reject_client(session.rid, codec.E_FENCED, reason, ref)
            return
        self.metrics["publishes.in"] += 1
        self.publish(Publish(session.rid, ref, topic, qos, frame.payload))

    def _on_leave(self, session: Session, frame: Frame) -> None:
        """Graceful leave: flag ourselves in etcd; the leader drains every shard away, then we exit."""
        self.session.leaving = True
        self.session.poll_now()
        self.log.info("leaving", epoch=self.epoch)
        self.send_client(session.rid, codec.encode(codec.LEAVING, {"id": frame.header["id"]}))

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
        codec.LEAVE: _on_leave,
    }

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
        for item in items:
            for owner in self._targets(item[0]):
                by_node.setdefault(owner, []).append(item)
        local = by_node.pop(self.me, None)
        if local:
            self._apply_route_items(kind, self.me, local, forwarded=False)
        if not by_node:
            on_done([])
            return None
        wid = next(self.ids)
        waiter = self.waiters[wid] = Waiter(set(by_node), [on_done], kind, by_node, attempt)
        for node, routes in by_node.items():
            header = {"id": wid, "node": self.me, "epoch": self.epoch, "routes": routes}
            if not self.send_peer(node, codec.encode(kind, header)):
                waiter.failures.append(node)
                self._settle_waiter(wid, node)
        self.call_later(self.cfg.request_timeout, lambda: self._expire_waiter(wid))
        return wid

    def _apply_route_items(self, kind: bytes, node: str, items: list[list[Any]], forwarded: bool) -> list[list[int]]:
        """Apply route changes for ``node``; returns [shard, our epoch] for items sent with an older epoch.

        Fencing at the sink: an item is applied only if we hold the shard (owner, new replica being filled, or
        hand-off source in its grace period) or the sender has seen a newer epoch than we have. A stale sender
        is told so in the ROUTE_ACK and re-sends to the owners of the current epoch.
        """
        change = self.routes.add if kind == codec.ROUTE_ADD else self.routes.remove
        a = self.assignment
        stale: list[list[int]] = []
        relay: dict[str, list[list[Any]]] = {}
        newer = False
        for item in items:
            shard, epoch, filt = item
            if shard == ROOT:
                change(ROOT, filt, node)
                continue
            ours = a.epoch(shard) if a is not None else 0
            holds = a is not None and (
                self.me in a.owners(shard) or shard in self.incoming or shard in self.forwarding
            )
            if holds or epoch > ours or forwarded:
                change(shard, filt, node)
                fw = self.forwarding.get(shard)
                if fw is not None and not forwarded:
                    for target in fw.targets:
                        relay.setdefault(target, []).append(item)
            if epoch < ours:
                stale.append([shard, ours])
            newer = newer or epoch > ours
        for target, routes in relay.items():
            self.metrics["handoff.changes_forwarded"] += len(routes)
            header = {"id": 0, "node": node, "epoch": self.epoch, "routes": routes, "fwd": True}
            self.send_peer(target, codec.encode(kind, header))
        if newer:
            self.session.poll_now()
        if stale:
            self.metrics["fencing.stale_route_items"] += len(stale)
        return stale

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
        queue = self.topic_queues.get(pub.topic)
        if queue is None:
            queue = self.topic_queues[pub.topic] = deque()
        queue.append(pub)
        for shard in {shard_for_key(key, a.shard_count) for key in lookup_keys(pub.topic)}:
            self._lookup(pub, shard, [])
        self._dispatch(pub.topic)

    def _lookup(self, pub: Publish, shard: int, tried: list[str]) -> None:
        """Find the nodes with routes matching ``pub.topic`` in ``shard``: locally if we own it, else ask an owner
        (the primary first, then the replicas in order, skipping those that already failed)."""
        a = self.assignment
        assert a is not None
        candidates = [n for n in a.owners(shard) if n not in tried and n in self.members]
        if not candidates or len(tried) > 3:
            self._fail_publish(pub, codec.E_UNAVAILABLE, f"no owner of shard {shard} answered ({tried})", shard)
            return
        owner = candidates[0]
        if owner == self.me:
            pub.dests |= self.routes.match(shard, pub.topic)
            return
        lid = next(self.ids)
        header = {"id": lid, "shard": shard, "epoch": a.epoch(shard), "topic": pub.topic}
        self.pending_lookups[lid] = Lookup(pub, shard, owner, [*tried, owner])
        pub.lookups_left += 1
        if not self.send_peer(owner, codec.encode(codec.LOOKUP, header)):
            self._lookup_failed(lid, f"owner {owner} of shard {shard} is unreachable")
            return
        self.call_later(self.cfg.lookup_timeout, lambda: self._lookup_failed(lid, f"owner {owner} did not answer"))

    def _lookup_failed(self, lid: int, reason: str, refresh: bool = False) -> None:
        lookup = self.pending_lookups.pop(lid, None)
        if lookup is None:
            return
        pub = lookup.pub
        pub.lookups_left -= 1
        self.metrics["lookups.retried"] += 1
        self.log.info("lookup_retry", shard=lookup.shard, owner=lookup.owner, reason=reason, epoch=self.epoch)
        if refresh:
            self._refresh_assignment()
        if not pub.failed:
            self._lookup(pub, lookup.shard, lookup.tried)
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
            if dest not in self.members:  # a route left behind by a node that is gone: nobody to deliver to
                self.metrics["drops.dead_destination"] += 1
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
            if sender in self.members:  # a stranger gets no reply: we have no address for it, by design
                self.send_peer(sender, codec.error_parts(exc.code, exc.reason, exc.ref))
            return
        if sender not in self.members:
            # Only members (per etcd) may change routes or ask for them; a stranger is refused and counted.
            self.metrics["errors.not_member"] += 1
            self.log.warning("peer_not_member", peer=sender, type=frame.type.decode(), epoch=self.epoch)
            return
        self._peer_handlers[frame.type](self, sender, frame)

    def _refuse_peer(self, sender: str, frame: Frame, code: str, reason: str, **extra: Any) -> None:
        self.metrics[f"fencing.refused.{code}"] += 1
        self.send_peer(sender, codec.error_parts(code, reason, frame.header.get("id"), **extra))

    def _on_route_change(self, sender: str, frame: Frame) -> None:
        h = frame.header
        forwarded = bool(h.get("fwd"))
        if self.fenced() and not forwarded:
            self._refuse_peer(sender, frame, codec.E_FENCED, f"{self.me} cannot renew its etcd lease")
            return
        if h["node"] != sender and not forwarded:
            self._refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} may only change its own routes")
            return
        stale = self._apply_route_items(frame.type, h["node"], h["routes"], forwarded)
        if not forwarded and h["id"]:
            self.send_peer(sender, codec.encode(codec.ROUTE_ACK, {"id": h["id"], "epoch": self.epoch, "stale": stale}))

    def _on_route_ack(self, sender: str, frame: Frame) -> None:
        stale = frame.header.get("stale")
        if stale and self._retry_stale(frame.header["id"], sender, stale):
            return
        self._settle_waiter(frame.header["id"], sender)

    def _on_lookup(self, sender: str, frame: Frame) -> None:
        h = frame.header
        shard = h["shard"]
        if self.fenced():
            self._refuse_peer(sender, frame, codec.E_FENCED, f"{self.me} cannot renew its etcd lease", shard=shard)
            return
        a = self.assignment
        ours = a.epoch(shard) if a is not None else 0
        holds = a is not None and (self.me in a.owners(shard) or shard in self.forwarding)
        if h["epoch"] < ours and not holds:
            reason = f"shard {shard} is at epoch {ours}, not {h['epoch']}, and {self.me} does not own it"
            self._refuse_peer(sender, frame, codec.E_STALE_EPOCH, reason, shard=shard, current_epoch=ours)
            return
        if h["epoch"] > ours:
            self.session.poll_now()
        nodes = sorted(self.routes.match(shard, h["topic"]))
        reply = {"id": h["id"], "shard": shard, "epoch": ours, "nodes": nodes}
        self.send_peer(sender, codec.encode(codec.LOOKUP_REPLY, reply))

    def _on_lookup_reply(self, sender: str, frame: Frame) -> None:
        lookup = self.pending_lookups.pop(frame.header["id"], None)
        if lookup is not None:
            pub = lookup.pub
            pub.dests.update(frame.header["nodes"])
            pub.lookups_left -= 1
            self._dispatch(pub.topic)

    def _on_handoff(self, sender: str, frame: Frame) -> None:
        """We are the source of a move: snapshot the shard to the new replicas, then stream its changes."""
        h = frame.header
        shard, epoch = h["shard"], h["epoch"]
        if self.fenced():
            self._refuse_peer(sender, frame, codec.E_FENCED, f"{self.me} cannot renew its etcd lease", shard=shard)
            return
        a = self.assignment
        if a is None or a.epoch(shard) < epoch:
            self._refresh_assignment()
            a = self.assignment
        if a is None or a.epoch(shard) != epoch or self.me not in a.owners(shard):
            reason = f"{self.me} does not own shard {shard} at epoch {epoch}"
            self._refuse_peer(sender, frame, codec.E_STALE_EPOCH, reason, shard=shard)
            return
        targets = [t for t in h["targets"] if t != self.me]
        fw = self.forwarding.get(shard)
        if fw is None or fw.epoch != epoch:
            fw = self.forwarding[shard] = Forwarding(set(), epoch)
        fw.targets.update(targets)
        routes = [[filt, list(nodes)] for filt, nodes in self.routes.shard_routes(shard)]
        size = 0
        for target in targets:
            for start in range(0, max(len(routes), 1), SNAPSHOT_CHUNK):
                chunk = routes[start : start + SNAPSHOT_CHUNK]
                header = {
                    "id": h["id"], "shard": shard, "epoch": epoch, "routes": chunk,
                    "last": start + SNAPSHOT_CHUNK >= len(routes), "coordinator": h["coordinator"],
                }  # fmt: skip
                parts = codec.encode(codec.SNAPSHOT, header)
                size += len(parts[1])
                self.send_peer(target, parts)
        self.metrics["handoff.snapshots_sent"] += len(targets)
        self.metrics["handoff.routes_sent"] += len(routes) * len(targets)
        self.metrics["handoff.bytes_sent"] += size
        self.log.info("handoff_snapshot", shard=shard, epoch=epoch, targets=targets, routes=len(routes), bytes=size)

    def _on_snapshot(self, sender: str, frame: Frame) -> None:
        """We are a new replica: take the snapshot; when complete, tell the coordinator we are ready."""
        h = frame.header
        shard, epoch = h["shard"], h["epoch"]
        a = self.assignment
        if a is not None and a.epoch(shard) > epoch:
            reason = f"snapshot of shard {shard} is for epoch {epoch}, it is at {a.epoch(shard)}"
            self._refuse_peer(sender, frame, codec.E_STALE_EPOCH, reason, shard=shard)
            return
        if self.incoming.get(shard) != h["id"]:
            self.incoming[shard] = h["id"]
            move_id = h["id"]
            self.call_later(self.cfg.handoff_timeout, lambda: self._abandon_incoming(shard, move_id))
        for filt, nodes in h["routes"]:
            for node in nodes:
                self.routes.add(shard, filt, node)
        self.metrics["handoff.routes_received"] += len(h["routes"])
        self.metrics["handoff.bytes_received"] += len(orjson.dumps(h["routes"]))
        if h["last"]:
            ready = {"id": h["id"], "shard": shard, "epoch": epoch, "node": self.me}
            self.send_peer(h["coordinator"], codec.encode(codec.HANDOFF_READY, ready))

    def _abandon_incoming(self, shard: int, move_id: int) -> None:
        if self.incoming.get(shard) == move_id:
            del self.incoming[shard]
            self._release(shard)

    def _on_handoff_ready(self, sender: str, frame: Frame) -> None:
        if self.coordinator is not None:
            # Only mark it: the next coordinator tick flips every ready move in one etcd commit.
            self.coordinator.on_ready(frame.header["id"], frame.header["node"])

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
            self._lookup_failed(ref, reason, refresh=h["code"] == codec.E_STALE_EPOCH)
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
        codec.HANDOFF: _on_handoff,
        codec.SNAPSHOT: _on_snapshot,
        codec.HANDOFF_READY: _on_handoff_ready,
        codec.ERROR: _on_peer_error,
    }

    # ------------------------------------------------------------------ status
    def target_table(self) -> tuple[tuple[str, ...], ...] | None:
        """The balanced placement for the current live (non-leaving) members; cached per member set."""
        live = tuple(sorted((n, m.weight) for n, m in self.members.items() if not m.leaving))
        if not live:
            return None
        if self._target_cache is None or self._target_cache[0] != live:
            s, r = int(self.settings["shard_count"]), int(self.settings["replication"])
            self._target_cache = (live, ShardMap.build(dict(live), s, r).table)
        return self._target_cache[1]

    def status(self) -> dict[str, Any]:
        a = self.assignment
        table = self.target_table()
        shards = a.shards_of(self.me) if a else []
        status: dict[str, Any] = {
            "node": self.me,
            "client_endpoint": self.cfg.client_endpoint,
            "alive": True,
            "epoch": self.epoch,
            "members": sorted(self.members),
            "leaving_members": sorted(n for n, m in self.members.items() if m.leaving),
            "leader": self.leader,
            "fenced": self.fenced(),
            "leaving": self.session.leaving,
            "shard_count": a.shard_count if a else int(self.settings["shard_count"]),
            "replication": a.replication if a else int(self.settings["replication"]),
            "assignment_version": a.version if a else 0,
            "settled": bool(a is not None and table is not None and a.table == table),
            "shards": len(shards),
            "primary_shards": len(a.primaries_of(self.me)) if a else 0,
            "max_shard_epoch": max((a.epoch(s) for s in shards), default=0) if a else 0,
            "shard_epochs": {str(s): a.epoch(s) for s in shards} if a else {},
            "handoffs_out": sorted(self.forwarding),
            "handoffs_in": sorted(self.incoming),
            "routes": self.routes.route_count,
            "root_set_size": self.routes.root_size,
            "clients": len(self.sessions),
            "local_filters": len(self.local_q0) + len(self.local_q1),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "metrics": dict(self.metrics),
        }
        if self.coordinator is not None:
            status["rebalance"] = self.coordinator.progress()
        return status
