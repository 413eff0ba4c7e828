"""The shard node process: the shell around the protocol core (``shardmq.protocol.NodeCore``).

The core decides everything a node does with frames, timers and views; this module carries out what it asks
(``protocol.effects.Effects``): it owns the sockets, the zmq.Poller loop, the timer heap, the clock, the etcd
session thread and the metrics export, and does nothing else.

Rules of this file:
- One thread owns every socket and the core. The etcd session thread hands views and the answers to the core's
  etcd requests in over an inproc PULL socket; the loop never calls etcd itself.
- Sockets: a ROUTER for clients (``client_endpoint``), a ROUTER for peers (``peer_endpoint``) and one DEALER per
  peer whose routing id is this node's id, so a peer's ROUTER knows who is talking. Requests and replies between
  nodes both travel DEALER -> ROUTER. ``ROUTER_MANDATORY`` turns a send to a vanished client into an error the
  core acts on (``client_unreachable``) instead of a silent drop; ``ROUTER_HANDOVER`` lets a reconnecting
  client keep its routing id.
- The loop drains each ready socket in bounded NOBLOCK batches, has the core flush what that batch queued (one
  frame per destination), then runs due timers, then polls with the next timer deadline as timeout: no socket
  can starve another or the timers. The core's clock (``now``) is set before every batch and timer.
- Backpressure: while the core has ``max_waiting_publishes`` publishes waiting for lookups, client frames are
  not read (they wait in zmq and TCP buffers) until half of them left.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import zmq

from shardmq.protocol import NodeCore, ProtocolConfig, SessionView
from shardmq.ring import DEFAULT_REPLICATION, DEFAULT_SHARD_COUNT
from shardmq.router import codec

from .membership import EtcdAccess, EtcdAuthError, EtcdSession, MemberInfo, ensure_cluster_config, etcd_client
from .metrics import MetricsSnapshot, NodeCollector, WireStats, serve_metrics
from .security import NodeSecurity, SecurityConfigError, load_cluster_key
from .store import Store, StoreError

log = structlog.get_logger("shardmq.node")

DRAIN_BATCH = 256
FLUSH_AT = 256  # messages queued in the outbox or behind lookups: end the drain (latency under batched load)
HEARTBEAT_MS = 2000
# Dead clients are found by TCP keep-alive (the kernel answers it even while the application is stalled), not by
# zmq heartbeats: a heartbeat timeout on a connection whose reader is stalled re-makes the connection behind
# both ends' backs, and libzmq can abort when the reader resumes (libzmq issue 3937).
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTERVAL_S = 2
TCP_KEEPALIVE_COUNT = 5


@dataclass(slots=True)
class NodeConfig:
    node_id: str
    client_endpoint: str
    peer_endpoint: str
    etcd_url: str
    cluster: str = "default"
    # etcd beyond loopback: TLS files and an etcd user (membership.EtcdAccess); the password only from a file.
    etcd_user: str = ""
    etcd_password_file: str = ""
    etcd_ca_cert: str = ""
    etcd_client_cert: str = ""
    etcd_client_key: str = ""
    # Peer security (shard.security): the cluster's secret, or an explicit, logged opt-out.
    cluster_key_file: str = ""
    insecure: bool = False
    weight: int = 1
    shard_count: int = DEFAULT_SHARD_COUNT
    replication: int = DEFAULT_REPLICATION
    lease_ttl: int = 5
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    request_timeout: float = 5.0
    lookup_timeout: float = 1.0  # then ask the next owner: a dead primary costs one timeout, not a failed publish
    route_cache_size: int = 100_000  # (topic, shard) lookup answers kept at the entry node; 0 turns the cache off
    route_cache_ttl: float = 1.0  # a cached answer is asked again after this; owners wait 2x for INVALIDATE_ACKs
    # Stop reading client frames while this many publishes wait behind lookups; read again at half (backpressure).
    max_waiting_publishes: int = 100_000
    handoff_grace: float = 3.0  # an ex-owner keeps serving and forwarding this long after a flip
    handoff_timeout: float = 30.0
    endpoint_file: str | None = None  # where to write the bound endpoints (for launchers using port 0)
    advertise_peer_endpoint: str | None = None  # what peers should connect to, when not the bound one (NAT, proxy)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one); None: no endpoint
    metrics_address: str = "127.0.0.1"
    redelivery_interval: float = 2.0
    client_idle_check: float = 10.0
    # QoS 1 flow control per client session: messages written and not yet acknowledged, then a backlog of accepted
    # messages written as acknowledgements make room; beyond the backlog (count or bytes) a forward is refused with
    # ``overloaded`` (protocol/destination.py).
    max_inflight: int = 1000
    max_queued: int = 10_000
    max_session_bytes: int = 64 * 1024 * 1024
    # Durability (shard.store): retained records and persistent sessions in DATA_DIR/shardmq.db, loaded at start;
    # every acknowledgement waits for the commit of the change it confirms. None: in memory only, as before.
    data_dir: str | None = None
    fsync: str = "batch"  # "batch": one fsync per loop turn's commit; "off": commits survive kill -9, not power loss

    def etcd_access(self) -> EtcdAccess:
        return EtcdAccess.from_files(
            self.etcd_url, self.etcd_user, self.etcd_password_file, self.etcd_ca_cert, self.etcd_client_cert,
            self.etcd_client_key,
        )  # fmt: skip

    def protocol_config(self) -> ProtocolConfig:
        return ProtocolConfig(
            self.node_id, self.shard_count, self.replication, self.max_payload, self.request_timeout,
            self.lookup_timeout, self.route_cache_size, self.route_cache_ttl, self.handoff_grace,
            self.handoff_timeout, self.redelivery_interval, self.client_idle_check, self.max_inflight,
            self.max_queued, self.max_session_bytes, access_control=not self.insecure, durable=bool(self.data_dir),
            lease_ttl=float(self.lease_ttl),
        )  # fmt: skip


def tune_gc() -> None:
    """Collect cycles less often: the hot path allocates a few short-lived records per message, all freed by
    reference counting, so the default (a collection every 700 net allocations, ~100 messages) mostly scans live
    state for nothing. Everything made during start-up is frozen out of the scans. Measured with a paced 140k
    msg/s through 3 nodes: p99 publish -> deliver 14.2-14.4 ms before, 8.3-9.1 ms after."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def set_tcp_keepalive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_COUNT)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Node:
    """Carries out what the core asks (it implements ``protocol.effects.Effects``)."""

    def __init__(self, config: NodeConfig) -> None:
        self.cfg = config
        self.me = config.node_id
        self.incarnation = uuid.uuid4().hex[:12]  # this process, as opposed to earlier ones under the same id
        self.log = log.bind(node=self.me)
        self.core = NodeCore(config.protocol_config(), self, self.log, self.incarnation)
        self.ctx = zmq.Context.instance()
        self.wire = WireStats()
        self.collector: NodeCollector | None = None
        self.metrics_port: int | None = None
        self.dealers: dict[str, zmq.Socket] = {}
        self.dealer_monitors: dict[zmq.Socket, str] = {}  # monitor socket of a peer's DEALER -> that peer
        self.poller = zmq.Poller()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._etcd_tokens = itertools.count(1)
        self._etcd_waiting: dict[int, Callable[[dict[str, Any], bytes], None]] = {}
        self.clients_paused = False  # not reading client frames: too many publishes wait for lookups
        self.started = time.monotonic()
        self.rss_at_start = rss_bytes()
        self.running = False
        self.security: NodeSecurity | None = None  # set by run(): None in an --insecure cluster
        self.store: Store | None = None  # set by run() with --data-dir

    # ------------------------------------------------------------------ sockets
    def _open_sockets(self) -> None:
        self.client_sock = self.ctx.socket(zmq.ROUTER)
        self.peer_sock = self.ctx.socket(zmq.ROUTER)
        for sock in (self.client_sock, self.peer_sock):
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.LINGER, 0)
            # Frames far beyond our limits are cut off by zmq before they are buffered in full.
            sock.setsockopt(zmq.MAXMSGSIZE, codec.DEFAULT_MAX_HEADER + 2 * self.cfg.max_payload)
        self.peer_sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.peer_sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MS * 3)
        if self.security is not None:
            self.security.serve(self.peer_sock)
            self.security.serve_clients(self.client_sock)
        set_tcp_keepalive(self.client_sock)
        # "tcp://127.0.0.1:*" binds a free port chosen by the kernel: no race with other processes picking ports.
        self.client_sock.bind(self.cfg.client_endpoint)
        self.peer_sock.bind(self.cfg.peer_endpoint)
        self.cfg.client_endpoint = self.client_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.cfg.peer_endpoint = self.peer_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.cfg.metrics_port is not None:
            self.collector, self.metrics_port = serve_metrics(self.cfg.metrics_port, self.cfg.metrics_address)
        if self.cfg.endpoint_file:
            tmp = f"{self.cfg.endpoint_file}.tmp"
            bound = {
                "client_endpoint": self.cfg.client_endpoint,
                "peer_endpoint": self.cfg.peer_endpoint,
                "metrics_endpoint": self.metrics_endpoint(),
            }
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(bound))
            os.replace(tmp, self.cfg.endpoint_file)
        self.member_pull = self.ctx.socket(zmq.PULL)
        self.member_endpoint = f"inproc://members-{self.me}-{os.getpid()}"
        self.member_pull.bind(self.member_endpoint)

    def _dealer(self, node: str) -> zmq.Socket | None:
        sock = self.dealers.get(node)
        if sock is None:
            info = self.core.view.members.get(node)
            if info is None:
                return None
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.me.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MS * 3)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            if self.security is not None:
                self.security.connect_to(sock, info)
                # A refused handshake is final for this socket (libzmq does not try again): watch for it.
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                self.dealer_monitors[monitor] = node
                self.poller.register(monitor, zmq.POLLIN)
            sock.connect(info.peer_endpoint)
            self.dealers[node] = sock
        return sock

    def _on_dealer_refused(self, monitor: zmq.Socket) -> None:
        """A peer refused our key (its view did not show us within its wait, see ``shard.security``): the link
        would stay dead, so the DEALER is dropped and the next frame for that peer makes a new one, whose
        handshake the peer judges again. The frames queued on the old one are lost; what waits on them times out
        and is retried like any request to a silent peer."""
        node = self.dealer_monitors[monitor]
        with contextlib.suppress(zmq.Again):
            while True:
                monitor.recv_multipart(zmq.NOBLOCK)
        self.core.metrics["security.peer_handshake_refused"] += 1
        self.log.warning("peer_handshake_refused", peer=node, action="reconnecting with a new socket")
        self.forget_peer(node)

    # ------------------------------------------------------------------ effects (protocol.effects.Effects)
    def send_peer(self, node: str, parts: list[bytes]) -> bool:
        sock = self._dealer(node)
        metrics = self.core.metrics
        if sock is None:  # not a member (we only talk to members, and only members may talk to us)
            metrics["drops.peer_unknown"] += 1
            return False
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            metrics["drops.peer_hwm"] += 1
            self.log.warning("peer_queue_full", peer=node)
            return False
        metrics["frames_out.peer"] += 1
        self.wire.count("peer", node, "out", parts)
        return True

    def send_client(self, rid: bytes, parts: list[bytes]) -> bool:
        try:
            self.client_sock.send_multipart([rid, *parts], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.core.client_unreachable(rid)
            else:
                # Any frame zmq would not queue (the client's send queue is full); the QoS 0 messages among them
                # are what ``drops.client_hwm`` counts (the core's flush), since a frame may carry thousands.
                self.core.metrics["drops.client_hwm_frames"] += 1
            return False
        self.core.metrics["frames_out.client"] += 1
        self.wire.count("client", "", "out", parts)
        return True

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._timer_ids), fn))

    def poll_view(self) -> None:
        self.session.poll_now()

    def read_assignment(self, then: Callable[[bytes | None, int, bool], None]) -> None:
        self._etcd_request(lambda a, doc: then(doc or None, a["revision"] or 0, a["ok"]), "read_assignment")

    def write_assignment(self, document: bytes, expected_revision: int, then: Callable[[int | None], None]) -> None:
        self._etcd_request(lambda a, _doc: then(a["revision"] if a["ok"] else None), "write_assignment",
                           document, expected_revision)  # fmt: skip

    def _etcd_request(self, then: Callable[[dict[str, Any], bytes], None], kind: str, *args: Any) -> None:
        token = next(self._etcd_tokens)
        self._etcd_waiting[token] = then
        self.session.request(token, kind, *args)

    def set_leaving(self) -> None:
        self.session.leaving = True
        self.session.poll_now()

    def forget_peer(self, node: str) -> None:
        sock = self.dealers.pop(node, None)
        if sock is None:
            return
        for monitor, peer in list(self.dealer_monitors.items()):
            if peer == node:
                del self.dealer_monitors[monitor]
                self.poller.unregister(monitor)
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                monitor.close(linger=0)
        sock.close(linger=0)

    def stop(self) -> None:
        self.running = False

    def persist(self, changes: list[tuple[Any, ...]], then: Callable[[], None]) -> None:
        assert self.store is not None
        try:
            self.store.apply(changes)
        except (OSError, sqlite3.Error) as exc:
            # Nothing of this batch may be acknowledged, and later ones would not be stored either: stop (the
            # clients fail over; what was acknowledged before is in the store).
            self.core.metrics["errors.store"] += 1
            self.log.error("store_write_failed", path=str(self.store.path), changes=len(changes), error=str(exc))
            self.stop()
            return
        then()

    def shell_status(self) -> dict[str, Any]:
        self._sync_security_metrics()  # before the core's status copies its metrics
        rss = rss_bytes()
        routes = self.core.owner.routes.route_count
        store = self.store
        return {
            "data_dir": self.cfg.data_dir,
            "fsync": self.cfg.fsync if store is not None else None,
            "store_commits": store.commits if store is not None else 0,
            "store_commit_ms_avg": round(1000 * store.commit_seconds / store.commits, 3) if store and store.commits
            else None,
            "client_endpoint": self.cfg.client_endpoint,
            "metrics_endpoint": self.metrics_endpoint(),
            "rss_bytes": rss,
            # RSS growth since start per route held: the measured cost of the route table (local subscriptions
            # of this node's own clients included, so compare on nodes without big local subscriber sets).
            # Below 10,000 routes the allocator's own noise dominates, so nothing is reported.
            "bytes_per_route": round((rss - self.rss_at_start) / routes) if routes >= 10_000 else None,
            "clients_paused": self.clients_paused,
            "peer_security": "curve" if self.security is not None else "insecure",
            "client_security": "curve+acl" if self.security is not None else "insecure",
            "uptime_s": round(time.monotonic() - self.started, 1),
            "wire_bytes": {
                f"bytes_{direction}.{channel}{'.' + peer if peer else ''}": ch.bytes
                for (channel, peer, direction), ch in self.wire.channels.items()
            },
        }

    def status(self) -> dict[str, Any]:
        return {**self.shell_status(), **self.core.status()}

    def _sync_security_metrics(self) -> None:
        # The ZAP handler counts on its own thread; the count joins the node's metrics when they are read.
        if self.security is not None:
            if self.security.refused_keys:
                self.core.metrics["security.peer_keys_refused"] = self.security.refused_keys
            if self.security.refused_client_keys:
                self.core.metrics["security.client_keys_refused"] = self.security.refused_client_keys

    # ------------------------------------------------------------------ loop
    def _clock(self) -> None:
        """Advance the core's clock and tell it the lease's state (the session thread keeps it)."""
        core = self.core
        core.now = time.monotonic()
        core.on_lease(self.session.fenced_from(), self.session.registrations)

    def _run_timers(self) -> bool:
        """Run the timers that are due; False when none was."""
        timers = self.timers
        if not timers or timers[0][0] > time.monotonic():
            return False
        self._clock()
        now = self.core.now
        while timers and timers[0][0] <= now:
            _, _, fn = heapq.heappop(timers)
            try:
                fn()
            except Exception:  # a bug in one timer must not take the node down (as for a frame, see _drain)
                self.core.metrics["errors.internal"] += 1
                self.log.exception("timer_failed")
        return True

    def _secure(self) -> None:
        """Peer security on (``shard.security``), or the explicit opt-out, said loudly at every start."""
        if self.cfg.insecure:
            self.log.warning("insecure", reason="--insecure: neither peer nor client connections are "
                             "authenticated or encrypted; anyone who reaches a port can read, publish, pose as a "
                             "member or make the node leave")  # fmt: skip
            return
        if not self.cfg.cluster_key_file:
            raise SecurityConfigError("pass --cluster-key-file (the cluster's secret; `shardmq cluster up` makes "
                                      "DIR/cluster.key) or, explicitly, --insecure")  # fmt: skip
        self.security = NodeSecurity(self.ctx, load_cluster_key(self.cfg.cluster_key_file), self.cfg.cluster)

    def run(self) -> None:
        try:
            self._secure()
        except SecurityConfigError as exc:
            self.log.error("security_config_invalid", error=str(exc))
            raise SystemExit(2) from exc
        if self.cfg.data_dir:
            self._load_store()
        self._open_sockets()
        try:
            access = self.cfg.etcd_access()
            self.etcd = etcd_client(access, timeout=max(0.5, self.cfg.lease_ttl / 4))
            self.core.view.settings = ensure_cluster_config(self.etcd, self.cfg.cluster, self.core.view.settings)
        except EtcdAuthError as exc:  # a setting to fix: say which, and do not look like an outage
            self.log.error("etcd_auth_failed", etcd=self.cfg.etcd_url, error=str(exc))
            raise SystemExit(2) from exc
        except Exception as exc:
            self.log.error("etcd_unreachable", etcd=self.cfg.etcd_url, error=str(exc))
            raise SystemExit(2) from exc
        advertised = self.cfg.advertise_peer_endpoint or self.cfg.peer_endpoint
        security = self.security
        me = MemberInfo(
            self.me, self.cfg.client_endpoint, advertised, self.cfg.weight, False, self.incarnation,
            curve_key=security.public_key if security else "",
            key_proof=security.proof(self.me, self.incarnation) if security else "",
        )  # fmt: skip
        self.session = EtcdSession(
            self.ctx, access, self.cfg.cluster, me, self.member_endpoint, self.cfg.lease_ttl,
            admit=security.verified if security else None,
            admit_principal=security.verified_principal if security else None,
        )  # fmt: skip
        self.session.start()
        self.running = True
        tune_gc()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self._clock()
        self.core.start(self.core.now)
        self._publish_metrics()
        cfg = self.cfg
        self.log.info("node_started", client_endpoint=cfg.client_endpoint, peer_endpoint=cfg.peer_endpoint,
                      incarnation=self.incarnation, membership_epoch=0)  # fmt: skip
        poller = self.poller
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.peer_sock, zmq.POLLIN)
        poller.register(self.member_pull, zmq.POLLIN)
        core = self.core
        core.flush()  # what starting queued
        try:
            while self.running:
                if self._run_timers():
                    core.flush()  # what timers queued (a retried lookup's forwards) leaves now, not at the next frame
                self._pace_clients(poller)
                timeout = self.timers[0][0] - time.monotonic() if self.timers else None
                ready = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))
                if self.member_pull in ready:
                    self._clock()
                    self._drain(self.member_pull, self._on_session_parts)
                    core.flush()
                if self.peer_sock in ready:
                    self._clock()
                    self._drain(self.peer_sock, core.on_peer_parts, "peer")
                    core.flush()
                if self.client_sock in ready:
                    self._clock()
                    self._drain(self.client_sock, core.on_client_parts, "client")
                    core.flush()
                for monitor in [m for m in self.dealer_monitors if m in ready]:
                    self._on_dealer_refused(monitor)
        finally:
            self._shutdown()

    def _load_store(self) -> None:
        """Open the data directory's store and give the core what it holds, before we register (``durable``)."""
        assert self.cfg.data_dir
        started = time.monotonic()
        try:
            self.store = Store(self.cfg.data_dir, self.me, self.cfg.fsync)  # type: ignore[arg-type]
            retained, sessions = self.store.load()
        except (StoreError, sqlite3.Error) as exc:
            self.log.error("store_unusable", data_dir=self.cfg.data_dir, error=str(exc))
            raise SystemExit(2) from exc
        self.core.now = started
        self.core.durable.restore(retained, sessions)
        self.log.info("store_opened", path=str(self.store.path), fsync=self.cfg.fsync, retained=len(retained),
                      sessions=len(sessions), ms=round(1000 * (time.monotonic() - started), 1))  # fmt: skip

    def _on_session_parts(self, parts: list[bytes]) -> None:
        kind, header, document = parts
        if kind == b"view":
            snapshot = orjson.loads(header)
            view = SessionView.from_snapshot(snapshot, document)
            if self.security is not None:  # the keys each port admits from now on
                self.security.set_members(view.members)
                self.security.set_principals(snapshot.get("principals") or [])
            self.core.on_view(view)
            return
        answer = orjson.loads(header)
        then = self._etcd_waiting.pop(answer["token"], None)
        if then is not None:
            then(answer, document)

    def _pace_clients(self, poller: zmq.Poller) -> None:
        """Backpressure: with ``max_waiting_publishes`` publishes queued behind lookups (owners slow or gone),
        stop reading client frames until half of them have left. Clients' frames wait in zmq and TCP buffers,
        and a publisher's send blocks once those are full; peer frames (the lookup answers) are still read and
        timers still run, so the wait ends with the lookups: answered, or failed over after their timeout."""
        limit = self.cfg.max_waiting_publishes
        waiting = self.core.entry.queued_publishes
        if self.clients_paused and waiting <= limit // 2:
            self.clients_paused = False
            poller.register(self.client_sock, zmq.POLLIN)
            self.log.info("clients_resumed", waiting=waiting)
        elif not self.clients_paused and waiting >= limit:
            self.clients_paused = True
            poller.unregister(self.client_sock)
            self.core.metrics["backpressure.pauses"] += 1
            self.log.warning("clients_paused", waiting=waiting, requests=len(self.core.requests))

    def _drain(self, sock: zmq.Socket, handle: Callable[..., None], channel: str | None = None) -> None:
        core = self.core
        verify = channel == "peer" and self.security is not None
        principals = channel == "client" and self.security is not None
        principal: str | None = None
        for _ in range(DRAIN_BATCH):
            try:
                if principals:
                    principal, parts = self._recv_client_frame()
                else:
                    parts = self._recv_member_frame() if verify else sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if parts is None:
                continue
            if channel is not None:  # parts[0] is the routing id: the peer's node id, or a client's id
                peer = parts[0].decode(errors="replace") if channel == "peer" else ""
                self.wire.count(channel, peer, "in", parts[1:])
            try:
                if principals:
                    handle(parts, principal)
                else:
                    handle(parts)
            except Exception:  # a bug handling one frame must not take the node down
                core.metrics["errors.internal"] += 1
                self.log.exception("handler_failed")
            # Enough to send, or (reading clients) enough waiting for lookups: end the drain so the answers, on
            # the peer socket, are read before more publishes pile up behind them.
            if core.outbox.queued + (core.entry.queued_publishes if channel == "client" else 0) >= FLUSH_AT:
                return
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:  # drained: cheaper than the recv that raises zmq.Again
                return

    def _recv_member_frame(self) -> list[bytes] | None:
        """A peer frame, or None when its routing id is not the member its CURVE key belongs to (the User-Id
        the ZAP handler gave the connection): a member may speak only as itself."""
        first = self.peer_sock.recv(zmq.NOBLOCK, copy=False)
        rest = self.peer_sock.recv_multipart() if first.more else []  # the rest of the same message
        claimed = first.bytes
        if first.get("User-Id") != claimed.decode(errors="replace"):
            self.core.metrics["security.peer_id_mismatch"] += 1
            return None
        return [claimed, *rest]

    def _recv_client_frame(self) -> tuple[str, list[bytes]]:
        """A client frame and its principal: the User-Id the ZAP handler gave the connection."""
        first = self.client_sock.recv(zmq.NOBLOCK, copy=False)
        rest = self.client_sock.recv_multipart() if first.more else []  # the rest of the same message
        return first.get("User-Id"), [first.bytes, *rest]

    def _publish_metrics(self) -> None:
        """Hand the Prometheus thread a copy of our counters (it never reads live loop state)."""
        if self.collector is not None:
            self.collector.snapshot = MetricsSnapshot(self.me, dict(self.core.metrics), self.status(),
                                                      self.wire.copy())  # fmt: skip
            self.call_later(1.0, self._publish_metrics)

    def metrics_endpoint(self) -> str | None:
        if self.metrics_port is None:
            return None
        return f"http://{self.cfg.metrics_address}:{self.metrics_port}/metrics"

    def _shutdown(self) -> None:
        self._clock()
        self.core.shutdown()
        self.client_sock.close(linger=200)
        self.session.stop()
        self.session.join(timeout=3)
        for node in list(self.dealers):
            self.forget_peer(node)
        for sock in [self.peer_sock, self.member_pull]:
            sock.close(linger=0)
        if self.security is not None:
            self.security.stop()
        if self.store is not None:
            self.store.close()
