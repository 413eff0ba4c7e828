"""Durable across a full restart (item 6) on a real 3-node cluster (R=2) whose nodes keep stores (``--data-dir``,
``--fsync batch``): a persistent session offline with N acknowledged QoS 1 messages queued, and retained
messages; every node killed -9 (by the pids the cluster recorded), then ``restart``ed with its id and data
directory: the client reconnects and gets all N, in order, with ``session_present``; the retained messages are
back.

The test starts its own cluster and stops it by pid at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.testing import LocalCluster
from tests.test_cluster_restart import kill9
from tests.test_retained import drain, endpoints_of

QUEUED = 200
RETAINED = 20
SHARDS = 64


@pytest.fixture
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("durable"), nodes=3, lease_ttl=2, log_level="warning",
                           shard_count=SHARDS, data_dirs=True)  # fmt: skip
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


def wait_restored(lc: LocalCluster, timeout: float) -> None:
    """Every node settled (the assignment is the target: shards are back at their stored owners) and no restored
    session still waits to be announced."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            states = []
            for endpoint in endpoints_of(lc).values():
                with Client([endpoint], timeout=2.0) as c:
                    states.append(c.status())
            last = [(s["node"], s["settled"], s["store"]["sessions_restoring"]) for s in states]
            if all(s["settled"] and not s["store"]["sessions_restoring"] and not s["handoffs_in"] for s in states):
                return
        except (ShardMQError, TimeoutError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"not restored after {timeout}s: {last}")


@pytest.mark.timeout(90)
def test_everything_acknowledged_survives_kill9_of_every_node(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    cid = f"durable-{p}"
    c = Client([eps["n1"]], client_id=cid, clean_session=False, session_expiry=600)
    assert c.node == "n1"
    c.subscribe(f"{p}/q/#", qos=1)
    c.close()  # offline: what follows queues at n1
    queued = [f"m{i}".encode() for i in range(QUEUED)]
    with Client([eps["n3"]]) as pub:
        for data in queued:
            pub.publish(f"{p}/q/t", data, qos=1)  # returns once acknowledged: stored at n1 before the PUBACK
        retained = {f"{p}/r/{i}": f"r{i}".encode() for i in range(RETAINED)}
        for topic, data in retained.items():
            pub.publish(topic, data, qos=1, retain=True)
    for node in ("n1", "n2", "n3"):
        assert (Path(lc.data_dir(node)) / "shardmq.db").exists()

    assert lc.state is not None
    for proc in list(lc.state.nodes):
        kill9(proc)
    restarted = lc.restart(timeout=60)
    assert sorted(r.name for r in restarted) == ["n1", "n2", "n3"]
    wait_restored(lc, timeout=45)

    eps = endpoints_of(lc)
    with Client([eps["n2"], eps["n1"]], client_id=cid, clean_session=False, session_expiry=600) as back:
        assert back.session_present is True
        assert [m.payload for m in drain(back, quiet=1.0)] == queued  # every acknowledged message, in order
        with Client([eps["n3"]]) as client:
            client.subscribe(f"{p}/r/#", qos=1)
            got = {m.topic: m.payload for m in drain(client) if m.retain}
        assert got == retained
        with Client([eps["n1"]]) as pub:
            pub.publish(f"{p}/q/after", b"live", qos=1)
        assert [m.payload for m in drain(back)] == [b"live"]  # its routes were announced again
    with Client([eps["n1"]], client_id=cid):  # a clean connect ends the session
        pass
