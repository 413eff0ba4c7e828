"""Client security on a real cluster (``shard.security``, ``protocol.access``): CURVE on the client port,
principals admitted by key, ACLs per principal, credentials files.

A dedicated 2-node cluster (the tests add and revoke principals in its etcd), real node processes and real zmq
sockets on 127.0.0.1. Every client and raw socket is closed by the test that made it; the clusters are stopped by
pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from shardmq.client import Client, ShardMQError
from shardmq.client.aio import AsyncClient
from shardmq.client.credentials import CREDENTIALS_ENV, Credentials, CredentialsError
from shardmq.loadtest.tcp_proxy import TcpProxy
from shardmq.router import codec
from shardmq.testing import LocalCluster
from shardmq.testing.cluster import make_cluster_keys


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    lc = LocalCluster(tmp_path_factory.mktemp("client-secure"), nodes=2, log_level="warning")
    lc.up(timeout=90)
    try:
        yield lc
    finally:
        lc.down()


def endpoints(lc: LocalCluster) -> list[str]:
    assert lc.state is not None
    return lc.state.client_endpoints()


def metrics(lc: LocalCluster, node: int = 0) -> dict[str, Any]:
    with Client([endpoints(lc)[node]], timeout=5.0, credentials=lc.admin_credentials) as c:
        return dict(c.status()["metrics"])


def unique(prefix: str = "sec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def refused_at_once(make: Any) -> ShardMQError:
    """``make()`` must raise not_authorized well within the SDK's timeout (it watches the handshake)."""
    started = time.monotonic()
    with pytest.raises(ShardMQError) as info:
        make()
    assert info.value.code == codec.E_NOT_AUTHORIZED, info.value
    assert time.monotonic() - started < 1.5  # the clients below wait up to 5 s for an answer
    return info.value


# ------------------------------------------------------------------------------ strangers


@pytest.mark.timeout(60)
def test_a_client_without_credentials_is_refused_at_once(secure: LocalCluster) -> None:
    error = refused_at_once(lambda: Client(endpoints(secure), timeout=5.0, credentials=False))
    assert "requires credentials" in error.reason
    assert metrics(secure).get("security.client_keys_refused", 0) == 0  # no key at all: a mechanism mismatch


@pytest.mark.timeout(60)
def test_another_clusters_credentials_are_refused_at_once(secure: LocalCluster, tmp_path: Path) -> None:
    make_cluster_keys(tmp_path)  # a cluster key of its own: another server key, and a key no principal has
    refused_at_once(lambda: Client(endpoints(secure), timeout=5.0, credentials=tmp_path / "admin.creds"))


@pytest.mark.timeout(60)
def test_an_unknown_key_with_the_right_server_key_is_refused_and_counted(secure: LocalCluster) -> None:
    admin = Credentials.load(secure.admin_credentials)  # type: ignore[arg-type]
    public, secret = zmq.curve_keypair()
    stranger = Credentials("admin", public.decode(), secret.decode(), admin.server_key)  # claims a name, not a key
    before = metrics(secure).get("security.client_keys_refused", 0)
    refused_at_once(lambda: Client([endpoints(secure)[0]], timeout=5.0, credentials=stranger))
    assert metrics(secure)["security.client_keys_refused"] > before


