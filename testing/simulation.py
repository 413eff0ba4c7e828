"""A deterministic, in-memory shardmq cluster: the nodes' real protocol cores on a simulated network, etcd and clock.

What is real and what is simulated:

* Real: every node is a ``shardmq.protocol.NodeCore``, the object the node process runs, fed real encoded frames
  (``router.codec``), with its route table, route cache, hand-off machines, request registry and, on the leader,
  the ``Coordinator`` and planner. No handler of the node exists here; a fix to the node is a fix to the model.
* Simulated, after ``shard/node.py`` and ``shard/membership.py`` (the shell): ``SimNode`` carries out the core's
  effects. Frames go into FIFO channels per (sender, receiver), as one zmq connection keeps them in order, and
  are delivered when a driver says so (``deliver``), so the driver chooses every interleaving. Timers run on the
  simulated clock (``tick``). A send to a node that is crashed or partitioned is lost, as a zmq frame to a dead
  peer is; a closed peer connection (``forget_peer``) loses what was queued on it. etcd requests (assignment reads,
  the leader's commits) are answered at the node's next session poll, and fail while it cannot reach etcd.
* Simulated etcd (``Etcd``): leases with a TTL on the simulated clock, member keys (a put keeps an existing key's
  create_revision), the assignment document with compare-and-swap on its mod revision, a leader key held by a
  lease. The session (``session_poll``): keep-alive every TTL/6 (``KEEPALIVES_PER_TTL``), register again after a
  lost lease, retire a previous incarnation first (``EtcdSession.retire_previous``), read the view and hand it to
  the core.
* Clients: each subscription is one client session (``SimClient``) that sends SUB, and takes SUBACK, ERROR, MSG
  (acknowledged at once with DACK) and SESSION_END; a publish is a QoS 1 PUB from a publisher client. A client
  whose session ended is ``interrupted`` until it subscribes again (``resubscribe``), as the SDK fails over.
* Not modelled: client connections breaking on their own, slow clients, payload sizes, wall-clock costs.

Pure: no sockets, threads, real clocks or randomness. Whoever drives it (a hypothesis state machine, or
``shardmq.testing.simulate`` with a seed) chooses every step, so a run is a function of its step list.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardmq.protocol import MemberInfo, NodeCore, ProtocolConfig, SessionView
from shardmq.protocol.node import parse_assignment
from shardmq.rebalance import Member, target_table
from shardmq.ring import Assignment, shard_for_key
from shardmq.router import codec
from shardmq.router.partition import placement_key
from shardmq.router.routes import RouteTable
from shardmq.shard.membership import KEEPALIVES_PER_TTL

__all__ = ["Etcd", "Sim", "SimClient", "SimConfig", "SimNode"]

ROOT = RouteTable.ROOT


@dataclass(frozen=True, slots=True)
class SimConfig:
    shard_count: int = 16
    replication: int = 2
    lease_ttl: float = 3.0
    handoff_grace: float = 1.0
    handoff_timeout: float = 6.0
    request_timeout: float = 2.0
    lookup_timeout: float = 0.5
    route_cache_ttl: float = 1.0
    redelivery_interval: float = 2.0
    client_idle_check: float = 10.0
    snapshot_chunk: int = 2  # routes per SNAPSHOT: small, so hand-offs of the simulated shards take several
    # Client frames checked against ACLs (``protocol.access``): the driver gives each frame's principal and sets
    # the principals with ``core.access.set_principals``, as the shell does from its views.
    access_control: bool = False
    # Nodes journal what they would store (``protocol.durable``) and hold acknowledgements until ``persist``
    # completes; a node's store is its list ``persisted`` (memory: a crash or restart of a simulated node
    # starts it empty, as a node without --data-dir).
    durable: bool = False


@dataclass(slots=True)
class Lease:
    lease_id: int
    expires_at: float
    create_revision: int
    incarnation: int = 0
    leaving: bool = False


class Etcd:
    """The etcd keys shardmq uses: members (leased), assignment (CAS on mod revision) and leader (leased)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.revision = 1
        self.members: dict[str, Lease] = {}
        self.leases: dict[int, float] = {}  # lease id -> expiry
        self._next_lease = 1
        self.doc: Assignment | None = None
        self.doc_json = b""  # the document's bytes as written (views hand out this one object)
        self.doc_revision = 0
        self.leader: tuple[str, int] | None = None  # (node, lease id)
        self.history: list[tuple[int, Assignment]] = []  # every committed document, in order
        self.expired: dict[str, int] = {}  # node -> etcd revision at which its last lease expired
        self.expired_time: dict[str, float] = {}  # node -> simulated time of that expiry

    def expire(self, now: float) -> list[str]:
        gone = [lid for lid, until in self.leases.items() if until <= now]
        for lid in gone:
            del self.leases[lid]
        return self._drop_keys_without_lease(now) if gone else []

    def revoke(self, lid: int, now: float) -> list[str]:
        """``lease.revoke()``: the lease and every key attached to it (member key, leader key) go at once."""
        self.leases.pop(lid, None)
        return self._drop_keys_without_lease(now)

    def _drop_keys_without_lease(self, now: float) -> list[str]:
        dropped = []
        for node, lease in list(self.members.items()):
            if lease.lease_id not in self.leases:
                del self.members[node]
                self.revision += 1
                self.expired[node] = self.revision
                self.expired_time[node] = now
                dropped.append(node)
        if self.leader is not None and self.leader[1] not in self.leases:
            self.leader = None
            self.revision += 1
        return dropped

    def grant(self, now: float) -> int:
        lid = self._next_lease
        self._next_lease += 1
        self.leases[lid] = now + self.ttl
        return lid

    def put_member(self, node: str, lid: int, incarnation: int, leaving: bool = False) -> None:
        """A put attaches the key to ``lid``; a key that still exists keeps its create_revision."""
        self.revision += 1
        old = self.members.get(node)
        created = old.create_revision if old is not None else self.revision
        self.members[node] = Lease(lid, self.leases[lid], created, incarnation, leaving)

    def refresh(self, lid: int, now: float) -> bool:
        if lid not in self.leases:
            return False
        self.leases[lid] = now + self.ttl
        return True

    def campaign(self, node: str, lid: int | None) -> str | None:
        """``EtcdSession._leader``: read the key; create it with our lease when absent."""
        if self.leader is None and lid is not None and lid in self.leases:
            self.revision += 1
            self.leader = (node, lid)
        return self.leader[0] if self.leader else None

    def write_assignment(self, doc: Assignment, expected_revision: int, document: bytes = b"") -> int | None:
        """``membership.write_assignment``: 0 means create-if-absent, else compare the mod revision."""
        if expected_revision == 0:
            if self.doc is not None:
                return None
        elif self.doc_revision != expected_revision:
            return None
        self.revision += 1
        self.doc, self.doc_revision = doc, self.revision
        self.doc_json = document or doc.to_json()
        self.history.append((self.revision, doc))
        return self.revision


