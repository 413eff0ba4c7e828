"""etcd paused (SIGSTOP) for 2 s under QoS 1 traffic, with the default lease TTL (5 s): the loop of every node
keeps routing, since its etcd reads and writes are requests to the session thread, never calls of its own.

Nothing acknowledged is lost, messages keep arriving while etcd is stopped (the largest gap between two
deliveries is printed; the test bounds it at 1 s, far above the ~10 ms pace, since this machine's timing is
noisy), and a subscription made during the pause is confirmed: route changes need the owners, not etcd. Every
process started here is stopped by pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client
from shardmq.testing import LocalCluster, pid_runs
from tests.test_acked_delivery import Publisher, endpoints_from, lost

PAUSE_S = 2.0


@pytest.fixture
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("etcdpause"), nodes=3, log_level="warning")
    cluster.up(timeout=60)
    yield cluster
    cluster.down()
    assert cluster.state is not None
    assert not any(pid_runs(p) for p in cluster.state.nodes)


class Receiver(threading.Thread):
    """Receives until stopped, recording each payload's arrival time."""

    def __init__(self, endpoints: list[str], filters: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=2.0)
        for f in filters:
            self.client.subscribe(f, qos=1)
        self.got: dict[bytes, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.client.receive(timeout=0.2)
                if msg is not None:
                    self.got[msg.payload] = time.monotonic()
        finally:
            self.client.close()


@pytest.mark.timeout(120)
def test_etcd_paused_two_seconds_loses_nothing_and_subscriptions_succeed(lc: LocalCluster) -> None:
    assert lc.state is not None and lc.state.etcd is not None
    p = uuid.uuid4().hex[:6]
    topics = [f"{p}/{i}" for i in range(8)]
    sub = Receiver(endpoints_from(lc, "n2"), topics)
    pub = Publisher(endpoints_from(lc, "n1"), topics, pace=0.01)
    sub.start()
    pub.start()
    time.sleep(1.5)
    paused_at = time.monotonic()
    os.kill(lc.state.etcd.pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        with Client(endpoints_from(lc, "n3"), timeout=3.0) as late, Client(endpoints_from(lc, "n1")) as c:
            late.subscribe(f"{p}/during-pause", qos=1)  # confirmed by the owners while etcd is stopped
            c.publish(f"{p}/during-pause", b"x", qos=1)
            msg = late.receive(timeout=2.0)
            assert msg is not None and msg.payload == b"x"
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
    finally:
        os.kill(lc.state.etcd.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    time.sleep(1.5)
    pub.stop.set()
    pub.join(30)
    deadline = time.monotonic() + 10
    while lost(pub, sub) and time.monotonic() < deadline:  # type: ignore[arg-type]
        time.sleep(0.2)
    sub.stop.set()
    sub.join(10)
    missing = [m for m in pub.acked if m not in sub.got]
    assert missing == [], f"{len(missing)} of {len(pub.acked)} acknowledged messages never arrived"
    during = sorted(t for t in sub.got.values() if paused_at - 0.5 <= t <= resumed_at + 0.5)
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    largest = max(gaps, default=float("inf"))
    acked_during = sum(1 for t in pub.acked.values() if paused_at <= t <= resumed_at)
    print(f"\netcd stopped {resumed_at - paused_at:.2f}s: {acked_during} publishes acknowledged meanwhile, "
          f"largest delivery gap {largest * 1000:.0f} ms, failed publishes {pub.failed}")  # fmt: skip
    assert acked_during > 50, "publishes stopped being acknowledged while etcd was paused"
    assert largest < 1.0, f"deliveries stalled for {largest:.2f}s while etcd was paused"
