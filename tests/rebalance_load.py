"""QoS 1 load for the rebalance tests: publisher threads that resend until acked, and subscribers that count.

Each publisher owns its Client (a socket is never shared between threads). A publish that fails (node killed,
owner fenced, timeout) is resent with the same sequence number until it is acknowledged, so the publisher's
acked list is exactly what the cluster promised to deliver.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from shardmq.client import Client, ShardMQError
from shardmq.ring import Assignment, shard_for_key
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster


def current_assignment(lc: LocalCluster) -> Assignment:
    assert lc.state is not None
    document, _ = read_assignment(lc.etcd_client(), lc.state.cluster)
    assert document is not None
    return Assignment.from_json(document)


def topics_with_primary(lc: LocalCluster, node: str, count: int, prefix: str) -> list[str]:
    """Exact topics whose shard's primary owner is ``node`` (so killing it hits them)."""
    a = current_assignment(lc)
    found = []
    i = 0
    while len(found) < count:
        topic = f"{prefix}/{i}"
        if a.primary(shard_for_key(topic, a.shard_count)) == node:
            found.append(topic)
        i += 1
    return found


class Publisher(threading.Thread):
    def __init__(
        self, name: str, endpoints: list[str], topics: list[str], interval: float = 0.002, max_messages: int = 100_000
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.name_ = name
        self.endpoints = endpoints
        self.topics = topics
        self.interval = interval
        self.max_messages = max_messages
        self.acked: list[tuple[str, int]] = []
        self.ack_times: list[float] = []
        self.retries = 0
        self.stop = threading.Event()

    def run(self) -> None:
        client = Client(self.endpoints, client_id=f"pub-{self.name_}", timeout=2.0)
        try:
            for seq in range(self.max_messages):
                if self.stop.is_set():
                    break
                topic = self.topics[seq % len(self.topics)]
                payload = f"{self.name_}:{seq}".encode()
                while not self.stop.is_set():
                    try:
                        client.publish(topic, payload, qos=1)
                        self.acked.append((topic, seq))
                        self.ack_times.append(time.monotonic())
                        break
                    except (ShardMQError, TimeoutError):
                        self.retries += 1
                        time.sleep(0.05)
                time.sleep(self.interval)
        finally:
            client.close()

    def longest_gap_after(self, t0: float) -> float:
        """The longest time without an ack from ``t0`` on: how long publishing was interrupted."""
        times = [t0, *[t for t in self.ack_times if t >= t0]]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class Subscriber(threading.Thread):
    """Receives (and acknowledges) continuously in its own thread, counting copies and order per publisher."""

    def __init__(self, endpoints: list[str], name: str, filters: list[str]) -> None:
        super().__init__(name=f"sub-{name}", daemon=True)
        self.client = Client(endpoints, client_id=f"sub-{name}", timeout=2.0)
        self.client.subscribe_many(filters, qos=1)
        self.received: Counter[tuple[str, str, int]] = Counter()  # (publisher, topic, seq) -> copies
        self.order_violations = 0
        self._last: dict[tuple[str, str], int] = {}
        self.stop = threading.Event()
        self.last_message = time.monotonic()
        self.gaps: list[tuple[float, str]] = []  # (time.monotonic(), code) of errors receive raised

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    msg = self.client.receive(timeout=0.2)
                except ShardMQError as exc:  # a gap the SDK reports (interrupted), or no node could take it yet
                    self.gaps.append((time.monotonic(), exc.code))
                    if exc.code != "interrupted":
                        time.sleep(0.2)
                    continue
                if msg is None:
                    continue
                self.last_message = time.monotonic()
                pub, seq_text = msg.payload.decode().split(":")
                seq = int(seq_text)
                key = (pub, msg.topic, seq)
                self.received[key] += 1
                last = self._last.get((pub, msg.topic), -1)
                if seq < last and not msg.dup and self.received[key] == 1:
                    self.order_violations += 1
                self._last[(pub, msg.topic)] = max(last, seq)
        finally:
            self.client.close()

    def finish(self, quiet: float = 2.0, limit: float = 30.0) -> None:
        """Stop once nothing arrived for ``quiet`` seconds (redeliveries included)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and time.monotonic() - self.last_message < quiet:
            time.sleep(0.1)
        self.stop.set()
        self.join(timeout=5)

    def missing(self, publishers: list[Publisher]) -> list[tuple[str, str, int]]:
        wanted = [(p.name_, topic, seq) for p in publishers for topic, seq in p.acked]
        return [key for key in wanted if key not in self.received]

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)