class _NullLog:
    """The cores' structlog calls, dropped (a thousand nodes' logs would cost more than the run)."""

    def _drop(self, *args: Any, **kwargs: Any) -> None:
        return None

    debug = info = warning = error = exception = _drop


@dataclass(slots=True)
class SimClient:
    """One client session with one subscription (or the publisher of one node)."""

    rid: bytes
    node_id: str
    filt: str | None
    resumes: tuple[str, str, str] | None = None  # the ``Sim.interrupted`` entry this SUB makes again
    state: str = "pending"  # pending -> acked | refused; ended (SESSION_END) from any of them


@dataclass(slots=True)
class SessionClient:
    """A client driven frame by frame (persistent sessions): it hears only the node it is connected to."""

    rid: bytes
    node_id: str | None = None  # connected to; None: away (closed, killed)
    frames: list[codec.Frame] = field(default_factory=list)  # every frame heard, in order
    # Messages heard: (topic, payload, dup); QoS 1 ones are acknowledged at once unless ``ack`` is off.
    got: list[tuple[str, bytes, bool]] = field(default_factory=list)
    ack: bool = True

    def welcome(self) -> dict[str, Any] | None:
        found = [f.header for f in self.frames if f.type == codec.WELCOME]
        return found[-1] if found else None


class SimNode:
    """The shell of one simulated node process: carries out its core's effects (``protocol.effects.Effects``)."""

    def __init__(self, sim: Sim, node_id: str, incarnation: int, partitioned: bool = False,
                 retiring: bool = False) -> None:  # fmt: skip
        self.sim = sim
        self.node_id = node_id
        self.incarnation = incarnation
        self.crashed = False  # killed, or stopped (a graceful leave ended, or removed from the cluster)
        self.paused = False
        self.persisted: list[tuple[Any, ...]] = []  # what ``persist`` stored, in order (``SimConfig.durable``)
        # Set to a list by a test: ``persist`` calls wait there as (changes, then) until the test runs ``then``.
        self.persist_held: list[tuple[list[tuple[Any, ...]], Callable[[], None]]] | None = None
        self.partitioned = partitioned
        self.retiring = retiring  # a restarted process retiring its previous incarnation: not registered yet
        self.lease_id: int | None = None
        self.lease_valid_until = 0.0
        self.next_refresh = 0.0
        self.registrations = 0
        self.leaving = False
        self.view_read_at = 0  # etcd revision when the node last read its view
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.etcd_requests: deque[tuple[str, tuple[Any, ...], Callable[..., None]]] = deque()
        c = sim.cfg
        config = ProtocolConfig(
            node_id, c.shard_count, c.replication, request_timeout=c.request_timeout, lookup_timeout=c.lookup_timeout,
            route_cache_ttl=c.route_cache_ttl, handoff_grace=c.handoff_grace, handoff_timeout=c.handoff_timeout,
            redelivery_interval=c.redelivery_interval, client_idle_check=c.client_idle_check,
            snapshot_chunk=c.snapshot_chunk, access_control=c.access_control, durable=c.durable,
            lease_ttl=c.lease_ttl,
        )  # fmt: skip
        self.core = NodeCore(config, self, _NullLog(), str(incarnation))
        self.core.start(sim.now)

    @property
    def up(self) -> bool:
        """Runs code: not crashed (or stopped) and not paused."""
        return not self.crashed and not self.paused

    @property
    def online(self) -> bool:
        """Can reach etcd and peers."""
        return self.up and not self.partitioned

    def enter(self) -> NodeCore:
        """The core, with its clock and lease state brought up to date (what the shell does before each batch)."""
        core = self.core
        core.now = self.sim.now
        core.on_lease(self.lease_valid_until - self.sim.cfg.lease_ttl / 3, self.registrations)
        return core

    # ------------------------------------------------------------------ protocol.effects.Effects
    def send_peer(self, node: str, parts: list[bytes]) -> bool:
        if node not in self.core.view.members:
            self.core.metrics["drops.peer_unknown"] += 1
            return False
        self.sim.send(self.node_id, node, parts)
        return True

    def send_client(self, rid: bytes, parts: list[bytes]) -> bool:
        self.sim.client_frames.append((self.node_id, self.incarnation, rid, parts))
        return True

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (self.sim.now + delay, next(self.sim.seq), fn))

    def poll_view(self) -> None:
        return None  # the driver reads views (``refresh``, ``settle``); a real session would read sooner

    def read_assignment(self, then: Callable[[bytes | None, int, bool], None]) -> None:
        self.etcd_requests.append(("read", (), then))

    def write_assignment(self, document: bytes, expected_revision: int, then: Callable[[int | None], None]) -> None:
        self.etcd_requests.append(("write", (document, expected_revision), then))

    def set_leaving(self) -> None:
        self.leaving = True

    def forget_peer(self, node: str) -> None:
        self.sim.channels.pop((self.node_id, node), None)

    def stop(self) -> None:
        self.sim.stopped(self)

    def persist(self, changes: list[tuple[Any, ...]], then: Callable[[], None]) -> None:
        if self.persist_held is not None:
            self.persist_held.append((changes, then))
            return
        self.persisted.extend(changes)
        then()

    def shell_status(self) -> dict[str, Any]:
        return {}


