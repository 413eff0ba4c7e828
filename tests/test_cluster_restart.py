"""``LocalCluster.restart`` / ``shardmq cluster restart``: a local cluster's stopped processes start again with
their ids, flags, data and (when free) ports, while the running ones are left alone.

Every test starts its own cluster (it kills parts of it) and the fixture stops exactly the pids recorded for it,
those started by ``restart`` included, then checks that none of them still runs and removes the temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.shard.membership import cluster_prefix, read_assignment, read_members
from shardmq.testing import LocalCluster, Proc, pid_runs

LEASE_TTL = 2
NODES = ["n1", "n2", "n3"]


def status(endpoint: str) -> dict:
    with Client([endpoint], timeout=2.0) as c:
        return c.status()


def recorded(lc: LocalCluster) -> list[Proc]:
    assert lc.state is not None
    return [replace(p) for p in [*([lc.state.etcd] if lc.state.etcd else []), *lc.state.nodes]]


def kill9(proc: Proc) -> None:
    """SIGKILL by the pid the cluster recorded, and wait until it is really gone (the signal is asynchronous)."""
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_runs(proc):  # for our own child this also reaps it
        assert time.monotonic() < deadline, f"{proc.name} (pid {proc.pid}) still runs after SIGKILL"
        time.sleep(0.05)


def wait_until(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (ShardMQError, TimeoutError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} not true after {timeout}s ({last})")


def qos1_roundtrip(sub_endpoint: str, pub_endpoint: str, sub_node: str, pub_node: str) -> None:
    """A QoS 1 publish entering at ``pub_node`` reaches a subscriber connected to ``sub_node``."""
    topic = f"restart/{uuid.uuid4().hex[:8]}/temp"
    with Client([sub_endpoint], timeout=5.0) as sub, Client([pub_endpoint], timeout=5.0) as pub:
        assert (sub.node, pub.node) == (sub_node, pub_node)
        sub.subscribe(topic.rsplit("/", 2)[0] + "/+/temp", qos=1)
        pub.publish(topic, b"after restart", qos=1)  # raises unless every destination acknowledged it
        msg = sub.receive(timeout=5.0)
    assert msg is not None and (msg.topic, msg.payload, msg.qos) == (topic, b"after restart", 1)


@pytest.fixture
def lc() -> Iterator[LocalCluster]:
    directory = Path(tempfile.mkdtemp(prefix="shardmq-restart-"))
    cluster = LocalCluster(directory, nodes=3, lease_ttl=LEASE_TTL, log_level="warning")
    started: list[Proc] = []
    try:
        try:
            cluster.up(timeout=60)
        finally:
            if cluster.state is not None:
                started += recorded(cluster)
        yield cluster
    finally:
        if cluster.state_path.exists():  # the CLI test restarted processes from another process: read its record
            cluster.state = LocalCluster.load(directory).state
            started += recorded(cluster)
        cluster.down()
        leaked = [f"{p.name} (pid {p.pid})" for p in started if pid_runs(p)]
        shutil.rmtree(directory, ignore_errors=True)
        assert not leaked, f"processes still running after down(): {leaked}"


@pytest.mark.timeout(180)
def test_restart_brings_back_a_killed_etcd_with_its_data(lc: LocalCluster) -> None:
    assert lc.state is not None and lc.state.etcd is not None
    url, cluster = lc.state.etcd_url, lc.state.cluster
    nodes_before = {p.name: p.pid for p in lc.state.nodes}
    client = lc.etcd_client()
    config_before = client.get(cluster_prefix(cluster) + "config")
    document_before, revision_before = read_assignment(client, cluster)
    assert config_before and document_before is not None
    version_before = status(lc.state.nodes[0].client_endpoint)["assignment_version"]
    assert version_before >= 1
    # A key no node writes: if it is there after the restart, etcd kept its data directory (a wiped etcd would
    # also get a new config and assignment from the nodes, so those alone would not prove it).
    marker = f"/shardmq-test/{uuid.uuid4().hex}"
    client.put(marker, "kept")

    etcd_before = lc.state.etcd
    kill9(etcd_before)
    messages: list[str] = []
    done = lc.restart(timeout=60, progress=messages.append)

    assert [r.name for r in done] == ["etcd"]
    assert lc.state.etcd is not None and lc.state.etcd.pid != etcd_before.pid and pid_runs(lc.state.etcd)
    assert lc.state.etcd_url == url and done[0].moved == []  # its port was free again
    assert {p.name: p.pid for p in lc.state.nodes} == nodes_before  # running nodes were left alone
    assert all(pid_runs(p) for p in lc.state.nodes)
    assert any(m.startswith("cluster ready") for m in messages), messages
    assert LocalCluster.load(lc.dir).state == lc.state  # what it did is in the state file

    client = lc.etcd_client()
    assert client.get(marker) == [b"kept"]
    assert client.get(cluster_prefix(cluster) + "config") == config_before
    document_after, revision_after = read_assignment(client, cluster)
    assert document_after is not None and revision_after >= revision_before
    assert sorted(read_members(client, cluster)[1]) == NODES
    for proc in lc.state.nodes:
        st = status(proc.client_endpoint)
        assert st["members"] == NODES and not st["fenced"]
        assert st["assignment_version"] >= version_before
    eps = {p.name: p.client_endpoint for p in lc.state.nodes}
    qos1_roundtrip(eps["n1"], eps["n2"], "n1", "n2")
    qos1_roundtrip(eps["n3"], eps["n1"], "n3", "n1")


@pytest.mark.timeout(180)
def test_restart_brings_back_a_killed_node_with_its_id_flags_and_ports(lc: LocalCluster) -> None:
    assert lc.state is not None
    old = replace(lc._node("n3"))
    others = {p.name: p.pid for p in lc.state.nodes if p.name != "n3"}
    survivors = [p.client_endpoint for p in lc.state.nodes if p.name != "n3"]

    kill9(old)
    # Let the survivors see it gone first, so the restarted node is a real rejoin (a new member key and lease).
    wait_until(
        "survivors dropped n3",
        lambda: all(status(ep)["members"] == ["n1", "n2"] for ep in survivors),
        LEASE_TTL + 10,
    )
    messages: list[str] = []
    done = lc.restart(timeout=60, progress=messages.append)

    assert [r.name for r in done] == ["n3"]
    new = lc._node("n3")
    assert new.pid != old.pid and pid_runs(new)
    assert {p.name: p.pid for p in lc.state.nodes if p.name != "n3"} == others
    assert lc.state.etcd is not None
    assert f"etcd: running (pid {lc.state.etcd.pid}), left alone" in messages, messages
    if done[0].moved:  # another process took a port meanwhile (a shared machine): then it must say so
        warnings.warn(f"n3 could not keep every port: {done[0].moved}", stacklevel=1)
    else:
        assert (new.client_endpoint, new.peer_endpoint) == (old.client_endpoint, old.peer_endpoint)
        assert new.metrics_endpoint == old.metrics_endpoint

    # The same node flags as `up` gave it: only the ports and the etcd URL may differ in the command line.
    def flags(cmd: list[str]) -> list[str]:
        skip = {"--client-endpoint", "--peer-endpoint", "--metrics-port", "--etcd"}
        return [a for i, a in enumerate(cmd) if a not in skip and (i == 0 or cmd[i - 1] not in skip)]

    assert flags(new.cmd) == flags(old.cmd)
    assert new.cmd[new.cmd.index("--id") + 1] == "n3"
    assert new.cmd[new.cmd.index("--lease-ttl") + 1] == str(LEASE_TTL)
    assert new.cmd[new.cmd.index("--log-level") + 1] == "warning"
    assert LocalCluster.load(lc.dir).state == lc.state

    assert sorted(read_members(lc.etcd_client(), lc.state.cluster)[1]) == NODES
    st = status(new.client_endpoint)
    assert st["node"] == "n3" and st["members"] == NODES and not st["fenced"]
    eps = {p.name: p.client_endpoint for p in lc.state.nodes}
    qos1_roundtrip(eps["n3"], eps["n1"], "n3", "n1")  # delivered by the restarted node
    qos1_roundtrip(eps["n2"], eps["n3"], "n2", "n3")  # entering through it


@pytest.mark.timeout(180)
def test_cli_restart_prints_what_it_restarted_and_up_points_to_it(lc: LocalCluster) -> None:
    assert lc.state is not None
    shardmq = str(Path(sys.executable).parent / "shardmq")
    old = replace(lc._node("n2"))
    kill9(old)

    # `up` over a cluster that still partly runs refuses, starts nothing, and names the command to use.
    up = subprocess.run([shardmq, "cluster", "up", "--dir", str(lc.dir)], capture_output=True, text=True, timeout=60)
    assert up.returncode != 0
    assert f"shardmq cluster restart --dir {lc.dir}" in up.stderr and "(n2)" in up.stderr, up.stderr
    assert LocalCluster.load(lc.dir).state == lc.state

    # Hold n2's old client port, so that the restart must pick another one and record it.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    old_port = int(old.client_endpoint.rsplit(":", 1)[1])
    try:
        holder.bind(("127.0.0.1", old_port))
        holder.listen(1)
        run = subprocess.run(
            [shardmq, "cluster", "restart", "--dir", str(lc.dir), "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.close()
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "etcd: running" in out and "n1: running" in out and "n3: running" in out
    assert "n2: restarted, pid " in out and f"client port {old_port} was taken" in out
    assert "cluster ready" in out and "restarted: n2" in out

    state = LocalCluster.load(lc.dir).state  # what the CLI recorded
    assert state is not None
    new = next(p for p in state.nodes if p.name == "n2")
    assert new.pid != old.pid and pid_runs(new) and f"pid {new.pid}" in out
    assert new.client_endpoint != old.client_endpoint and new.peer_endpoint in out
    lc.state = state
    st = status(new.client_endpoint)
    assert st["node"] == "n2" and st["members"] == NODES
    qos1_roundtrip(new.client_endpoint, state.nodes[0].client_endpoint, "n2", "n1")

    again = subprocess.run(
        [shardmq, "cluster", "restart", "--dir", str(lc.dir)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to restart" in again.stdout
    assert LocalCluster.load(lc.dir).state == state