@pytest.mark.timeout(60)
def test_a_raw_socket_without_curve_gets_no_answer(secure: LocalCluster) -> None:
    """A plain DEALER's HELLO and SUB to ``#`` never reach the node: no handshake, so no reply and no route."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoints(secure)[0])
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(codec.encode(codec.HELLO, {"id": 1, "client": "spy"}), zmq.NOBLOCK)
            sock.send_multipart(codec.encode(codec.SUB, {"id": 2, "filters": ["#"], "qos": 0}), zmq.NOBLOCK)
        assert not monitor.poll(1500)
        assert not sock.poll(500)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


@pytest.mark.timeout(60)
def test_no_credentials_in_the_environment_means_none(secure: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    refused_at_once(lambda: Client(endpoints(secure), timeout=5.0))


@pytest.mark.timeout(60)
def test_the_environment_names_the_credentials(secure: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    path = secure.add_credentials(unique("env"), subscribe=["env/#"])
    monkeypatch.setenv(CREDENTIALS_ENV, str(path))
    with Client(endpoints(secure), timeout=5.0) as c:
        c.subscribe("env/x")


@pytest.mark.timeout(60)
def test_a_credentials_file_others_may_read_is_refused(secure: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "open.creds"
    path.write_bytes(Path(secure.admin_credentials).read_bytes())  # type: ignore[arg-type]
    os.chmod(path, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        Client(endpoints(secure), credentials=path)


@pytest.mark.timeout(60)
def test_the_asyncio_client_is_refused_at_once_too(secure: LocalCluster) -> None:
    import asyncio

    async def connect() -> None:
        async with AsyncClient(endpoints(secure), timeout=5.0, credentials=False) as c:
            await c.status()

    refused_at_once(lambda: asyncio.run(connect()))


# ------------------------------------------------------------------------------ ACLs


@pytest.mark.timeout(90)
@pytest.mark.parametrize("qos", [0, 1])
def test_subscribe_acl_allows_within_and_refuses_outside(secure: LocalCluster, qos: int) -> None:
    room = unique("room")
    path = secure.add_credentials(unique("reader"), subscribe=[f"{room}/sensors/#"])
    before = metrics(secure).get("errors.not_authorized", 0)
    with Client(endpoints(secure), timeout=5.0, credentials=path) as c:
        c.subscribe(f"{room}/sensors/+/temp", qos=qos)  # covered by sensors/#
        for outside in (f"{room}/#", "#", f"{room}/other"):
            with pytest.raises(ShardMQError) as info:
                c.subscribe(outside, qos=qos)
            assert info.value.code == codec.E_NOT_AUTHORIZED
            assert outside not in c.subscriptions
        with Client(endpoints(secure), timeout=5.0, credentials=secure.admin_credentials) as admin:
            admin.publish(f"{room}/other", b"not for the reader", qos=1)
            admin.publish(f"{room}/sensors/k/temp", b"for the reader", qos=1)
        got = c.receive(timeout=5.0)
        assert got is not None and got.payload == b"for the reader"
        assert c.receive(timeout=0.5) is None
    assert metrics(secure)["errors.not_authorized"] - before >= 3


@pytest.mark.timeout(90)
def test_publish_acl_refuses_qos1_at_once_and_qos0_as_an_asynchronous_error(secure: LocalCluster) -> None:
    room = unique("room")
    path = secure.add_credentials(unique("writer"), publish=[f"{room}/allowed/#"])
    with Client(endpoints(secure), timeout=5.0, credentials=secure.admin_credentials) as watcher:
        watcher.subscribe(f"{room}/#", qos=1)
        with Client(endpoints(secure), timeout=5.0, credentials=path) as c:
            c.publish(f"{room}/allowed/a", b"ok-1", qos=1)
            with pytest.raises(ShardMQError) as info:
                c.publish(f"{room}/forbidden", b"no-1", qos=1)
            assert info.value.code == codec.E_NOT_AUTHORIZED
            c.publish(f"{room}/forbidden", b"no-0", qos=0)
            c.publish(f"{room}/allowed/b", b"ok-0", qos=0)
            with pytest.raises(ShardMQError) as info:
                c.flush()  # the node's error for the QoS 0 publish arrives before its confirmation
            assert info.value.code == codec.E_NOT_AUTHORIZED
            with pytest.raises(ShardMQError):  # a subscription is refused too: the writer may not read
                c.subscribe(f"{room}/allowed/a")
        received = set()
        while (m := watcher.receive(timeout=2.0)) is not None:
            received.add(m.payload)
        assert received == {b"ok-1", b"ok-0"}


@pytest.mark.timeout(90)
def test_a_batch_with_refused_topics_delivers_the_allowed_ones(secure: LocalCluster) -> None:
    """PUBS: the refused items are answered one by one; the others of the same frame go on."""
    room = unique("room")
    path = secure.add_credentials(unique("batch"), publish=[f"{room}/ok/+"])
    with Client(endpoints(secure), timeout=5.0, credentials=secure.admin_credentials) as watcher:
        watcher.subscribe(f"{room}/#", qos=1)
        with Client(endpoints(secure), timeout=5.0, credentials=path) as c:
            messages = [(f"{room}/ok/{i}" if i % 2 else f"{room}/no/{i}", f"m{i}".encode()) for i in range(20)]
            with pytest.raises(ShardMQError) as info:
                c.publish_many(messages, qos=1)
            assert info.value.code == codec.E_NOT_AUTHORIZED
        got = set()
        while (m := watcher.receive(timeout=2.0)) is not None:
            got.add(m.topic)
        assert got == {f"{room}/ok/{i}" for i in range(1, 20, 2)}


@pytest.mark.timeout(60)
def test_only_an_admin_may_make_a_node_leave_or_read_detailed_status(secure: LocalCluster) -> None:
    path = secure.add_credentials(unique("user"), publish=["x"], subscribe=["x"])
    with Client([endpoints(secure)[0]], timeout=5.0, credentials=path) as c:
        assert c.status()["node"]  # plain status: any principal
        for call in (lambda: c.status(detail=True), c.leave):
            with pytest.raises(ShardMQError) as info:
                call()
            assert info.value.code == codec.E_NOT_AUTHORIZED
    with Client([endpoints(secure)[0]], timeout=5.0, credentials=secure.admin_credentials) as admin:
        assert "routes_per_shard" in admin.status(detail=True)
        assert len(admin.status()["members"]) == 2  # the refused LEAVE left the node in the cluster


@pytest.mark.timeout(90)
def test_revoking_a_principal_ends_its_sessions_and_refuses_it(secure: LocalCluster) -> None:
    name = unique("gone")
    room = unique("room")
    path = secure.add_credentials(name, subscribe=[f"{room}/#"])
    c = Client(endpoints(secure), timeout=3.0, credentials=path)
    try:
        c.subscribe(f"{room}/t", qos=1)
        assert secure.revoke_credentials(name)
        with pytest.raises(ShardMQError) as info:  # SESSION_END, then the failover's handshakes are refused
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                c.receive(timeout=0.5)
        assert info.value.code in (codec.E_NOT_AUTHORIZED, codec.E_INTERRUPTED)
        if info.value.code == codec.E_INTERRUPTED:
            with pytest.raises(ShardMQError) as info:
                c.receive(timeout=3.0)
            assert info.value.code == codec.E_NOT_AUTHORIZED
    finally:
        with contextlib.suppress(ShardMQError):
            c.close()
    refused_at_once(lambda: Client(endpoints(secure), timeout=5.0, credentials=path))


@pytest.mark.timeout(90)
def test_another_principal_taking_a_routing_id_gets_nothing_of_its_session(secure: LocalCluster) -> None:
    """zmq lets a new connection take a routing id over (ROUTER_HANDOVER): a principal that reuses another's
    client id starts a session of its own, and the victim's QoS 1 messages are not handed to it."""
    room = unique("room")
    victim = secure.add_credentials(unique("victim"), subscribe=[f"{room}/#"])
    thief = secure.add_credentials(unique("thief"), subscribe=[f"{room}/public"])
    client_id = unique("id")
    node = [endpoints(secure)[0]]
    v = Client(node, client_id=client_id, timeout=3.0, credentials=victim)
    try:
        v.subscribe(f"{room}/secret", qos=1)
        with Client(node, timeout=5.0, credentials=secure.admin_credentials) as admin:
            admin.publish(f"{room}/secret", b"for the victim only", qos=1)
        before = metrics(secure).get("security.session_taken_by_other_principal", 0)
        with Client(node, client_id=client_id, timeout=3.0, credentials=thief) as t:
            assert t.receive(timeout=1.5) is None
        assert metrics(secure)["security.session_taken_by_other_principal"] > before
    finally:
        with contextlib.suppress(ShardMQError):
            v.close()


