"""The shardmq wire codec: multipart zmq frames <-> validated ``Frame`` objects.

Rules of this file:
- A message on the wire is exactly three parts: ``[type, header, payload]``. ``type`` is a short ASCII name
  from ``FRAME_TYPES``; ``header`` is a UTF-8 JSON object (orjson) that always carries ``"v"`` (the protocol
  version); ``payload`` is opaque bytes (the application message for PUB/FWD/MSG, empty otherwise). A ROUTER
  socket prepends the peer's routing id; stripping it is the socket owner's job, not the codec's.
- ``decode`` never trusts its input: wrong part count, a header that is not a JSON object, a missing or
  mistyped field, an unknown type, a foreign version or an oversized part raise ``ProtocolError`` whose
  ``code`` is a stable machine-readable string and whose ``reason`` says what to fix. When the header could
  be parsed, ``ProtocolError.ref`` carries its request ``id`` so the error can be matched to the request.
- Two epochs, two names: ``shard_epoch`` (a shard's ownership changes, what fencing compares) on the frames about
  one shard, and the cluster's ``membership_epoch`` only in WELCOME, for clients and logs. A field no receiver
  reads is not sent. Batches put many items in one frame (``filters``, ``routes``, ``mids``, ``ids``) rather
  than inventing new frame types; only a request defined as one item per frame has a batch sibling (PUBS, FWDS,
  MSGS for PUB, FWD, MSG; LOOKUPS and LOOKUPS_REPLY for LOOKUP and LOOKUP_REPLY), whose lone item still goes
  as the plain frame.
- Retained messages (since v3): RETAIN (a retain publish's change, entry node -> the shard's primary, and with
  ``replica`` the primary -> the other owners and hand-off targets), RETAIN_ACK, RETAINED_GET (a new
  subscription's filters) and RETAINED_REPLY (the stored messages: ``items`` and ``sizes`` in the header, the
  payloads back to back, as PUBS). A retain flag is optional where a message travels (PUB ``retain``, a PUBS
  item's 4th element, MSG ``retain``, an MSGS item's 5th): absent means false, so ordinary frames stay as small
  as before; present, it must be a JSON boolean. A SNAPSHOT may carry the shard's retained messages
  (``retained`` and ``retained_sizes``, the payloads in its payload part); ``split_retained`` checks them.
- Persistent sessions (v4): HELLO may say ``clean`` (false: keep the session) and ``expiry`` (seconds); a QoS 1 forward
  may carry its publish id's counter (FWD ``pid``, a FWDS item's 4th element; the entry node is the sender) and the
  persistent sessions it reaches through routes moved from a node that left (FWD ``sessions``, a FWDS item's 5th
  element: [client id, origin node] pairs); the
  takeover frames SESSION_TAKE, SESSION_STATE (items [topic, dup, retain, pid] and ``sizes``, the payloads back to
  back, as PUBS) and SESSION_TAKEN; SESSION_END code ``taken_over``.
- Shared subscriptions (v4): SHARED_FWD (one message for one shared subscription, ``share``; optional ``pid``, and
  ``dup``, true only when exactly ``true``) and SHARED_DONE (``ids`` of SHARED_FWDs a member acknowledged);
  SHARED_COPY (a backup of a message the entry node gave its own member, answered FWD_ACK) and SHARED_RELEASE
  (``ids`` of SHARED_COPYs whose message a member acknowledged).
- Wills (v4): HELLO may carry ``will`` ({"topic", "qos", "retain"}, checked by the node) with the will's payload in its
  payload part; a RETAIN of a session record may be conditional (``if_will``, a string, and ``clear_will``), and
  its RETAIN_ACK then may say ``conflict`` (the stored record in its payload part).
- Batched retained writes (v4): RETAINS, the batch sibling of RETAIN for one shard (``items`` [topic, qos] and
  ``sizes``, the payloads back to back, as PUBS; with ``replica`` a ``stamp`` [shard_epoch, first seq], item i
  stamped first seq + i), answered by one RETAIN_ACK for all its items; never conditional (no ``if_will``).
  RETAINM, the writes of several shards with one primary in one frame (``parts`` [shard, shard_epoch, count] in
  item order; with ``replica`` [shard, shard_epoch, count, stamp epoch, first seq]; ``items``/``sizes`` as RETAINS),
  answered by RETAINM_ACK per shard (``stale`` [shard, shard_epoch] pairs, ``failed`` [shard, code, reason]
  triples; a shard listed in neither is stored).
- The codec is pure: no sockets, clocks or logging. docs/PROTOCOL.md documents every frame listed here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

PROTOCOL_VERSION = 4  # v4: persistent sessions, replicated session queues, shared subscriptions, wills (v3: retained)
DEFAULT_MAX_PAYLOAD = 1024 * 1024
DEFAULT_MAX_HEADER = 16 * 1024 * 1024

# Client <-> node
HELLO = b"HELLO"
WELCOME = b"WELCOME"
SUB = b"SUB"
SUBACK = b"SUBACK"
UNSUB = b"UNSUB"
UNSUBACK = b"UNSUBACK"
PUB = b"PUB"
PUBS = b"PUBS"
PUBACK = b"PUBACK"
MSG = b"MSG"
DACK = b"DACK"
PING = b"PING"
PONG = b"PONG"
STATUS = b"STATUS"
STATUS_REPLY = b"STATUS_REPLY"
BYE = b"BYE"
LEAVE = b"LEAVE"
LEAVING = b"LEAVING"
SESSION_END = b"SESSION_END"
DROPPED = b"DROPPED"  # node -> client: QoS 0 messages for it that its full send queue made the node drop
ERROR = b"ERROR"
# Node <-> node
ROUTE_ADD = b"ROUTE_ADD"
ROUTE_DEL = b"ROUTE_DEL"
ROUTE_ACK = b"ROUTE_ACK"
LOOKUP = b"LOOKUP"
LOOKUP_REPLY = b"LOOKUP_REPLY"
LOOKUPS = b"LOOKUPS"  # many LOOKUPs to one owner in one frame
LOOKUPS_REPLY = b"LOOKUPS_REPLY"
FWD = b"FWD"
FWD_ACK = b"FWD_ACK"
FWDS = b"FWDS"
MSGS = b"MSGS"
HANDOFF = b"HANDOFF"
SNAPSHOT = b"SNAPSHOT"
HANDOFF_READY = b"HANDOFF_READY"
INVALIDATE = b"INVALIDATE"
INVALIDATE_ACK = b"INVALIDATE_ACK"
RETAIN = b"RETAIN"  # a retained message's change: entry -> shard primary; with ``replica``: primary -> replicas
RETAINS = b"RETAINS"  # many RETAINs of one shard in one frame (a session queue's records, their deletions)
RETAINM = b"RETAINM"  # the RETAINS of several shards with one primary (or one replica) in one frame
RETAINM_ACK = b"RETAINM_ACK"  # a RETAINM's answer, per shard
RETAIN_ACK = b"RETAIN_ACK"
RETAINED_GET = b"RETAINED_GET"  # a new subscription's filters: which retained messages match them
RETAINED_REPLY = b"RETAINED_REPLY"
# Persistent sessions: a node taking over client C's session asks its holder for it (SESSION_TAKE), gets its state
# (SESSION_STATE chunks, the last with ``last``), says it holds it now (SESSION_TAKEN) and gets the tail (more
# SESSION_STATE chunks, the last with ``last``).
SESSION_TAKE = b"SESSION_TAKE"
SESSION_STATE = b"SESSION_STATE"
SESSION_TAKEN = b"SESSION_TAKEN"
# Shared subscriptions: a message for one member of a group (``share`` = "$share/GROUP/FILTER") at the destination
# node the entry node picked (SHARED_FWD, answered FWD_ACK), and the destination's word that a member acknowledged
# it (SHARED_DONE), after which the entry node drops its copy.
SHARED_FWD = b"SHARED_FWD"
SHARED_DONE = b"SHARED_DONE"
# An entry node that gave a QoS 1 shared message to its own member keeps a copy at another node (SHARED_COPY,
# answered FWD_ACK) until the member acknowledged it (SHARED_RELEASE); the holder sends it on if the entry node dies.
SHARED_COPY = b"SHARED_COPY"
SHARED_RELEASE = b"SHARED_RELEASE"

_INT = int
_STR = str
_LIST = list

# Required header fields per frame type (besides "v"). Optional fields are read with .get by the receiver.
FRAME_FIELDS: dict[bytes, dict[str, type]] = {
    HELLO: {},
    WELCOME: {"node": _STR},
    SUB: {"id": _INT, "filters": _LIST, "qos": _INT},
    SUBACK: {"id": _INT, "results": _LIST},
    UNSUB: {"id": _INT, "filters": _LIST},
    UNSUBACK: {"id": _INT},
    PUB: {"topic": _STR, "qos": _INT},
    PUBS: {"items": _LIST, "sizes": _LIST},
    PUBACK: {"ids": _LIST},
    MSG: {"topic": _STR, "qos": _INT},
    MSGS: {"items": _LIST, "sizes": _LIST},
    DACK: {"mids": _LIST},
    PING: {},
    PONG: {},
    STATUS: {"id": _INT},
    STATUS_REPLY: {"id": _INT, "status": dict},
    BYE: {},
    LEAVE: {"id": _INT},
    LEAVING: {"id": _INT},
    SESSION_END: {"code": _STR, "reason": _STR},
    DROPPED: {"count": _INT},
    ERROR: {"code": _STR, "reason": _STR},
    ROUTE_ADD: {"id": _INT, "node": _STR, "routes": _LIST},
    ROUTE_DEL: {"id": _INT, "node": _STR, "routes": _LIST},
    ROUTE_ACK: {"id": _INT},
    LOOKUP: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "topic": _STR},
    LOOKUP_REPLY: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "nodes": _LIST},
    LOOKUPS: {"items": _LIST},
    LOOKUPS_REPLY: {"items": _LIST},
    FWD: {"id": _INT, "topic": _STR, "qos": _INT},
    FWD_ACK: {"ids": _LIST},
    FWDS: {"items": _LIST, "sizes": _LIST},
    HANDOFF: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "targets": _LIST, "coordinator": _STR},
    SNAPSHOT: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "routes": _LIST, "last": bool, "coordinator": _STR},
    HANDOFF_READY: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "node": _STR},
    INVALIDATE: {"id": _INT, "shards": _LIST},
    INVALIDATE_ACK: {"id": _INT},
    RETAIN: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "topic": _STR, "qos": _INT, "replica": bool},
    RETAINS: {"id": _INT, "shard": _INT, "shard_epoch": _INT, "replica": bool, "items": _LIST, "sizes": _LIST},
    RETAIN_ACK: {"id": _INT},
    RETAINM: {"id": _INT, "replica": bool, "parts": _LIST, "items": _LIST, "sizes": _LIST},
    RETAINM_ACK: {"id": _INT, "stale": _LIST, "failed": _LIST},
    RETAINED_GET: {"id": _INT, "filters": _LIST},
    RETAINED_REPLY: {"id": _INT, "items": _LIST, "sizes": _LIST, "more": bool},
    SESSION_TAKE: {"id": _INT, "client_id": _STR},
    SESSION_STATE: {"id": _INT, "client_id": _STR, "filters": _LIST, "items": _LIST, "sizes": _LIST, "last": bool},
    SESSION_TAKEN: {"id": _INT, "client_id": _STR},
    SHARED_FWD: {"id": _INT, "topic": _STR, "qos": _INT, "share": _STR},
    SHARED_DONE: {"ids": _LIST},
    SHARED_COPY: {"id": _INT, "topic": _STR, "share": _STR},
    SHARED_RELEASE: {"ids": _LIST},
}
FRAME_TYPES = frozenset(FRAME_FIELDS)


def _routes_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) == 3 and type(r[0]) is int and type(r[1]) is int and isinstance(r[2], str)
        for r in items
    )


def _snapshot_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list)
        and len(r) == 2
        and isinstance(r[0], str)
        and isinstance(r[1], list)
        and all(isinstance(n, str) for n in r[1])
        for r in items
    )


def _strings_ok(items: list[Any]) -> bool:
    return all(isinstance(n, str) for n in items)


def _ints_ok(items: list[Any]) -> bool:
    return all(type(n) is int and n >= 0 for n in items)


def _lookups_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) == 5 and type(r[0]) is int and type(r[1]) is int and type(r[2]) is int
        and isinstance(r[3], str) and r[4] in (0, 1) and type(r[4]) is int
        for r in items
    )  # fmt: skip


def _lookup_replies_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) == 4 and type(r[0]) is int and type(r[1]) is int and isinstance(r[2], list)
        and all(isinstance(n, str) for n in r[2]) and r[3] in (0, 1) and type(r[3]) is int
        for r in items
    )  # fmt: skip


def _moved_sessions_ok(pairs: Any) -> bool:
    """A forward's ``sessions``: [client id:str, origin node:str] pairs (routes moved from a node that left)."""
    return isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in pairs
    )


