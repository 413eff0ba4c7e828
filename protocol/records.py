"""The records the protocol core keeps: client sessions, publishes in flight and the requests waiting on peers.

Rules of this file:
- Plain data and small helpers only; the sides of the core (``entry``, ``owner``, ``destination``,
  ``subscriptions``) act on them.
- Every record that waits on peers says which (``waits_on``): ``requests.PendingRequests`` holds them all, so a
  peer's ERROR or its loss reaches whatever waits on it through one registry.
- ``ROOT`` is the route table's shard for the root set (filters without a placement key): root-set routes live
  on every node.
- Publishes wait in a per-topic FIFO until their lookups finish (``Publish.lookups_left``), so the order of
  publishes to one topic is the order they are forwarded in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from shardmq.router import codec
from shardmq.router.acl import Acl
from shardmq.router.routes import RouteTable

ROOT = RouteTable.ROOT
SESSION_PREFIX = "$session/"  # the session directory's records (``sessions``): no client may publish or subscribe
# A persistent session's replicated queue (``sessions``): one record per queued QoS 1 message, in the retained
# store of the session key's shard, ``$sessionq/<client id>/<entry key>`` (``queue_topic``). Reserved as well.
QUEUE_PREFIX = "$sessionq/"
# Outcomes of a shared message sent on (``Publish.then``), besides an error code: a member acknowledged it; no other
# node has members of its share (a plain publish with no subscriber is acknowledged: so is this one at arrival).
SHARED_OK = "ok"
NO_MEMBER = "no_member"
RESERVED_REASON = f"topics under {SESSION_PREFIX!r} and {QUEUE_PREFIX!r} are reserved for the cluster's sessions"
Pid = tuple[str, int]  # a QoS 1 publish's id: (entry node, its counter there)
# A QoS 1 message kept for a session beyond its window: (topic, payload, retain, pid or None, dup).
Queued = tuple[str, bytes, bool, Pid | None, bool]


def is_reserved(topic_or_filter: str) -> bool:
    return (
        topic_or_filter.startswith((SESSION_PREFIX, QUEUE_PREFIX))
        or topic_or_filter in (SESSION_PREFIX[:-1], QUEUE_PREFIX[:-1])
    )


def queue_topic(client_id: str, pid: Pid) -> str:
    """The record of one queued message of ``client_id``'s session: keyed by its publish id, so the same publish
    written twice (two holders during a takeover's overlap) is one record. The key is one level (no ``/``)."""
    return f"{QUEUE_PREFIX}{client_id}/{pid[1]}@{pid[0].replace('/', '|')}"


def queue_filter(client_id: str) -> str:
    """The filter that matches exactly ``client_id``'s queue records (a client id has no wildcard: it is checked
    as part of a topic name at HELLO; its ``/`` levels are all literal, the key is the one last level)."""
    return f"{QUEUE_PREFIX}{client_id}/+"


def placement_key(topic: str) -> str:
    """The key whose shard holds a retained-store record: a queue record lives with its session's directory record
    (``$session/<client id>``), so the session moves, snapshots and is replicated as one; any other topic is its
    own key."""
    if topic.startswith(QUEUE_PREFIX):
        return SESSION_PREFIX + topic[len(QUEUE_PREFIX):].rpartition("/")[0]
    return topic


def encode_queued(topic: str, retain: bool, pid: Pid, payload: bytes) -> bytes:
    """A queue record's value: a length-prefixed JSON head [topic, retain, entry node, counter], then the payload."""
    head = orjson.dumps([topic, retain, pid[0], pid[1]])
    return len(head).to_bytes(4, "big") + head + payload


def decode_queued(value: bytes) -> tuple[str, bool, Pid, bytes] | None:
    """(topic, retain, pid, payload) of a queue record's value; None when it is not one (counted by the caller)."""
    try:
        size = int.from_bytes(value[:4], "big")
        topic, retain, node, counter = orjson.loads(value[4 : 4 + size])
        if not (isinstance(topic, str) and isinstance(node, str) and type(counter) is int):
            return None
        return topic, bool(retain), (node, counter), value[4 + size :]
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None


@dataclass(slots=True)
class Session:
    """What a node knows of one connected client."""

    rid: bytes
    last_seen: float
    filters: dict[str, int] = field(default_factory=dict)  # filter -> granted qos
    # mid -> (topic, payload, written): a message zmq took (written) is not resent on a timer, since the stream
    # is reliable while the connection lives; unwritten ones (send queue full) and, on reconnect, all are resent.
    inflight: dict[int, tuple[str, bytes, bool]] = field(default_factory=dict)
    next_mid: int = 1
    greeted: bool = False  # said HELLO: a later HELLO on this session finds it present (MQTT's session present)
    # QoS 1 messages beyond the window (``max_inflight``), oldest first: accepted, written as acknowledgements
    # make room (``Queued``; retain for a retained message, ``destination.deliver_retained``).
    backlog: deque[Queued] = field(default_factory=deque)
    held_bytes: int = 0  # payload bytes in ``inflight`` and ``backlog``: bounded by ``max_session_bytes``
    detached_at: float | None = None  # the time its connection was found gone; None while attached
    # QoS 0 messages dropped because zmq would not queue them (the client reads too slowly), in all and not yet
    # told to the client (a DROPPED frame goes once zmq takes frames for it again).
    dropped: int = 0
    dropped_unreported: int = 0
    # QoS 0 publishes of this client that its entry node failed or refused (``entry``), not yet told to the client:
    # code -> [count, the last one's reason, how many of them are not logged yet]; None when nothing is owed.
    # Reported as one ERROR with ``count`` per code.
    publish_failed: dict[str, list[Any]] | None = None
    # The principal that opened the session and its ACL (``access``); None when access control is off.
    principal: str | None = None
    acl: Acl | None = None
    retained_mids: set[int] = field(default_factory=set)  # inflight mids that carry a retained message (MSG retain)
    # Persistent sessions (``sessions``): kept after BYE or a lost connection for ``expiry`` seconds.
    persistent: bool = False
    expiry: float = 0.0
    pids: dict[int, Pid] = field(default_factory=dict)  # inflight mid -> its publish id (persistent sessions only)
    moving_to: str | None = None  # the node taking this session over: nothing is delivered here any more
    # At the node taking a session over: until the old holder's tail came, live messages wait here (``Queued``).
    waiting_tail: bool = False
    live: list[Queued] = field(default_factory=list)
    moved_pids: set[Pid] = field(default_factory=set)  # publish ids the old holder handed over (delivered once)
    shared_mids: dict[int, SharedMessage] = field(default_factory=dict)  # inflight mid -> the shared message it is
    backlog_base: int = 0  # the stored position of ``backlog[0]`` (``durable``: a persistent session's store rows)
    restored: bool = False  # loaded from the store at start; its directory record not yet rewritten (``durable``)
    # The will (``wills``): what HELLO gave, as the directory record holds it (a ``wills.will_block``); None: no
    # will, or it was cleared (BYE) or claimed (published).
    will: dict[str, Any] | None = None


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
    asked_remote: bool = False  # a lookup went to another node: two hops before the forward
    retain: bool = False  # also store it as the topic's retained message (``retained``); its PUBACK waits for that
    will: bool = False  # a will the node publishes for a client that is gone (``wills``): its outcome is counted
    routed: bool = False  # forwarded: a PUBACK may go once nothing else waits (a RETAIN_ACK may come first)
    pid: int = 0  # a QoS 1 publish's id at this entry node, the same for all its destinations (session takeover)
    # A shared message sent on by a node that could not deliver it (``Entry.redispatch_shared``): only members of
    # ``share_only`` on nodes outside ``exclude`` may get it, and ``then(outcome)`` runs once: ``SHARED_OK`` when a
    # member acknowledged it, ``NO_MEMBER`` when no other node has members of the share, else the error code that
    # failed it. ``placed`` runs once when every node it went to answered FWD_ACK (they hold it now).
    share_only: str | None = None
    exclude: frozenset[str] = frozenset()
    then: Callable[[str], None] | None = None
    placed: Callable[[], None] | None = None


@dataclass(slots=True)
class PendingForward:
    """A QoS 1 forward waiting for its destination's FWD_ACK (the publisher's PUBACK waits for all of them)."""

    dest: str
    pub: Publish

    def waits_on(self, node: str) -> bool:
        return self.dest == node


@dataclass(slots=True)
class SharedForward:
    """A QoS 1 message forwarded to one node for one shared subscription (SHARED_FWD). Until ``acked`` (FWD_ACK)
    the publisher's PUBACK waits for it, as for a PendingForward; afterwards the entry node keeps it as its copy
    until the destination says a member acknowledged it (SHARED_DONE), and sends it to another node of the group
    if the destination leaves the view first (node loss)."""

    dest: str
    pub: Publish
    share: str
    acked: bool = False

    def waits_on(self, node: str) -> bool:
        return self.dest == node


@dataclass(slots=True)
class SharedCopy:
    """A QoS 1 shared message the entry node gave its own member, backed up at another node (SHARED_COPY): until
    ``acked`` (FWD_ACK) the publisher's PUBACK waits for it; afterwards it waits for the member's acknowledgement
    (then SHARED_RELEASE to ``dest``). ``tried``: the backups that left before the member acknowledged."""

    dest: str
    pub: Publish
    share: str
    fid: int = 0
    acked: bool = False
    released: bool = False  # the member acknowledged it (or it was sent on): no backup needed any more
    slots: list[str] = field(default_factory=list)  # the share's slot nodes: a backup there first
    tried: set[str] = field(default_factory=set)

    def waits_on(self, node: str) -> bool:
        return self.dest == node


@dataclass(slots=True)
class HeldCopy:
    """A SHARED_COPY this node keeps for ``origin`` (its id there: ``fid``) until SHARED_RELEASE; if ``origin``
    leaves the view first, the message goes to a member on another node (``Entry.redispatch_shared``)."""

    origin: str
    fid: int
    share: str
    topic: str
    payload: bytes

    def waits_on(self, node: str) -> bool:
        return self.origin == node


@dataclass(slots=True)
class SharedMessage:
    """A shared subscription's message at the node that delivers it to one local member: in that member's
    inflight (``Session.shared_mids``) or waiting for a member's window (``Destination.shared_pending``).
    ``done`` runs once a member acknowledged it (tells whoever holds the copy: SHARED_DONE to the entry node)."""

    share: str
    topic: str
    qos: int
    payload: bytes
    done: Callable[[], None] | None = None
    dup: bool = False  # it may have reached a member before (one that left, a node that died)


@dataclass(slots=True)
class Lookup:
    """One LOOKUP in flight, answering every publish to its topic that arrived meanwhile (``pubs``; none yet for
    a refresh ahead of a cached answer's expiry)."""

    pubs: list[Publish]
    topic: str
    shard: int
    owner: str
    tried: list[str]
    shard_epoch: int = 0  # the shard's epoch we asked at, the route cache's ticket and the time then (route_cache)
    ticket: tuple[int, int] = (0, 0)
    sent_at: float = 0.0
    head: str | None = None  # the topic's first level when ``shard`` is its first level's shard only (see entry)

    def waits_on(self, node: str) -> bool:
        return self.owner == node


@dataclass(slots=True)
class Invalidation:
    """INVALIDATEs sent to the entry nodes caching answers of ``shards``; ``callbacks`` run once all acknowledged
    (or left, or timed out): the ROUTE_ACKs of added routes in those shards wait for them."""

    pending: set[str]
    shards: list[int]
    callbacks: list[Callable[[list[str]], None]] = field(default_factory=list)

    def waits_on(self, node: str) -> bool:
        return node in self.pending


@dataclass(slots=True)
class Waiter:
    """Something waiting for a set of peer replies, e.g. a SUBACK waiting for every owner's ROUTE_ACK."""

    pending: set[str]
    callbacks: list[Callable[[list[str]], None]]
    kind: bytes = codec.ROUTE_ADD
    sent: dict[str, list[list[Any]]] = field(default_factory=dict)  # node -> [shard, shard_epoch, filter] items
    attempt: int = 0
    filters: list[str] = field(default_factory=list)  # ROUTE_ADD filters this waiter installs
    failures: list[str] = field(default_factory=list)

    def waits_on(self, node: str) -> bool:
        return node in self.pending


@dataclass(slots=True)
class Relay:
    """Route additions a hand-off source relayed to the targets filling their shards (``owner``), waiting for
    their ROUTE_ACKs: the addition is confirmed to its subscriber's node only once every target holds it."""

    pending: set[str]
    header: dict[str, Any]  # the relayed frame's header, without ``routes``
    sent: dict[str, list[list[Any]]]  # target -> [shard, shard_epoch, filter] items
    callbacks: list[Callable[[list[str]], None]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)  # shards of relays not delivered (see owner's rules)
    attempt: int = 0

    def waits_on(self, node: str) -> bool:
        return node in self.pending


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


@dataclass(slots=True)
class RetainWrite:
    """A retain publish's change sent to its shard's primary (``retained``), waiting for RETAIN_ACK."""

    primary: str
    shard: int
    topic: str
    qos: int
    payload: bytes
    then: Callable[[str | None, str], None]  # (error code or None, reason)
    attempt: int = 0
    # A session record's conditional write (``wills``): applied only if the stored record's pending will has this
    # id ("" = none); ``clear_will``: the primary drops the stored record's will itself (the payload is unused).
    # A mismatch calls ``on_conflict`` with the stored record instead of ``then``.
    if_will: str | None = None
    clear_will: bool = False
    on_conflict: Callable[[bytes], None] | None = None

    def waits_on(self, node: str) -> bool:
        return self.primary == node


@dataclass(slots=True)
class RetainBatch:
    """Writes of one shard sent to its primary in one RETAINS frame (``retained.send_batched``), waiting for its
    one RETAIN_ACK; each write's ``then`` is answered with it. ``attempt`` counts the whole batch's stale retries."""

    primary: str
    shard: int
    writes: list[RetainWrite]
    attempt: int = 0

    def waits_on(self, node: str) -> bool:
        return self.primary == node


@dataclass(slots=True)
class RetainParts:
    """Writes of several shards with one primary sent in one RETAINM frame (``retained.send_batched``), waiting for
    its RETAINM_ACK; each shard's writes get that shard's answer. A write's ``attempt`` counts its stale retries."""

    primary: str
    shards: dict[int, list[RetainWrite]]

    def waits_on(self, node: str) -> bool:
        return self.primary == node


@dataclass(slots=True)
class PartsReplication:
    """The RETAINM frames a primary (or a hand-off source relaying them) sent, one per replica or target node, each
    with the parts of the shards that node holds; ``then(failed)`` once each answered or left the view, ``failed``
    shard -> (code, reason) of the shards a node refused or did not confirm in time."""

    pending: set[str]
    shards: dict[str, list[int]]  # node -> the shards its frame carries
    then: Callable[[dict[int, tuple[str, str]]], None]
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)

    def waits_on(self, node: str) -> bool:
        return node in self.pending