# ------------------------------------------------------------------------------ on the wire


@pytest.fixture
def insecure(tmp_path: Path) -> Iterator[LocalCluster]:
    lc = LocalCluster(tmp_path / "insecure", nodes=1, log_level="warning", insecure=True)
    lc.up(timeout=90)
    try:
        yield lc
    finally:
        lc.down()


def client_wiretap(lc: LocalCluster) -> tuple[bytes, bytes, bytes]:
    """(bytes a recording proxy saw between a publisher and its node, the topic, the payload)."""
    assert lc.state is not None
    node = lc.state.nodes[0].client_endpoint
    proxy = TcpProxy(int(node.rsplit(":", 1)[1]), record=True)
    topic, payload = f"wiretap/{uuid.uuid4().hex}", f"payload-{uuid.uuid4().hex}".encode()
    try:
        creds = lc.admin_credentials
        proxied = f"tcp://127.0.0.1:{proxy.port}"
        with Client([node], credentials=creds) as sub, Client([proxied], credentials=creds) as pub:
            sub.subscribe(topic, qos=1)
            pub.publish(topic, payload, qos=1)
            pub.publish(topic, payload, qos=0)
            pub.flush()
            got = sub.receive(timeout=5.0)
        assert got is not None and got.payload == payload
        recorded = bytes(proxy.recorded or b"")
        assert len(recorded) > 200
        return recorded, topic.encode(), payload
    finally:
        proxy.close()