def _fwd_items_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) in (3, 4, 5) and type(r[0]) is int and isinstance(r[1], str)
        and type(r[2]) is int and r[2] in (0, 1) and (len(r) == 3 or type(r[3]) is int)
        and (len(r) < 5 or _moved_sessions_ok(r[4]))
        for r in items
    )  # fmt: skip


def _pid_ok(pid: Any) -> bool:
    """A publish id: [entry node:str, counter:int] (``SESSION_STATE`` items), or null."""
    return pid is None or (isinstance(pid, list) and len(pid) == 2 and isinstance(pid[0], str) and type(pid[1]) is int)


def _session_items_ok(items: list[Any]) -> bool:
    """SESSION_STATE items: [topic:str, dup:bool, retain:bool, pid:[node, counter]|null]."""
    return all(
        isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and type(r[1]) is bool and type(r[2]) is bool
        and _pid_ok(r[3])
        for r in items
    )  # fmt: skip


def _session_filters_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and type(r[1]) is int and r[1] in (0, 1)
        for r in items
    )


def _pubs_items_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) in (3, 4) and isinstance(r[0], str) and type(r[1]) is int and r[1] in (0, 1)
        and (r[2] is None or type(r[2]) is int) and (len(r) == 3 or type(r[3]) is bool)
        for r in items
    )  # fmt: skip


