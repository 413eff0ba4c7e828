"""The private etcd of a LocalCluster runs with authentication on, and nodes reach it with a user and password.

Real parts: the session's cluster (a real etcd and real node processes on 127.0.0.1) and real node processes
started with wrong settings, each bounded by a timeout and reaped by the test.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
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
        "--insecure",  # these nodes never get past etcd: their peer security is beside the point
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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=shardmq-test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip


@pytest.fixture
def tls_etcd(tmp_path: Path):
    """A real etcd on 127.0.0.1 that speaks only TLS and wants a client certificate signed by our CA."""
    from shardmq.testing.cluster import etcd_binary, free_port

    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make the test's certificates")
    _make_certs(tmp_path)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    cmd = [
        etcd_binary(), "--name", "tls", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server-key.pem"),
        "--client-cert-auth", "--trusted-ca-file", str(tmp_path / "ca.pem"), "--log-level", "warn",
    ]  # fmt: skip
    with open(tmp_path / "etcd.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        access = EtcdAccess(url, ca_cert=str(tmp_path / "ca.pem"), client_cert=str(tmp_path / "client.pem"),
                            client_key=str(tmp_path / "client-key.pem"))  # fmt: skip
        client = etcd_client(access, timeout=2.0)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.status()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield access
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_tls_with_a_client_certificate(tls_etcd: EtcdAccess) -> None:
    client = etcd_client(tls_etcd, timeout=2.0)
    client.put("/shardmq/tls/key", "value")
    assert client.get("/shardmq/tls/key") == [b"value"]
    no_client_cert = etcd_client(EtcdAccess(tls_etcd.url, ca_cert=tls_etcd.ca_cert), timeout=2.0)
    with pytest.raises(Exception):  # noqa: B017 - the TLS handshake fails; requests names it several ways
        no_client_cert.get("/shardmq/tls/key")
    unverified = etcd_client(EtcdAccess(tls_etcd.url), timeout=2.0)  # no CA: the server's certificate is unknown
    with pytest.raises(Exception):  # noqa: B017
        unverified.get("/shardmq/tls/key")