class Sim:
    """The cluster. Every public method is one step a driver may take; ``trace`` records them."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.now = 0.0
        self.seq = itertools.count()
        self.etcd = Etcd(self.cfg.lease_ttl)
        self.nodes: dict[str, SimNode] = {}
        self.channels: dict[tuple[str, str], deque[list[bytes]]] = {}
        self.client_frames: deque[tuple[str, int, bytes, list[bytes]]] = deque()
        # The principal the simulated clients' frames come from, for cores with access control on (``access``).
        self.client_principal: str | None = None
        self.clients: dict[bytes, SimClient] = {}
        self._client_ids = itertools.count(1)
        self._refs = itertools.count(1)
        self.last_client = b""
        self.sub_refs: dict[int, SimClient] = {}
        self.acked: dict[str, set[str]] = {}  # filter -> subscriber nodes whose SUB was acknowledged
        self.ack_time: dict[tuple[str, str], float] = {}
        self.failed_subs = 0
        # Publishes: id -> (time, entry node, topic, subscribers acknowledged then, outcome, nodes delivered to).
        self.publishes: dict[int, list[Any]] = {}
        self.trace: list[str] = []
        self.notes: list[str] = []
        self._views: tuple[int, int, dict[str, MemberInfo], int, bytes] | None = None
        self._member_infos: dict[tuple[str, int, int, bool], MemberInfo] = {}
        self.etcd_reachable = True
        self._incarnations = 0
        self._names = itertools.count()
        # Subscriptions whose client session ended (fenced node, restart, stop): (filter, node it was on, why).
        # Their ack is void (removed from ``acked``) until the client subscribes again (``resubscribe``).
        self.interrupted: list[tuple[str, str, str]] = []
        self.interruptions: list[tuple[float, str, str, str]] = []  # log: (time, node, filter, why)
        # Retain publishes in order: (id, topic, payload, etcd revision when sent).
        self.retain_log: list[tuple[int, str, bytes, int]] = []
        self.retained_got: dict[bytes, dict[str, tuple[bytes, int]]] = {}  # client -> topic -> (payload, qos)
        self.session_clients: dict[bytes, SessionClient] = {}

    # ------------------------------------------------------------------ helpers
    def shard_of(self, filt: str) -> int:
        key = placement_key(filt)
        return ROOT if key is None else shard_for_key(key, self.cfg.shard_count)

    def fenced(self, n: SimNode) -> bool:
        return n.enter().fenced()

    def live_members(self) -> set[str]:
        return set(self.etcd.members)

    def reaches_etcd(self, n: SimNode) -> bool:
        return n.online and self.etcd_reachable

    def expired_after_ack(self, filt: str, node: str) -> bool:
        """True when ``node``'s lease expired after its SUB of ``filt`` was acknowledged."""
        acked = self.ack_time.get((filt, node))
        return acked is not None and self.etcd.expired_time.get(node, -1.0) >= acked

    def target(self) -> tuple[tuple[str, ...], ...] | None:
        """The balanced table for etcd's live members: what the leader's coordinator moves towards (the same
        cached computation, so a run builds each member set's table once)."""
        members = {n: Member(1, m.leaving) for n, m in self.etcd.members.items()}
        return target_table(members, self.cfg.shard_count, self.cfg.replication)

    def has_route(self, node_id: str, shard: int, filt: str, subscriber: str) -> bool:
        for f, nodes in self.nodes[node_id].core.owner.routes.shard_routes(shard):
            if f == filt:
                return subscriber in nodes
        return False

    def send(self, src: str, dst: str, parts: list[bytes]) -> None:
        s, d = self.nodes[src], self.nodes.get(dst)
        if not s.online or d is None or d.crashed or d.partitioned:
            return  # lost; the sender finds out by a timeout, like a frame to a dead peer
        self.channels.setdefault((src, dst), deque()).append(parts)

    def _drop_channels(self, node_id: str) -> None:
        for key in [k for k in self.channels if node_id in k]:
            del self.channels[key]

    # ------------------------------------------------------------------ cluster-level steps
    def join(self) -> str:
        node_id = f"n{next(self._names)}"
        self._incarnations += 1
        self.nodes[node_id] = SimNode(self, node_id, self._incarnations)
        self.trace.append(f"join {node_id}")
        self.session_poll(node_id, read=True)
        return node_id

    def crash(self, node_id: str) -> None:
        """kill -9: the process is gone (its lease runs out in etcd); its clients lose their sessions."""
        n = self.nodes[node_id]
        n.crashed = True
        n.timers.clear()
        self._drop_channels(node_id)
        self._end_client_sessions(node_id, "crash")
        self.trace.append(f"crash {node_id}")

    def stopped(self, n: SimNode) -> None:
        """The node's core stopped the process (a graceful leave ended, or removed): its session revokes the
        lease on the way out (``EtcdSession.run``)."""
        if n.crashed:
            return
        revoke = n.lease_id is not None and self.reaches_etcd(n)  # asked while the process still runs
        n.crashed = True
        n.timers.clear()
        self._drop_channels(n.node_id)  # frames on their way to or from an exited process are gone
        self._end_client_sessions(n.node_id, "stopped")
        if revoke:
            self.etcd.revoke(n.lease_id, self.now)
        self.notes.append(f"{self.now}: {n.node_id} stopped")

    def leave(self, node_id: str) -> bool:
        """A graceful leave (``shardmq cluster leave``: the LEAVE frame): the node flags itself leaving, the
        leader drains its shards, then it exits."""
        n = self.nodes[node_id]
        if not n.up:
            return False
        self.trace.append(f"leave {node_id}")
        rid = b"admin/%s" % node_id.encode()
        self.clients[rid] = SimClient(rid, node_id, None, state="admin")
        n.enter().on_client_parts([rid, *codec.encode(codec.LEAVE, {"id": next(self._refs)})], self.client_principal)
        n.core.flush()
        return True

    def restart(self, node_id: str) -> None:
        """kill -9 and an immediate start under the same id: every in-memory state is lost, frames to and from it
        are lost; its lease lives on in etcd. The new process retires the old incarnation first."""
        old = self.nodes[node_id]
        self.trace.append(f"restart {node_id}")
        old.crashed = True
        old.timers.clear()
        self._end_client_sessions(node_id, "restart")
        self._drop_channels(node_id)
        self._incarnations += 1
        self.nodes[node_id] = SimNode(self, node_id, self._incarnations, partitioned=old.partitioned, retiring=True)
        self.session_poll(node_id, read=True)

    def etcd_down(self) -> None:
        self.etcd_reachable = False
        self.trace.append("etcd_down")

    def etcd_up(self) -> None:
        self.etcd_reachable = True
        self.trace.append("etcd_up")

    def pause(self, node_id: str) -> None:
        self.nodes[node_id].paused = True
        self.trace.append(f"pause {node_id}")

    def resume(self, node_id: str) -> None:
        self.nodes[node_id].paused = False
        self.trace.append(f"resume {node_id}")

    def partition(self, node_id: str) -> None:
        self.nodes[node_id].partitioned = True
        self._drop_channels(node_id)
        self.trace.append(f"partition {node_id}")

    def heal(self, node_id: str) -> None:
        self.nodes[node_id].partitioned = False
        self.trace.append(f"heal {node_id}")

    def tick(self, dt: float, renew: bool = True) -> None:
        """Advance the clock; etcd expires leases; sessions keep alive (if ``renew``); timers fire."""
        self.now += dt
        self.trace.append(f"tick {dt} renew={renew}")
        self.etcd.expire(self.now)
        if renew:
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=False)
        self.etcd.expire(self.now)
        for node_id in sorted(self.nodes):
            self.run_timers(node_id)
        self.pump_clients()

    def run_timers(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if not n.up or not n.timers or n.timers[0][0] > self.now:
            return
        core = n.enter()
        timers = n.timers
        while n.up and timers and timers[0][0] <= self.now:
            _, _, fn = heapq.heappop(timers)
            fn()
        core.flush()

    # ------------------------------------------------------------------ EtcdSession
    def session_poll(self, node_id: str, read: bool = True) -> None:
        """One iteration of ``EtcdSession.run``: answer the core's etcd requests, keep-alive when due, register
        (again) when the lease is gone; with ``read`` the view is read and handed to the core."""
        n = self.nodes[node_id]
        if not n.up:
            return
        reaches = self.reaches_etcd(n)
        self._answer_requests(n, reaches)
        if not reaches:
            return
        if n.retiring and not self._retire_previous(n):
            return
        if n.lease_id is not None and self.now >= n.next_refresh:
            if self.etcd.refresh(n.lease_id, self.now):
                n.lease_valid_until = self.now + self.cfg.lease_ttl
                n.next_refresh = self.now + self.cfg.lease_ttl / KEEPALIVES_PER_TTL
            else:
                n.lease_id = None
                n.lease_valid_until = 0.0
        if n.lease_id is None:
            n.lease_id = self.etcd.grant(self.now)
            self.etcd.put_member(node_id, n.lease_id, n.incarnation, n.leaving)
            n.registrations += 1
            n.lease_valid_until = self.now + self.cfg.lease_ttl
            n.next_refresh = self.now + self.cfg.lease_ttl / KEEPALIVES_PER_TTL
        elif self.etcd.members.get(node_id) is not None and self.etcd.members[node_id].leaving != n.leaving:
            self.etcd.put_member(node_id, n.lease_id, n.incarnation, n.leaving)
        if read:
            self.etcd.campaign(node_id, n.lease_id)
            n.view_read_at = self.etcd.revision
            n.enter().on_view(self._view(n))
            n.core.flush()

    def _view(self, n: SimNode) -> SessionView:
        """The view every node reads at this etcd revision: one members mapping and one document, shared."""
        etcd = self.etcd
        cached = self._views
        if cached is None or cached[0] != etcd.revision or cached[1] != etcd.doc_revision:
            members = {m: self._member_info(m, lease) for m, lease in sorted(etcd.members.items())}
            epoch = max((lease.create_revision for lease in etcd.members.values()), default=0)
            document = etcd.doc_json  # one bytes object per document: the cores' parse cache finds it
            cached = self._views = (etcd.revision, etcd.doc_revision, members, epoch, document)
        leader = etcd.leader[0] if etcd.leader else None
        return SessionView(cached[2], cached[3], leader, etcd.doc_revision, n.registrations, cached[4])

    def _member_info(self, node: str, lease: Lease) -> MemberInfo:
        """One MemberInfo object per registration state, shared by every view that shows it (cores compare
        members by identity first)."""
        key = (node, lease.incarnation, lease.create_revision, lease.leaving)
        info = self._member_infos.get(key)
        if info is None:
            info = self._member_infos[key] = MemberInfo(
                node, f"sim://{node}/client", f"sim://{node}/peer", 1, lease.leaving, str(lease.incarnation),
                lease.create_revision,
            )  # fmt: skip
        return info

    def _answer_requests(self, n: SimNode, reaches: bool) -> None:
        while n.etcd_requests and n.up:
            kind, args, then = n.etcd_requests.popleft()
            core = n.enter()
            if kind == "read":
                if reaches:
                    doc = self._view(n).document
                    then(doc or None, self.etcd.doc_revision, True)
                else:
                    then(None, 0, False)
            else:
                document, expected = args
                doc = parse_assignment(document)  # the core's cache: the views that follow reuse the parse
                then(self.etcd.write_assignment(doc, expected, document) if reaches else None)
            core.flush()

    def _retire_previous(self, n: SimNode) -> bool:
        """``EtcdSession.retire_previous``: revoke the lease of a member key left by a previous incarnation; then,
        while other members are live, wait until the assignment lists this id in no shard."""
        key = self.etcd.members.get(n.node_id)
        if key is not None and key.incarnation != n.incarnation:
            self.etcd.revoke(key.lease_id, self.now)
            self.notes.append(f"{self.now}: {n.node_id} revoked the lease of its previous incarnation")
        others = set(self.etcd.members) - {n.node_id}
        doc = self.etcd.doc
        if others and doc is not None and n.node_id in doc.nodes():
            return False
        n.retiring = False
        return True

    def refresh(self, node_id: str) -> None:
        self.trace.append(f"refresh {node_id}")
        self.session_poll(node_id, read=True)
        self.pump_clients()

    def lead(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if n.up:
            n.enter().lead()
            n.core.flush()

    # ------------------------------------------------------------------ network
    def deliverable(self) -> list[tuple[str, str]]:
        return sorted(k for k, q in self.channels.items() if q and self.nodes[k[1]].up)

    def deliver(self, src: str, dst: str) -> None:
        """Deliver the oldest frame from ``src`` to ``dst`` (dropped if either end is partitioned or crashed)."""
        q = self.channels.get((src, dst))
        if not q:
            return
        parts = q.popleft()
        if not q:
            del self.channels[(src, dst)]  # the driver scans the channels often: keep only those with frames
        s, d = self.nodes[src], self.nodes[dst]
        self.trace.append(f"deliver {src}->{dst} {parts[0].decode()}")
        if s.crashed or s.partitioned or d.crashed or d.partitioned or d.paused:
            return
        core = d.enter()
        core.on_peer_parts([src.encode(), *parts])
        core.flush()
        self.pump_clients()

    # ------------------------------------------------------------------ clients
    def subscribe(self, node_id: str, filt: str, resumes: tuple[str, str, str] | None = None, qos: int = 1) -> bool:
        """A new client on ``node_id`` subscribes to ``filt`` (QoS 1 unless ``qos``). False when the node does not
        run; a refusal (no assignment yet, fenced) comes back as an ERROR (``failed_subs``). Retained messages it
        gets are in ``retained_got`` under the newest client's id (``last_client``)."""
        self.trace.append(f"subscribe {node_id} {filt}")
        n = self.nodes[node_id]
        if not n.up:
            return False
        rid = self.last_client = b"c%d" % next(self._client_ids)
        client = self.clients[rid] = SimClient(rid, node_id, filt, resumes)
        ref = next(self._refs)
        self.sub_refs[ref] = client
        sub = codec.encode(codec.SUB, {"id": ref, "filters": [filt], "qos": qos})
        n.enter().on_client_parts([rid, *sub], self.client_principal)
        n.core.flush()
        self.pump_clients()
        return client.state != "refused"

    def unsubscribe(self, rid: bytes) -> bool:
        """The client ``rid`` unsubscribes (UNSUB); its subscription stops counting as acknowledged at once."""
        client = self.clients.get(rid)
        if client is None or client.filt is None or client.state != "acked":
            return False
        n = self.nodes[client.node_id]
        if not n.up:
            return False
        self.trace.append(f"unsubscribe {rid.decode()}")
        client.state = "unsubscribed"
        self._unack(client)
        unsub = codec.encode(codec.UNSUB, {"id": next(self._refs), "filters": [client.filt]})
        n.enter().on_client_parts([rid, *unsub], self.client_principal)
        n.core.flush()
        self.pump_clients()
        return True

    def resubscribe(self, index: int, node_id: str) -> bool:
        """The client of interrupted subscription ``index`` subscribes again through ``node_id`` (the SDK fails
        over and subscribes everything again). It stays interrupted until acknowledged."""
        entry = self.interrupted[index]
        self.trace.append(f"resubscribe {index} via {node_id}")
        return self.subscribe(node_id, entry[0], entry)

    def publish(self, node_id: str, topic: str, retain: bool = False, delete: bool = False) -> int | None:
        """A QoS 1 publish of a unique payload through ``node_id``; returns its id (None if the node does not
        run). Its outcome (``publishes[id][4]``: "acked" or the error code) and the subscriber nodes it reached
        (``publishes[id][5]``) fill in as frames are delivered. ``retain``: also the topic's retained message
        (``delete``: an empty retain publish, which deletes it); ``retain_log`` keeps them in order."""
        self.trace.append(f"publish {node_id} {topic}" + (" retain" if retain else "") + (" delete" if delete else ""))
        n = self.nodes[node_id]
        if not n.up:
            return None
        pid = next(self._refs)
        expected = frozenset(self.acked.get(topic, set()) & self.live_members())
        self.publishes[pid] = [self.now, node_id, topic, expected, None, set()]
        rid = b"pub/%s/%d" % (node_id.encode(), n.incarnation)
        if rid not in self.clients:
            self.clients[rid] = SimClient(rid, node_id, None, state="publisher")
        header: dict[str, Any] = {"id": pid, "topic": topic, "qos": 1}
        if retain:
            header["retain"] = True
            self.retain_log.append((pid, topic, b"" if delete else b"%d" % pid, self.etcd.revision))
        payload = b"" if delete else b"%d" % pid
        n.enter().on_client_parts([rid, *codec.encode(codec.PUB, header, payload)], self.client_principal)
        n.core.flush()
        self.pump_clients()
        return pid

    def pump_clients(self) -> None:
        """Clients take the frames their nodes sent them; a QoS 1 message is acknowledged (DACK) at once."""
        while self.client_frames:
            node_id, incarnation, rid, parts = self.client_frames.popleft()
            frame = codec.decode(parts, max_payload=1 << 30)
            sc = self.session_clients.get(rid)
            if sc is not None:
                if sc.node_id == node_id:
                    self._session_client_heard(sc, node_id, frame)
                continue
            client = self.clients.get(rid)
            if client is None:
                continue
            h = frame.header
            if frame.type == codec.SUBACK:
                self._subscribed(client)
            elif frame.type == codec.ERROR:
                self._refused(client, h)
            elif frame.type == codec.SESSION_END:
                self._session_ended(client, h["code"])
            elif frame.type == codec.PUBACK:
                for pid in h["ids"]:
                    if pid in self.publishes and self.publishes[pid][4] is None:
                        self.publishes[pid][4] = "acked"
            elif frame.type in (codec.MSG, codec.MSGS):
                self._received(node_id, incarnation, client, frame)

    # ------------------------------------------------------------------ session clients (frame by frame)
    def client_send(self, rid: bytes, node_id: str, frame_type: bytes, header: dict[str, Any],
                    payload: bytes = b"") -> None:  # fmt: skip
        """A ``SessionClient`` (made if new) sends a frame to ``node_id``, which it is connected to from then on."""
        sc = self.session_clients.setdefault(rid, SessionClient(rid))
        sc.node_id = node_id
        self.trace.append(f"client {rid.decode()} -> {node_id} {frame_type.decode()}")
        n = self.nodes[node_id]
        if not n.up:
            return
        n.enter().on_client_parts([rid, *codec.encode(frame_type, header, payload)], self.client_principal)
        n.core.flush()
        self.pump_clients()

    def client_away(self, rid: bytes) -> None:
        """The client's connection is gone without a BYE (killed): it hears nothing more; its node finds out."""
        sc = self.session_clients[rid]
        node_id, sc.node_id = sc.node_id, None
        if node_id is not None and self.nodes[node_id].up:
            core = self.nodes[node_id].enter()
            core.client_unreachable(rid)
            core.flush()

    def _session_client_heard(self, sc: SessionClient, node_id: str, frame: codec.Frame) -> None:
        sc.frames.append(frame)
        if frame.type == codec.MSG:
            h = frame.header
            items = [(h["topic"], frame.payload, bool(h.get("dup")), h.get("mid") if h["qos"] else None)]
        elif frame.type == codec.MSGS:
            items = [(item[0], payload, bool(item[3]), item[2] if item[1] else None)
                     for item, payload in codec.split_batch(frame)]  # fmt: skip
        else:
            return
        sc.got.extend((topic, payload, dup) for topic, payload, dup, _ in items)
        mids = [mid for *_, mid in items if mid is not None]
        n = self.nodes[node_id]
        if mids and sc.ack and n.up:  # the outer pump takes what this causes
            n.enter().on_client_parts([sc.rid, *codec.encode(codec.DACK, {"mids": mids})], self.client_principal)
            n.core.flush()

    def _subscribed(self, client: SimClient) -> None:
        if client.state != "pending" or client.filt is None:
            return  # a SUBACK after the session ended: the client had moved on
        client.state = "acked"
        self.acked.setdefault(client.filt, set()).add(client.node_id)
        self.ack_time[(client.filt, client.node_id)] = self.now
        if client.resumes in self.interrupted:
            self.interrupted.remove(client.resumes)

    def _refused(self, client: SimClient, h: dict[str, Any]) -> None:
        ref = h.get("ref")
        if ref in self.publishes:
            if self.publishes[ref][4] is None:
                self.publishes[ref][4] = h["code"]
            return
        if ref in self.sub_refs and client.state == "pending":
            client.state = "refused"
            self.failed_subs += 1

    def _session_ended(self, client: SimClient, why: str) -> None:
        if client.filt is None or client.state in ("refused", "ended"):
            client.state = "ended"
            return
        was_acked = client.state == "acked"
        client.state = "ended"
        if was_acked:
            self._unack(client)
        if client.resumes is None:  # a resubscribing client's first interruption is still listed
            entry = (client.filt, client.node_id, why)
            self.interrupted.append(entry)
            client.resumes = entry
        self.interruptions.append((self.now, client.node_id, client.filt, why))

    def _unack(self, client: SimClient) -> None:
        assert client.filt is not None
        if not any(c.state == "acked" and c.filt == client.filt and c.node_id == client.node_id
                   for c in self.clients.values() if c is not client):  # fmt: skip
            subs = self.acked.get(client.filt)
            if subs is not None:
                subs.discard(client.node_id)
            self.ack_time.pop((client.filt, client.node_id), None)

    def _end_client_sessions(self, node_id: str, why: str) -> None:
        """The node's process ended: its clients' sessions end with it (the SDK reports the gap)."""
        for client in list(self.clients.values()):
            if client.node_id == node_id and client.state in ("pending", "acked"):
                self._session_ended(client, why)

    def _received(self, node_id: str, incarnation: int, client: SimClient, frame: codec.Frame) -> None:
        if frame.type == codec.MSG:
            h = frame.header
            items = [(h.get("mid"), frame.payload, h["topic"], h["qos"], h.get("retain") is True)]
        else:
            items = [(item[2], payload, item[0], item[1], len(item) > 4 and item[4] is True)
                     for item, payload in codec.split_batch(frame)]  # fmt: skip
        mids = [mid for mid, *_ in items if mid is not None]
        for _, payload, topic, qos, retain in items:
            if retain:  # a retained message for a new subscription (not a publish reaching a subscriber)
                self.retained_got.setdefault(client.rid, {})[topic] = (payload, qos)
                continue
            if not payload:  # a retain publish that deletes: nothing to tell publishes apart by
                continue
            pid = int(payload)
            if pid in self.publishes:
                self.publishes[pid][5].add(client.node_id)
        n = self.nodes.get(node_id)
        if mids and n is not None and n.up and n.incarnation == incarnation:
            dack = codec.encode(codec.DACK, {"mids": mids})
            n.enter().on_client_parts([client.rid, *dack], self.client_principal)
            n.core.flush()

    # ------------------------------------------------------------------ settling
    def views_current(self) -> bool:
        members = self.etcd.members
        for n in self.nodes.values():
            if not n.up or n.node_id not in members:
                continue
            view = n.core.view
            if view.assignment_revision != self.etcd.doc_revision or view.registration_seen != n.registrations:
                return False
            if self._views is not None and view.members is self._views[2] and self._views[0] == self.etcd.revision:
                continue  # the current view object itself
            if set(view.members) != set(members) or any(
                view.members[m].revision != lease.create_revision for m, lease in members.items()
            ):
                return False
        return True

    def leader_node(self) -> SimNode | None:
        if self.etcd.leader is None:
            return None
        return self.nodes[self.etcd.leader[0]]

    def quiescent(self) -> bool:
        """Nothing left to do: views current, no frames, requests or etcd requests pending, no shard being
        refilled, the assignment at the target, no moves in flight."""
        doc, target = self.etcd.doc, self.target()
        if not self.etcd_reachable or any(n.retiring and not n.crashed for n in self.nodes.values()):
            return False
        if doc is None or target is None or doc.table != target or not self.views_current():
            return False
        if any(self.channels.values()) or self.client_frames:
            return False
        for n in self.nodes.values():
            core = n.core
            held = core.entry.shared_copies() if len(core.requests) else 0  # a member's unacked shared messages
            if n.up and (len(core.requests) > held or core.owner.deferred_route_changes or n.etcd_requests
                         or core.subscriptions.announcements_due or core.owner.refilling):  # fmt: skip
                return False
        leader = self.leader_node()
        if leader is None or not leader.up or leader.core.coordinator is None or leader.core.coordinator.in_flight:
            return False
        return all(
            not n.partitioned and not n.paused if not n.crashed else n.node_id not in self.etcd.members
            for n in self.nodes.values()
        )

    def settle(self, max_rounds: int = 400, dt: float = 0.25) -> bool:
        """Drive the cluster deterministically towards quiescence: deliver every frame, read every view, let
        the leader step, advance the clock. Paused and partitioned nodes stay so. True once quiescent."""
        self.trace.append("settle")
        for _ in range(max_rounds):
            self.drain()
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=True)
            self.drain()
            leader = self.leader_node()
            if leader is not None:
                self.lead(leader.node_id)
            if self.quiescent():
                return True
            self.now += dt
            self.etcd.expire(self.now)
            for node_id in sorted(self.nodes):
                self.session_poll(node_id, read=False)
                self.run_timers(node_id)
            self.pump_clients()
        return self.quiescent()

    def drain(self, limit: int = 1_000_000) -> None:
        """Deliver every frame queued (and those they cause), channel by channel in a fixed order."""
        for _ in range(limit):
            ready = self.deliverable()
            if not ready:
                return
            for src, dst in ready:
                q = self.channels.get((src, dst))
                while q:
                    self.deliver(src, dst)

    def subscribers(self) -> list[SimClient]:
        return [c for c in self.clients.values() if c.filt is not None and c.state == "acked"]

    def check_publish(self, node_id: str, topic: str, max_rounds: int = 80) -> frozenset[str] | None:
        """Publish and run the cluster until the publisher has its answer: the subscriber nodes the message
        reached when it was acknowledged, or None when it failed (or no answer came)."""
        pid = self.publish(node_id, topic)
        if pid is None:
            return None
        record = self.publishes[pid]
        for _ in range(max_rounds):
            self.drain()
            if record[4] is not None:
                break
            self.now += 0.25
            for nid in sorted(self.nodes):
                self.session_poll(nid, read=True)
                self.run_timers(nid)
            self.pump_clients()
        return frozenset(record[5]) if record[4] == "acked" else None
