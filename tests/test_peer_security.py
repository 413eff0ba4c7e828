"""Peer security on a real cluster (``shard.security``): CURVE on every peer link, admitted by key, members by proof.

A dedicated cluster (the tests register fake members in its etcd), real node processes and real zmq sockets on
127.0.0.1. Every raw socket is closed with linger 0 by the test that made it; the cluster is stopped by pid.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from shardmq.client import Client
from shardmq.loadtest.tcp_proxy import TcpProxy
from shardmq.protocol.view import MemberInfo
from shardmq.router import codec
from shardmq.shard.membership import cluster_prefix, read_members
from shardmq.shard.security import key_proof, load_cluster_key
from shardmq.testing import LocalCluster
from shardmq.testing.cluster import free_port


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    lc = LocalCluster(tmp_path_factory.mktemp("secure"), nodes=2, log_level="warning")
    lc.up(timeout=90)
    try:
        yield lc
    finally:
        lc.down()


@pytest.fixture
def insecure(tmp_path: Path) -> Iterator[LocalCluster]:
    lc = LocalCluster(tmp_path / "insecure", nodes=2, log_level="warning", insecure=True)
    lc.up(timeout=90)
    try:
        yield lc
    finally:
        lc.down()


def status(endpoint: str) -> dict[str, Any]:
    with Client([endpoint], timeout=5.0) as c:
        return c.status()


def metric(endpoint: str, key: str) -> int:
    return int(status(endpoint)["metrics"].get(key, 0))


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def members(lc: LocalCluster) -> dict[str, MemberInfo]:
    assert lc.state is not None
    return read_members(lc.etcd_client(), lc.state.cluster)[1]


def handshake_succeeds(sock: zmq.Socket, endpoint: str, timeout: float = 2.0) -> bool:
    """Connect ``sock`` and watch its monitor: did any handshake succeed within ``timeout``?"""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        return bool(monitor.poll(int(timeout * 1000)))
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


@pytest.mark.timeout(60)
def test_cluster_runs_curve_between_peers(secure: LocalCluster) -> None:
    assert secure.state is not None
    assert all(status(n.client_endpoint)["peer_security"] == "curve" for n in secure.state.nodes)
    assert all(m.curve_key and m.key_proof for m in members(secure).values())


@pytest.mark.timeout(60)
def test_a_plain_socket_claiming_a_member_id_cannot_even_connect(secure: LocalCluster) -> None:
    """No CURVE: the handshake fails, so a forged route delete never reaches the node."""
    assert secure.state is not None
    n1 = secure.state.nodes[0]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"n2")
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert not handshake_succeeds(sock, n1.peer_endpoint)
        before = status(n1.client_endpoint)
        forged = f"forged-{uuid.uuid4().hex[:8]}/#"
        with contextlib.suppress(zmq.Again):  # with no handshake zmq may hold no pipe to queue it on
            sock.send_multipart(codec.encode(codec.ROUTE_ADD, {"id": 1, "node": "n2", "routes": [[-1, 0, forged]]}),
                                zmq.NOBLOCK)  # fmt: skip
        time.sleep(1.0)
        after = status(n1.client_endpoint)
        assert after["root_set_size"] == before["root_set_size"]  # the forged root-set route never arrived
        errors = {k: v for k, v in after["metrics"].items() if k.startswith("errors.")}
        assert errors == {k: v for k, v in before["metrics"].items() if k.startswith("errors.")}
    finally:
        sock.close(linger=0)


@pytest.mark.timeout(60)
def test_an_unknown_key_is_refused_and_counted(secure: LocalCluster) -> None:
    assert secure.state is not None
    n1 = secure.state.nodes[0]
    server_key = members(secure)["n1"].curve_key.encode()
    public, secret = zmq.curve_keypair()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"n2")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    before = metric(n1.client_endpoint, "security.peer_keys_refused")
    try:
        assert not handshake_succeeds(sock, n1.peer_endpoint)
        assert wait_for(lambda: metric(n1.client_endpoint, "security.peer_keys_refused") > before)
    finally:
        sock.close(linger=0)


def _register(lc: LocalCluster, node_id: str, curve_key: str, proof: str) -> str:
    assert lc.state is not None
    info = MemberInfo(node_id, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", incarnation="x", curve_key=curve_key,
                      key_proof=proof)  # fmt: skip
    key = cluster_prefix(lc.state.cluster) + f"members/{node_id}"
    lc.etcd_client().put(key, orjson.dumps(info.to_dict()))
    return key


@pytest.mark.timeout(60)
def test_a_member_written_to_etcd_without_the_cluster_key_is_no_member(secure: LocalCluster) -> None:
    """Someone who can write to etcd (but holds no cluster key) registers a member: no node counts it."""
    assert secure.state is not None
    public, _ = zmq.curve_keypair()
    key = _register(secure, "forged", public.decode(), "00" * 32)
    try:
        time.sleep(2.5)  # a few session reads
        for n in secure.state.nodes:
            assert "forged" not in status(n.client_endpoint)["members"]
    finally:
        secure.etcd_client().delete(key)


@pytest.mark.timeout(120)
def test_a_wiretap_between_peers_sees_no_topic_or_payload(secure: LocalCluster) -> None:
    """A third node's peer port is reached only through a recording proxy: a QoS 1 message from n1's client to a
    subscriber on n3 crosses it, and neither its topic nor its payload is in the recorded bytes."""
    recorded, topic, payload = wiretap(secure)
    assert topic not in recorded and payload not in recorded
    # Plaintext frames would show as ZMTP frames (flags, size, body) of a frame type, and every header carries
    # '"v":'. A bare 3-byte b"FWD" also turns up by chance in a few hundred KB of ciphertext (about once per
    # 16 MB), which made this test fail once in a full run: look for what a plaintext frame really contains.
    assert b"\x01\tROUTE_ADD" not in recorded and b"\x01\x03FWD" not in recorded and b"\x01\x04FWDS" not in recorded
    assert b'"v":' not in recorded


# After the wiretap on purpose: the leader starts moving shards to the registered "spy", and once the spy is
# gone those moves wait out the hand-off timeout (30 s) before the cluster settles again. The wiretap waits for
# a settled cluster of three, so placed after this test it waited those 30 s; nothing after this test does.
@pytest.mark.timeout(90)
def test_a_member_may_speak_only_as_itself(secure: LocalCluster) -> None:
    """A process with a member's key (registered with a valid proof) claims another member's routing id: the
    node drops its frames and counts them (``security.peer_id_mismatch``)."""
    assert secure.state is not None
    n1 = secure.state.nodes[0]
    public, secret = zmq.curve_keypair()
    proof = key_proof(load_cluster_key(str(secure.cluster_key_path)), secure.state.cluster, "spy", "x",
                      public.decode())  # fmt: skip
    key = _register(secure, "spy", public.decode(), proof)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        assert wait_for(lambda: "spy" in status(n1.client_endpoint)["members"])
        sock.setsockopt(zmq.ROUTING_ID, b"n2")  # not its own id
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.CURVE_SERVERKEY, members(secure)["n1"].curve_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        before = metric(n1.client_endpoint, "security.peer_id_mismatch")
        assert handshake_succeeds(sock, n1.peer_endpoint)  # its key is a member's
        sock.send_multipart(codec.encode(codec.ROUTE_DEL, {"id": 1, "node": "n2", "routes": [[-1, 0, "#"]]}))
        assert wait_for(lambda: metric(n1.client_endpoint, "security.peer_id_mismatch") > before)
    finally:
        sock.close(linger=0)
        secure.etcd_client().delete(key)
        wait_for(lambda: "spy" not in status(n1.client_endpoint)["members"], timeout=15)


@pytest.mark.timeout(150)
def test_the_same_wiretap_reads_an_insecure_cluster(insecure: LocalCluster) -> None:
    """The control: with --insecure the recorder reads the topic and payload, so the proxy is on the path."""
    recorded, topic, payload = wiretap(insecure)
    assert topic in recorded and payload in recorded
    # What the secure test looks for is what plaintext frames really contain.
    assert b'"v":' in recorded and (b"\x01\x03FWD" in recorded or b"\x01\x04FWDS" in recorded)


def wiretap(lc: LocalCluster) -> tuple[bytes, bytes, bytes]:
    """(bytes recorded on the way to n3's peer port, the topic, the payload) of one message to n3."""
    secure = lc
    assert secure.state is not None
    peer_port = free_port()
    proxy = TcpProxy(peer_port, record=True)
    secret_topic = f"wiretap/{uuid.uuid4().hex}"
    payload = f"payload-{uuid.uuid4().hex}".encode()
    try:
        n3 = secure.start_node(
            "n3", peer_endpoint=f"tcp://127.0.0.1:{peer_port}",
            extra_args=["--advertise-peer-endpoint", f"tcp://127.0.0.1:{proxy.port}"],
        )  # fmt: skip
        secure.wait_ready(3, timeout=60)
        creds = lc.admin_credentials
        with (
            Client([n3.client_endpoint], credentials=creds) as sub,
            Client([secure.state.nodes[0].client_endpoint], credentials=creds) as pub,
        ):
            sub.subscribe(secret_topic, qos=1)
            pub.publish(secret_topic, payload, qos=1)
            got = sub.receive(timeout=10.0)
        assert got is not None and got.payload == payload
        recorded = bytes(proxy.recorded or b"")
        assert len(recorded) > 1000  # the message and the hand-offs to n3 went through the proxy
        return recorded, secret_topic.encode(), payload
    finally:
        secure.stop_node("n3")
        proxy.close()
        Path(secure.dir / "run" / "n3.json").unlink(missing_ok=True)


class _RefuseAll:
    def callback(self, domain: str, key: bytes) -> bool:
        return False


@pytest.mark.timeout(90)
def test_a_link_whose_handshake_is_refused_is_made_again(tmp_path: Path) -> None:
    """A member whose peer port refuses our key (here: a registered member that refuses everyone; in life, a
    peer whose view did not show us within its wait) would leave our DEALER dead for good, since libzmq does not
    retry a refused handshake. The node sees the refusal on the socket's monitor, counts it and makes the link
    again for its next frame, so each new frame to that peer gets a new handshake."""
    from zmq.auth.thread import ThreadAuthenticator

    lc = LocalCluster(tmp_path / "refused", nodes=1, log_level="warning")
    lc.up(timeout=60)
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("refuse", credentials_provider=_RefuseAll())
    router = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    router.curve_server = True
    router.curve_secretkey = secret
    router.zap_domain = b"refuse"
    router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    key = ""
    try:
        assert lc.state is not None
        n1 = lc.state.nodes[0]
        proof = key_proof(load_cluster_key(str(lc.cluster_key_path)), lc.state.cluster, "fake", "x", public.decode())
        info = MemberInfo("fake", "tcp://127.0.0.1:9", f"tcp://127.0.0.1:{port}", incarnation="x",
                          curve_key=public.decode(), key_proof=proof)  # fmt: skip
        key = cluster_prefix(lc.state.cluster) + "members/fake"
        lc.etcd_client().put(key, orjson.dumps(info.to_dict()))  # the leader starts handing shards to it
        assert wait_for(lambda: metric(n1.client_endpoint, "security.peer_handshake_refused") >= 2, timeout=45)
        with Client([n1.client_endpoint], timeout=5.0) as c:  # and the node serves its clients meanwhile
            c.subscribe("refused/t", qos=1)
            c.publish("refused/t", b"x", qos=1)
            assert c.receive(timeout=5.0) is not None
    finally:
        if key:
            lc.etcd_client().delete(key)
        lc.down()
        router.close(linger=0)
        auth.stop()
        ctx.term()
