"""The shardmq client SDK (blocking flavour; ``shardmq.client.green`` is the gevent one, ``shardmq.client.aio``
the asyncio one).

The rules below are the SDK's, for every flavour. The protocol that implements them (state, frames, and each
call's control flow: failover, recovery, resending) is ``core.ClientCore``, shared by all flavours and free of
I/O. Rules of this file, a shell around it:
- It owns the socket, its zmq monitor, the clock, the lock, the flusher thread and the waiting: ``_run`` drives a
  step of the core, blocking on each effect it yields (``Send``, ``Recv``, ``NOW``, ``Open``, ``CLOSE``). It holds
  no protocol state of its own and decides nothing the core decides; what it adds is when and where to block.
- Hot paths (a QoS 0 publish, a flush while connected, a message already in the inbox) use the core's plain
  methods without a generator.

The SDK's rules:
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
  for nothing) is kept in ``errors`` and raised by the next call. QoS 0 publishes the entry node failed (no
  owner answered a lookup, ...) come as one ERROR with ``count`` per code, added up in ``publish_failed`` and
  kept as one error per code (``ShardMQError.count``: how many), which ``flush`` and ``close`` raise first.
- Topics and filters are validated here first with the same rules as the server, so a bad one fails fast
  without a round trip.
- QoS 0 publishes gather only while the publisher outpaces the socket, without a timer at low load: a
  ``publish(qos=0)`` that finds nothing pending and comes ``linger`` or more after the previous one sends its
  message at once, in the caller's thread (at ordinary rates every message leaves at once, with no hand-off to
  the flusher thread). Publishes closer together than ``linger`` (a tight loop, a burst, a paced loop catching
  up: what queues while the previous send is still on its way through zmq's I/O thread and the node) gather:
  ``publish`` appends to the pending list and returns, and the caller's own thread sends the list when it
  reaches ``max_batch`` messages or its oldest message is ``linger`` seconds old (checked with
  ``time.monotonic()`` on each publish). A flush is one PUBS frame (a lone message goes as the plain PUB it
  always was), split so that no frame carries more than the node's ``max_payload`` (from WELCOME) bytes of
  payload; a larger message goes alone. Consecutive QoS 0 messages to one topic in a frame go as one run
  (``codec.Run``), which every node passes on as one item.
  ``max_batch=1`` turns batching off (every publish is sent at once, as before).
- Every other call (``publish(qos=1)``, ``publish_many``, ``subscribe*``, ``unsubscribe``, ``receive``,
  ``status``, ``leave``, ``flush``, ``close``, ``connect`` and failover) sends what is pending first, so order per
  topic is kept across QoS levels and calls. ``receive`` flushes before it blocks, so a thread waiting in
  ``receive`` never sits on pending messages.
- A background flusher thread (a daemon, started on the first buffered publish, holding only a weakref to the
  Client so an unclosed client can still be garbage collected) sends what is pending once the application leaves
  the client idle (the end of a burst, a publish that followed another within ``linger`` and then a sleep), at most
  once per ``linger``: at moderate rates (a publish every few tens of microseconds, with sleeps between) messages
  gather for up to ``linger`` instead of costing every process on the path a wake-up each, while a message after
  a quiet spell of ``linger`` or more leaves at once (from ``publish`` itself). ``publish`` wakes it (an Event)
  only when the pending list goes from empty to non-empty and the message did not leave at once. It never waits
  for the application: it only try-acquires the lock and, when the application is inside a call, looks again
  0.5 ms later (and stops looking once the list is empty). Its errors are kept in ``errors``. ``close`` flushes,
  stops and joins it.
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
  PONG: the node answers the PING only once each of them was forwarded or failed, and after its report of the
  failed ones, which ``flush`` and ``close`` raise.
- Pending QoS 0 messages are otherwise at most once like every QoS 0 publish: those buffered or flushed to a
  node that died (or that is closed by a failover before zmq wrote them) are lost, and only ``flush``/``close``
  report it. ``Client.dropped`` counts the messages the node dropped for this client because it read too slowly
  (the node's ``DROPPED`` frames), ``Client.publish_failed`` its QoS 0 publishes the entry node failed (the
  node's ERRORs with ``count``).
- Apart from the flusher, a Client belongs to the thread (or greenlet) that made it; never share one between
  threads or greenlets.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from shardmq.router import codec

from .core import (
    BULK_CHUNK,
    CLOSE,
    DACK_BATCH,
    DEFAULT_LINGER,
    DEFAULT_MAX_BATCH,
    NOW,
    OVERLOAD_BACKOFF,
    OVERLOAD_BACKOFF_MAX,
    PENDING_FIRST,
    PENDING_FLUSH,
    PENDING_LONE,
    PING_INTERVAL,
    VALID_TOPICS_MEMO,
    ClientCore,
    CoreView,
    Message,
    Open,
    Recv,
    Send,
    ShardMQError,
    Steps,
    Will,
    WillArg,
    as_bytes,
    check_qos,
    session_client_id,
)
from .credentials import Credentials, CredentialsArg
from .credentials import resolve as resolve_credentials

# The monitor events a client's socket reports: a disconnect (say HELLO again) and the handshakes' outcomes.
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
MONITORED_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED


def use_curve(sock: Any, credentials: Credentials | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client with these credentials; none: leave it plain."""
    if credentials is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, credentials.server_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, credentials.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, credentials.secret_key.encode())


