"""Exit right after publishing: ``flush()`` and ``close()`` return only once the node has read every publish.

A separate process publishes QoS 0 messages and exits at once, which is how scripts and batch jobs end. The
only witness that counts is the entry node: its ``publishes.in`` counter (from ``Client.status()`` on that node,
read before and after) must have grown by exactly the number published. Before the PING/PONG barrier, the tail
still in zmq's queue when the process exited was lost (12-24% of 200,000 in the report that opened issue 9).

The unit tests at the end use a fake socket to pin down the barrier itself: a PING with an id after the
publishes, and a ``timeout`` error (the socket still closed) when no PONG comes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.router import codec
from tests.test_client_batching import FakePoller

TOPICS = 1000

# argv: endpoint, topic prefix, count, mode. Payloads are unique (the message's number).
PUBLISHER = textwrap.dedent(
    """
    import os, sys
    from shardmq.client import Client
    from shardmq.client.green import GreenClient

    endpoint, prefix, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    # timeout: the PONG comes once the node has handled the whole burst, which can take seconds on a busy machine.
    topics = [f"{prefix}/{i}" for i in range(TOPICS)]
    if mode == "with":
        with Client([endpoint], timeout=60) as c:
            for i in range(n):
                c.publish(topics[i % TOPICS], b"%d" % i)
    elif mode == "flush_then_os_exit":
        c = Client([endpoint], timeout=60)
        for i in range(n):
            c.publish(topics[i % TOPICS], b"%d" % i)
        c.flush()
        os._exit(0)  # no close(), no interpreter shutdown: only what flush() guaranteed counts
    elif mode == "green_with":
        with GreenClient([endpoint], timeout=60) as c:
            for i in range(n):
                c.publish(topics[i % TOPICS], b"%d" % i)
    elif mode == "green_publish_many_flush_then_os_exit":
        c = GreenClient([endpoint], timeout=60)
        c.publish_many((topics[i % TOPICS], b"%d" % i) for i in range(n))
        c.flush()
        os._exit(0)
    else:
        raise SystemExit(f"unknown mode {mode}")
    """
).replace("TOPICS", str(TOPICS))


def publishes_in(client: Client) -> int:
    return int(client.status()["metrics"].get("publishes.in", 0))


def settled_publishes_in(client: Client, timeout: float = 30.0) -> int:
    """``publishes.in`` once it stopped moving (two readings 0.5 s apart agree): the node has caught up."""
    deadline = time.monotonic() + timeout
    last = publishes_in(client)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = publishes_in(client)
        if now == last:
            return now
        last = now
    return last


def run_publisher(endpoint: str, n: int, mode: str) -> None:
    prefix = f"exit/{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", PUBLISHER, endpoint, prefix, str(n), mode],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, f"publisher failed ({done.returncode}): {done.stderr[-2000:]}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("mode", "n"),
    [
        ("with", 200_000),
        ("flush_then_os_exit", 200_000),
        ("green_with", 50_000),
        ("green_publish_many_flush_then_os_exit", 200_000),
    ],
)
def test_every_publish_reaches_the_node_before_the_process_exits(
    connect: Callable[..., Client], endpoints: list[str], mode: str, n: int
) -> None:
    watcher = connect(0)
    node = watcher.node
    before = settled_publishes_in(watcher)  # an earlier publisher's frames may still be in the node's queue
    run_publisher(endpoints[0], n, mode)
    # The publisher exited after the node's PONG, which the node sent only after handling every frame before the
    # PING: the count is final at once, with no waiting.
    grown = publishes_in(watcher) - before
    if grown != n:  # say how many were really lost, not how many the node had yet to handle
        grown = settled_publishes_in(watcher) - before
        pytest.fail(f"the entry node had not read every publish when the publisher exited: {grown} of {n} in the end")
    assert watcher.node == node, "the watcher failed over; its counts are not the entry node's"


# ---------------------------------------------------------------------------------------------- unit: fake socket


class SilentNode:
    """A DEALER stand-in that answers HELLO, records what is sent, and answers PING only when ``pong`` is set."""

    def __init__(self, pong: bool) -> None:
        self.pong = pong
        self.sent: list[codec.Frame] = []
        self.replies: list[list[bytes]] = []
        self.closed = False

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        frame = codec.decode(parts, max_payload=1 << 62)
        self.sent.append(frame)
        rid = frame.header.get("id")
        if frame.type == codec.HELLO:
            self.replies.append(codec.encode(codec.WELCOME, {"id": rid, "node": "n1"}))
        elif frame.type == codec.PING and self.pong:
            self.replies.extend(self.before_pong())
            self.replies.append(codec.encode(codec.PONG, {"id": rid}))

    def before_pong(self) -> list[list[bytes]]:
        """What the node sends before a PONG: an ERROR for an earlier QoS 0 publish, as on the real pipe."""
        return [codec.error_parts(codec.E_FENCED, "refused a QoS 0 publish")]

    def poll(self, timeout_ms: int) -> int:
        if not self.replies and timeout_ms:
            time.sleep(min(timeout_ms, 5) / 1000)
        return 1 if self.replies else 0

    def recv_multipart(self) -> list[bytes]:
        return self.replies.pop(0)

    def close(self, linger: int | None = None) -> None:
        self.closed = True

    def disable_monitor(self) -> None:
        pass


def fake(pong: bool, node: SilentNode | None = None, timeout: float = 0.3) -> tuple[Client, SilentNode]:
    """A client connected to ``node`` (a ``SilentNode(pong)`` by default), its publishes gathering."""
    node = SilentNode(pong) if node is None else node
    client = Client("tcp://fake", connect=False, timeout=timeout, max_batch=1000, linger=60)
    def open_fake(endpoint: str) -> None:
        client.sock, client._poller = node, FakePoller(node)

    client._open = open_fake  # type: ignore[method-assign]
    client.connect()
    client._core.last_publish = client._core.last_flush = time.monotonic()  # publishes gather (linger=60)
    node.sent.clear()
    return client, node


@pytest.mark.timeout(10)
def test_flush_sends_a_ping_after_the_publishes_and_raises_the_errors_read_before_its_pong() -> None:
    client, node = fake(pong=True)
    client.publish("t/a", b"1")
    client.publish("t/b", b"2")
    with pytest.raises(ShardMQError) as err:
        client.flush()
    assert err.value.code == codec.E_FENCED  # the node's answer to a publish, read on the way to the PONG
    assert [f.type for f in node.sent] == [codec.PUBS, codec.PING]
    assert isinstance(node.sent[1].header["id"], int)
    client.flush()  # nothing published since the last PONG: no round trip
    assert [f.type for f in node.sent] == [codec.PUBS, codec.PING]
    client.close()
    assert [f.type for f in node.sent] == [codec.PUBS, codec.PING, codec.BYE]


@pytest.mark.timeout(10)
def test_flush_without_a_pong_raises_timeout_naming_the_publishes() -> None:
    client, node = fake(pong=False)
    for i in range(3):
        client.publish("t/a", str(i))
    with pytest.raises(ShardMQError) as err:
        client.flush()
    assert err.value.code == codec.E_TIMEOUT
    assert "3 QoS 0 publishes" in err.value.reason and "may be lost" in err.value.reason
    with pytest.raises(ShardMQError) as err:
        client.close()  # a later PONG would have confirmed them; none came, so close says so too
    assert err.value.code == codec.E_TIMEOUT and node.closed


@pytest.mark.timeout(10)
def test_close_without_a_pong_closes_the_socket_and_raises() -> None:
    client, node = fake(pong=False)
    client.publish("t/a", b"x")
    with pytest.raises(ShardMQError) as err:
        client.close()
    assert err.value.code == codec.E_TIMEOUT
    assert node.closed and client.sock is None
    assert [f.type for f in node.sent] == [codec.PUB, codec.PING, codec.BYE]


@pytest.mark.timeout(10)
def test_close_of_a_client_that_published_nothing_sends_no_ping() -> None:
    client, node = fake(pong=False)
    client.close()
    assert [f.type for f in node.sent] == [codec.BYE]
