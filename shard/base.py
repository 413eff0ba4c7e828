"""What the parts of a ``Node`` share: the attributes it holds and the methods of its shell (``node.py``).

Rules of this file:
- Declarations only: ``NodeBase`` has annotations and ``TYPE_CHECKING`` signatures, no values and no code.
  ``Node.__init__`` (and ``Node.run``) create the attributes; the mixins (``clients``, ``routing``,
  ``ownership``) subclass ``NodeBase`` so what they use from the rest of the node is stated and type-checks.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq

from shardmq.rebalance import Coordinator
from shardmq.ring import Assignment
from shardmq.router.codec import Frame
from shardmq.router.matching import FilterIndex
from shardmq.router.route_cache import LookupWatchers, RouteCache
from shardmq.router.routes import RouteTable

from .membership import EtcdSession, MemberInfo
from .outbox import Outbox
from .state import Forwarding, Invalidation, Lookup, Publish, Session, Waiter

if TYPE_CHECKING:
    from .node import NodeConfig


class NodeBase:
    """The state of a node (created in ``Node.__init__``, sockets and etcd in ``Node.run``)."""

    cfg: NodeConfig
    me: str
    incarnation: str
    sessions_ended_fenced: bool
    log: Any
    ctx: zmq.Context
    metrics: Counter[str]
    routes: RouteTable
    local_q0: FilterIndex[bytes]
    local_q1: FilterIndex[bytes]
    sessions: dict[bytes, Session]
    drop_reports: dict[bytes, Session]
    members: dict[str, MemberInfo]
    epoch: int
    assignment: Assignment | None
    assignment_revision: int
    leader: str | None
    coordinator: Coordinator | None
    forwarding: dict[int, Forwarding]
    incoming: dict[int, int]
    snapshot_sources: dict[int, str]
    _lead_scheduled: bool
    _registration: int
    _last_refresh: float
    _last_progress_log: float
    dealers: dict[str, zmq.Socket]
    topic_queues: dict[str, deque[Publish]]
    queued_publishes: int
    clients_paused: bool
    pending_lookups: dict[int, Lookup]
    lookups_in_flight: dict[tuple[str, int], int]
    route_cache: RouteCache
    lookup_watchers: LookupWatchers
    invalidations: dict[int, Invalidation]
    invalidating: dict[int, set[int]]
    deferred_route_changes: deque[tuple[float, str, Frame]]
    member_revision: int
    pending_fwds: dict[int, tuple[str, Publish]]
    unexpired_fwds: list[int]
    waiters: dict[int, Waiter]
    outbox: Outbox
    route_add_waiters: dict[str, int]
    timers: list[tuple[float, int, Callable[[], None]]]
    ids: itertools.count[int]
    started: float
    running: bool
    settings: dict[str, Any]
    client_sock: zmq.Socket
    peer_sock: zmq.Socket
    member_pull: zmq.Socket
    member_endpoint: str
    etcd: Any
    session: EtcdSession

    if TYPE_CHECKING:  # the shell's methods, defined in ``Node``

        def send_peer(self, node: str, parts: list[bytes]) -> bool: ...

        def send_client(self, rid: bytes, parts: list[bytes]) -> bool: ...

        def reject_client(self, rid: bytes, code: str, reason: str, ref: int | None = None) -> None: ...

        def call_later(self, delay: float, fn: Callable[[], None]) -> None: ...

        def stop(self) -> None: ...

        def end_sessions(self, code: str, reason: str) -> None: ...

        def detach_session(self, rid: bytes) -> None: ...

        def status(self) -> dict[str, Any]: ...

        def _refuse_peer(self, sender: str, frame: Frame, code: str, reason: str, **extra: Any) -> None: ...
        def _shards_ok(self, shards: Iterable[int]) -> bool: ...

        def _fail_peer_requests(self, node: str) -> None: ...
