"""Shared fixtures: real local clusters (a private etcd plus shard node processes on 127.0.0.1).

Every cluster a test starts is stopped by the fixture that started it, by pid, and its temp dir removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from shardmq.client import Client
from shardmq.testing import LocalCluster

_names = itertools.count(1)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-node cluster with R=2 shared by the routing tests (each test uses its own topics)."""
    directory = tmp_path_factory.mktemp("cluster")
    lc = LocalCluster(directory, nodes=3, log_level="warning", node_args=["--client-idle-check", "1"])
    lc.up(timeout=60)
    yield lc
    lc.down()


@pytest.fixture
def endpoints(cluster: LocalCluster) -> list[str]:
    assert cluster.state is not None
    return cluster.state.client_endpoints()


@pytest.fixture
def connect(endpoints: list[str]) -> Iterator:
    """connect(node_index) -> a Client whose first endpoint is that node; all closed after the test."""
    made: list[Client] = []

    def make(index: int = 0, **kwargs) -> Client:
        ordered = endpoints[index:] + endpoints[:index]
        client = Client(ordered, client_id=f"t{next(_names)}-{index}", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
