"""Acknowledged means delivered: ordinary faults of a running cluster, checked by Kafka's rule.

Each test starts its own cluster (lease TTL 2 s, 3 nodes, R=2) and QoS 1 publishers with unique payloads, injects
one fault, and checks that every message whose publish returned (was acknowledged) reached the subscriber, except
those acknowledged while the subscriber's SDK reported its subscription interrupted (``ShardMQError("interrupted")``
from ``receive``: somebody knows). Faults: kill -9 and an immediate restart under the same id, on the same
endpoints and on new ones; SIGSTOP of the subscriber's node past its lease; its node cut from etcd; a subscriber
that stops reading while QoS 1 messages pile up (flow control). Every process started here is stopped by pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.router import codec
from shardmq.testing import LocalCluster, pid_runs
from tests.rebalance_load import topics_with_primary
from tests.tcp_proxy import TcpProxy

LEASE_TTL = 2


@pytest.fixture
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        tmp_path_factory.mktemp("acked"), nodes=3, lease_ttl=LEASE_TTL, log_level="warning",
        node_args=["--max-inflight", "100", "--max-queued", "2000"],
    )  # fmt: skip
    cluster.up(timeout=60)
    yield cluster
    cluster.down()
    assert cluster.state is not None
    assert not any(pid_runs(p) for p in cluster.state.nodes)


def node(lc: LocalCluster, name: str):  # noqa: ANN201 - a Proc
    assert lc.state is not None
    return next(p for p in lc.state.nodes if p.name == name)


def endpoints_from(lc: LocalCluster, first: str) -> list[str]:
    """Client endpoints with ``first``'s first (the others are the failover list)."""
    assert lc.state is not None
    return [node(lc, first).client_endpoint, *(p.client_endpoint for p in lc.state.nodes if p.name != first)]


class Publisher(threading.Thread):
    """QoS 1 publishes of unique payloads, round robin over ``topics``; records what was acknowledged, when."""

    def __init__(self, endpoints: list[str], topics: list[str], pace: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.topics, self.pace = endpoints, topics, pace
        self.acked: dict[bytes, float] = {}  # payload -> time.monotonic() of its acknowledgement
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.endpoints, timeout=2.0) as c:
            i = 0
            while not self.stop.is_set() and i < 100_000:
                payload = f"{uuid.uuid4().hex}-{i}".encode()
                try:
                    c.publish(self.topics[i % len(self.topics)], payload, qos=1)
                    self.acked[payload] = time.monotonic()
                except ShardMQError:
                    self.failed += 1
                i += 1
                time.sleep(self.pace)


