"""The example of README.md's "Testing your application against shardmq", as users would write it.

A real cluster (private etcd + 2 node processes) from ``shardmq.testing`` in pytest's tmp dir, a publish and a
subscribe through the SDK; the fixture stops every process it started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import shardmq.testing
from shardmq.client import Client
from shardmq.testing import LocalCluster


@pytest.fixture
def shardmq_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "shardmq", nodes=2, log_level="warning")
    cluster.up(timeout=30)  # returns once both nodes see each other and own their shards; cleans up if it fails
    try:
        yield cluster
    finally:
        cluster.down()  # stops exactly the pids it started


@pytest.mark.timeout(60)
def test_my_app_gets_what_it_subscribed_to(shardmq_cluster: LocalCluster) -> None:
    assert shardmq_cluster.state is not None
    endpoints = shardmq_cluster.state.client_endpoints()
    creds = shardmq_cluster.admin_credentials  # the operator's; add_credentials(name, publish=..., ...) makes more
    with Client(endpoints, credentials=creds) as subscriber, Client(endpoints[::-1], credentials=creds) as publisher:
        subscriber.subscribe("orders/+/created", qos=1)  # returns once the route is stored
        publisher.publish("orders/42/created", b'{"total": 3}', qos=1)  # returns once the subscriber's node has it
        msg = subscriber.receive(timeout=5.0)
        assert subscriber.node != publisher.node
    assert msg is not None
    assert (msg.topic, msg.payload) == ("orders/42/created", b'{"total": 3}')


def test_the_package_exports_what_it_documents() -> None:
    assert "LocalCluster" in shardmq.testing.__all__
    for name in shardmq.testing.__all__:
        assert hasattr(shardmq.testing, name), name
    assert "LocalCluster" in (shardmq.testing.__doc__ or "")
