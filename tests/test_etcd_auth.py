"""The private etcd of a LocalCluster runs with authentication on, and nodes reach it with a user and password.

Real parts: the session's cluster (a real etcd and real node processes on 127.0.0.1) and real node processes
started with wrong settings, each bounded by a timeout and reaped by the test.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shardmq.shard.membership import EtcdAccess, EtcdAuthError, cluster_prefix, etcd_client
from shardmq.testing import LocalCluster


def test_anonymous_access_is_refused_with_the_flag_to_set(cluster: LocalCluster) -> None:
    assert cluster.state is not None
    anonymous = etcd_client(cluster.state.etcd_url, timeout=2.0)
    with pytest.raises(EtcdAuthError, match="--etcd-user"):
        anonymous.get(cluster_prefix(cluster.state.cluster) + "config")
    with pytest.raises(EtcdAuthError, match="--etcd-user"):
        anonymous.put("/stranger", "was here")


def test_the_password_is_kept_in_a_file_only_its_owner_reads(cluster: LocalCluster) -> None:
    mode = stat.S_IMODE(os.stat(cluster.etcd_password_path).st_mode)
    assert mode == 0o600
    assert cluster.etcd_client().get(cluster_prefix(cluster.state.cluster) + "config")  # type: ignore[union-attr]


def test_a_wrong_password_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.state is not None
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    client = etcd_client(EtcdAccess.from_files(cluster.state.etcd_url, "root", str(wrong)), timeout=2.0)
    with pytest.raises(EtcdAuthError, match="refused user 'root'.*--etcd-password-file"):
        client.get(cluster_prefix(cluster.state.cluster) + "config")


def test_an_expired_token_is_renewed(cluster: LocalCluster) -> None:
    """etcd's simple tokens expire (300 s by default): a request answered 'invalid auth token' authenticates again
    and is sent once more, so a long-running node keeps its session."""
    assert cluster.state is not None
    client = cluster.etcd_client(timeout=2.0)
    key = cluster_prefix(cluster.state.cluster) + "config"
    assert client.get(key)
    client.session.headers["Authorization"] = "expired.1"
    assert client.get(key)
    assert client.session.headers["Authorization"] != "expired.1"


def _node(cluster: LocalCluster, tmp_path: Path, *etcd_args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.state is not None
    cmd = [
        sys.executable, "-m", "shardmq.cli.main", "node", "--id", "intruder",
        "--client-endpoint", "tcp://127.0.0.1:*", "--peer-endpoint", "tcp://127.0.0.1:*",
        "--etcd", cluster.state.etcd_url, "--cluster", cluster.state.cluster, *etcd_args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.timeout(120)
def test_a_node_with_a_wrong_password_stops_at_start_saying_what_to_fix(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    done = _node(cluster, tmp_path, "--etcd-user", "root", "--etcd-password-file", str(wrong))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "etcd_auth_failed" in out and "check --etcd-user and --etcd-password-file" in out


@pytest.mark.timeout(120)
def test_a_node_without_a_user_stops_at_start_saying_what_to_fix(cluster: LocalCluster, tmp_path: Path) -> None:
    done = _node(cluster, tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "etcd_auth_failed" in out and "has authentication on" in out


@pytest.mark.timeout(120)
def test_a_missing_password_file_stops_the_node_at_start(cluster: LocalCluster, tmp_path: Path) -> None:
    done = _node(cluster, tmp_path, "--etcd-user", "root", "--etcd-password-file", str(tmp_path / "absent"))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "cannot read --etcd-password-file" in out