class Subscriber(threading.Thread):
    """Receives until stopped; records payloads and the interruptions the SDK reports."""

    def __init__(self, endpoints: list[str], filters: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = Client(endpoints, timeout=2.0)
        for f in filters:
            self.client.subscribe(f, qos=1)
        self.got: set[bytes] = set()
        self.count = 0
        self.interrupted_at: list[float] = []
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.paused = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    msg = self.client.receive(timeout=0.2)
                except ShardMQError as exc:
                    # interrupted: the SDK reports a gap; fenced/unavailable: no node could take the subscriptions
                    # just then (the next call tries again), a gap the application sees too.
                    self.errors.append((time.monotonic(), str(exc)))
                    assert exc.code in (codec.E_INTERRUPTED, codec.E_FENCED, codec.E_UNAVAILABLE), exc
                    self.interrupted_at.append(time.monotonic())
                    if exc.code != codec.E_INTERRUPTED:
                        time.sleep(0.2)
                    continue
                if msg is not None:
                    self.got.add(msg.payload)
                    self.count += 1
        finally:
            self.client.close()


def start_pair(lc: LocalCluster, pub_node: str, sub_node: str) -> tuple[Publisher, Subscriber]:
    """A subscriber to 8 fresh topics on ``sub_node`` and a publisher to them on ``pub_node``, 1.5 s under way."""
    p = uuid.uuid4().hex[:6]
    topics = [f"{p}/{i}" for i in range(8)]
    sub = Subscriber(endpoints_from(lc, sub_node), topics)
    pub = Publisher(endpoints_from(lc, pub_node), topics)
    sub.start()
    pub.start()
    time.sleep(1.5)
    return pub, sub


def finish(pub: Publisher, sub: Subscriber, quiet: float = 3.0) -> None:
    pub.stop.set()
    pub.join(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until nothing new arrived for ``quiet`` seconds
        before = sub.count
        time.sleep(quiet)
        if sub.count == before:
            break
    sub.stop.set()
    sub.join(10)


def lost(pub: Publisher, sub: Subscriber) -> list[bytes]:
    return [p for p in pub.acked if p not in sub.got]


def wait_members(lc: LocalCluster, name: str, count: int, timeout: float = 40.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client([node(lc, name).client_endpoint], timeout=1.0) as c:
                status = c.status()
            if len(status["members"]) == count and status["settled"] and status["shards"] > 0:
                return status
        except (ShardMQError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"{name} did not rejoin with {count} members"
        time.sleep(0.2)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("same_endpoints", [True, False], ids=["same-endpoints", "new-endpoints"])
def test_restart_under_the_same_id_loses_no_acknowledged_message(lc: LocalCluster, same_endpoints: bool) -> None:
    """kill -9 of n3 and an immediate restart under the same id (what a supervisor does): n3 must not answer
    lookups for its shards from an empty table, and peers must reach it at its new endpoints."""
    p = uuid.uuid4().hex[:6]
    topics = topics_with_primary(lc, "n3", 8, p)
    sub = Subscriber(endpoints_from(lc, "n2"), topics)
    pub = Publisher(endpoints_from(lc, "n1"), topics)
    sub.start()
    pub.start()
    time.sleep(1.5)
    n3 = node(lc, "n3")
    with Client([n3.client_endpoint], timeout=2.0) as c:
        old_incarnation = c.status()["incarnation"]
    lc.stop_node("n3", sig=signal.SIGKILL)
    args = ["--client-endpoint", n3.client_endpoint, "--peer-endpoint", n3.peer_endpoint] if same_endpoints else []
    restarted = lc.start_node("n3", extra_args=args)
    assert (restarted.client_endpoint == n3.client_endpoint) is same_endpoints
    assert wait_members(lc, "n3", 3)["incarnation"] != old_incarnation
    time.sleep(2.0)  # publishes after the rejoin too
    # A fresh subscriber on the restarted node gets what is published to it (its routes reach the owners).
    with Client([restarted.client_endpoint], timeout=3.0) as fresh, Client(endpoints_from(lc, "n1")) as c:
        fresh.subscribe(f"{p}/fresh", qos=1)
        for i in range(20):
            c.publish(f"{p}/fresh", str(i).encode(), qos=1)
        got = [m.payload for m in iter(lambda: fresh.receive(timeout=2.0), None)]
    assert sorted(got, key=int) == [str(i).encode() for i in range(20)]
    finish(pub, sub)
    assert len(pub.acked) > 200
    assert lost(pub, sub) == [], f"{len(lost(pub, sub))} of {len(pub.acked)} acknowledged messages never arrived"
    assert sub.interrupted_at == []  # the subscriber's own node never lost its session


@pytest.mark.timeout(150)
def test_subscriber_node_stopped_past_its_lease_reports_the_gap(lc: LocalCluster) -> None:
    """SIGSTOP of the subscriber's node for longer than its lease: peers drop its routes, so messages acknowledged
    meanwhile cannot reach the subscriber; the subscriber must learn it (``interrupted``), fail over, subscribe
    again, and miss nothing acknowledged before the stop or after it subscribed again."""
    pub, sub = start_pair(lc, "n1", "n2")
    n2 = node(lc, "n2")
    stopped_at = time.monotonic()
    os.kill(n2.pid, signal.SIGSTOP)
    try:
        time.sleep(LEASE_TTL * 2.5)
    finally:
        os.kill(n2.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while not sub.interrupted_at and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sub.interrupted_at, "the subscriber was not told its subscription had a gap"
    resumed_at = sub.interrupted_at[0]
    deadline = time.monotonic() + 30  # until 50 more were acknowledged after it (a loaded machine publishes slower)
    while sum(t > resumed_at + 1.0 for t in list(pub.acked.values())) <= 50 and time.monotonic() < deadline:
        time.sleep(0.2)
    finish(pub, sub)
    assert sub.client.interruptions >= 1
    missing = lost(pub, sub)
    unexplained = [m for m in missing if not stopped_at <= pub.acked[m] <= resumed_at + 1.0]
    assert unexplained == [], f"{len(unexplained)} acknowledged outside the reported gap never arrived"
    after = [m for m, t in pub.acked.items() if t > resumed_at + 1.0]
    assert len(after) > 50 and all(m in sub.got for m in after)


@pytest.mark.timeout(150)
def test_node_cut_from_etcd_ends_its_sessions_and_clients_move(lc: LocalCluster) -> None:
    """A node whose process and clients stay up but whose etcd is unreachable: its clients are told at once
    (SESSION_END) and fail over; a publish is acknowledged only if it reached the live subscription."""
    assert lc.state is not None
    etcd_port = int(lc.state.etcd_url.rsplit(":", 1)[1])
    proxy = TcpProxy(etcd_port)
    try:
        lc.start_node("n4", etcd_url=f"http://127.0.0.1:{proxy.port}")
        wait_members(lc, "n4", 4)
        pub, sub = start_pair(lc, "n1", "n4")
        cut_at = time.monotonic()
        proxy.cut()
        deadline = time.monotonic() + 20
        while not sub.interrupted_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.interrupted_at, "the subscriber of a node cut from etcd was not told"
        told_after = sub.interrupted_at[0] - cut_at
        assert told_after < LEASE_TTL, f"told {told_after:.1f} s after the cut: after its lease could expire"
        time.sleep(LEASE_TTL * 2)
        proxy.heal()
        time.sleep(2.0)
        finish(pub, sub)
        assert sub.client.failovers >= 1  # it moved to a node that could keep its routes
        missing = lost(pub, sub)
        # Told before the lease could expire, it subscribed elsewhere before the others dropped n4's routes.
        gap_end = sub.interrupted_at[-1] + 1.0  # the last report: failed resubscriptions extend the gap
        unexplained = [m for m in missing if not cut_at <= pub.acked[m] <= gap_end]
        rel = sorted(round(pub.acked[m] - cut_at, 2) for m in unexplained)
        assert unexplained == [], f"{len(unexplained)} acknowledged outside the gap never arrived (s after cut: {rel})"
    finally:
        proxy.close()


@pytest.mark.timeout(150)
def test_stalled_qos1_subscriber_bounds_memory_and_publisher_waits(lc: LocalCluster) -> None:
    """A subscriber that stops reading while QoS 1 messages keep coming: its node keeps at most max_inflight +
    max_queued (100 + 2000 here) for it and refuses the rest (``overloaded``, retried by the SDK until its
    timeout), so nothing acknowledged is dropped; when it reads again everything acknowledged arrives."""
    p = uuid.uuid4().hex[:6]
    sub = Subscriber(endpoints_from(lc, "n2"), [f"{p}/#"])
    sub.start()
    sub.paused.set()
    acked: list[bytes] = []
    refused = 0
    with Client(endpoints_from(lc, "n1"), timeout=1.0) as c:
        for batch in range(8):  # 8 x 1,000: far more than the subscriber's node may keep for it
            messages = [(f"{p}/{i % 10}", f"{batch}-{i}-{uuid.uuid4().hex}".encode()) for i in range(1000)]
            try:
                c.publish_many(messages, qos=1, batch=250)
                acked.extend(m for _, m in messages)
            except ShardMQError as exc:
                assert exc.code == codec.E_OVERLOADED, exc
                refused += 1
    with Client([node(lc, "n2").client_endpoint], timeout=2.0) as c:
        status = c.status()
    assert status["qos1_inflight"] + status["qos1_backlog"] <= 100 + 2000
    assert status["clients_busiest"] and status["clients_busiest"][0]["backlog"] > 0
    assert status["metrics"].get("qos1.refused_overloaded", 0) > 0
    assert refused > 0  # the publisher felt the pressure
    sub.paused.clear()
    deadline = time.monotonic() + 30
    while not set(acked) <= sub.got and time.monotonic() < deadline:
        time.sleep(0.2)
    sub.stop.set()
    sub.join(10)
    missing = [m for m in acked if m not in sub.got]
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged messages never arrived"
    assert sub.interrupted_at == []


@pytest.mark.timeout(120)
def test_connection_remade_by_zmq_resumes_the_session(lc: LocalCluster) -> None:
    """The subscriber's TCP connection breaks and zmq re-makes it (here a relay cuts it for half a second): the
    SDK notices (socket monitor), says HELLO again, the node still has the session and resends everything
    unacknowledged, so nothing is lost and there is no gap to report."""
    n2 = node(lc, "n2")
    proxy = TcpProxy(int(n2.client_endpoint.rsplit(":", 1)[1]))
    try:
        p = uuid.uuid4().hex[:6]
        topics = [f"{p}/{i}" for i in range(4)]
        sub = Subscriber([f"tcp://127.0.0.1:{proxy.port}"], topics)
        pub = Publisher(endpoints_from(lc, "n1"), topics)
        with Client([n2.client_endpoint]) as c:
            redelivered_before = c.status()["metrics"].get("deliveries.redelivered", 0)
        sub.start()
        pub.start()
        for _ in range(3):
            time.sleep(1.0)
            proxy.cut()
            time.sleep(0.5)
            proxy.heal()
        time.sleep(2.0)
        finish(pub, sub)
        with Client([n2.client_endpoint]) as c:
            redelivered = c.status()["metrics"].get("deliveries.redelivered", 0) - redelivered_before
        assert lost(pub, sub) == [], f"{len(lost(pub, sub))} of {len(pub.acked)} acknowledged messages never arrived"
        assert sub.interrupted_at == [] and sub.client.interruptions == 0
        assert sub.client.failovers == 0
        assert redelivered > 0  # what was written to a broken connection came again on the new one
    finally:
        proxy.close()
