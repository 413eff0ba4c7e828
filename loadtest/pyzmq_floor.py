"""The floor for ``compare_brokers``: shardmq's four processes and hops with none of its work.

publisher -> forwarder -> forwarder -> subscriber, pyzmq PUSH/PULL on loopback: the same process count and hops
as shardmq's measured path (publisher, entry node, subscriber's node, subscriber). The publisher batches by the
SDK's rule (up to ``DEFAULT_MAX_BATCH`` messages, or what gathered in ``DEFAULT_LINGER``; at rates below one
message per linger each message leaves at once) into one frame of 100-byte payloads back to back; each
forwarder is a Python loop that receives a frame and sends it on unread; the subscriber cuts the frame into
payloads. No routing, parsing, validation, acks or bookkeeping: what this reaches is what the machine gives four
Python processes passing the same batches, so shardmq's distance from it is the cost of its own work.

PUSH/PULL is lossless (a PUSH with no reader holds its messages), so every figure counts every message sent.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from shardmq.client.client import DEFAULT_LINGER, DEFAULT_MAX_BATCH

SUBSCRIBER_ENDPOINT = "sub_endpoint"
PUBLISHER_ENDPOINT = "pub_endpoint"


def forwarder(upstream: str | None, downstream: str | None, bound: Any) -> None:
    """Receive frames on a PULL and send each on through a PUSH, as they came. A None endpoint is bound on a
    random loopback port, reported on ``bound`` as (side, endpoint); the other side connects. Ends on SIGTERM."""
    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock, endpoint, side in ((pull, upstream, "up"), (push, downstream, "down")):
        if endpoint is None:
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            bound.put((side, f"tcp://127.0.0.1:{port}"))
        else:
            sock.connect(endpoint)
    while True:
        push.send(pull.recv(copy=False), copy=False)


def _bound(q: Any, side: str) -> str:
    got, endpoint = q.get(timeout=15)
    if got != side:
        raise RuntimeError(f"forwarder reported its {got} endpoint, expected {side}")
    return endpoint


@contextlib.contextmanager
def chain(ctx: Any) -> Iterator[dict[str, Any]]:
    """Start the two forwarders; yields the endpoints the publisher and subscriber connect to. Both forwarders
    (started here, by pid) are terminated on exit."""
    procs: list[mp.process.BaseProcess] = []
    try:
        q = ctx.Queue()
        last = ctx.Process(target=forwarder, args=(None, None, q), daemon=True, name="floor-fwd-2")
        procs.append(last)
        last.start()
        middle, sub_endpoint = _bound(q, "up"), _bound(q, "down")
        first = ctx.Process(target=forwarder, args=(None, middle, q), daemon=True, name="floor-fwd-1")
        procs.append(first)
        first.start()
        pub_endpoint = _bound(q, "up")
        yield {PUBLISHER_ENDPOINT: pub_endpoint, SUBSCRIBER_ENDPOINT: sub_endpoint, "pid": first.pid}
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def subscribe(
    info: dict[str, Any], ready: Any, size: int
) -> tuple[Callable[[float], bytes | None], Callable[[], None]]:
    """(get, close): ``get(timeout)`` returns one payload or None, as ``compare_brokers.pull_loop`` wants."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(info[SUBSCRIBER_ENDPOINT])
    ready.set()  # the forwarder's PUSH holds frames until this reader is connected
    waiting: deque[bytes] = deque()

    def get(timeout: float) -> bytes | None:
        if not waiting:
            if not sock.poll(max(0, int(timeout * 1000))):
                return None
            frame = sock.recv()
            waiting.extend(frame[at : at + size] for at in range(0, len(frame), size))
        return waiting.popleft()

    def close() -> None:
        sock.close(linger=0)
        ctx.term()

    return get, close


class Publisher:
    """The publisher's side: ``add`` queues a payload and sends the batch by the SDK's rule; ``close`` sends the
    rest and waits (up to 10 s) until zmq wrote it."""

    def __init__(self, info: dict[str, Any], rate: float | None) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.connect(info[PUBLISHER_ENDPOINT])
        self.batch: list[bytes] = []
        self.since = 0.0
        # The SDK's flusher sends at once when the application goes idle for a linger; a paced run slower than
        # one message per linger is always idle in between.
        self.send_each = rate is not None and 1.0 / rate >= DEFAULT_LINGER

    def add(self, payload: bytes) -> None:
        now = time.monotonic()
        if not self.batch:
            self.since = now
        self.batch.append(payload)
        if self.send_each or len(self.batch) >= DEFAULT_MAX_BATCH or now - self.since >= DEFAULT_LINGER:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.sock.send(b"".join(self.batch))
            self.batch = []

    def close(self) -> None:
        self.flush()
        self.sock.close(linger=10_000)
        self.ctx.term()
