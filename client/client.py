"""The shardmq client SDK (blocking flavour; ``shardmq.client.green`` is the gevent one).

Rules of this file:
- One DEALER socket to one node at a time. Any node can serve any topic, so the endpoint list is a failover
  list: when a node does not answer within ``timeout`` (or answers ``fenced``: it lost etcd) the client moves to
  the next endpoint, subscribes again to everything it had (clean-session semantics: the application does
  nothing), and resends the request it was waiting on. A QoS 1 publish may therefore arrive twice; it is never
  silently lost.
- Requests carry an ``id``; the reply (or an ERROR with ``ref`` = id) is matched to it. Messages that arrive
  while a request waits are queued for ``receive``. QoS 1 messages are acknowledged (DACK) once ``receive``
  has handed them to the application: one DACK frame for every message taken from the inbox, sent when the
  inbox is empty (before ``receive`` waits for more) or 256 are due. A message handed over but not yet
  acknowledged when the connection breaks is redelivered (``dup``): at least once, as before.
- Sessions: WELCOME says whether the node still had this client's session (``session_present``). The client
  watches its socket's zmq monitor: when zmq re-made the connection (the node restarted on the same address, or
  a connection broke), it says HELLO again before anything else, so the node resends every unacknowledged
  QoS 1 message, or says it has no session. A node that cannot keep routes (it lost etcd, or stops) ends the
  session with SESSION_END, and the client fails over. Whenever the subscriptions had a gap (a session ended,
  not present after a reconnect, a failover), the client subscribes again, counts it in ``interruptions``
  (with ``interruption_log``) and ``receive`` raises ``ShardMQError("interrupted")`` once, after the messages
  that arrived before the gap: messages published during it may be missing, and somebody knows. Recovery
  (HELLO, failover) runs at the start of a call and while ``receive`` waits, never inside another request.
- No zmq heartbeats: a heartbeat timeout on a connection whose reader is stalled re-makes the connection, and
  libzmq can abort when that reader resumes (libzmq issue 3937). Idle connections are checked with PING by
  ``receive`` and by TCP keep-alive.
- Errors from the server are raised as ``ShardMQError(code, reason)``; an error for a QoS 0 publish (which waits
  for nothing) is kept in ``errors`` and raised by the next call.
- Topics and filters are validated here first with the same rules as the server, so a bad one fails fast
  without a round trip.
- QoS 0 publishes are batched when they queue up, without a timer at low load: ``publish(qos=0)`` appends to
  ``_pending`` and returns; the caller's own thread sends the pending list when it reaches ``max_batch`` messages
  or its oldest message is ``linger`` seconds old (checked with ``time.monotonic()`` on each publish). A flush is
  one PUBS frame (a lone message goes as the plain PUB it always was), split so that no frame carries more than
  the node's ``max_payload`` (from WELCOME) bytes of payload; a larger message goes alone. Consecutive QoS 0
  messages to one topic in a frame go as one run (``codec.Run``), which every node passes on as one item.
  ``max_batch=1`` turns batching off (every publish is sent at once, as before).
- Every other call (``publish(qos=1)``, ``publish_many``, ``subscribe*``, ``unsubscribe``, ``receive``,
  ``status``, ``leave``, ``flush``, ``close``, ``connect`` and failover) sends what is pending first, so order per
  topic is kept across QoS levels and calls. ``receive`` flushes before it blocks, so a thread waiting in
  ``receive`` never sits on pending messages.
- A background flusher thread (a daemon, started on the first buffered publish, holding only a weakref to the
  Client so an unclosed client can still be garbage collected) sends what is pending once the application leaves
  the client idle (a lone publish followed by a sleep, the end of a burst), at most once per ``linger``: at
  moderate rates (a publish every few tens of microseconds, with sleeps between) messages gather for up to
  ``linger`` instead of costing every process on the path a wake-up each, while a message after a quiet spell
  of ``linger`` or more leaves at once. ``publish`` wakes it (an Event) only
  when the pending list goes from empty to non-empty. It never waits for the application: it only
  try-acquires the lock and, when the application is inside a call, looks again 0.5 ms later (and stops looking
  once the list is empty). Its errors are kept in ``errors``. ``close`` flushes, stops and joins it.
- The socket is used by the application's thread and by the flusher, never at the same time: every socket use
  (send, recv, poll) happens under ``_lock`` (an RLock), held for the whole of each public call and by the
  flusher while it flushes. The lock also makes the hand-over between the two threads a memory barrier, which is
  what zmq asks of a socket that migrates between threads. ``flush`` and ``close`` wait for the node's PONG
  (below) holding it; the flusher has nothing to send then (they sent it) and never waits for it.
- ``flush`` and ``close`` are a barrier: they send what is pending, then (if any QoS 0 publish went out on this
  socket since the last confirmation) a PING with an id on the same DEALER, and wait up to ``timeout`` for its
  PONG. zmq keeps order on one pipe and the node handles a client's frames in order, so the PONG means the node
  has read every publish sent before it; only then does ``flush`` return and ``close`` say BYE. Without that, a
  process that exits at once loses whatever zmq's queue still held (its I/O thread dies with the process). No
  PONG: ``ShardMQError("timeout")`` naming how many publishes may be lost (``close`` still closes the socket,
  then raises). Publishes sent on a socket closed before its node confirmed them (a failover, ``connect()``)
  make the next ``flush`` or ``close`` raise ``unavailable``. Errors the node sent for those publishes arrive before the
  PONG and are raised by ``flush``.
- Pending QoS 0 messages are otherwise at most once like every QoS 0 publish: those buffered or flushed to a
  node that died (or that is closed by a failover before zmq wrote them) are lost, and only ``flush``/``close``
  report it. ``Client.dropped`` counts the messages the node dropped for this client because it read too slowly
  (the node's ``DROPPED`` frames).
- Apart from the flusher, a Client belongs to the thread (or greenlet) that made it; never share one between
  threads or greenlets.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import zmq

from shardmq.router import codec
from shardmq.router.codec import ProtocolError
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

BULK_CHUNK = 5000
PING_INTERVAL = 5.0
DACK_BATCH = 256
OVERLOAD_BACKOFF = 0.01  # first pause before a publish refused with ``overloaded`` is sent again; doubles
OVERLOAD_BACKOFF_MAX = 0.2
DEFAULT_MAX_BATCH = 128
DEFAULT_LINGER = 0.0005
VALID_TOPICS_MEMO = 4096  # topic names a client remembers as valid (publishers to many more re-check some)
# A PUBS header lists every item's topic; JSON writes a topic character in at most 6 bytes (``\u001f``), plus the
# item's brackets, qos, id and size. Frames stay under the header limit the node decodes with.
_ITEM_HEADER_BYTES = 32
_RUN_SIZE_BYTES = 12  # one more message in a run: its size in ``sizes`` and its share of ``counts``
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x more to build, on every message received
class Message:
    topic: str
    payload: bytes
    qos: int
    dup: bool = False


class ShardMQError(Exception):
    """An error the server (or the client's own validation) reported; ``code`` is stable, ``reason`` explains."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _exclusive(method: _F) -> _F:
    """A public call: holds the socket lock throughout, recovers the session if needed, and sends the pending
    QoS 0 publishes first."""

    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._recovery is not None:
                self._recover()
            self._flush_pending()
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


class _Flusher:
    """The background flusher: its thread and Events. It reaches the Client only through a weakref."""

    RETRY = 0.0005  # the application was inside a call with messages pending: look again this much later

    def __init__(self, client: Client) -> None:
        self.wake = threading.Event()
        self.stop = threading.Event()
        name = f"shardmq-flusher-{client.client_id[:12]}"
        self.thread = threading.Thread(target=self._run, args=(weakref.ref(client),), name=name, daemon=True)

    def halt(self) -> None:
        """Ask the thread to end (``close``, or the Client was garbage collected)."""
        self.stop.set()
        self.wake.set()

    def _run(self, ref: weakref.ReferenceType[Client]) -> None:
        while True:
            self.wake.wait()
            if self.stop.is_set():
                return
            self.wake.clear()  # before looking: a publish after this point sets it again
            while True:
                client = ref()
                if client is None:
                    return
                retry = client._flush_in_background()
                del client  # hold no strong reference while waiting
                if retry is None:
                    break
                if self.stop.wait(retry):
                    return


class Client:
    zmq_module: ModuleType = zmq
    default_max_batch: int = DEFAULT_MAX_BATCH  # GreenClient: 1 (no OS threads under gevent)
    batching: bool = True  # GreenClient: False, and a max_batch above 1 is refused

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        client_id: str | None = None,
        timeout: float = 5.0,
        connect: bool = True,
        *,
        max_batch: int | None = None,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one node endpoint, e.g. tcp://127.0.0.1:7101")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.max_batch = self.default_max_batch if max_batch is None else max_batch
        if type(self.max_batch) is not int or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1 (1: no batching), got {self.max_batch!r}")
        if self.max_batch > 1 and not self.batching:
            raise ValueError(f"{type(self).__name__} does not batch publish() (max_batch=1); use publish_many")
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger!r}")
        self.linger = linger
        self.max_payload = codec.DEFAULT_MAX_PAYLOAD  # the node's limit, from its WELCOME
        self.ctx = self.zmq_module.Context.instance()
        self.sock: Any = None
        self.node: str | None = None
        self.endpoint: str | None = None
        self.subscriptions: dict[str, int] = {}
        self.errors: deque[ShardMQError] = deque(maxlen=1000)
        self._valid_topics: set[str] = set()  # topic names already validated (``_check_topic``)
        # (topic, payload, qos, dup, mid to DACK when handed over): plain tuples of atoms, which the garbage
        # collector stops tracking, so a backlog here never makes it walk the heap; the Message is built when
        # ``receive`` hands it over (it then usually dies young).
        self.inbox: deque[tuple[str, bytes, int, bool, int | None]] = deque()
        self.failovers = 0
        self.interruptions = 0  # times the subscriptions had a gap (see the rules above)
        self.interruption_log: deque[tuple[float, str]] = deque(maxlen=1000)  # (time.monotonic(), reason)
        self._recovery: str | None = None  # "hello": zmq re-made the connection; "failover": the session ended
        self._had_session = False  # a node welcomed us once: a later session that is not present is a gap
        self._subscribed_node: str | None = None  # the node whose session for us holds all of ``subscriptions``
        self._gap_reported = False  # the current gap was already counted (SESSION_END), not again at WELCOME
        self._monitor: Any = None
        self._poller: Any = None
        self.dropped = 0  # QoS 0 messages the node dropped for this client (full send queue), from DROPPED frames
        self._ids = itertools.count(1)
        self._next_endpoint = 0
        self._last_heard = time.monotonic()
        self._lock = threading.RLock()  # every socket use; held by each public call and by the flusher
        self._pending: list[tuple[str, bytes]] = []  # QoS 0 publishes not sent yet, oldest first
        self._pending_since = 0.0  # time.monotonic() of the oldest pending publish
        self._dacks: list[int] = []  # mids handed to the application, acknowledged together (see receive)
        self._last_flush = 0.0  # time.monotonic() of the last flush: the flusher sends at most once per linger
        self._flusher: _Flusher | None = None
        self._flusher_finalizer: weakref.finalize | None = None
        # QoS 0 publishes handed to the current socket since its node last confirmed reading everything (a PONG
        # to ``_confirm_read``), and those handed to sockets closed before such a confirmation.
        self._unconfirmed = 0
        self._unconfirmed_closed = 0
        if connect:
            self.connect()

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Connect to the first endpoint that answers, starting after the last one used.

        Pending QoS 0 publishes are sent to the current node first (if there is one).
        """
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        if self.sock is not None:
            self._send_dacks()
            if self._pending:
                self._flush_pending()
        failures = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._next_endpoint % len(self.endpoints)]
            self._next_endpoint += 1
            last = len(failures) == len(self.endpoints) - 1
            self._open(endpoint)
            try:
                reply = self._roundtrip(codec.HELLO, {"client": self.client_id}, b"", codec.WELCOME)
                if reply.get("fenced") and not last:  # it cannot keep routes: another node can
                    failures.append(f"{endpoint} (fenced)")
                    continue
                self._welcomed(reply, endpoint)
            except TimeoutError:
                failures.append(endpoint)
                continue
            except ShardMQError as exc:
                if exc.code not in (codec.E_FENCED, codec.E_UNAVAILABLE) or last:
                    # Not connected for good: the next call starts over rather than stay on a node that has
                    # none of our subscriptions.
                    self._close_socket()
                    raise
                failures.append(f"{endpoint} ({exc.code})")
                continue
            return
        self._close_socket()
        raise ShardMQError(codec.E_UNAVAILABLE, f"no node answered within {self.timeout}s: {', '.join(failures)}")

    def _welcomed(self, reply: dict[str, Any], endpoint: str) -> None:
        """A WELCOME: take the node's settings; unless it resumed our session, subscribe again and report the gap.

        A session is resumed only on the node that holds every one of our subscriptions (``_subscribed_node``):
        another node may hold an older session of ours whose subscriptions were undone (a refused SUB)."""
        self.node, self.endpoint = reply["node"], endpoint
        max_payload = reply.get("max_payload")
        if type(max_payload) is int and max_payload > 0:
            self.max_payload = max_payload
        if reply.get("session_present") is True and self.node == self._subscribed_node:
            return
        # A new session: message ids of the old one mean nothing here (acknowledging them would acknowledge
        # other messages), and its QoS 1 messages come again from wherever they are still kept.
        self._dacks.clear()
        if any(entry[4] is not None and entry[2] >= 0 for entry in self.inbox):
            self.inbox = deque((t, p, q, d, None if q >= 0 else m) for t, p, q, d, m in self.inbox)
        if self.subscriptions:
            if self._had_session and not self._gap_reported:
                self._interrupted(f"node {self.node} did not have this client's session with its subscriptions")
            self._subscribed_node = None
            self._resubscribe()
        self._subscribed_node = self.node
        self._gap_reported = False
        self._had_session = True

    def _interrupted(self, reason: str) -> None:
        """The subscriptions had a gap: count it, and let ``receive`` raise it after what arrived before."""
        if not self.subscriptions:
            return
        self.interruptions += 1
        self.interruption_log.append((time.monotonic(), reason))
        self.inbox.append((reason, b"", -1, False, -1))  # qos -1: the marker ``_receive`` raises
        self._gap_reported = True
        self._subscribed_node = None

    def _recover(self) -> None:
        """Say HELLO again on a connection zmq re-made, or move to the next node after SESSION_END."""
        kind, self._recovery = self._recovery, None
        if kind == "hello" and self.endpoint is not None:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    self._welcomed(self._roundtrip(codec.HELLO, {"client": self.client_id}, b"", codec.WELCOME),
                                   self.endpoint)  # fmt: skip
                    return
                except TimeoutError:
                    if self._recovery != "hello" or time.monotonic() >= deadline:
                        break
                    self._recovery = None  # zmq re-made the connection once more while we waited: HELLO again
                except ShardMQError:
                    break
        self._failover()

    def _move_on(self) -> None:
        """The node stayed silent: recover if the connection was re-made meanwhile, else fail over."""
        if self._recovery is not None:
            self._recover()
        else:
            self._failover()

    def _open(self, endpoint: str) -> None:
        self._close_socket()
        z = self.zmq_module
        sock = self.ctx.socket(z.DEALER)
        sock.setsockopt(z.ROUTING_ID, self.client_id.encode())
        sock.setsockopt(z.LINGER, 0)
        sock.setsockopt(z.TCP_KEEPALIVE, 1)
        sock.setsockopt(z.TCP_KEEPALIVE_IDLE, 10)
        sock.setsockopt(z.TCP_KEEPALIVE_INTVL, 2)
        sock.setsockopt(z.TCP_KEEPALIVE_CNT, 5)
        self._monitor = sock.get_monitor_socket(z.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        self.sock = sock
        self._poller = z.Poller()
        self._poller.register(sock, z.POLLIN)
        self._poller.register(self._monitor, z.POLLIN)
        self._recovery = None  # a new connection: whatever the old one needed is moot

    def _close_socket(self, linger: int = 0) -> None:
        if self.sock is not None:
            with contextlib.suppress(self.zmq_module.ZMQError):
                self.sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self.sock.close(linger=linger)
            self.sock = self._monitor = self._poller = None
            self._unconfirmed_closed += self._unconfirmed  # a later node's PONG says nothing about these
            self._unconfirmed = 0

    def _read_monitor(self) -> None:
        """zmq reported a disconnect (the only event we ask for): it reconnects by itself, and we say HELLO."""
        z = self.zmq_module
        with contextlib.suppress(z.Again):
            while True:
                self._monitor.recv_multipart(z.NOBLOCK)
                if self._recovery is None:
                    self._recovery = "hello"
                # QoS 0 publishes written to the broken connection may be gone: a PONG on the new one cannot
                # vouch for them, so the next flush or close reports them.
                self._unconfirmed_closed += self._unconfirmed
                self._unconfirmed = 0

    def _failover(self) -> None:
        self.failovers += 1
        self._recovery = None
        self._connect()

    def _resubscribe(self) -> None:
        by_qos: dict[int, list[str]] = {}
        for filt, qos in self.subscriptions.items():
            by_qos.setdefault(qos, []).append(filt)
        for qos, filters in by_qos.items():
            for start in range(0, len(filters), BULK_CHUNK):
                chunk = filters[start : start + BULK_CHUNK]
                self._roundtrip(codec.SUB, {"filters": chunk, "qos": qos}, b"", codec.SUBACK)

    def close(self) -> None:
        """Send what is pending, wait until the node has read it (``_confirm_read``), stop the flusher, say BYE and
        close the socket.

        Returns only once the node confirmed reading every publish made before; if it does not within ``timeout``,
        the socket is closed all the same and ``ShardMQError("timeout")`` is raised (the publishes may be lost).
        """
        with self._lock:
            unconfirmed: ShardMQError | None = None
            try:
                self._flush_pending()
                try:
                    self._confirm_read()
                except ShardMQError as exc:  # raised once the socket is closed: close always closes
                    unconfirmed = exc
            finally:
                self._stop_flusher()
                if self.sock is not None:
                    with contextlib.suppress(self.zmq_module.ZMQError):
                        self.sock.send_multipart(codec.encode(codec.BYE, {}), self.zmq_module.NOBLOCK)
                    self._close_socket(linger=max(0, int(self.timeout * 1000)))
            if unconfirmed is not None:
                raise unconfirmed

    def _confirm_read(self) -> None:
        """The barrier of ``flush`` and ``close`` (see the rules above); the caller holds the lock."""
        count = self._unconfirmed
        if count and self.sock is not None:
            try:
                self._roundtrip(codec.PING, {}, b"", codec.PONG)
            except TimeoutError:
                raise ShardMQError(
                    codec.E_TIMEOUT,
                    f"{count} QoS 0 publishes sent to {self.node} ({self.endpoint}) were not confirmed read: no PONG "
                    f"within {self.timeout}s (the node is dead, stalled or far behind); they may be lost",
                ) from None
            self._unconfirmed = 0
        if self._unconfirmed_closed:
            lost, self._unconfirmed_closed = self._unconfirmed_closed, 0
            raise ShardMQError(
                codec.E_UNAVAILABLE,
                f"{lost} QoS 0 publishes were sent on a connection closed (failover or connect) before its node "
                f"confirmed reading them; they may be lost",
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ frames
    def _send(self, frame_type: bytes, header: dict[str, Any], payload: bytes = b"") -> None:
        self._send_parts(codec.encode(frame_type, header, payload))

    def _send_parts(self, parts: list[bytes]) -> None:
        if self.sock is None:
            self._connect()
        self.sock.send_multipart(parts)

    # ------------------------------------------------------------------ QoS 0 batching
    def _flush_pending(self) -> None:
        """Send the pending QoS 0 publishes (the caller holds the lock). On an error they are lost (QoS 0)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self.sock is None:
            self._connect()  # connect=False, or after close(): the node's max_payload comes with its WELCOME
        for parts in self._publish_frames(pending, 0, [None] * len(pending)):
            self._send_parts(parts)
        self._unconfirmed += len(pending)
        self._last_flush = time.monotonic()

    def _publish_frames(
        self, messages: list[tuple[str, bytes]], qos: int, refs: list[int | None]
    ) -> Iterator[list[bytes]]:
        """Frames carrying ``messages`` in order: PUBS frames of at most ``max_payload`` bytes of payload (and a
        header the node accepts), in which consecutive QoS 0 messages to one topic form one run (codec.Run); a
        frame of one message (so any larger message) is a plain PUB."""
        limit = self.max_payload
        runs: list[tuple[list[Any], list[int], list[bytes]]] = []
        size = header = count = 0
        joinable = None  # the topic the last run may be extended with
        for (topic, data), ref in zip(messages, refs, strict=True):
            n = len(data)
            if count and (size + n > limit or header + _ITEM_HEADER_BYTES + 6 * len(topic) > codec.DEFAULT_MAX_HEADER):
                yield _publish_frame(runs, qos, count)
                runs, size, header, count, joinable = [], 0, 0, 0, None
            if topic == joinable and ref is None:
                run = runs[-1]
                run[1].append(n)
                run[2].append(data)
                header += _RUN_SIZE_BYTES
            else:
                runs.append(([topic, qos, ref], [n], [data]))
                joinable = topic if not qos and ref is None else None
                header += _ITEM_HEADER_BYTES + 6 * len(topic)
            size += n
            count += 1
        if count:
            yield _publish_frame(runs, qos, count)

    def _wake_flusher(self) -> None:
        """The pending list just became non-empty: make sure the flusher will send it if the caller goes idle."""
        flusher = self._flusher
        if flusher is None:
            flusher = self._flusher = _Flusher(self)
            self._flusher_finalizer = weakref.finalize(self, flusher.halt)  # an unclosed client stops it too
            flusher.thread.start()
        flusher.wake.set()

    def _flush_in_background(self) -> float | None:
        """The flusher's turn: send what is pending unless the application is inside a call.

        Returns None when nothing is left to do, else how many seconds to wait before looking again.
        """
        if not self._pending:  # emptied by the application's own call (a read of a list: atomic)
            return None
        # Busy (the last flush was less than ``linger`` ago): let messages gather until then. At low load the
        # last flush is long past, so a lone message still leaves at once.
        wait = self._last_flush + self.linger - time.monotonic()
        if wait > 0:
            return wait
        if not self._lock.acquire(blocking=False):  # the application is inside a call: never wait for it
            return _Flusher.RETRY
        try:
            self._flush_pending()
        except Exception as exc:  # nobody to raise to in this thread: the next call raises it
            error = exc if isinstance(exc, ShardMQError) else ShardMQError(codec.E_UNAVAILABLE, repr(exc))
            self.errors.append(error)
        finally:
            self._lock.release()
        return None

    def _stop_flusher(self) -> None:
        flusher, finalizer = self._flusher, self._flusher_finalizer
        self._flusher = self._flusher_finalizer = None
        if finalizer is not None:
            finalizer()  # halt(), once
        if flusher is not None and flusher.thread is not threading.current_thread():
            flusher.thread.join()

    def _recv(self, timeout: float) -> codec.Frame | None:
        """One frame from the node within ``timeout`` seconds, or None (also when zmq reported a disconnect:
        ``_recovery`` then says what to do)."""
        ready = dict(self._poller.poll(max(0, int(timeout * 1000))))
        if self._monitor in ready:
            self._read_monitor()
        if self.sock not in ready:
            return None
        parts = self.sock.recv_multipart()
        self._last_heard = time.monotonic()
        try:
            return codec.decode(parts, max_payload=1 << 62)
        except ProtocolError as exc:
            self.errors.append(ShardMQError(exc.code, f"undecodable frame from node: {exc.reason}"))
            return None

    def _handle_unsolicited(self, frame: codec.Frame) -> None:
        h = frame.header
        if frame.type == codec.MSG:
            mid = h.get("mid") if h["qos"] else None
            self.inbox.append((h["topic"], frame.payload, h["qos"], bool(h.get("dup")), mid))
        elif frame.type == codec.MSGS:  # a batch: the node sends messages that queued up together in one frame
            try:
                for (topic, qos, mid, dup), sizes, blob in codec.split_runs(frame):
                    if sizes is None:
                        self.inbox.append((topic, blob, qos, bool(dup), mid if qos else None))
                    else:  # a QoS 0 run: many messages to one topic
                        self.inbox.extend((topic, data, 0, bool(dup), None) for data in codec.cut(blob, sizes))
            except (ProtocolError, ValueError, TypeError) as exc:
                self.errors.append(ShardMQError(codec.E_BAD_FRAME, f"undecodable MSGS from node: {exc}"))
        elif frame.type == codec.PING:
            self.sock.send_multipart(codec.encode(codec.PONG, {}))
        elif frame.type == codec.SESSION_END:  # the node cannot keep our routes: move on at the next turn
            self._interrupted(f"node {self.node} ended the session: {h['code']}: {h['reason']}")
            self._recovery = "failover"
        elif frame.type == codec.DROPPED:
            count = h["count"]
            if count > 0:  # the codec checked it is an int; a negative one would only corrupt the total
                self.dropped += count
        elif frame.type == codec.ERROR:
            self.errors.append(ShardMQError(h["code"], h["reason"]))

    def _roundtrip(self, frame_type: bytes, header: dict[str, Any], payload: bytes, expect: bytes) -> dict[str, Any]:
        """Send a request and wait for its reply; TimeoutError when the node stays silent."""
        rid = next(self._ids)
        self._send(frame_type, {**header, "id": rid}, payload)
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                if self._recovery is not None:  # the request may have gone with the old connection
                    raise TimeoutError(f"the connection to {self.endpoint} was re-made or ended")
                continue
            h = frame.header
            if frame.type == expect and (h.get("id") == rid or rid in (h.get("ids") or ())):
                return h
            if frame.type == codec.ERROR and h.get("ref") == rid:
                raise ShardMQError(h["code"], h["reason"])
            if frame.type not in (codec.WELCOME, codec.PONG):
                self._handle_unsolicited(frame)
        raise TimeoutError(f"no {expect.decode()} within {self.timeout}s")

    def _request(self, frame_type: bytes, header: dict[str, Any], payload: bytes, expect: bytes) -> dict[str, Any]:
        """A round trip that fails over once to the next node when this one is silent."""
        self._raise_pending_error()
        try:
            return self._roundtrip(frame_type, header, payload, expect)
        except TimeoutError:
            pass
        except ShardMQError as exc:
            if exc.code != codec.E_FENCED or len(self.endpoints) == 1:
                raise
            self._recovery = "failover"
        # Silent, fenced (it lost etcd and cannot vouch for anything) or re-connected: recover and resend.
        self._move_on()
        try:
            return self._roundtrip(frame_type, header, payload, expect)
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{exc} from {self.endpoint} either (after a failover)") from None

    def _check_topic(self, topic: str) -> None:
        """Validate a topic name not seen yet (ShardMQError if it is not one) and remember it: a hot topic is
        checked once, not on every publish. The memo is bounded: full, it starts over."""
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            raise ShardMQError(exc.code, exc.reason) from None
        if len(self._valid_topics) >= VALID_TOPICS_MEMO:
            self._valid_topics.clear()
        self._valid_topics.add(topic)

    def _raise_pending_error(self) -> None:
        if self.errors:
            raise self.errors.popleft()

    # ------------------------------------------------------------------ API
    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe to one filter; returns once every owner of its route confirmed."""
        self.subscribe_many([topic_filter], qos)

    @_exclusive
    def subscribe_many(
        self,
        filters: Iterable[str],
        qos: int = 0,
        chunk: int = BULK_CHUNK,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk subscribe in frames of ``chunk`` filters; ``progress(n)`` after each. Returns how many were added."""
        _check_qos(qos)
        done = 0
        batch: list[str] = []
        for filt in filters:
            try:
                validate_topic_filter(filt)
            except TopicError as exc:
                raise ShardMQError(exc.code, exc.reason) from None
            batch.append(filt)
            if len(batch) >= chunk:
                done += self._subscribe_batch(batch, qos)
                batch = []
                if progress:
                    progress(done)
        if batch:
            done += self._subscribe_batch(batch, qos)
            if progress:
                progress(done)
        return done

    def _subscribe_batch(self, filters: list[str], qos: int) -> int:
        reply = self._request(codec.SUB, {"filters": filters, "qos": qos}, b"", codec.SUBACK)
        failed = [r for r in reply["results"] if isinstance(r, dict)]
        for filt in filters:
            self.subscriptions[filt] = qos
        if failed:
            for r in failed:
                self.subscriptions.pop(r.get("filter"), None)
            first = failed[0]
            raise ShardMQError(first["code"], f"{len(failed)} filter(s) refused; first: {first['reason']}")
        return len(filters)

    @_exclusive
    def unsubscribe(self, *filters: str) -> None:
        for filt in filters:
            self.subscriptions.pop(filt, None)
        self._request(codec.UNSUB, {"filters": list(filters)}, b"", codec.UNSUBACK)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0) -> None:
        """Publish; with qos=1 returns only after every node with matching subscribers accepted it.

        With qos=0 the message is queued and sent with the others that queue up (see the rules above): at once
        when ``max_batch`` are pending or the oldest is ``linger`` seconds old, else by the next call or by the
        flusher thread as soon as the application leaves the client idle.
        """
        _check_qos(qos)
        if topic not in self._valid_topics:
            self._check_topic(topic)
        data = payload if type(payload) is bytes else _as_bytes(payload)  # the common case without a call
        with self._lock:
            if qos:
                if self._recovery is not None:
                    self._recover()
                self._flush_pending()
                deadline, backoff = time.monotonic() + self.timeout, OVERLOAD_BACKOFF
                while True:
                    try:
                        self._request(codec.PUB, {"topic": topic, "qos": 1}, data, codec.PUBACK)
                        return
                    except ShardMQError as exc:  # a subscriber's backlog is full: wait for it (flow control)
                        if exc.code != codec.E_OVERLOADED or time.monotonic() + backoff > deadline:
                            raise
                    self._pause(backoff, ())
                    backoff = min(2 * backoff, OVERLOAD_BACKOFF_MAX)
            self._raise_pending_error()
            pending = self._pending
            now = time.monotonic()
            if not pending:
                self._pending_since = now
            pending.append((topic, data))
            if len(pending) >= self.max_batch or now - self._pending_since >= self.linger:
                self._flush_pending()
            elif len(pending) == 1:
                self._wake_flusher()

    @_exclusive
    def publish_many(self, messages: Iterable[tuple[str, bytes | str]], qos: int = 0, batch: int = 500) -> int:
        """Publish (topic, payload) pairs, ``batch`` to a frame; returns how many were published.

        With qos=1 each frame's messages are in flight together and the call returns once every one of them was
        acknowledged (a node that stays silent is failed over and the unacknowledged ones are sent again).
        Order per topic is kept, as with ``publish``.
        """
        _check_qos(qos)
        done = 0
        chunk: list[tuple[str, bytes]] = []
        for topic, payload in messages:
            if topic not in self._valid_topics:
                self._check_topic(topic)
            chunk.append((topic, _as_bytes(payload)))
            if len(chunk) >= batch:
                done += self._publish_batch(chunk, qos)
                chunk = []
        if chunk:
            done += self._publish_batch(chunk, qos)
        return done

    def _publish_batch(self, chunk: list[tuple[str, bytes]], qos: int) -> int:
        """Send one chunk; for qos=1 wait until every message is acknowledged. A silent node is failed over
        once (what was not acknowledged is sent again); messages refused with ``overloaded`` (a subscriber's
        backlog is full) are sent again after a growing pause until ``timeout`` has passed, then raised."""
        self._raise_pending_error()
        total = len(chunk)
        failovers_left = 1
        deadline, backoff = time.monotonic() + self.timeout, OVERLOAD_BACKOFF
        while True:
            if self.sock is None:
                self._connect()  # frames are cut to the node's max_payload, which comes with its WELCOME
            ids = [next(self._ids) if qos else None for _ in chunk]
            for parts in self._publish_frames(chunk, qos, ids):
                self._send_parts(parts)
            if not qos:
                self._unconfirmed += total
                return total
            unacked, overloaded = self._await_pubacks({i for i in ids if i is not None})
            if not unacked and not overloaded:
                return total
            if unacked:  # silent node: move on and send again what was not acknowledged
                if not failovers_left:
                    raise ShardMQError(codec.E_TIMEOUT, f"{len(unacked)} publishes not acknowledged after a failover")
                failovers_left -= 1
                self._move_on()
            elif time.monotonic() + backoff > deadline:
                raise ShardMQError(
                    codec.E_OVERLOADED,
                    f"{len(overloaded)} publishes refused for {self.timeout}s: their subscribers' backlogs are full",
                )
            else:
                self._pause(backoff, ids)
                backoff = min(2 * backoff, OVERLOAD_BACKOFF_MAX)
            again = unacked | overloaded
            chunk = [m for m, ref in zip(chunk, ids, strict=True) if ref in again]

    def _await_pubacks(self, waiting: set[int]) -> tuple[set[int], set[int]]:
        """Wait for PUBACKs of ``waiting``; returns the ids still unanswered after ``timeout`` (or when the
        connection was re-made) and those refused with ``overloaded``. Any other refusal is raised."""
        overloaded: set[int] = set()
        deadline = time.monotonic() + self.timeout
        while waiting and (left := deadline - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                if self._recovery is not None:  # what was sent on the old connection may be lost: resend
                    break
                continue
            h = frame.header
            if frame.type == codec.PUBACK:
                waiting.difference_update(h["ids"])
            elif frame.type == codec.ERROR and h.get("ref") in waiting:
                if h["code"] != codec.E_OVERLOADED:
                    raise ShardMQError(h["code"], h["reason"])
                waiting.discard(h["ref"])
                overloaded.add(h["ref"])
            elif frame.type not in (codec.WELCOME, codec.PONG):
                self._handle_unsolicited(frame)
        return waiting, overloaded

    def _pause(self, seconds: float, answered: Iterable[int | None]) -> None:
        """Wait ``seconds`` while handling what arrives (a cooperative wait under gevent, unlike time.sleep);
        late answers to ``answered`` requests are dropped."""
        done = set(answered)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                continue
            if frame.type in (codec.PUBACK, codec.WELCOME, codec.PONG):
                continue
            if frame.type == codec.ERROR and frame.header.get("ref") in done:
                continue
            self._handle_unsolicited(frame)

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (forever when None); None on timeout."""
        inbox = self.inbox
        if inbox and inbox[0][4] is None and not self._pending:
            # A QoS 0 message already here and nothing to flush: no socket use, so no lock (the flusher thread
            # never touches the inbox, and only the application's thread reads it).
            topic, payload, qos, dup, _ = inbox.popleft()
            return Message(topic, payload, qos, dup)
        return self._receive(timeout)

    @_exclusive
    def _receive(self, timeout: float | None) -> Message | None:
        if self.sock is None:
            self._connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.inbox:
            left = PING_INTERVAL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            frame = self._recv(min(left, PING_INTERVAL))
            if frame is not None:
                self._handle_unsolicited(frame)
            elif self._recovery is not None:
                self._recover()
            elif time.monotonic() - self._last_heard > PING_INTERVAL:
                self._check_alive()
        if self._recovery is not None:  # subscribe again now, not once the application has read the backlog
            self._recover()
        if not self.inbox:
            return None
        topic, payload, qos, dup, mid = self.inbox.popleft()
        if qos < 0:  # the marker of a gap in the subscriptions (``_interrupted``); the reason is in ``topic``
            raise ShardMQError(codec.E_INTERRUPTED, topic)
        if isinstance(mid, int):  # acknowledged only now that the application has it
            self._dacks.append(mid)
            if not self.inbox or len(self._dacks) >= DACK_BATCH:
                self._send_dacks()
        return Message(topic, payload, qos, dup)

    def _send_dacks(self) -> None:
        """Acknowledge the QoS 1 messages handed to the application: one DACK frame for all of them."""
        if self._dacks and self.sock is not None:
            mids, self._dacks = self._dacks, []
            self.sock.send_multipart(codec.encode(codec.DACK, {"mids": mids}))

    def _check_alive(self) -> None:
        """A quiet connection may be a dead node: ping it, and fail over if it stays silent."""
        try:
            self._roundtrip(codec.PING, {}, b"", codec.PONG)
        except TimeoutError:
            self._move_on()

    @_exclusive
    def leave(self) -> None:
        """Ask the connected node to leave the cluster gracefully (it drains its shards, then exits).

        No failover here: sending LEAVE to the next endpoint would make a different node leave.
        """
        try:
            self._roundtrip(codec.LEAVE, {}, b"", codec.LEAVING)
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{self.node} did not confirm LEAVE: {exc}") from None

    @_exclusive
    def status(self, detail: bool = False) -> dict[str, Any]:
        """The connected node's status: members, shards, routes, root-set size, metrics.

        ``detail=True`` adds ``routes_per_shard`` ({shard: [routes, bytes]} for the shards this node is primary
        of), which costs the node a walk over those routes.
        """
        return self._request(codec.STATUS, {"detail": detail}, b"", codec.STATUS_REPLY)["status"]

    @_exclusive
    def flush(self) -> None:
        """Send every pending QoS 0 publish and return once the node has read every publish made so far.

        ``ShardMQError("timeout")`` when the node does not confirm within ``timeout`` (the publishes may be lost),
        ``unavailable`` when some went on a connection closed before its node confirmed them; then, like any
        call, an error kept from an earlier publish (those the node sent before its confirmation included).
        """
        self._confirm_read()
        self._raise_pending_error()


def _publish_frame(runs: list[tuple[list[Any], list[int], list[bytes]]], qos: int, count: int) -> list[bytes]:
    """One PUB (a lone message, as it always looked) or one PUBS frame of these runs (what the node handles like
    that many PUBs)."""
    if count == 1:
        [([topic, _, ref], _, [data])] = runs
        header: dict[str, Any] = {"topic": topic, "qos": qos}
        if ref is not None:
            header["id"] = ref
        return codec.encode(codec.PUB, header, data)
    frame_runs = [(item, sizes if len(sizes) > 1 else None, b"".join(blobs)) for item, sizes, blobs in runs]
    return codec.encode_runs(codec.PUBS, {}, frame_runs)


def _as_bytes(payload: bytes | str) -> bytes:
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ShardMQError(codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos!r}")