@dataclass(slots=True)
class Replication:
    """A retained change the primary (or a hand-off source relaying it) sent to replicas and hand-off targets;
    ``then(failed)`` once each answered, left the view, or the time ran out (failed)."""

    pending: set[str]
    then: Callable[[bool], None]
    failed: bool = False

    def waits_on(self, node: str) -> bool:
        return node in self.pending


@dataclass(slots=True)
class RetainedFetch:
    """A new subscription's RETAINED_GETs, one per member asked; delivered to its client once all answered.
    Without a session: a node's own read of one record (``then`` gets its payload, None when there is none)."""

    session: Session | None
    filters: dict[str, int]  # granted filter -> granted qos
    pending: dict[str, int]  # node -> RETAINED_GETs to it not answered yet (a retry may ask a node twice)
    asked: dict[str, list[str]]  # node -> filters it was asked for
    tried: dict[str, list[str]]  # exact filter -> owners asked so far (the next one is asked on a timeout)
    # topic -> (rank, qos, payload, stamp epoch, stamp seq) of the copy kept
    got: dict[str, tuple[int, int, bytes, int, int]] = field(default_factory=dict)
    partial: dict[str, bool] = field(default_factory=dict)  # node -> it sent a chunk with ``more``
    then: Callable[[bytes | None], None] | None = None
    timeout: float | None = None  # per member asked; None: retained_fetch_timeout

    def waits_on(self, node: str) -> bool:
        return node in self.pending


@dataclass(slots=True)
class Takeover:
    """A persistent session this node takes over from its holder (``sessions``): ``phase`` is "lookup" (reading
    the directory), "state" (SESSION_TAKE sent), "subscribe" (routes and directory record being written), "tail"
    (SESSION_TAKEN sent, waiting for what queued at the holder since)."""

    session: Session
    client_id: str
    holder: str = ""
    phase: str = "lookup"
    filters: list[list[Any]] = field(default_factory=list)
    items: list[tuple[list[Any], bytes]] = field(default_factory=list)
    started: float = 0.0
    ref: Any = None  # the HELLO's id, for its WELCOME
    welcomed: bool = False
    prior_will: dict[str, Any] | None = None  # the will the directory record held (``wills``): ours displaces it
    rebuild: bool = False  # SESSION_TAKE went to the session shard's primary to rebuild it from the replica
    deadline: float = 0.0  # a rebuild asked: its answer is due then (the primary may wait out the holder's lease)
    replica: bool = False  # the record names another holder: a fresh session purges the old replicated queue

    def waits_on(self, node: str) -> bool:
        return node == self.holder and self.phase in ("state", "tail")
