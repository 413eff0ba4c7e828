"""Node-to-node security: CURVE on every peer socket, and a ZAP handler that admits only the cluster's members.

Rules of this file:
- Trust comes from the cluster key, a secret the operator holds (``--cluster-key-file``, 32 random bytes in hex;
  ``shardmq cluster up`` makes one in ``DIR/cluster.key``, mode 0600). Every node process makes a fresh CURVE
  keypair at start and registers its public key in etcd with a proof: HMAC-SHA256 under the cluster key of
  (cluster, node id, incarnation, public key). A member whose proof does not verify is not a member: the etcd
  session drops it from every view (``member_rejected``), so someone who can only write to etcd cannot join,
  and a stranger without the key cannot make a proof.
- The peer ROUTER is a CURVE server with ZAP domain ``shardmq-peer`` and ``ZAP_ENFORCE_DOMAIN``: libzmq lets a
  CURVE handshake through when no ZAP handler answers, so the node starts the handler first and refuses to start
  without it. The handler admits a client key only if it is the registered key of a current member, and names
  that member as the connection's User-Id. A peer's DEALER is a CURVE client that knows the server key from the
  member's registration.
- A key the node's view does not show yet is not refused at once: a newcomer (or a restarted member) connects
  as soon as it has registered, and our view may show it up to a second later. libzmq does not reconnect after a
  refused handshake, so refusing then would leave that link dead for good. The handler waits for the view, up to
  ``ADMIT_WAIT_S``, and refuses what never shows up. It answers one request at a time, as pyzmq's handler loop
  does: its ZAP socket is a REP socket, and a reply sent later from another task can leave the next request
  unread (the socket's readiness is edge-triggered), which stalled handshakes for good. So a stranger's
  handshakes delay other new connections by up to ``ADMIT_WAIT_S`` each; established links are not affected,
  and a handshake left waiting past libzmq's handshake interval is retried by libzmq.
- A member's identity is its key, not the routing id it claims: the node reads each peer frame's User-Id and
  drops (and counts, ``security.peer_id_mismatch``) a frame whose routing id is another member's.
- ``--insecure`` turns all of this off, explicitly: the node logs ``insecure`` at warning level at every start.
- The shell owns it; the protocol core never sees keys, and membership views reach it already filtered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from shardmq.protocol.view import MemberInfo

PEER_ZAP_DOMAIN = "shardmq-peer"
CLUSTER_KEY_BYTES = 32
ADMIT_WAIT_S = 3.0  # several view reads (at least one a second, and one on every etcd watch event)


class SecurityConfigError(RuntimeError):
    """A security setting is missing or unreadable: says which flag to fix."""


def load_cluster_key(path: str) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read --cluster-key-file {path}: {exc.strerror}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise SecurityConfigError(f"--cluster-key-file {path} must hold the key in hex") from exc
    if len(key) < CLUSTER_KEY_BYTES:
        raise SecurityConfigError(f"--cluster-key-file {path} holds {len(key)} bytes; it needs {CLUSTER_KEY_BYTES}")
    return key


def write_cluster_key(path: Path) -> None:
    """A new random cluster key, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(CLUSTER_KEY_BYTES) + "\n")


def key_proof(cluster_key: bytes, cluster: str, node_id: str, incarnation: str, curve_key: str) -> str:
    message = "\0".join((cluster, node_id, incarnation, curve_key)).encode()
    return hmac.new(cluster_key, message, hashlib.sha256).hexdigest()


class PeerSecurity:
    """This process's CURVE keypair, the proofs of members' keys, and the ZAP handler of the peer port."""

    def __init__(self, ctx: zmq.Context, cluster_key: bytes, cluster: str) -> None:
        self._cluster_key = cluster_key
        self._cluster = cluster
        public, secret = zmq.curve_keypair()
        self.public_key = public.decode()
        self._secret_key = secret
        self._members_by_key: dict[str, str] = {}  # z85 public key -> node id; replaced whole, read by the ZAP thread
        self.refused_keys = 0  # handshakes from keys of no member (written by the ZAP thread)
        self._lock = threading.Lock()
        self._auth = _MemberAuthenticator(ctx, self)
        self._auth.start()
        self._auth.configure_curve_callback(PEER_ZAP_DOMAIN, credentials_provider=self)
        if not self._auth.is_alive():
            raise SecurityConfigError("the ZAP authenticator did not start: refusing to serve peers without it")

    def proof(self, node_id: str, incarnation: str) -> str:
        return key_proof(self._cluster_key, self._cluster, node_id, incarnation, self.public_key)

    def verified(self, member: MemberInfo) -> bool:
        """The member's registered key carries a proof made with our cluster key."""
        if not member.curve_key or not member.key_proof:
            return False
        expected = key_proof(self._cluster_key, self._cluster, member.node_id, member.incarnation, member.curve_key)
        return hmac.compare_digest(expected, member.key_proof)

    def set_members(self, members: Mapping[str, MemberInfo]) -> None:
        """The keys the peer port admits from now on (the session hands over only verified members)."""
        self._members_by_key = {m.curve_key: node for node, m in members.items() if m.curve_key}

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (the peer ROUTER, before it binds) a CURVE server whose handshakes ZAP must approve."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, PEER_ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def connect_to(self, sock: zmq.Socket, member: MemberInfo) -> None:
        """Make ``sock`` (a DEALER to ``member``, before it connects) a CURVE client that knows the member's key."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, member.curve_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)

    # The ZAP handler's questions (asked on its thread, in its asyncio loop).
    def callback(self, domain: str, key: bytes) -> bool | Awaitable[bool]:
        z85_key = key.decode()
        if domain == PEER_ZAP_DOMAIN and z85_key in self._members_by_key:
            return True
        if domain != PEER_ZAP_DOMAIN:
            return self._refused()
        return self._admitted_once_seen(z85_key)

    async def _admitted_once_seen(self, z85_key: str) -> bool:
        """A key our view may show soon (a member that just registered): wait for it (see the rules)."""
        deadline = time.monotonic() + ADMIT_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if z85_key in self._members_by_key:
                return True
        return self._refused()

    def _refused(self) -> bool:
        with self._lock:
            self.refused_keys += 1
        return False

    def member_of(self, key: bytes) -> str:
        return self._members_by_key.get(key.decode(), "")

    def stop(self) -> None:
        self._auth.stop()


class _MemberAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, naming a connection's User-Id after the member whose key it presented."""

    def __init__(self, ctx: zmq.Context, security: PeerSecurity) -> None:
        super().__init__(ctx)
        self._security = security

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        return self._security.member_of(z85.encode(client_public_key))
