"""Backpressure at the entry node: too many publishes waiting for lookups stop it reading client frames.

A real 3-node cluster whose nodes pause at 50 waiting publishes. The primary of about a third of the shards is
stopped with SIGSTOP (for less than its lease TTL, so it stays a member): lookups sent to it wait for their
timeout before they fail over to the replica, so publishes to its topics queue up at the entry node. The node
pauses, counts it, resumes once the lookups have failed over, and every message still arrives once. The
stopped node is started again (SIGCONT) in a finally block; the fixture stops every process by pid.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardmq.client import Client
from shardmq.testing import LocalCluster

LIMIT = 50
TOPICS = 600


@pytest.fixture(scope="module")
def paced_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory: Path = tmp_path_factory.mktemp("backpressure")
    lc = LocalCluster(
        directory, nodes=3, log_level="warning", lease_ttl=6, node_args=["--max-waiting-publishes", str(LIMIT)]
    )
    lc.up(timeout=60)
    yield lc
    lc.down()


@pytest.mark.timeout(120)
def test_publishes_waiting_for_a_stopped_owner_pause_clients_and_all_arrive(paced_cluster: LocalCluster) -> None:
    assert paced_cluster.state is not None
    nodes = paced_cluster.state.nodes
    endpoints = paced_cluster.state.client_endpoints()
    p = uuid.uuid4().hex[:8]
    topics = [f"{p}-{i}" for i in range(TOPICS)]  # one level: each is looked up in exactly one shard
    with Client([endpoints[2]], timeout=10.0) as sub, Client([endpoints[0]], timeout=10.0) as pub:
        sub.subscribe_many(topics, qos=1)
        before = pub.status()["metrics"].get("backpressure.pauses", 0)
        stopped = nodes[1].pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            sent = [(topic, f"{topic}:{k}".encode()) for k in range(2) for topic in topics]
            assert pub.publish_many(sent, qos=1, batch=len(sent)) == len(sent)  # every one acknowledged
        finally:
            os.kill(stopped, signal.SIGCONT)
        status = pub.status()
        assert status["metrics"]["backpressure.pauses"] - before >= 1  # it paused ...
        assert not status["clients_paused"] and status["publishes_waiting"] == 0  # ... and resumed
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 20
        while len(got) < len(sent) and time.monotonic() < deadline:
            msg = sub.receive(timeout=1.0)
            if msg is not None:
                got.append((msg.topic, msg.payload))
        assert sorted(got) == sorted(sent)  # each exactly once
        for topic in topics:  # and in publish order per topic
            assert [m for t, m in got if t == topic] == [m for t, m in sent if t == topic]