def monitor_event(core: ClientCore, endpoint: str, message: list[bytes]) -> ShardMQError | None:
    """Tell the core what the socket's monitor reported; a refused handshake comes back as the error to raise."""
    event = parse_monitor_message(message)["event"]
    if event & HANDSHAKE_FAILED:
        return core.handshake_failed(endpoint, zmq.Event(event).name or str(event))
    if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
        core.handshake_succeeded()
    else:
        core.connection_broken()
    return None

__all__ = [
    "BULK_CHUNK",
    "DACK_BATCH",
    "DEFAULT_LINGER",
    "DEFAULT_MAX_BATCH",
    "OVERLOAD_BACKOFF",
    "OVERLOAD_BACKOFF_MAX",
    "PING_INTERVAL",
    "VALID_TOPICS_MEMO",
    "Client",
    "Message",
    "ShardMQError",
    "Will",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


def _exclusive(method: _F) -> _F:
    """A public call: holds the socket lock throughout, recovers the session if needed, and sends the pending
    QoS 0 publishes first."""

    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._core.recovery is not None:
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


class Client(CoreView):
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
        credentials: CredentialsArg = None,
        clean_session: bool = True,
        session_expiry: float | None = None,
        will: WillArg = None,
    ) -> None:
        max_batch = self.default_max_batch if max_batch is None else max_batch
        client_id = session_client_id(client_id, clean_session, session_expiry)
        self._core = ClientCore(endpoints, client_id, timeout, max_batch, linger, resolve_credentials(credentials),
                                clean_session, session_expiry, will)  # fmt: skip
        if max_batch > 1 and not self.batching:
            raise ValueError(f"{type(self).__name__} does not batch publish() (max_batch=1); use publish_many")
        self._core.last_heard = time.monotonic()
        self.ctx = self.zmq_module.Context.instance()
        self.sock: Any = None
        self._endpoint = ""  # the socket's
        self._monitor: Any = None
        self._poller: Any = None
        self._lock = threading.RLock()  # every socket use; held by each public call and by the flusher
        self._flusher: _Flusher | None = None
        self._flusher_finalizer: weakref.finalize | None = None
        if connect:
            self.connect()

    # ------------------------------------------------------------------ driving the core
    def _run(self, steps: Steps[_T]) -> _T:
        """Drive a step of the core to its end, performing each effect it asks for by blocking on it."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                effect = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = error = None
            try:
                kind = type(effect)
                if kind is Recv:
                    value = self._recv(effect.timeout)  # type: ignore[union-attr]
                elif effect is NOW:
                    value = time.monotonic()
                elif kind is Send:
                    self.sock.send_multipart(effect.parts)  # type: ignore[union-attr]
                elif kind is Open:
                    self._open(effect.endpoint)  # type: ignore[union-attr]
                elif effect is CLOSE:
                    self._close_socket()
                else:
                    raise TypeError(f"unknown effect {effect!r}")
            except BaseException as exc:  # the core decides what it handles (TimeoutError, ShardMQError...)
                error = exc

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Connect to the first endpoint that answers, starting after the last one used.

        Pending QoS 0 publishes are sent to the current node first (if there is one).
        """
        with self._lock:
            self._run(self._core.connect())

    def _recover(self) -> None:
        self._run(self._core.recover())

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
        use_curve(sock, self._core.credentials)
        self._monitor = sock.get_monitor_socket(MONITORED_EVENTS)
        self._endpoint = endpoint
        self._core.socket_opened()
        sock.connect(endpoint)
        self.sock = sock
        self._poller = z.Poller()
        self._poller.register(sock, z.POLLIN)
        self._poller.register(self._monitor, z.POLLIN)

    def _close_socket(self, linger: int = 0) -> None:
        if self.sock is not None:
            with contextlib.suppress(self.zmq_module.ZMQError):
                self.sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self.sock.close(linger=linger)
            self.sock = self._monitor = self._poller = None
            self._core.socket_closed()

    def _read_monitor(self) -> None:
        """zmq reported a disconnect (it reconnects by itself, and we say HELLO) or a refused handshake (raised)."""
        z = self.zmq_module
        with contextlib.suppress(z.Again):
            while True:
                refused = monitor_event(self._core, self._endpoint, self._monitor.recv_multipart(z.NOBLOCK))
                if refused is not None:
                    raise refused

    def _recv(self, timeout: float) -> codec.Frame | None:
        """One frame from the node within ``timeout`` seconds, or None (also when zmq reported a disconnect:
        the core's ``recovery`` then says what to do)."""
        ready = dict(self._poller.poll(max(0, int(timeout * 1000))))
        if self._monitor in ready:
            self._read_monitor()
        if self.sock not in ready:
            return None
        parts = self.sock.recv_multipart()
        return self._core.decode(parts, time.monotonic())

    def _handle_unsolicited(self, frame: codec.Frame) -> None:
        reply = self._core.handle_unsolicited(frame)
        if reply is not None and self.sock is not None:
            self.sock.send_multipart(reply)

    def close(self) -> None:
        """Send what is pending, wait until the node has read it (the core's ``confirm_read``), stop the flusher,
        say BYE and close the socket.

        Returns only once the node confirmed reading every publish made before; if it does not within ``timeout``,
        the socket is closed all the same and ``ShardMQError("timeout")`` is raised (the publishes may be lost).
        The node's report of QoS 0 publishes it failed is raised the same way, once the socket is closed.
        """
        with self._lock:
            unconfirmed: ShardMQError | None = None
            try:
                self._flush_pending()
                try:
                    self._run(self._core.confirm_read())
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

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ API
    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe to one filter; returns once every owner of its route confirmed. ``"$share/GROUP/FILTER"`` joins
        a shared subscription: each matching message goes to one member of the group (docs/SDK.md)."""
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
        return self._run(self._core.subscribe_many(filters, qos, chunk, progress))

    @_exclusive
    def unsubscribe(self, *filters: str) -> None:
        self._run(self._core.unsubscribe(filters))

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Publish; with qos=1 returns only after every node with matching subscribers accepted it.

        ``retain=True`` also stores it as the topic's retained message (an empty payload deletes it), which later
        subscribers get with ``Message.retain`` set; with qos=1 the call returns once it is stored and replicated.
        A QoS 0 retain publish is sent at once, after whatever is pending (not batched).

        With qos=0 (see the rules above) a lone message leaves at once, from this thread, when nothing is pending
        and the previous publish was ``linger`` seconds ago or more; else it is queued and sent with the others that
        queue up: at once when ``max_batch`` are pending or the oldest is ``linger`` seconds old, else by the next call
        or by the flusher thread as soon as the application leaves the client idle.
        """
        check_qos(qos)
        core = self._core
        if topic not in core.valid_topics:
            core.check_topic(topic)
        data = payload if type(payload) is bytes else as_bytes(payload)  # the common case without a call
        with self._lock:
            if qos or retain:
                if core.recovery is not None:
                    self._recover()
                self._flush_pending()
                self._run(core.publish_acked(topic, data, retain) if qos else core.publish_retained(topic, data))
                return
            action = core.add_pending(topic, data, time.monotonic())
            if action in (PENDING_FLUSH, PENDING_LONE):
                # A lone message leaves from the caller's thread: waking the flusher for it would cost a thread
                # hand-off (tens of microseconds to milliseconds on a busy machine) for nothing to gather.
                self._flush_pending()
            elif action == PENDING_FIRST:
                self._wake_flusher()

    @_exclusive
    def publish_many(
        self, messages: Iterable[tuple[str, bytes | str]], qos: int = 0, batch: int = 500, retain: bool = False
    ) -> int:
        """Publish (topic, payload) pairs, ``batch`` to a frame; returns how many were published (``retain``: each
        also as its topic's retained message).

        With qos=1 each frame's messages are in flight together and the call returns once every one of them was
        acknowledged (a node that stays silent is failed over and the unacknowledged ones are sent again).
        Order per topic is kept, as with ``publish``.
        """
        check_qos(qos)
        core = self._core
        done = 0
        chunk: list[tuple[str, bytes]] = []
        for topic, payload in messages:
            if topic not in core.valid_topics:
                core.check_topic(topic)
            chunk.append((topic, as_bytes(payload)))
            if len(chunk) >= batch:
                done += self._run(core.publish_batch(chunk, qos, retain))
                chunk = []
        if chunk:
            done += self._run(core.publish_batch(chunk, qos, retain))
        return done

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (forever when None); None on timeout."""
        core = self._core
        inbox = core.inbox
        if inbox and inbox[0][4] is None and not core.pending:
            # A QoS 0 message already here and nothing to flush: no socket use, so no lock (the flusher thread
            # never touches the inbox, and only the application's thread reads it).
            topic, payload, qos, dup, _, retain = inbox.popleft()
            return Message(topic, payload, qos, dup, retain)
        return self._receive(timeout)

    @_exclusive
    def _receive(self, timeout: float | None) -> Message | None:
        core = self._core
        if not (core.inbox and core.connected and core.recovery is None):  # else nothing to wait for or recover
            self._run(core.wait_for_message(timeout))
        message, dack = core.take_message()
        if dack is not None:
            self.sock.send_multipart(dack)
        return message

    @_exclusive
    def leave(self) -> None:
        """Ask the connected node to leave the cluster gracefully (it drains its shards, then exits).

        No failover here: sending LEAVE to the next endpoint would make a different node leave.
        """
        self._run(self._core.leave())

    @_exclusive
    def status(self, detail: bool = False) -> dict[str, Any]:
        """The connected node's status: members, shards, routes, root-set size, metrics.

        ``detail=True`` adds ``routes_per_shard`` ({shard: [routes, bytes]} for the shards this node is primary
        of), which costs the node a walk over those routes.
        """
        return self._run(self._core.status(detail))

    @_exclusive
    def flush(self) -> None:
        """Send every pending QoS 0 publish and return once the node has read every publish made so far.

        ``ShardMQError("timeout")`` when the node does not confirm within ``timeout`` (the publishes may be lost),
        ``unavailable`` when some went on a connection closed before its node confirmed them; then the node's
        report of QoS 0 publishes it failed (``count`` of them, in ``publish_failed`` too); then, like any call, an
        error kept from an earlier publish (those the node sent before its confirmation included).
        """
        self._run(self._core.flush())

    # ------------------------------------------------------------------ QoS 0 batching
    def _flush_pending(self) -> None:
        """Send the pending QoS 0 publishes (the caller holds the lock). On an error they are lost (QoS 0)."""
        core = self._core
        if not core.pending:
            return
        if not core.connected:
            self._run(core.flush_pending())
            return
        frames, count = core.take_pending()  # the hot path of a batch: no generator
        for parts in frames:
            self.sock.send_multipart(parts)
        core.pending_sent(count, time.monotonic())

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
        core = self._core
        if not core.pending:  # emptied by the application's own call (a read of a list: atomic)
            return None
        # Busy (the last flush was less than ``linger`` ago): let messages gather until then. At low load the
        # last flush is long past, so a lone message still leaves at once.
        wait = core.last_flush + core.linger - time.monotonic()
        if wait > 0:
            return wait
        if not self._lock.acquire(blocking=False):  # the application is inside a call: never wait for it
            return _Flusher.RETRY
        try:
            self._flush_pending()
        except Exception as exc:  # nobody to raise to in this thread: the next call raises it
            error = exc if isinstance(exc, ShardMQError) else ShardMQError(codec.E_UNAVAILABLE, repr(exc))
            core.errors.append(error)
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