def _retains_items_ok(items: list[Any]) -> bool:
    """RETAINS items: [topic, qos]."""
    return all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and type(r[1]) is int and r[1] in (0, 1)
        for r in items
    )


def _retainm_parts_ok(items: list[Any]) -> bool:
    """RETAINM parts: [shard, shard_epoch, count] or, from a primary to its replicas, [shard, shard_epoch, count,
    stamp epoch, first seq]; integers, count at least 1."""
    return all(
        isinstance(r, list) and len(r) in (3, 5) and all(type(x) is int and x >= 0 for x in r) and r[2] >= 1
        for r in items
    )


def _shard_epoch_pairs_ok(items: list[Any]) -> bool:
    return all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in items)


def _retainm_failed_ok(items: list[Any]) -> bool:
    return all(
        isinstance(r, list) and len(r) == 3 and type(r[0]) is int and isinstance(r[1], str) and isinstance(r[2], str)
        for r in items
    )


def _retained_items_ok(items: list[Any]) -> bool:
    """RETAINED_REPLY items: [topic, qos, shard, stamp epoch, stamp seq]."""
    return all(
        isinstance(r, list) and len(r) == 5 and isinstance(r[0], str) and type(r[1]) is int and r[1] in (0, 1)
        and type(r[2]) is int and type(r[3]) is int and type(r[4]) is int
        for r in items
    )  # fmt: skip


