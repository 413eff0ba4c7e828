"""Shared subscriptions through kill -9 on a real 3-node cluster of this module's own (it kills a node): a member
connected to the publisher's own node holds unacknowledged QoS 1 messages (it never reads), the node is killed,
and every message the publisher got a PUBACK for reaches the other member (from the backups the entry node kept at
the other member's node: SHARED_COPY, PROTOCOL.md §3.11).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client
from shardmq.testing import LocalCluster
from tests.test_retained import endpoints_of

WAIT = 20.0  # seconds for the surviving member to get everything (n1's lease is 2 s, then a redispatch each)


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("shared-loss"), nodes=3, lease_ttl=2, log_level="warning")
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.mark.timeout(90)
def test_kill_the_node_of_the_publisher_and_a_holding_member_loses_no_acked_message(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    share = f"$share/g/{p}/jobs"
    with Client([eps["n2"]]) as other:
        holder = Client([eps["n1"]])  # never reads: what it is given stays unacknowledged
        holder.subscribe(share, qos=1)
        other.subscribe(share, qos=1)
        publisher = Client([eps["n1"]])
        assert holder.node == publisher.node == "n1"
        sent = [f"m{i}".encode() for i in range(20)]
        for payload in sent:
            publisher.publish(f"{p}/jobs", payload, qos=1)  # returns once PUBACKed
        lc.stop_node("n1", sig=signal.SIGKILL)
        holder._close_socket(linger=0)
        publisher._close_socket(linger=0)
        got: set[bytes] = set()
        deadline = time.monotonic() + WAIT
        while set(sent) - got and (left := deadline - time.monotonic()) > 0:
            msg = other.receive(timeout=min(left, 1.0))
            if msg is not None:
                got.add(msg.payload)
        metrics = other.status()["metrics"]
    assert metrics.get("shared.redispatched_entry_lost", 0) > 0, "n1's member held nothing: the test proves nothing"
    assert sorted(set(sent) - got) == [], "acknowledged, then lost with n1"
