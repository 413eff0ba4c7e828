"""The sans-I/O core of the shardmq SDK, shared by every flavour (``Client``, ``GreenClient``, ``AsyncClient``).

Rules of this file:
- No I/O of any kind: no sockets, no zmq, no clock reads, no threads, no sleeping, no asyncio. Everything the
  core needs from the world is asked for by *yielding an effect* and comes back as the value of that ``yield``:
  ``Send(parts)`` (hand a frame to the socket), ``Recv(timeout)`` (the next frame within ``timeout`` seconds, or
  None), ``NOW`` (the shell's monotonic clock), ``Open(endpoint)`` (close the current socket, open one to
  ``endpoint``) and ``CLOSE`` (close the socket). A shell drives a generator with ``gen.send(result)`` and throws
  the exception of a failed effect into it with ``gen.throw``; ``Client._run`` blocks on each effect,
  ``AsyncClient._run`` awaits it. This is the sans-I/O pattern of h11, with the control flow (failover,
  recovery, resending) written once, here, as generators, instead of once per flavour: the flavours differ only
  in how they wait, so the rules of the protocol cannot drift apart between them.
- It owns the protocol state: request ids and frames, matching replies and ERRORs to requests, the inbox and
  DACK accounting, the subscriptions and their re-subscribe plan, sessions (WELCOME, SESSION_END, HELLO after a
  reconnect) and the interruptions they cause, the QoS 0 pending list and its frames (``max_payload``, runs),
  publish-ack bookkeeping, overload backoff and topic validation. The rules of the SDK themselves are stated at
  the top of ``client.py``; this file implements them.
- A shell owns the socket, its zmq monitor (it calls ``connection_broken`` on a disconnect event, and
  ``socket_closed`` whenever it closes a socket), the clock, the waiting, the lock that serialises calls and any
  background flushing. Nothing here may block or assume a thread: a plain method returns at once, a generator
  only suspends at a ``yield``.
- Plain methods (``add_pending``, ``take_message``, ``handle_unsolicited``...) never yield, so shells use them on
  their hot paths (a QoS 0 publish, a message already in the inbox) without the cost of a generator.
- ``Recv(timeout, yieldable=True)`` is only asked for by ``wait_for_message``: a shell may answer it with
  ``YIELDED`` to say "someone else wants the socket", and the wait returns early (``AsyncClient`` uses it so that
  a coroutine waiting in ``receive`` lets other coroutines' calls through). A shell that has no such need never
  answers ``YIELDED``.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from shardmq.router import codec
from shardmq.router.codec import ProtocolError
from shardmq.router.shared import is_shared, validate_share
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

from .credentials import Credentials

BULK_CHUNK = 5000
PING_INTERVAL = 5.0
DACK_BATCH = 256
OVERLOAD_BACKOFF = 0.01  # first pause before a publish refused with ``overloaded`` is sent again; doubles
OVERLOAD_BACKOFF_MAX = 0.2
DEFAULT_MAX_BATCH = 128
DEFAULT_LINGER = 0.0005
# A persistent session's HELLO may wait for a takeover from the node holding the session: the node answers within
# its request_timeout (5 s by default), so the HELLO waits that much longer than other requests.
TAKEOVER_MARGIN = 6.0
TAKEN_OVER_MARK = -2  # an inbox entry's qos: ``receive`` raises ``taken_over`` there (-1: ``interrupted``)
VALID_TOPICS_MEMO = 4096  # topic names a client remembers as valid (publishers to many more re-check some)
# A PUBS header lists every item's topic; JSON writes a topic character in at most 6 bytes (``\u001f``), plus the
# item's brackets, qos, id and size. Frames stay under the header limit the node decodes with.
_ITEM_HEADER_BYTES = 32
_RUN_SIZE_BYTES = 12  # one more message in a run: its size in ``sizes`` and its share of ``counts``

_T = TypeVar("_T")

# An inbox entry: (topic, payload, qos, dup, mid to DACK when handed over, retain). Plain tuples of atoms, which the
# garbage collector stops tracking, so a backlog never makes it walk the heap; the Message is built when it is
# handed over (it then usually dies young). qos -1 is the marker of a gap (the reason is in the topic).
InboxEntry = tuple[str, bytes, int, bool, int | None, bool]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x more to build, on every message received
class Message:
    topic: str
    payload: bytes
    qos: int
    dup: bool = False
    retain: bool = False  # a retained message sent for a new subscription; live messages never are


@dataclass(slots=True, frozen=True)
class Will:
    """The message the cluster publishes for this client if it goes away without ``close()`` (its process killed,
    its connection lost): a normal publish to ``topic`` (QoS ``qos``, stored as the retained message with
    ``retain``). ``Client(..., will=Will(...))``, or the tuple ``(topic, payload, qos)`` / ``(topic, payload, qos,
    retain)``."""

    topic: str
    payload: bytes | str
    qos: int = 0
    retain: bool = False


WillArg = Will | tuple[str, bytes | str, int] | tuple[str, bytes | str, int, bool] | None


class ShardMQError(Exception):
    """An error the server (or the client's own validation) reported; ``code`` is stable, ``reason`` explains.
    ``count``: in a report of QoS 0 publishes the entry node failed, how many (``Client.publish_failed``); else None."""

    def __init__(self, code: str, reason: str, count: int | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.count = count


# ---------------------------------------------------------------------------------------------- effects


@dataclass(slots=True, frozen=True)
class Send:
    """Hand this frame to the socket (the core made sure one is open)."""

    parts: list[bytes]


@dataclass(slots=True, frozen=True)
class Recv:
    """The next frame from the node within ``timeout`` seconds, or None (also when the connection broke: the
    shell then has called ``connection_broken``). ``yieldable``: the shell may answer ``YIELDED`` instead."""

    timeout: float
    yieldable: bool = False


@dataclass(slots=True, frozen=True)
class Open:
    """Close the current socket (if any) and open one to ``endpoint``."""

    endpoint: str


class _Token:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NOW: Final = _Token("NOW")  # effect: the shell's monotonic clock, in seconds
CLOSE: Final = _Token("CLOSE")  # effect: close the socket
YIELDED: Final = _Token("YIELDED")  # answer to a yieldable Recv: give the socket up for now

Effect = Send | Recv | Open | _Token
Steps = Generator[Effect, Any, _T]  # a protocol step the shell drives; its return value is the call's result

# ``add_pending`` tells the shell what to do next.
PENDING_QUEUED: Final = 0  # nothing: more are pending, a flush is already due
PENDING_FIRST: Final = 1  # the list just became non-empty: make sure it is flushed once the caller goes idle
PENDING_FLUSH: Final = 2  # max_batch or linger reached: flush now, in the caller's call
# A lone message: the list was empty and the previous publish was ``linger`` or more ago, so the publisher does not
# outpace the socket and waiting would only add latency. A shell that can send in the caller's own thread does so
# now (``Client``: no hand-off to its flusher thread); one whose flush leaves on its next turn anyway treats it as
# PENDING_FIRST.
PENDING_LONE: Final = 3


# Refusals of a QoS 1 publish that the SDK sends again (``Backoff``): none of them acknowledged it, and each ends
# by itself (a backlog drains; lookups are answered once shards have owners that hold their routes; a node fenced
# from etcd, after the failover ``request`` tries, vouches again once etcd answers).
RETRIED_REFUSALS = frozenset({codec.E_OVERLOADED, codec.E_UNAVAILABLE, codec.E_FENCED})


class Backoff:
    """When to send again a refused QoS 1 publish (``RETRIED_REFUSALS``): after 10, 20, ... 200 ms, until
    ``timeout`` has passed since the first try."""

    __slots__ = ("deadline", "delay")

    def __init__(self, now: float, timeout: float) -> None:
        self.deadline = now + timeout
        self.delay = OVERLOAD_BACKOFF

    def next(self, now: float) -> float | None:
        """Seconds to pause before the next try, or None: give up (the pause would pass the deadline)."""
        delay = self.delay
        if now + delay > self.deadline:
            return None
        self.delay = min(2 * delay, OVERLOAD_BACKOFF_MAX)
        return delay


# ---------------------------------------------------------------------------------------------- the core


def session_client_id(client_id: str | None, clean_session: bool, session_expiry: float | None) -> str:
    """The client id to use (a random one for a clean session without one); ValueError for a persistent session
    without a client id or a positive ``session_expiry``."""
    if not clean_session:
        if not client_id:
            raise ValueError("clean_session=False needs a client_id: the session is found again by it")
        if isinstance(session_expiry, bool) or not isinstance(session_expiry, int | float) or not session_expiry > 0:
            raise ValueError(f"clean_session=False needs session_expiry > 0 seconds, got {session_expiry!r}")
        try:
            validate_topic_name("$session/" + client_id)
        except TopicError:
            raise ValueError(f"client_id {client_id!r} cannot name a persistent session (no '+', '#' or NUL)") from None
    return client_id or uuid.uuid4().hex


def check_will(will: WillArg, client_id: str) -> Will | None:
    """The will as a ``Will`` with bytes payload (None: none); ValueError for a malformed argument, ShardMQError
    (``invalid_topic``, ``invalid_qos``, ``not_authorized``) for what the node would refuse."""
    if will is None:
        return None
    shape = "Will(...), (topic, payload, qos) or (topic, payload, qos, retain)"
    if isinstance(will, tuple):
        if len(will) not in (3, 4):
            raise ValueError(f"will must be {shape}, got {will!r}")
        will = Will(*will)
    if not isinstance(will, Will):
        raise ValueError(f"will must be {shape}, got {will!r}")
    if not isinstance(will.payload, bytes | bytearray | memoryview | str):
        raise ValueError(f"will payload must be bytes or str, got {type(will.payload).__name__}")
    if type(will.retain) is not bool:
        raise ValueError(f"will retain must be True or False, got {will.retain!r}")
    try:
        validate_topic_name(will.topic)
    except TopicError as exc:
        raise ShardMQError(exc.code, f"will topic: {exc.reason}") from None
    if will.qos not in (0, 1) or type(will.qos) is not int:
        raise ShardMQError(codec.E_INVALID_QOS, f"will qos must be 0 or 1, got {will.qos!r}")
    if will.topic.startswith("$session/"):
        raise ShardMQError(codec.E_NOT_AUTHORIZED, "will topic: '$session/' is reserved for the session directory")
    try:
        validate_topic_name("$session/" + client_id)
    except TopicError:
        raise ValueError(f"client_id {client_id!r} cannot hold a will (no '+', '#' or NUL)") from None
    return Will(will.topic, as_bytes(will.payload), will.qos, will.retain)



class ClientCore:
    """The protocol state of one client and the steps of every call (see the rules above)."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        client_id: str,
        timeout: float,
        max_batch: int,
        linger: float,
        credentials: Credentials | None = None,
        clean_session: bool = True,
        session_expiry: float | None = None,
        will: WillArg = None,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one node endpoint, e.g. tcp://127.0.0.1:7101")
        if type(max_batch) is not int or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1 (1: no batching), got {max_batch!r}")
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger!r}")
        self.client_id = client_id
        self.clean_session = clean_session
        self.session_expiry = session_expiry
        self.will = check_will(will, client_id)  # sent with every HELLO; kept by the node holding the session
        self.session_present = False  # the last WELCOME's session_present
        self.taken_over: ShardMQError | None = None  # another connection took our persistent session (not raised yet)
        self.credentials = credentials  # CURVE keys for the shell's socket; None: no CURVE (an insecure cluster)
        self.handshake_ok = False  # a zmq handshake succeeded on the current socket (``handshake_failed``)
        self.handshakes_failed = 0  # failed handshakes on it since the last success
        self.timeout = timeout
        self.max_batch = max_batch
        self.linger = linger
        self.max_payload = codec.DEFAULT_MAX_PAYLOAD  # the node's limit, from its WELCOME
        self.connected = False  # a socket is open (the shell yields to Open/CLOSE and reports socket_closed)
        self.node: str | None = None
        self.endpoint: str | None = None
        self.subscriptions: dict[str, int] = {}
        self.errors: deque[ShardMQError] = deque(maxlen=1000)
        self.valid_topics: set[str] = set()  # topic names already validated (``check_topic``)
        self.inbox: deque[InboxEntry] = deque()
        self.failovers = 0
        self.interruptions = 0  # times the subscriptions had a gap
        self.interruption_log: deque[tuple[float, str]] = deque(maxlen=1000)  # (shell's clock, reason)
        self.recovery: str | None = None  # "hello": zmq re-made the connection; "failover": the session ended
        self.had_session = False  # a node welcomed us once: a later session that is not present is a gap
        self.subscribed_node: str | None = None  # the node whose session for us holds all of ``subscriptions``
        self.gap_reported = False  # the current gap was already counted (SESSION_END), not again at WELCOME
        self.dropped = 0  # QoS 0 messages the node dropped for this client (full send queue), from DROPPED frames
        self.publish_failed = 0  # our QoS 0 publishes the entry node failed, from its ERRORs with ``count``
        self.ids = itertools.count(1)
        self.next_endpoint = 0
        self.last_heard = 0.0  # shell's clock when a frame last came from the node
        self.pending: list[tuple[str, bytes]] = []  # QoS 0 publishes not sent yet, oldest first
        self.pending_since = 0.0  # when the oldest pending publish was queued
        self.dacks: list[int] = []  # mids handed to the application, acknowledged together (``take_message``)
        self.last_flush = 0.0  # when the pending list was last sent
        self.last_publish = 0.0  # when the previous QoS 0 publish was queued (``add_pending``)
        # QoS 0 publishes handed to the current socket since its node last confirmed reading everything (a PONG
        # to ``confirm_read``), and those handed to sockets closed before such a confirmation.
        self.unconfirmed = 0
        self.unconfirmed_closed = 0

    # ------------------------------------------------------------------ validation
    def check_topic(self, topic: str) -> None:
        """Validate a topic name not seen yet (ShardMQError if it is not one) and remember it: a hot topic is
        checked once, not on every publish. The memo is bounded: full, it starts over."""
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            raise ShardMQError(exc.code, exc.reason) from None
        if len(self.valid_topics) >= VALID_TOPICS_MEMO:
            self.valid_topics.clear()
        self.valid_topics.add(topic)

    def raise_pending_error(self) -> None:
        if self.errors:
            error = self.errors.popleft()
            if error is self.taken_over:  # raised once: not by ``receive`` as well
                self.taken_over = None
                self.inbox = deque(entry for entry in self.inbox if entry[2] != TAKEN_OVER_MARK)
            raise error

    # ------------------------------------------------------------------ events the shell reports
    def connection_broken(self) -> None:
        """zmq reported a disconnect: it reconnects by itself, and the next turn says HELLO again. Not before a
        handshake succeeded on this socket: nothing went over it yet (zmq keeps what was sent for the next
        connection), and the failed handshake was reported to ``handshake_failed``."""
        if not self.handshake_ok:
            return
        if self.recovery is None:
            self.recovery = "hello"
        # QoS 0 publishes written to the broken connection may be gone: a PONG on the new one cannot vouch for
        # them, so the next flush or close reports them.
        self.unconfirmed_closed += self.unconfirmed
        self.unconfirmed = 0

    def socket_opened(self) -> None:
        """The shell opened a socket: no handshake on it yet."""
        self.handshake_ok = False
        self.handshakes_failed = 0

    def handshake_succeeded(self) -> None:
        self.handshake_ok = True
        self.handshakes_failed = 0

    def handshake_failed(self, endpoint: str, event: str) -> ShardMQError | None:
        """zmq reported a failed handshake (``event``: its monitor event's name). The error to raise when it means
        the node refuses us; None when it may be a connection broken half-way (zmq tries again by itself).

        ``HANDSHAKE_FAILED_AUTH`` is the node's ZAP handler saying no: definite. The others are definite only
        before any handshake succeeded on this socket (a mechanism mismatch, a server key that is not the node's):
        ``NO_DETAIL`` is also what a connection cut during the handshake gives, so it counts once it happened twice
        in a row. After a success, both are a broken connection (a relay cut, a node restarting)."""
        self.handshakes_failed += 1
        if event == "HANDSHAKE_FAILED_AUTH" or (
            not self.handshake_ok and (event == "HANDSHAKE_FAILED_PROTOCOL" or self.handshakes_failed >= 2)
        ):
            return self.handshake_refused(endpoint, event)
        return None

    def handshake_refused(self, endpoint: str, event: str) -> ShardMQError:
        """The node refused our credentials, or we and it disagree on CURVE. Every node of a cluster would answer
        the same, so the shell raises this at once instead of failing over or waiting for a timeout."""
        creds = self.credentials
        if creds is None:
            reason = (f"{endpoint} refused the connection ({event}): the cluster requires credentials; pass "
                      "credentials=PATH or set SHARDMQ_CREDENTIALS (`shardmq creds add NAME --dir DIR` makes one)")
        elif event == "HANDSHAKE_FAILED_PROTOCOL":
            reason = (f"{endpoint} refused the connection ({event}): it does not speak CURVE (an --insecure "
                      f"cluster?) or these credentials are for another cluster ({creds.cluster!r})")
        else:
            reason = (f"{endpoint} refused principal {creds.principal!r} ({event}): unknown to this cluster, "
                      f"revoked, or the credentials are for another cluster ({creds.cluster!r})")
        return ShardMQError(codec.E_NOT_AUTHORIZED, reason)

    def socket_closed(self) -> None:
        """The shell closed the socket (idempotent)."""
        self.connected = False
        self.unconfirmed_closed += self.unconfirmed  # a later node's PONG says nothing about these
        self.unconfirmed = 0

    def decode(self, parts: list[bytes], now: float) -> codec.Frame | None:
        """A frame the socket returned, or None (kept in ``errors``) when it does not decode."""
        self.last_heard = now
        try:
            return codec.decode(parts, max_payload=1 << 62)
        except ProtocolError as exc:
            self.errors.append(ShardMQError(exc.code, f"undecodable frame from node: {exc.reason}"))
            return None

    def handle_unsolicited(self, frame: codec.Frame) -> list[bytes] | None:
        """A frame that answers no request waited on: messages, PING, SESSION_END, DROPPED, late ERRORs.
        Returns a frame to send back at once (PONG), if any."""
        h = frame.header
        if frame.type == codec.MSG:
            mid = h.get("mid") if h["qos"] else None
            self.inbox.append((h["topic"], frame.payload, h["qos"], bool(h.get("dup")), mid, h.get("retain") is True))
        elif frame.type == codec.MSGS:  # a batch: the node sends messages that queued up together in one frame
            try:
                for (topic, qos, mid, dup, *flags), sizes, blob in codec.split_runs(frame):
                    retain = bool(flags) and flags[0] is True
                    if sizes is None:
                        self.inbox.append((topic, blob, qos, bool(dup), mid if qos else None, retain))
                    else:  # a QoS 0 run: many messages to one topic
                        self.inbox.extend((topic, data, 0, bool(dup), None, retain) for data in codec.cut(blob, sizes))
            except (ProtocolError, ValueError, TypeError) as exc:
                self.errors.append(ShardMQError(codec.E_BAD_FRAME, f"undecodable MSGS from node: {exc}"))
        elif frame.type == codec.PING:
            return codec.encode(codec.PONG, {})
        elif frame.type == codec.SESSION_END and h["code"] == codec.E_TAKEN_OVER:
            # Another connection with our client id took the persistent session: taking it back would make the
            # two take it from each other forever, so this client stops here and says so.
            error = self.taken_over = ShardMQError(codec.E_TAKEN_OVER, f"node {self.node}: {h['reason']}")
            self.errors.append(error)  # raised by the next call, or by ``receive`` (the marker), whichever is first
            self.inbox.append((error.reason, b"", TAKEN_OVER_MARK, False, -1, False))
            self.subscribed_node = None
        elif frame.type == codec.SESSION_END:  # the node cannot keep our routes: move on at the next turn
            self.interrupted(f"node {self.node} ended the session: {h['code']}: {h['reason']}", self.last_heard)
            self.recovery = "failover"
        elif frame.type == codec.DROPPED:
            count = h["count"]
            if count > 0:  # the codec checked it is an int; a negative one would only corrupt the total
                self.dropped += count
        elif frame.type == codec.ERROR:
            count = h.get("count")
            if type(count) is int and count > 0:
                self.publish_failed += count
                self.keep_failure_report(h["code"], h["reason"], count)
            else:
                self.errors.append(ShardMQError(h["code"], h["reason"]))
        return None

    def keep_failure_report(self, code: str, reason: str, count: int) -> None:
        """Keep the node's report of ``count`` failed QoS 0 publishes: one kept error per code, so a later report
        adds its count to the one not raised yet and the next call says how many failed in all."""
        for i, kept in enumerate(self.errors):
            if kept.count is not None and kept.code == code:
                total = kept.count + count
                merged = f"{total} QoS 0 publishes failed (reports not raised yet, added up); the latest: {reason}"
                self.errors[i] = ShardMQError(code, merged, total)
                return
        self.errors.append(ShardMQError(code, reason, count))

    def _unsolicited(self, frame: codec.Frame) -> Steps[None]:
        reply = self.handle_unsolicited(frame)
        if reply is not None:
            yield Send(reply)

    # ------------------------------------------------------------------ requests and replies
    def request_frame(self, frame_type: bytes, header: dict[str, Any], payload: bytes = b"") -> tuple[int, list[bytes]]:
        """A request with a fresh id, and that id."""
        rid = next(self.ids)
        return rid, codec.encode(frame_type, {**header, "id": rid}, payload)

    @staticmethod
    def match_reply(frame: codec.Frame, rid: int, expect: bytes) -> dict[str, Any] | None:
        """The header of ``frame`` if it is the ``expect`` reply to request ``rid``; ShardMQError if it is the ERROR
        refusing that request; None for anything else (which the caller hands to ``handle_unsolicited``, unless it
        is a late WELCOME or PONG)."""
        h = frame.header
        if frame.type == expect and (h.get("id") == rid or rid in (h.get("ids") or ())):
            return h
        if frame.type == codec.ERROR and h.get("ref") == rid:
            raise ShardMQError(h["code"], h["reason"])
        return None

    def send(self, parts: list[bytes]) -> Steps[None]:
        if not self.connected:
            yield from self.connect()
        yield Send(parts)

    def roundtrip(
        self, frame_type: bytes, header: dict[str, Any], payload: bytes, expect: bytes, timeout: float | None = None
    ) -> Steps[dict[str, Any]]:
        """Send a request and wait for its reply; TimeoutError when the node stays silent."""
        rid, parts = self.request_frame(frame_type, header, payload)
        yield from self.send(parts)
        timeout = self.timeout if timeout is None else timeout
        deadline = (yield NOW) + timeout
        while (left := deadline - (yield NOW)) > 0:
            frame = yield Recv(left)
            if frame is None:
                if self.recovery is not None:  # the request may have gone with the old connection
                    raise TimeoutError(f"the connection to {self.endpoint} was re-made or ended")
                continue
            reply = self.match_reply(frame, rid, expect)
            if reply is not None:
                return reply
            if frame.type not in (codec.WELCOME, codec.PONG):
                yield from self._unsolicited(frame)
        raise TimeoutError(f"no {expect.decode()} within {timeout}s")

    def request(
        self, frame_type: bytes, header: dict[str, Any], payload: bytes, expect: bytes
    ) -> Steps[dict[str, Any]]:
        """A round trip that fails over once to the next node when this one is silent."""
        self.raise_pending_error()
        try:
            return (yield from self.roundtrip(frame_type, header, payload, expect))
        except TimeoutError:
            pass
        except ShardMQError as exc:
            if exc.code != codec.E_FENCED or len(self.endpoints) == 1:
                raise
            self.recovery = "failover"
        # Silent, fenced (it lost etcd and cannot vouch for anything) or re-connected: recover and resend.
        yield from self.move_on()
        try:
            return (yield from self.roundtrip(frame_type, header, payload, expect))
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{exc} from {self.endpoint} either (after a failover)") from None

    # ------------------------------------------------------------------ connection and sessions
    def _open(self, endpoint: str) -> Steps[None]:
        if self.connected:
            self.socket_closed()
        yield Open(endpoint)
        self.connected = True
        self.recovery = None  # a new connection: whatever the old one needed is moot

    def _close(self) -> Steps[None]:
        yield CLOSE
        self.socket_closed()

    def connect(self) -> Steps[None]:
        """Connect to the first endpoint that answers, starting after the last one used; what is due on the
        current connection (DACKs, pending QoS 0 publishes) is sent there first."""
        if self.connected:
            dack = self.take_dacks()
            if dack is not None:
                yield Send(dack)
            if self.pending:
                yield from self.flush_pending()
        failures = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self.next_endpoint % len(self.endpoints)]
            self.next_endpoint += 1
            last = len(failures) == len(self.endpoints) - 1
            yield from self._open(endpoint)
            try:
                reply = yield from self.hello()
                if reply.get("fenced") and not last:  # it cannot keep routes: another node can
                    failures.append(f"{endpoint} (fenced)")
                    continue
                yield from self.welcomed(reply, endpoint)
            except TimeoutError:
                failures.append(endpoint)
                continue
            except ShardMQError as exc:
                if exc.code not in (codec.E_FENCED, codec.E_UNAVAILABLE) or last:
                    # Not connected for good: the next call starts over rather than stay on a node that has
                    # none of our subscriptions.
                    yield from self._close()
                    raise
                failures.append(f"{endpoint} ({exc.code})")
                continue
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Cancelled or interrupted before the node welcomed us: this socket has no session, so the
                    # next call connects again instead of using it.
                    self.connected = False
                raise
            return
        yield from self._close()
        raise ShardMQError(codec.E_UNAVAILABLE, f"no node answered within {self.timeout}s: {', '.join(failures)}")

    def hello(self) -> Steps[dict[str, Any]]:
        """HELLO and its WELCOME; a persistent session's waits ``TAKEOVER_MARGIN`` longer (a takeover). The will,
        if any, goes with every HELLO (``will`` in the header, its payload as the frame's)."""
        header: dict[str, Any] = {"client": self.client_id}
        payload = b""
        if self.will is not None:
            header["will"] = {"topic": self.will.topic, "qos": self.will.qos, "retain": self.will.retain}
            payload = bytes(self.will.payload)
        if self.clean_session:
            return (yield from self.roundtrip(codec.HELLO, header, payload, codec.WELCOME))
        header |= {"clean": False, "expiry": self.session_expiry}
        return (yield from self.roundtrip(codec.HELLO, header, payload, codec.WELCOME, self.timeout + TAKEOVER_MARGIN))

    def welcome(self, reply: dict[str, Any], endpoint: str, now: float) -> list[dict[str, Any]] | None:
        """Take a WELCOME: the node's settings, and whether the session survived. None: it resumed our session;
        else the SUB headers that subscribe again (``resubscribe_plan``), after which the caller calls
        ``session_ready``. A session is resumed only on the node that holds every one of our subscriptions
        (``subscribed_node``): another node may hold an older session of ours whose subscriptions were undone
        (a refused SUB)."""
        self.node, self.endpoint = reply["node"], endpoint
        max_payload = reply.get("max_payload")
        if type(max_payload) is int and max_payload > 0:
            self.max_payload = max_payload
        self.session_present = reply.get("session_present") is True
        same_node = self.node == self.subscribed_node
        if self.session_present and same_node:
            return None
        # A new session, or a persistent one taken over from another node: message ids of the old one mean nothing
        # here (acknowledging them would acknowledge other messages), and its QoS 1 messages come again from
        # wherever they are still kept (a takeover resends them with ``dup``).
        self.dacks.clear()
        if any(entry[4] is not None and entry[2] >= 0 for entry in self.inbox):
            self.inbox = deque((t, p, q, d, None if q >= 0 else m, r) for t, p, q, d, m, r in self.inbox)
        if self.session_present and not self.clean_session:  # it holds its subscriptions
            self.subscribed_node = self.node
            self.had_session = True
            self.gap_reported = False
            return None
        if not self.subscriptions:
            return []
        if self.had_session and not self.gap_reported:
            self.interrupted(f"node {self.node} did not have this client's session with its subscriptions", now)
        self.subscribed_node = None
        return self.resubscribe_plan()

    def resubscribe_plan(self) -> list[dict[str, Any]]:
        """The SUB headers (without ids) that make a new session hold every subscription: one per qos and chunk."""
        by_qos: dict[int, list[str]] = {}
        for filt, qos in self.subscriptions.items():
            by_qos.setdefault(qos, []).append(filt)
        return [
            {"filters": filters[start : start + BULK_CHUNK], "qos": qos}
            for qos, filters in by_qos.items()
            for start in range(0, len(filters), BULK_CHUNK)
        ]

    def session_ready(self) -> None:
        """The node now holds every subscription (re-subscribed, or there were none)."""
        self.subscribed_node = self.node
        self.gap_reported = False
        self.had_session = True

    def welcomed(self, reply: dict[str, Any], endpoint: str) -> Steps[None]:
        plan = self.welcome(reply, endpoint, (yield NOW))
        if plan is None:
            return
        for header in plan:
            yield from self.roundtrip(codec.SUB, header, b"", codec.SUBACK)
        self.session_ready()

    def interrupted(self, reason: str, now: float) -> None:
        """The subscriptions had a gap: count it, and let ``take_message`` raise it after what arrived before."""
        if not self.subscriptions:
            return
        self.interruptions += 1
        self.interruption_log.append((now, reason))
        self.inbox.append((reason, b"", -1, False, -1, False))  # qos -1: the marker ``take_message`` raises
        self.gap_reported = True
        self.subscribed_node = None

    def recover(self) -> Steps[None]:
        """Say HELLO again on a connection zmq re-made, or move to the next node after SESSION_END."""
        kind, self.recovery = self.recovery, None
        try:
            if kind == "hello" and self.endpoint is not None:
                deadline = (yield NOW) + self.timeout
                while True:
                    try:
                        reply = yield from self.hello()
                        yield from self.welcomed(reply, self.endpoint)
                        return
                    except TimeoutError:
                        if self.recovery != "hello" or (yield NOW) >= deadline:
                            break
                        self.recovery = None  # zmq re-made the connection once more while we waited: HELLO again
                    except ShardMQError:
                        break
            yield from self.failover()
        except BaseException as exc:
            if not isinstance(exc, Exception) and self.recovery is None:
                self.recovery = kind  # cancelled or interrupted half-way: the next call recovers again
            raise

    def move_on(self) -> Steps[None]:
        """The node stayed silent: recover if the connection was re-made meanwhile, else fail over."""
        if self.recovery is not None:
            yield from self.recover()
        else:
            yield from self.failover()

    def failover(self) -> Steps[None]:
        self.failovers += 1
        self.recovery = None
        yield from self.connect()

    def prepare(self) -> Steps[None]:
        """What every public call does first: recover the session if needed, send the pending publishes."""
        if self.recovery is not None:
            yield from self.recover()
        if self.pending:
            yield from self.flush_pending()

    # ------------------------------------------------------------------ subscriptions
    def subscribe_many(
        self, filters: Iterable[str], qos: int, chunk: int, progress: Callable[[int], None] | None
    ) -> Steps[int]:
        check_qos(qos)
        done = 0
        batch: list[str] = []
        for filt in filters:
            check_filter(filt)
            batch.append(filt)
            if len(batch) >= chunk:
                done += yield from self._subscribe_batch(batch, qos)
                batch = []
                if progress:
                    progress(done)
        if batch:
            done += yield from self._subscribe_batch(batch, qos)
            if progress:
                progress(done)
        return done

    def _subscribe_batch(self, filters: list[str], qos: int) -> Steps[int]:
        reply = yield from self.request(codec.SUB, {"filters": filters, "qos": qos}, b"", codec.SUBACK)
        return self.subscribed(filters, qos, reply)

    def subscribed(self, filters: list[str], qos: int, reply: dict[str, Any]) -> int:
        """Record a SUBACK: every filter is ours unless the node refused it (then ShardMQError)."""
        failed = [r for r in reply["results"] if isinstance(r, dict)]
        for filt in filters:
            self.subscriptions[filt] = qos
        if failed:
            for r in failed:
                self.subscriptions.pop(r.get("filter"), None)
            first = failed[0]
            raise ShardMQError(first["code"], f"{len(failed)} filter(s) refused; first: {first['reason']}")
        return len(filters)

    def unsubscribe(self, filters: Sequence[str]) -> Steps[None]:
        for filt in filters:
            self.subscriptions.pop(filt, None)
        yield from self.request(codec.UNSUB, {"filters": list(filters)}, b"", codec.UNSUBACK)

    # ------------------------------------------------------------------ publishing
    def add_pending(self, topic: str, data: bytes, now: float) -> int:
        """Queue a QoS 0 publish (already validated); PENDING_FLUSH, PENDING_LONE, PENDING_FIRST or PENDING_QUEUED.

        Messages gather only while the publisher outpaces the socket: publishes less than ``linger`` apart (a
        tight loop, a burst, a paced loop catching up) join the pending list, while one that finds it empty and
        comes ``linger`` or more after the previous publish is PENDING_LONE. The gap between publishes, not the
        time since the last send, decides: a flush that came late (a busy machine delays the flusher) must not
        make the next lone message wait as well.
        """
        self.raise_pending_error()
        pending = self.pending
        previous, self.last_publish = self.last_publish, now
        if not pending:
            self.pending_since = now
            pending.append((topic, data))
            if self.max_batch == 1 or self.linger == 0:
                return PENDING_FLUSH
            return PENDING_LONE if now - previous >= self.linger else PENDING_FIRST
        pending.append((topic, data))
        if len(pending) >= self.max_batch or now - self.pending_since >= self.linger:
            return PENDING_FLUSH
        return PENDING_QUEUED

    def take_pending(self) -> tuple[list[list[bytes]], int]:
        """The frames of every pending QoS 0 publish, and how many publishes they carry; the list is emptied (on
        an error the publishes are lost: QoS 0). Call only when connected: frames are cut to the node's
        ``max_payload``. Then ``pending_sent`` once they were handed to the socket."""
        pending, self.pending = self.pending, []
        return list(self.publish_frames(pending, 0, [None] * len(pending))), len(pending)

    def pending_sent(self, count: int, now: float) -> None:
        self.unconfirmed += count
        self.last_flush = now

    def flush_pending(self) -> Steps[None]:
        """Send the pending QoS 0 publishes."""
        if not self.pending:
            return
        if not self.connected:
            # connect=False, or after close(): the node's max_payload comes with its WELCOME. ``connect`` sends
            # nothing pending while not connected, so the list is still whole afterwards.
            yield from self.connect()
        frames, count = self.take_pending()
        for parts in frames:
            yield from self.send(parts)
        self.pending_sent(count, (yield NOW))

    def publish_frames(
        self, messages: list[tuple[str, bytes]], qos: int, refs: list[int | None], retain: bool = False
    ) -> Iterator[list[bytes]]:
        """Frames carrying ``messages`` in order: PUBS frames of at most ``max_payload`` bytes of payload (and a
        header the node accepts), in which consecutive QoS 0 messages to one topic form one run (codec.Run); a
        frame of one message (so any larger message) is a plain PUB. ``retain``: every item carries the retain
        flag and none joins a run (the node stores each one)."""
        limit = self.max_payload
        runs: list[tuple[list[Any], list[int], list[bytes]]] = []
        size = header = count = 0
        joinable = None  # the topic the last run may be extended with
        for (topic, data), ref in zip(messages, refs, strict=True):
            n = len(data)
            if count and (size + n > limit or header + _ITEM_HEADER_BYTES + 6 * len(topic) > codec.DEFAULT_MAX_HEADER):
                yield _publish_frame(runs, qos, count)
                runs, size, header, count, joinable = [], 0, 0, 0, None
            if topic == joinable and ref is None and not retain:
                run = runs[-1]
                run[1].append(n)
                run[2].append(data)
                header += _RUN_SIZE_BYTES
            else:
                runs.append(([topic, qos, ref, True] if retain else [topic, qos, ref], [n], [data]))
                joinable = topic if not qos and ref is None and not retain else None
                header += _ITEM_HEADER_BYTES + 6 * len(topic)
            size += n
            count += 1
        if count:
            yield _publish_frame(runs, qos, count)

    def publish_acked(self, topic: str, data: bytes, retain: bool = False) -> Steps[None]:
        """A QoS 1 publish: returns once every node with matching subscribers accepted it (and, with ``retain``,
        the topic's retained message is stored); refused with ``overloaded`` (a subscriber's backlog is full),
        ``unavailable`` (the cluster cannot route it yet: no owner of its shard answered, a shard being refilled,
        a destination that left) or ``fenced`` (every node tried lost etcd) it is sent again after a ``Backoff``
        pause, until ``timeout`` has passed."""
        backoff = Backoff((yield NOW), self.timeout)
        header: dict[str, Any] = {"topic": topic, "qos": 1}
        if retain:
            header["retain"] = True
        while True:
            try:
                yield from self.request(codec.PUB, header, data, codec.PUBACK)
                return
            except ShardMQError as exc:  # a full backlog (flow control) or a cluster still re-forming: wait
                if exc.code not in RETRIED_REFUSALS:
                    raise
                pause = backoff.next((yield NOW))
                if pause is None:
                    raise
            yield from self.pause(pause, ())

    def publish_retained(self, topic: str, data: bytes) -> Steps[None]:
        """A QoS 0 retain publish: never batched with the pending list (sent after it, to keep order), so the
        node stores this one message; a failure to store it comes back as an asynchronous error."""
        yield from self.flush_pending()
        if not self.connected:
            yield from self.connect()
        yield from self.send(codec.encode(codec.PUB, {"topic": topic, "qos": 0, "retain": True}, data))
        self.pending_sent(1, (yield NOW))

    def publish_batch(self, chunk: list[tuple[str, bytes]], qos: int, retain: bool = False) -> Steps[int]:
        """Send one chunk; for qos=1 wait until every message is acknowledged. A silent node is failed over
        once (what was not acknowledged is sent again); messages refused with ``overloaded`` (a subscriber's
        backlog is full) are sent again after a growing pause until ``timeout`` has passed, then raised."""
        self.raise_pending_error()
        total = len(chunk)
        failovers_left = 1
        backoff = Backoff((yield NOW), self.timeout)
        while True:
            if not self.connected:
                yield from self.connect()  # frames are cut to the node's max_payload, which comes with its WELCOME
            ids = [next(self.ids) if qos else None for _ in chunk]
            for parts in self.publish_frames(chunk, qos, ids, retain):
                yield from self.send(parts)
            if not qos:
                self.unconfirmed += total
                return total
            unacked, overloaded = yield from self.await_pubacks({i for i in ids if i is not None})
            if not unacked and not overloaded:
                return total
            if unacked:  # silent node: move on and send again what was not acknowledged
                if not failovers_left:
                    raise ShardMQError(codec.E_TIMEOUT, f"{len(unacked)} publishes not acknowledged after a failover")
                failovers_left -= 1
                yield from self.move_on()
            elif (pause := backoff.next((yield NOW))) is None:
                raise ShardMQError(
                    codec.E_OVERLOADED,
                    f"{len(overloaded)} publishes refused for {self.timeout}s: their subscribers' backlogs are full",
                )
            else:
                yield from self.pause(pause, ids)
            again = unacked | overloaded
            chunk = [m for m, ref in zip(chunk, ids, strict=True) if ref in again]

    def settle_acks(self, frame: codec.Frame, waiting: set[int], overloaded: set[int]) -> bool:
        """Take a PUBACK (or an ERROR for one of ``waiting``) off ``waiting``: True if ``frame`` was one. Refusals
        with ``overloaded`` move to ``overloaded``; any other refusal is raised."""
        if frame.type == codec.PUBACK:
            waiting.difference_update(frame.header["ids"])
            return True
        h = frame.header
        if frame.type == codec.ERROR and h.get("ref") in waiting:
            if h["code"] != codec.E_OVERLOADED:
                raise ShardMQError(h["code"], h["reason"])
            waiting.discard(h["ref"])
            overloaded.add(h["ref"])
            return True
        return False

    def await_pubacks(self, waiting: set[int]) -> Steps[tuple[set[int], set[int]]]:
        """Wait for PUBACKs of ``waiting``; returns the ids still unanswered after ``timeout`` (or when the
        connection was re-made) and those refused with ``overloaded``. Any other refusal is raised."""
        overloaded: set[int] = set()
        deadline = (yield NOW) + self.timeout
        while waiting and (left := deadline - (yield NOW)) > 0:
            frame = yield Recv(left)
            if frame is None:
                if self.recovery is not None:  # what was sent on the old connection may be lost: resend
                    break
                continue
            if not self.settle_acks(frame, waiting, overloaded) and frame.type not in (codec.WELCOME, codec.PONG):
                yield from self._unsolicited(frame)
        return waiting, overloaded

    def pause(self, seconds: float, answered: Iterable[int | None]) -> Steps[None]:
        """Wait ``seconds`` while handling what arrives; late answers to ``answered`` requests are dropped."""
        done = set(answered)
        end = (yield NOW) + seconds
        while (left := end - (yield NOW)) > 0:
            frame = yield Recv(left)
            if frame is None:
                continue
            if frame.type in (codec.PUBACK, codec.WELCOME, codec.PONG):
                continue
            if frame.type == codec.ERROR and frame.header.get("ref") in done:
                continue
            yield from self._unsolicited(frame)

    # ------------------------------------------------------------------ receiving
    def wait_for_message(self, timeout: float | None) -> Steps[None]:
        """Wait until the inbox holds something, up to ``timeout`` seconds (forever when None), checking a quiet
        connection with PING; then recover if needed (subscribe again now, not once the application has read the
        backlog). Returns early when the shell answers a yieldable Recv with YIELDED."""
        if not self.connected:
            yield from self.connect()
        deadline = None if timeout is None else (yield NOW) + timeout
        while not self.inbox:
            now = yield NOW
            left = PING_INTERVAL if deadline is None else deadline - now
            if left <= 0:
                break
            frame = yield Recv(min(left, PING_INTERVAL), True)
            if frame is YIELDED:
                break
            if frame is not None:
                yield from self._unsolicited(frame)
            elif self.recovery is not None:
                yield from self.recover()
            elif (yield NOW) - self.last_heard > PING_INTERVAL:
                yield from self.check_alive()
        if self.recovery is not None:
            yield from self.recover()

    def take_message(self) -> tuple[Message | None, list[bytes] | None]:
        """The next message of the inbox (None if empty) and the DACK frame to send now, if one is due: QoS 1
        messages are acknowledged only once handed over, together, when the inbox is empty or DACK_BATCH are due.
        The marker of a gap raises ``ShardMQError("interrupted")``."""
        if not self.inbox:
            return None, None
        topic, payload, qos, dup, mid, retain = self.inbox.popleft()
        if qos == TAKEN_OVER_MARK and self.taken_over is not None:
            error, self.taken_over = self.taken_over, None
            if error in self.errors:
                self.errors.remove(error)
            raise error
        if qos < 0:  # the marker of a gap in the subscriptions (``interrupted``); the reason is in ``topic``
            raise ShardMQError(codec.E_INTERRUPTED, topic)
        dack = None
        if isinstance(mid, int):  # acknowledged only now that the application has it
            self.dacks.append(mid)
            if not self.inbox or len(self.dacks) >= DACK_BATCH:
                dack = self.take_dacks()
        return Message(topic, payload, qos, dup, retain), dack

    def take_dacks(self) -> list[bytes] | None:
        """One DACK frame for every message handed over and not acknowledged yet (None: none, or no socket)."""
        if not self.dacks or not self.connected:
            return None
        mids, self.dacks = self.dacks, []
        return codec.encode(codec.DACK, {"mids": mids})

    def check_alive(self) -> Steps[None]:
        """A quiet connection may be a dead node: ping it, and fail over if it stays silent."""
        try:
            yield from self.roundtrip(codec.PING, {}, b"", codec.PONG)
        except TimeoutError:
            yield from self.move_on()

    # ------------------------------------------------------------------ the rest
    def leave(self) -> Steps[None]:
        """LEAVE to the connected node; no failover (that would make another node leave)."""
        try:
            yield from self.roundtrip(codec.LEAVE, {}, b"", codec.LEAVING)
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{self.node} did not confirm LEAVE: {exc}") from None

    def status(self, detail: bool) -> Steps[dict[str, Any]]:
        reply = yield from self.request(codec.STATUS, {"detail": detail}, b"", codec.STATUS_REPLY)
        return reply["status"]

    def confirm_read(self) -> Steps[None]:
        """The barrier of ``flush`` and ``close``: a PING after the publishes, whose PONG says the node read them and
        each left it (forwarded, or failed and reported before the PONG: that report is raised here)."""
        count = self.unconfirmed
        if count and self.connected:
            try:
                yield from self.roundtrip(codec.PING, {}, b"", codec.PONG)
            except TimeoutError:
                raise ShardMQError(
                    codec.E_TIMEOUT,
                    f"{count} QoS 0 publishes sent to {self.node} ({self.endpoint}) were not confirmed read: no PONG "
                    f"within {self.timeout}s (the node is dead, stalled or far behind); they may be lost",
                ) from None
            self.unconfirmed = 0
        if self.unconfirmed_closed:
            lost, self.unconfirmed_closed = self.unconfirmed_closed, 0
            raise ShardMQError(
                codec.E_UNAVAILABLE,
                f"{lost} QoS 0 publishes were sent on a connection closed (failover or connect) before its node "
                f"confirmed reading them; they may be lost",
            )
        # The node reported the failed ones before its PONG: raised first, and by ``close`` too.
        for error in self.errors:
            if error.count is not None:
                self.errors.remove(error)
                raise error

    def flush(self) -> Steps[None]:
        yield from self.confirm_read()
        self.raise_pending_error()