# Shapes of list items, checked so a handler never meets a malformed batch half-way through applying it.
# (SUB/UNSUB filters are checked one by one by the node, which answers per filter.)
LIST_ITEMS: dict[tuple[bytes, str], tuple[Callable[[list[Any]], bool], str]] = {
    (ROUTE_ADD, "routes"): (_routes_ok, "[shard:int, shard_epoch:int, filter:str] triples"),
    (ROUTE_DEL, "routes"): (_routes_ok, "[shard:int, shard_epoch:int, filter:str] triples"),
    (DACK, "mids"): (lambda items: all(type(m) is int for m in items), "integers"),
    (FWD_ACK, "ids"): (lambda items: all(type(m) is int for m in items), "integers"),
    (SHARED_DONE, "ids"): (lambda items: all(type(m) is int for m in items), "integers"),
    (SHARED_RELEASE, "ids"): (lambda items: all(type(m) is int for m in items), "integers"),
    (LOOKUP_REPLY, "nodes"): (_strings_ok, "node id strings"),
    (LOOKUPS, "items"): (_lookups_ok, "[id:int, shard:int, shard_epoch:int, topic:str, head:0|1] lists"),
    (LOOKUPS_REPLY, "items"): (_lookup_replies_ok, "[id:int, shard_epoch:int, nodes:[str, ...], clear:0|1] lists"),
    (HANDOFF, "targets"): (_strings_ok, "node id strings"),
    (INVALIDATE, "shards"): (_ints_ok, "shard numbers (non-negative integers)"),
    (SNAPSHOT, "routes"): (_snapshot_ok, "[filter:str, [node:str, ...]] pairs"),
    (FWDS, "items"): (
        _fwd_items_ok, "[id:int, topic:str, qos:0|1(, pid:int(, sessions:[[client:str, origin:str], ...]))] lists"
    ),
    (FWDS, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (MSGS, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (PUBS, "items"): (_pubs_items_ok, "[topic:str, qos:0|1, id:int|null(, retain:bool)] lists"),
    (PUBS, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (RETAINS, "items"): (_retains_items_ok, "[topic:str, qos:0|1] pairs"),
    (RETAINS, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (RETAINM, "parts"): (
        _retainm_parts_ok, "[shard:int, shard_epoch:int, count:int>=1(, stamp_epoch:int, first_seq:int)] lists"
    ),
    (RETAINM, "items"): (_retains_items_ok, "[topic:str, qos:0|1] pairs"),
    (RETAINM, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (RETAINM_ACK, "stale"): (_shard_epoch_pairs_ok, "[shard:int, shard_epoch:int] pairs"),
    (RETAINM_ACK, "failed"): (_retainm_failed_ok, "[shard:int, code:str, reason:str] triples"),
    (RETAINED_GET, "filters"): (_strings_ok, "filter strings"),
    (RETAINED_REPLY, "items"): (_retained_items_ok, "[topic:str, qos:0|1, shard:int, epoch:int, seq:int] lists"),
    (RETAINED_REPLY, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
    (SESSION_STATE, "filters"): (_session_filters_ok, "[filter:str, qos:0|1] pairs"),
    (SESSION_STATE, "items"): (
        _session_items_ok, "[topic:str, dup:bool, retain:bool, pid:[node:str, n:int]|null] lists"
    ),
    (SESSION_STATE, "sizes"): (_ints_ok, "payload sizes (non-negative integers)"),
}
# Optional header fields that must be JSON booleans when present (absent means false).
OPTIONAL_BOOLS: dict[bytes, tuple[str, ...]] = {
    PUB: ("retain",), MSG: ("retain",), HELLO: ("clean",), RETAIN: ("clear_will",), RETAIN_ACK: ("conflict",),
}
# Optional header fields that must be JSON integers when present: FWD ``pid`` (the publish id's counter at the
# entry node, which is the sender). (HELLO ``expiry``, a number of seconds, is checked by the node.)
OPTIONAL_INTS: dict[bytes, tuple[str, ...]] = {FWD: ("pid",), SHARED_FWD: ("pid",)}
CLIENT_REQUESTS = frozenset({HELLO, SUB, UNSUB, PUB, PUBS, DACK, PING, PONG, STATUS, BYE, LEAVE})
PEER_REQUESTS = frozenset(
    {
        ROUTE_ADD, ROUTE_DEL, ROUTE_ACK, LOOKUP, LOOKUP_REPLY, LOOKUPS, LOOKUPS_REPLY, FWD, FWDS, FWD_ACK, HANDOFF,
        SNAPSHOT, HANDOFF_READY, INVALIDATE, INVALIDATE_ACK, ERROR, RETAIN, RETAINS, RETAINM, RETAINM_ACK, RETAIN_ACK,
        RETAINED_GET,
        RETAINED_REPLY, SESSION_TAKE, SESSION_STATE, SESSION_TAKEN, SHARED_FWD, SHARED_DONE, SHARED_COPY,
        SHARED_RELEASE,
    }
)  # fmt: skip

# Error codes (stable strings; docs/PROTOCOL.md explains each).
E_BAD_FRAME = "bad_frame"
E_BAD_HEADER = "bad_header"
E_INVALID_UTF8 = "invalid_utf8"
E_UNKNOWN_TYPE = "unknown_type"
E_VERSION = "unsupported_version"
E_TOO_LARGE = "payload_too_large"
E_INVALID_TOPIC = "invalid_topic"
E_INVALID_FILTER = "invalid_filter"
E_INVALID_QOS = "invalid_qos"
E_UNAVAILABLE = "unavailable"
E_TIMEOUT = "timeout"
E_NOT_ALLOWED = "not_allowed"
E_NOT_AUTHORIZED = "not_authorized"  # the principal's ACL does not allow it, or no valid credentials
E_STALE_EPOCH = "stale_epoch"
E_FENCED = "fenced"
E_OVERLOADED = "overloaded"  # a subscriber's QoS 1 backlog is full: the publish was not delivered
E_INTERRUPTED = "interrupted"  # SDK: the node ended this client's session (its subscriptions had a gap)
E_SHUTDOWN = "shutdown"  # SESSION_END: the node is stopping
E_TAKEN_OVER = "taken_over"  # SESSION_END: a connection with the same client id took the persistent session


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` for programs, ``reason`` for people."""

    def __init__(self, code: str, reason: str, ref: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ref = ref


@dataclass(slots=True)
class Frame:
    type: bytes
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def parts(self) -> list[bytes]:
        return encode(self.type, self.header, self.payload)


def encode(frame_type: bytes, header: dict[str, Any], payload: bytes = b"") -> list[bytes]:
    """Frames for the wire; ``v`` is filled in so callers never forget it."""
    if "v" not in header:
        header = {"v": PROTOCOL_VERSION, **header}
    return [frame_type, orjson.dumps(header), payload]


def error_parts(code: str, reason: str, ref: int | None = None, **extra: Any) -> list[bytes]:
    header: dict[str, Any] = {"code": code, "reason": reason, **extra}
    if ref is not None:
        header["ref"] = ref
    return encode(ERROR, header)


def decode(
    parts: list[bytes],
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    max_header: int = DEFAULT_MAX_HEADER,
    allowed: frozenset[bytes] = FRAME_TYPES,
) -> Frame:
    if len(parts) != 3:
        raise ProtocolError(E_BAD_FRAME, f"a frame has 3 parts [type, header, payload], got {len(parts)}")
    raw_type, raw_header, payload = parts
    if len(raw_header) > max_header:
        raise ProtocolError(E_TOO_LARGE, f"header is {len(raw_header)} bytes, the limit is {max_header}")
    try:
        header = orjson.loads(raw_header)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(raw_header).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(E_INVALID_UTF8, "header is not valid UTF-8") from None
        raise ProtocolError(E_BAD_HEADER, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(E_BAD_HEADER, "header must be a JSON object")
    ref = header.get("id")
    ref = ref if isinstance(ref, int) and not isinstance(ref, bool) else None
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        reason = f"protocol version {version!r} unsupported; use v={PROTOCOL_VERSION}"
        raise ProtocolError(E_VERSION, reason, ref)
    frame_type = bytes(raw_type)
    if frame_type not in allowed:
        shown = frame_type[:32].decode("ascii", "replace")
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown frame type {shown!r} on this channel", ref)
    for name, expected in FRAME_FIELDS[frame_type].items():
        value = header.get(name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolError(
                E_BAD_HEADER, f"{frame_type.decode()} header needs field {name!r} of type {expected.__name__}", ref
            )
        check = LIST_ITEMS.get((frame_type, name))
        if check is not None and not check[0](value):
            raise ProtocolError(E_BAD_HEADER, f"{frame_type.decode()} field {name!r} must be a list of {check[1]}", ref)
    for name in OPTIONAL_BOOLS.get(frame_type, ()):
        if name in header and type(header[name]) is not bool:
            raise ProtocolError(E_BAD_HEADER, f"{frame_type.decode()} field {name!r} must be true or false", ref)
    for name in OPTIONAL_INTS.get(frame_type, ()):
        if name in header and type(header[name]) is not int:
            raise ProtocolError(E_BAD_HEADER, f"{frame_type.decode()} field {name!r} must be an integer", ref)
    if frame_type == ROUTE_ADD and "refilled" in header and not (
        isinstance(header["refilled"], list) and _shard_epoch_pairs_ok(header["refilled"])
    ):
        reason = "ROUTE_ADD field 'refilled' must be a list of [shard, shard_epoch] pairs"
        raise ProtocolError(E_BAD_HEADER, reason, ref)
    if frame_type == FWD and "sessions" in header and not _moved_sessions_ok(header["sessions"]):
        raise ProtocolError(E_BAD_HEADER, "FWD field 'sessions' must be a list of [client:str, origin:str] pairs", ref)
    if len(payload) > max_payload:
        raise ProtocolError(E_TOO_LARGE, f"payload is {len(payload)} bytes, the limit is {max_payload}", ref)
    return Frame(frame_type, header, bytes(payload))


RetainedItem = tuple[str, int, int, int, bytes]  # (topic, qos, stamp epoch, stamp seq, payload)


def split_retained(frame: Frame) -> list[RetainedItem]:
    """The retained messages a SNAPSHOT carries (``retained``: [topic, qos, epoch, seq] lists, ``retained_sizes``,
    the payloads back to back in its payload part); ProtocolError when they are malformed or disagree."""
    h = frame.header
    items, sizes = h.get("retained"), h.get("retained_sizes")
    if items is None and sizes is None:
        if frame.payload:
            raise ProtocolError(E_BAD_FRAME, "SNAPSHOT has a payload but no retained messages", h.get("id"))
        return []
    ok = (
        isinstance(items, list) and isinstance(sizes, list) and _ints_ok(sizes)
        and all(
            isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and r[1] in (0, 1) and type(r[1]) is int
            and type(r[2]) is int and type(r[3]) is int
            for r in items
        )
    )  # fmt: skip
    if not ok:
        reason = "SNAPSHOT retained must be [topic:str, qos:0|1, epoch:int, seq:int] lists with retained_sizes"
        raise ProtocolError(E_BAD_HEADER, reason, h.get("id"))
    assert isinstance(items, list) and isinstance(sizes, list)
    if len(items) != len(sizes) or sum(sizes) != len(frame.payload):
        raise ProtocolError(
            E_BAD_FRAME,
            f"SNAPSHOT lists {len(items)} retained messages and {len(sizes)} sizes totalling {sum(sizes)} bytes for a "
            f"{len(frame.payload)}-byte payload",
            h.get("id"),
        )
    out: list[RetainedItem] = []
    at = 0
    view = memoryview(frame.payload)
    for (topic, qos, epoch, seq), size in zip(items, sizes, strict=True):
        out.append((topic, qos, epoch, seq, bytes(view[at : at + size])))
        at += size
    return out


# ---------------------------------------------------------------------------------------------- batches
# PUBS, FWDS and MSGS carry many messages in one frame: the header lists each message's fields (``items``) and the
# byte size of its payload (``sizes``), and the payload part is the payloads back to back. One frame costs one
# header parse and one socket operation however many messages it holds.


# A run is an item that stands for several consecutive payloads: ``counts`` (optional, one positive int per item;
# absent means 1 each) says how many, and ``sizes`` still has one entry per payload. A burst of QoS 0 messages to
# one topic then costs one item at every hop instead of one per message. Acks (ids, mids) are per message, so
# only a QoS 0 item may stand for more than one payload.
Run = tuple[Any, list[int] | None, bytes]  # (item, its payloads' sizes or None for one payload, the payload bytes)
_QOS_AT = {PUBS: 1, FWDS: 2, MSGS: 1}  # where the qos is in an item of each batch type


def encode_runs(frame_type: bytes, header: dict[str, Any], runs: list[Run]) -> list[bytes]:
    """A PUBS/FWDS/MSGS frame of runs (see above); ``counts`` is left out when every run is one payload."""
    items: list[Any] = []
    counts: list[int] = []
    sizes: list[int] = []
    for item, run_sizes, blob in runs:
        items.append(item)
        if run_sizes is None:
            counts.append(1)
            sizes.append(len(blob))
        else:
            counts.append(len(run_sizes))
            sizes.extend(run_sizes)
    fields = {**header, "items": items, "sizes": sizes}
    if len(sizes) != len(items):
        fields["counts"] = counts
    return encode(frame_type, fields, b"".join(blob for _, _, blob in runs))


def split_runs(frame: Frame) -> list[Run]:
    """The runs of a PUBS/FWDS/MSGS frame, each checked; ProtocolError (nothing applied yet) when ``counts``,
    ``sizes`` and the payload disagree or a QoS 1 item claims more than one payload."""
    h = frame.header
    counts = h.get("counts")
    if counts is None:
        return [(item, None, payload) for item, payload in split_batch(frame)]
    name, ref = frame.type.decode(), h.get("id")
    items, sizes = h["items"], h["sizes"]
    if not isinstance(counts, list) or not all(type(c) is int and c > 0 for c in counts):
        raise ProtocolError(E_BAD_HEADER, f"{name} field 'counts' must be a list of positive integers", ref)
    if len(counts) != len(items) or sum(counts) != len(sizes) or sum(sizes) != len(frame.payload):
        raise ProtocolError(
            E_BAD_FRAME,
            f"{name} lists {len(items)} items and {len(counts)} counts totalling {sum(counts)} payloads, and "
            f"{len(sizes)} sizes totalling {sum(sizes)} bytes for a {len(frame.payload)}-byte payload; counts need "
            f"one entry per item and must add up to the number of sizes",
            ref,
        )
    qos_at = _QOS_AT[frame.type]
    out: list[Run] = []
    at = first = 0
    view = memoryview(frame.payload)
    for i, (item, count) in enumerate(zip(items, counts, strict=True)):
        if count == 1:
            size = sizes[first]
            out.append((item, None, bytes(view[at : at + size])))
        else:
            qos = item[qos_at] if isinstance(item, list) and len(item) > qos_at else None
            if qos != 0:
                reason = f"{name} item {i} stands for {count} payloads at qos {qos}: only a QoS 0 item may"
                raise ProtocolError(E_BAD_FRAME, reason + " stand for more than one (acks are per message)", ref)
            run_sizes = sizes[first : first + count]
            size = sum(run_sizes)
            out.append((item, run_sizes, bytes(view[at : at + size])))
        at += size
        first += count
    return out


def split_batch(frame: Frame) -> list[tuple[Any, bytes]]:
    """(item, payload) pairs of a PUBS/FWDS/MSGS frame, a run giving one pair per payload; ProtocolError when
    sizes (and counts) and payload disagree."""
    if frame.header.get("counts") is not None:
        pairs: list[tuple[Any, bytes]] = []
        for item, run_sizes, blob in split_runs(frame):
            pairs.extend(zip(itertools.repeat(item), cut(blob, run_sizes)))
        return pairs
    items, sizes = frame.header["items"], frame.header["sizes"]
    if len(items) != len(sizes) or sum(sizes) != len(frame.payload):
        raise ProtocolError(
            E_BAD_FRAME,
            f"{frame.type.decode()} lists {len(items)} items and {len(sizes)} sizes totalling {sum(sizes)} bytes "
            f"for a {len(frame.payload)}-byte payload",
            frame.header.get("id"),
        )
    out, at = [], 0
    view = memoryview(frame.payload)
    for item, size in zip(items, sizes, strict=True):
        out.append((item, bytes(view[at : at + size])))
        at += size
    return out


def cut(blob: bytes, sizes: list[int] | None) -> list[bytes]:
    """The payloads of a run: ``blob`` cut by ``sizes`` (None: the blob is one payload)."""
    if sizes is None:
        return [blob]
    out, at = [], 0
    view = memoryview(blob)
    for size in sizes:
        out.append(bytes(view[at : at + size]))
        at += size
    return out
