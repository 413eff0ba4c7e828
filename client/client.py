"""The shardmq client SDK (blocking flavour; ``shardmq.client.green`` is the gevent one).

Rules of this file:
- One DEALER socket to one node at a time. Any node can serve any topic, so the endpoint list is a failover
  list: when a node does not answer within ``timeout`` (or answers ``fenced``: it lost etcd) the client moves to
  the next endpoint, subscribes again to everything it had (clean-session semantics: the application does
  nothing), and resends the request it was waiting on. A QoS 1 publish may therefore arrive twice; it is never
  silently lost.
- Requests carry an ``id``; the reply (or an ERROR with ``ref`` = id) is matched to it. Messages that arrive
  while a request waits are queued for ``receive``. QoS 1 messages are acknowledged (DACK) when ``receive``
  hands them to the application.
- Errors from the server are raised as ``ShardMQError(code, reason)``; an error for a QoS 0 publish (which waits
  for nothing) is kept in ``errors`` and raised by the next call.
- Topics and filters are validated here first with the same rules as the server, so a bad one fails fast
  without a round trip.
- A socket belongs to the thread (or greenlet) that made the client; never share a Client between them.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import zmq

from shardmq.router import codec
from shardmq.router.codec import ProtocolError
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

BULK_CHUNK = 5000
PING_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
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


class Client:
    zmq_module: ModuleType = zmq

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        client_id: str | None = None,
        timeout: float = 5.0,
        connect: bool = True,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one node endpoint, e.g. tcp://127.0.0.1:7101")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.ctx = self.zmq_module.Context.instance()
        self.sock: Any = None
        self.node: str | None = None
        self.endpoint: str | None = None
        self.subscriptions: dict[str, int] = {}
        self.errors: deque[ShardMQError] = deque(maxlen=1000)
        self.inbox: deque[tuple[Message, int | None]] = deque()  # (message, mid to DACK when handed over)
        self.failovers = 0
        self._ids = itertools.count(1)
        self._next_endpoint = 0
        self._last_heard = time.monotonic()
        if connect:
            self.connect()

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Connect to the first endpoint that answers, starting after the last one used."""
        failures = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._next_endpoint % len(self.endpoints)]
            self._next_endpoint += 1
            self._open(endpoint)
            try:
                reply = self._roundtrip(codec.HELLO, {"client": self.client_id}, b"", codec.WELCOME)
            except TimeoutError:
                failures.append(endpoint)
                continue
            self.node, self.endpoint = reply["node"], endpoint
            if self.subscriptions:
                self._resubscribe()
            return
        self._close_socket()
        raise ShardMQError(codec.E_UNAVAILABLE, f"no node answered within {self.timeout}s: {', '.join(failures)}")

    def _open(self, endpoint: str) -> None:
        self._close_socket()
        z = self.zmq_module
        sock = self.ctx.socket(z.DEALER)
        sock.setsockopt(z.ROUTING_ID, self.client_id.encode())
        sock.setsockopt(z.LINGER, 0)
        sock.setsockopt(z.HEARTBEAT_IVL, 2000)
        sock.setsockopt(z.HEARTBEAT_TIMEOUT, 6000)
        sock.connect(endpoint)
        self.sock = sock

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def _failover(self) -> None:
        self.failovers += 1
        self.connect()

    def _resubscribe(self) -> None:
        by_qos: dict[int, list[str]] = {}
        for filt, qos in self.subscriptions.items():
            by_qos.setdefault(qos, []).append(filt)
        for qos, filters in by_qos.items():
            for start in range(0, len(filters), BULK_CHUNK):
                chunk = filters[start : start + BULK_CHUNK]
                self._roundtrip(codec.SUB, {"filters": chunk, "qos": qos}, b"", codec.SUBACK)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(self.zmq_module.ZMQError):
                self.sock.send_multipart(codec.encode(codec.BYE, {}), self.zmq_module.NOBLOCK)
            self._close_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ frames
    def _send(self, frame_type: bytes, header: dict[str, Any], payload: bytes = b"") -> None:
        self._send_parts(codec.encode(frame_type, header, payload))

    def _send_parts(self, parts: list[bytes]) -> None:
        if self.sock is None:
            self.connect()
        self.sock.send_multipart(parts)

    def _recv(self, timeout: float) -> codec.Frame | None:
        """One frame from the node within ``timeout`` seconds, or None."""
        if not self.sock.poll(max(0, int(timeout * 1000))):
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
            self.inbox.append((Message(h["topic"], frame.payload, h["qos"], bool(h.get("dup"))), mid))
        elif frame.type == codec.MSGS:  # a batch: the node sends messages that queued up together in one frame
            try:
                for (topic, qos, mid, dup), payload in codec.split_batch(frame):
                    self.inbox.append((Message(topic, payload, qos, bool(dup)), mid if qos else None))
            except (ProtocolError, ValueError, TypeError) as exc:
                self.errors.append(ShardMQError(codec.E_BAD_FRAME, f"undecodable MSGS from node: {exc}"))
        elif frame.type == codec.PING:
            self.sock.send_multipart(codec.encode(codec.PONG, {}))
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
        # Silent, or fenced (it lost etcd and cannot vouch for anything): move to the next node and resend.
        self._failover()
        try:
            return self._roundtrip(frame_type, header, payload, expect)
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{exc} from {self.endpoint} either (after a failover)") from None

    def _raise_pending_error(self) -> None:
        if self.errors:
            raise self.errors.popleft()

    # ------------------------------------------------------------------ API
    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe to one filter; returns once every owner of its route confirmed."""
        self.subscribe_many([topic_filter], qos)

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

    def unsubscribe(self, *filters: str) -> None:
        for filt in filters:
            self.subscriptions.pop(filt, None)
        self._request(codec.UNSUB, {"filters": list(filters)}, b"", codec.UNSUBACK)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0) -> None:
        """Publish; with qos=1 returns only after every node with matching subscribers accepted it."""
        _check_qos(qos)
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            raise ShardMQError(exc.code, exc.reason) from None
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if qos == 0:
            self._raise_pending_error()
            self._send(codec.PUB, {"topic": topic, "qos": 0}, data)
            return
        self._request(codec.PUB, {"topic": topic, "qos": 1}, data, codec.PUBACK)

    def publish_many(
        self, messages: Iterable[tuple[str, bytes | str]], qos: int = 0, batch: int = 500
    ) -> int:
        """Publish (topic, payload) pairs, ``batch`` to a frame; returns how many were published.

        With qos=1 each frame's messages are in flight together and the call returns once every one of them was
        acknowledged (a node that stays silent is failed over and the unacknowledged ones are sent again).
        Order per topic is kept, as with ``publish``.
        """
        _check_qos(qos)
        done = 0
        chunk: list[tuple[str, bytes]] = []
        for topic, payload in messages:
            try:
                validate_topic_name(topic)
            except TopicError as exc:
                raise ShardMQError(exc.code, exc.reason) from None
            chunk.append((topic, payload.encode() if isinstance(payload, str) else bytes(payload)))
            if len(chunk) >= batch:
                done += self._publish_batch(chunk, qos)
                chunk = []
        if chunk:
            done += self._publish_batch(chunk, qos)
        return done

    def _publish_batch(self, chunk: list[tuple[str, bytes]], qos: int) -> int:
        self._raise_pending_error()
        for attempt in range(2):
            ids = [next(self._ids) if qos else None for _ in chunk]
            items = [[topic, qos, ref] for (topic, _), ref in zip(chunk, ids, strict=True)]
            self._send_parts(codec.encode_batch(codec.PUBS, {}, items, [p for _, p in chunk]))
            if not qos:
                return len(chunk)
            unacked = self._await_pubacks({i for i in ids if i is not None})
            if not unacked:
                return len(chunk)
            if attempt == 0:  # silent node: move on and resend what was not acknowledged
                chunk = [m for m, ref in zip(chunk, ids, strict=True) if ref in unacked]
                self._failover()
        raise ShardMQError(codec.E_TIMEOUT, f"{len(chunk)} publishes not acknowledged after a failover")

    def _await_pubacks(self, waiting: set[int]) -> set[int]:
        """Wait for PUBACKs of ``waiting``; returns the ids still unacknowledged after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while waiting and (left := deadline - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                continue
            h = frame.header
            if frame.type == codec.PUBACK:
                ids = h.get("ids")
                waiting.difference_update(ids if isinstance(ids, list) else [h["id"]])
            elif frame.type == codec.ERROR and h.get("ref") in waiting:
                raise ShardMQError(h["code"], h["reason"])
            elif frame.type not in (codec.WELCOME, codec.PONG):
                self._handle_unsolicited(frame)
        return waiting

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (forever when None); None on timeout."""
        if self.sock is None:
            self.connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.inbox:
            left = PING_INTERVAL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            frame = self._recv(min(left, PING_INTERVAL))
            if frame is not None:
                self._handle_unsolicited(frame)
            elif time.monotonic() - self._last_heard > PING_INTERVAL:
                self._check_alive()
        if not self.inbox:
            return None
        msg, mid = self.inbox.popleft()
        if isinstance(mid, int):  # acknowledged only now that the application has it
            self.sock.send_multipart(codec.encode(codec.DACK, {"mids": [mid]}))
        return msg

    def _check_alive(self) -> None:
        """A quiet connection may be a dead node: ping it, and fail over if it stays silent."""
        try:
            self._roundtrip(codec.PING, {}, b"", codec.PONG)
        except TimeoutError:
            self._failover()

    def leave(self) -> None:
        """Ask the connected node to leave the cluster gracefully (it drains its shards, then exits).

        No failover here: sending LEAVE to the next endpoint would make a different node leave.
        """
        try:
            self._roundtrip(codec.LEAVE, {}, b"", codec.LEAVING)
        except TimeoutError as exc:
            raise ShardMQError(codec.E_TIMEOUT, f"{self.node} did not confirm LEAVE: {exc}") from None

    def status(self, detail: bool = False) -> dict[str, Any]:
        """The connected node's status: members, shards, routes, root-set size, metrics.

        ``detail=True`` adds ``routes_per_shard`` ({shard: [routes, bytes]} for the shards this node is primary
        of), which costs the node a walk over those routes.
        """
        return self._request(codec.STATUS, {"detail": detail}, b"", codec.STATUS_REPLY)["status"]


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ShardMQError(codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos!r}")