@pytest.mark.timeout(90)
def test_a_wiretap_between_a_client_and_its_node_sees_no_topic_or_payload(secure: LocalCluster) -> None:
    recorded, topic, payload = client_wiretap(secure)
    assert topic not in recorded and payload not in recorded
    assert b'"qos"' not in recorded and b'"id"' not in recorded  # no header (CURVE has its HELLO, WELCOME)


@pytest.mark.timeout(120)
def test_the_same_client_wiretap_reads_an_insecure_cluster(insecure: LocalCluster) -> None:
    recorded, topic, payload = client_wiretap(insecure)
    assert topic in recorded and payload in recorded


# ------------------------------------------------------------------------------ the command line


def shardmq(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardmq.cli.main", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.timeout(120)
def test_creds_add_writes_a_private_file_whose_acl_the_cluster_enforces(secure: LocalCluster) -> None:
    name = unique("cli")
    done = shardmq("creds", "add", name, "--dir", str(secure.dir), "--publish", "cli/#", "--subscribe", "cli/+")
    assert done.returncode == 0, done.stderr
    path = secure.dir / f"{name}.creds"
    assert path.stat().st_mode & 0o077 == 0
    allowed = shardmq("pub", "cli/x", "hello", "--qos", "1", "--dir", str(secure.dir), "--credentials", str(path))
    assert allowed.returncode == 0, allowed.stderr
    refused = shardmq("pub", "other/x", "hello", "--qos", "1", "--dir", str(secure.dir), "--credentials", str(path))
    assert refused.returncode != 0 and "not_authorized" in refused.stderr
    assert shardmq("creds", "revoke", name, "--dir", str(secure.dir)).returncode == 0
    gone = shardmq("pub", "cli/x", "hello", "--qos", "1", "--dir", str(secure.dir), "--credentials", str(path))
    assert gone.returncode != 0 and "not_authorized" in gone.stderr


@pytest.mark.timeout(120)
def test_creds_add_works_for_a_cluster_of_ones_own_given_its_etcd_and_key(secure: LocalCluster, tmp_path: Path) -> None:
    """A deployment not made by `cluster up`: the operator names etcd (user, password file), the cluster and the
    cluster key file, as the nodes take them."""
    from shardmq.testing.cluster import ETCD_USER

    assert secure.state is not None
    name, out = unique("own"), tmp_path / "own.creds"
    done = shardmq("creds", "add", name, "--etcd", secure.state.etcd_url, "--cluster", secure.state.cluster,
                   "--cluster-key-file", str(secure.cluster_key_path), "--etcd-user", ETCD_USER,
                   "--etcd-password-file", str(secure.etcd_password_path), "--subscribe", "own/#", "--out", str(out))
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while True:  # the nodes see the new record within milliseconds (the etcd watch)
        try:
            with Client(endpoints(secure), timeout=5.0, credentials=out) as c:
                c.subscribe("own/x")
            break
        except ShardMQError as exc:
            if exc.code != codec.E_NOT_AUTHORIZED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
