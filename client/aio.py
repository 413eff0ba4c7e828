"""The asyncio flavour of the SDK: ``AsyncClient``, the calls of ``Client`` with ``await``.

Rules of this file:
- A shell around ``core.ClientCore``, like ``Client``: the protocol (frames, ids, sessions, failover, inbox,
  DACKs, batching frames, validation) is the core's, and the rules of the SDK at the top of ``client.py`` hold
  here too. This file owns the ``zmq.asyncio`` socket, its monitor, the waiting, the lock and the flush task.
- It never blocks the event loop: every wait is an awaited ``Poller.poll`` with a timeout (no ``time.sleep``, no
  blocking socket call, no OS thread); a send that zmq cannot take (its queue to the node is full) is awaited for
  at most ``timeout`` seconds, then ``ShardMQError("timeout")`` (the blocking flavour would block on it).
- One AsyncClient may be shared by many tasks: every call holds an ``asyncio.Lock`` around its use of the socket,
  so concurrent awaits are serialised in arrival order. A task waiting in ``receive`` holds the lock only while
  no other call waits for it: it gives the socket up (the core's ``YIELDED``) as soon as one does, and takes it
  back after, so a consumer task never stalls publishing tasks on the same client. Messages that other calls
  read while they wait for their replies go to the shared inbox, as in ``Client``. Several tasks in ``receive``
  share the messages (each message goes to one of them).
- QoS 0 batching without timers or threads: ``publish(qos=0)`` queues the message and, when the pending list
  was empty, schedules a flush task on the loop; that task sends whatever queued up by the time it runs (the
  caller's next ``await`` at the latest, or once a send under way releases the lock). So a lone publish leaves
  on the loop's next turn, publishes made while a send is under way leave together, and ``max_batch``/``linger``
  still make ``publish`` send inline. The task's errors are kept in ``errors`` and raised by the next call.
- ``flush``/``close`` are the same PING/PONG barrier as in ``Client``; ``close`` also cancels the flush task.
- A client is bound to the event loop it is first used on (its lock and socket are).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from shardmq.router import codec

from .client import MONITORED_EVENTS, monitor_event, use_curve
from .core import (
    BULK_CHUNK,
    CLOSE,
    DEFAULT_LINGER,
    DEFAULT_MAX_BATCH,
    NOW,
    PENDING_FIRST,
    PENDING_FLUSH,
    PENDING_LONE,
    YIELDED,
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
from .credentials import CredentialsArg
from .credentials import resolve as resolve_credentials

__all__ = ["AsyncClient", "Message", "ShardMQError", "Will"]

_T = TypeVar("_T")


class AsyncClient(CoreView):
    """``async with AsyncClient(endpoints) as c: await c.subscribe(...); m = await c.receive(timeout=1.0)``."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        client_id: str | None = None,
        timeout: float = 5.0,
        *,
        max_batch: int | None = None,
        linger: float = DEFAULT_LINGER,
        credentials: CredentialsArg = None,
        clean_session: bool = True,
        session_expiry: float | None = None,
        will: WillArg = None,
    ) -> None:
        max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        client_id = session_client_id(client_id, clean_session, session_expiry)
        self._core = ClientCore(endpoints, client_id, timeout, max_batch, linger, resolve_credentials(credentials),
                                clean_session, session_expiry, will)  # fmt: skip
        # A shadow of the process's global context: ``zmq.asyncio.Context.instance()`` may hand back the plain
        # context when a blocking Client made it first (the class attribute is shared).
        self.ctx = zmq.asyncio.Context.shadow(zmq.Context.instance())
        self.sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._endpoint = ""  # the socket's
        self._poller: zmq.asyncio.Poller | None = None
        self._lock = asyncio.Lock()  # every socket use; held by each call and by the flush task
        self._wanted = 0  # calls (other than receive) waiting for the lock
        self._want: asyncio.Future[None] | None = None  # set when one starts waiting: a receive gives way
        self._flush_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ driving the core
    async def _run(self, steps: Steps[_T]) -> _T:
        """Drive a step of the core to its end, awaiting each effect it asks for."""
        value: Any = None
        error: BaseException | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                effect = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = error = None
            try:
                if effect is NOW:
                    value = loop.time()
                elif isinstance(effect, Recv):
                    value = await self._recv(effect.timeout, effect.yieldable)
                elif isinstance(effect, Send):
                    await self._send(effect.parts)
                elif isinstance(effect, Open):
                    self._open(effect.endpoint)
                elif effect is CLOSE:
                    self._close_socket()
                else:
                    raise TypeError(f"unknown effect {effect!r}")
            except BaseException as exc:  # cancellation included: the core's own handlers see it, then it goes on
                error = exc

    @contextlib.asynccontextmanager
    async def _exclusive(self, *, urgent: bool = True) -> AsyncIterator[None]:
        """Hold the lock. ``urgent`` (every call but ``receive``): a ``receive`` waiting on the socket gives way."""
        if urgent:
            self._wanted += 1
            if self._want is not None and not self._want.done():
                self._want.set_result(None)
            try:
                await self._lock.acquire()
            finally:
                self._wanted -= 1
        else:
            await self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[ClientCore]:
        """A public call: the lock, then recovery and the pending QoS 0 publishes, as in ``Client``."""
        async with self._exclusive():
            await self._run(self._core.prepare())
            yield self._core

    # ------------------------------------------------------------------ socket
    def _open(self, endpoint: str) -> None:
        self._close_socket()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.client_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 5)
        use_curve(sock, self._core.credentials)
        self._monitor = sock.get_monitor_socket(MONITORED_EVENTS)
        self._endpoint = endpoint
        self._core.socket_opened()
        sock.connect(endpoint)  # zmq connects in its I/O thread: this returns at once
        self.sock = sock
        self._poller = zmq.asyncio.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _close_socket(self, linger: int = 0) -> None:
        if self.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self.sock.close(linger=linger)
            self.sock = self._monitor = self._poller = None
            self._core.socket_closed()

    async def _send(self, parts: list[bytes]) -> None:
        assert self.sock is not None
        try:
            async with asyncio.timeout(self._core.timeout):
                await self.sock.send_multipart(parts)
        except TimeoutError:
            raise ShardMQError(
                codec.E_TIMEOUT, f"zmq could not queue a frame to {self.endpoint} for {self.timeout}s (not read)"
            ) from None

    async def _recv(self, timeout: float, yieldable: bool) -> Any:
        """One frame within ``timeout`` seconds, or None (also when zmq reported a disconnect), or YIELDED when
        ``yieldable`` and another call wants the lock."""
        if yieldable and self._wanted:
            return YIELDED
        assert self._poller is not None
        poll = asyncio.ensure_future(self._poller.poll(max(0, int(timeout * 1000))))
        try:
            if yieldable:
                want = self._want = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait((poll, want), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._want = None
                    want.cancel()
                if not poll.done():
                    return YIELDED
            ready = dict(await poll)
        finally:
            if not poll.done():
                poll.cancel()
        if self._monitor is not None and self._monitor in ready:
            await self._read_monitor()
        if self.sock is None or self.sock not in ready:
            return None
        parts = await self.sock.recv_multipart()
        return self._core.decode(parts, asyncio.get_running_loop().time())

    async def _read_monitor(self) -> None:
        """zmq reported a disconnect (it reconnects by itself, and the core says HELLO at its next turn) or a
        refused handshake (raised)."""
        assert self._monitor is not None
        with contextlib.suppress(zmq.Again):
            while True:
                message = await self._monitor.recv_multipart(zmq.NOBLOCK)
                refused = monitor_event(self._core, self._endpoint, message)
                if refused is not None:
                    raise refused

    # ------------------------------------------------------------------ lifecycle
    async def connect(self) -> None:
        """Connect to the first endpoint that answers (calls connect by themselves when needed)."""
        async with self._exclusive():
            await self._run(self._core.connect())

    async def __aenter__(self) -> AsyncClient:
        if not self._core.connected:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Send what is pending, wait until the node has read it (PING/PONG), say BYE and close the socket.

        As ``Client.close``: the socket is closed even when the node does not confirm, then the error is raised.
        """
        async with self._exclusive():
            unconfirmed: ShardMQError | None = None
            try:
                await self._flush_pending()
                try:
                    await self._run(self._core.confirm_read())
                except ShardMQError as exc:  # raised once the socket is closed: close always closes
                    unconfirmed = exc
            finally:
                task, self._flush_task = self._flush_task, None
                if task is not None and task is not asyncio.current_task():
                    task.cancel()  # it waits for the lock we hold: nothing is left for it to send
                if self.sock is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        await self.sock.send_multipart(codec.encode(codec.BYE, {}), zmq.NOBLOCK)
                    self._close_socket(linger=max(0, int(self.timeout * 1000)))
            if unconfirmed is not None:
                raise unconfirmed

    # ------------------------------------------------------------------ API
    async def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe to one filter; returns once every owner of its route confirmed."""
        await self.subscribe_many([topic_filter], qos)

    async def subscribe_many(
        self,
        filters: Iterable[str],
        qos: int = 0,
        chunk: int = BULK_CHUNK,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk subscribe in frames of ``chunk`` filters; ``progress(n)`` after each. Returns how many were added."""
        async with self._call() as core:
            return await self._run(core.subscribe_many(filters, qos, chunk, progress))

    async def unsubscribe(self, *filters: str) -> None:
        async with self._call() as core:
            await self._run(core.unsubscribe(filters))

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Publish; with qos=1 returns only after every node with matching subscribers accepted it. ``retain``: as
        ``Client.publish`` (also the topic's retained message; a QoS 0 one leaves at once, not batched).

        With qos=0 the message is queued and leaves on the loop's next turn with whatever queued up meanwhile
        (see the rules above), at once when ``max_batch`` are pending or the oldest is ``linger`` seconds old.
        """
        check_qos(qos)
        core = self._core
        if topic not in core.valid_topics:
            core.check_topic(topic)
        data = payload if type(payload) is bytes else as_bytes(payload)
        if qos or retain:
            async with self._call():
                await self._run(core.publish_acked(topic, data, retain) if qos else core.publish_retained(topic, data))
            return
        action = core.add_pending(topic, data, asyncio.get_running_loop().time())
        if action == PENDING_FLUSH:
            async with self._exclusive():
                await self._flush_pending()
        elif action in (PENDING_FIRST, PENDING_LONE) and (self._flush_task is None or self._flush_task.done()):
            # A lone message too leaves on the loop's next turn: no thread hand-off to save here.
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def publish_many(
        self, messages: Iterable[tuple[str, bytes | str]], qos: int = 0, batch: int = 500, retain: bool = False
    ) -> int:
        """Publish (topic, payload) pairs, ``batch`` to a frame; returns how many were published (as
        ``Client.publish_many``: with qos=1, once every one was acknowledged)."""
        check_qos(qos)
        async with self._call() as core:
            done = 0
            chunk: list[tuple[str, bytes]] = []
            for topic, payload in messages:
                if topic not in core.valid_topics:
                    core.check_topic(topic)
                chunk.append((topic, as_bytes(payload)))
                if len(chunk) >= batch:
                    done += await self._run(core.publish_batch(chunk, qos, retain))
                    chunk = []
            if chunk:
                done += await self._run(core.publish_batch(chunk, qos, retain))
            return done

    async def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (forever when None); None on timeout.

        Raises ``ShardMQError("interrupted")`` once per gap in the subscriptions; QoS 1 messages are acknowledged
        once handed over, as in ``Client.receive``."""
        core = self._core
        inbox = core.inbox
        if inbox and inbox[0][4] is None and not core.pending:  # a QoS 0 message already here: no socket use
            topic, payload, qos, dup, _, retain = inbox.popleft()
            return Message(topic, payload, qos, dup, retain)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            async with self._exclusive(urgent=False):
                await self._run(core.prepare())
                if not (core.inbox and core.connected and core.recovery is None):
                    left = None if deadline is None else max(0.0, deadline - loop.time())
                    await self._run(core.wait_for_message(left))
                if core.inbox or (deadline is not None and loop.time() >= deadline):
                    message, dack = core.take_message()
                    if dack is not None:
                        await self._send(dack)
                    return message
            # Another call wanted the socket: it has the lock now; wait again once it is done.

    async def leave(self) -> None:
        """Ask the connected node to leave the cluster gracefully; never fails over (see ``Client.leave``)."""
        async with self._call() as core:
            await self._run(core.leave())

    async def status(self, detail: bool = False) -> dict[str, Any]:
        """The connected node's status (see ``Client.status``)."""
        async with self._call() as core:
            return await self._run(core.status(detail))

    async def flush(self) -> None:
        """Send every pending QoS 0 publish and return once the node has read every publish made so far."""
        async with self._call() as core:
            await self._run(core.flush())

    # ------------------------------------------------------------------ QoS 0 batching
    async def _flush_pending(self) -> None:
        """Send the pending QoS 0 publishes (the caller holds the lock)."""
        core = self._core
        while core.pending:  # more may queue up while a send is awaited
            if not core.connected or self.sock is None:
                await self._run(core.flush_pending())
                continue
            frames, count = core.take_pending()
            for parts in frames:
                await self._send(parts)
            core.pending_sent(count, asyncio.get_running_loop().time())

    async def _flush_soon(self) -> None:
        """The flush task: sends what queued up since it was scheduled; nobody awaits it, so errors are kept."""
        try:
            async with self._exclusive():
                await self._flush_pending()
        except Exception as exc:
            error = exc if isinstance(exc, ShardMQError) else ShardMQError(codec.E_UNAVAILABLE, repr(exc))
            self._core.errors.append(error)