def _publish_frame(runs: list[tuple[list[Any], list[int], list[bytes]]], qos: int, count: int) -> list[bytes]:
    """One PUB (a lone message, as it always looked) or one PUBS frame of these runs (what the node handles like
    that many PUBs)."""
    if count == 1:
        [([topic, _, ref, *retain], _, [data])] = runs
        header: dict[str, Any] = {"topic": topic, "qos": qos}
        if ref is not None:
            header["id"] = ref
        if retain:
            header["retain"] = True
        return codec.encode(codec.PUB, header, data)
    frame_runs = [(item, sizes if len(sizes) > 1 else None, b"".join(blobs)) for item, sizes, blobs in runs]
    return codec.encode_runs(codec.PUBS, {}, frame_runs)


def as_bytes(payload: bytes | str) -> bytes:
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ShardMQError(codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos!r}")


def check_filter(topic_filter: str) -> None:
    """A topic filter, or a shared subscription ``$share/GROUP/FILTER`` (GROUP non-empty, without ``+ # /``)."""
    try:
        if is_shared(topic_filter):
            validate_share(topic_filter)
        else:
            validate_topic_filter(topic_filter)
    except TopicError as exc:
        raise ShardMQError(exc.code, exc.reason) from None


class CoreView:
    """What the shells show of their core: the SDK's public attributes (and a few private ones the blocking
    flavour always had), read and written through to ``_core``."""

    _core: ClientCore

    @property
    def endpoints(self) -> list[str]:
        return self._core.endpoints

    @property
    def session_present(self) -> bool:
        """Whether the node that last welcomed this client had its session (a persistent one found again)."""
        return self._core.session_present

    @endpoints.setter
    def endpoints(self, value: list[str]) -> None:
        self._core.endpoints = value

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def timeout(self) -> float:
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._core.timeout = value

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    @property
    def linger(self) -> float:
        return self._core.linger

    @property
    def max_payload(self) -> int:
        return self._core.max_payload

    @property
    def node(self) -> str | None:
        return self._core.node

    @property
    def endpoint(self) -> str | None:
        return self._core.endpoint

    @property
    def subscriptions(self) -> dict[str, int]:
        return self._core.subscriptions

    @property
    def errors(self) -> deque[ShardMQError]:
        return self._core.errors

    @property
    def inbox(self) -> deque[InboxEntry]:
        return self._core.inbox

    @property
    def failovers(self) -> int:
        return self._core.failovers

    @property
    def interruptions(self) -> int:
        return self._core.interruptions

    @property
    def interruption_log(self) -> deque[tuple[float, str]]:
        return self._core.interruption_log

    @property
    def dropped(self) -> int:
        return self._core.dropped

    @property
    def publish_failed(self) -> int:
        return self._core.publish_failed

    @property
    def _pending(self) -> list[tuple[str, bytes]]:
        return self._core.pending

    @property
    def _valid_topics(self) -> set[str]:
        return self._core.valid_topics
