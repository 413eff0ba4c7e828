"""Shared fixtures: real local clusters (a private etcd plus shard node processes on 127.0.0.1).

Every cluster a test starts is stopped by the fixture that started it, by pid, and its temp dir removed.

The clusters are secure (CURVE on both ports, ACLs): one cluster key and one operator's credentials serve the
whole session (``SHARDMQ_CLUSTER_KEYS``, which ``LocalCluster.up`` reads), and ``SHARDMQ_CREDENTIALS`` names those
credentials, so a ``Client`` a test makes, or a tool it starts, authenticates as the operator without saying so.
Tests of security itself pass other credentials explicitly.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardmq.client import Client
from shardmq.client.credentials import CREDENTIALS_ENV
from shardmq.testing import LocalCluster
from shardmq.testing.cluster import CLUSTER_KEYS_ENV, make_cluster_keys

_names = itertools.count(1)
_keys_dir: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _keys_dir
    _keys_dir = Path(tempfile.mkdtemp(prefix="shardmq-test-keys-"))
    make_cluster_keys(_keys_dir)
    os.environ[CLUSTER_KEYS_ENV] = str(_keys_dir)
    os.environ[CREDENTIALS_ENV] = str(_keys_dir / "admin.creds")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _keys_dir is not None:
        shutil.rmtree(_keys_dir, ignore_errors=True)


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
