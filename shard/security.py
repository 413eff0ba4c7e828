"""Node security: CURVE on both ports, and a ZAP handler that admits only the cluster's members (peer port) and
principals (client port).

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
  and a handshake left waiting past libzmq's handshake interval is retried by libzmq. A member refused all the
  same makes its link again (``shard.node``: the DEALER's monitor reports the refusal).
- A member's identity is its key, not the routing id it claims: the node reads each peer frame's User-Id and
  drops (and counts, ``security.peer_id_mismatch``) a frame whose routing id is another member's.
- Clients (``CLIENT_ZAP_DOMAIN``): the client ROUTER is a CURVE server too, with one keypair for the whole
  cluster, derived from the cluster key (``client_server_secret``), so one credentials file works with every
  node. A principal is a name, a client CURVE key and an ACL, stored at ``/shardmq/<cluster>/principals/<name>``
  with a proof: HMAC-SHA256 under the cluster key of the whole record (``sign_principal``); the etcd session
  hands over only the records whose proof verifies (``verified_principal``), so writing etcd alone grants
  nothing. The handler admits a client key only if it is a current principal's, and names that principal as
  the connection's User-Id: the shell passes it to the core with every frame, and the core applies its ACL
  (``protocol.access``). Before the node's first read of the principals the handler waits for it (up to
  ``ADMIT_WAIT_S``); after that, an unknown key is refused at once: a client's refusal must not cost the
  other clients' handshakes a wait (they are answered one at a time, see above).
- A credentials file (``client.credentials``) holds a principal's name, its keypair and the cluster's client
  server key; ``shardmq creds add`` makes one (``testing.cluster.LocalCluster.add_credentials``).
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
from typing import Any

import orjson
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from shardmq.protocol.view import MemberInfo
from shardmq.router.acl import Acl

PEER_ZAP_DOMAIN = "shardmq-peer"
CLIENT_ZAP_DOMAIN = "shardmq-client"
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


def client_server_secret(cluster_key: bytes) -> bytes:
    """The secret CURVE key of every node's client port (z85), derived from the cluster key (see the rules)."""
    seed = hmac.new(cluster_key, b"shardmq client port", hashlib.sha256).digest()
    return z85.encode(seed)


def client_server_key(cluster_key: bytes) -> str:
    """The public CURVE key of every node's client port (z85): what a credentials file names as ``server_key``."""
    return zmq.curve_public(client_server_secret(cluster_key)).decode()


def principal_proof(cluster_key: bytes, cluster: str, name: str, curve_key: str, acl: Acl) -> str:
    message = orjson.dumps([cluster, name, curve_key, acl.to_dict()])
    return hmac.new(cluster_key, message, hashlib.sha256).hexdigest()


def sign_principal(cluster_key: bytes, cluster: str, name: str, curve_key: str, acl: Acl) -> dict[str, Any]:
    """A principal's etcd record: its name, client key, ACL and their proof under the cluster key."""
    if not name or "/" in name or not name.isprintable():
        raise ValueError(f"a principal's name must be non-empty and printable, without '/': {name!r}")
    return {"name": name, "key": curve_key, **acl.to_dict(),
            "proof": principal_proof(cluster_key, cluster, name, curve_key, acl)}  # fmt: skip


class NodeSecurity:
    """This process's CURVE keypair, the proofs of members' keys and principals' records, and the ZAP handler
    of both ports."""

    def __init__(self, ctx: zmq.Context, cluster_key: bytes, cluster: str) -> None:
        self._cluster_key = cluster_key
        self._cluster = cluster
        public, secret = zmq.curve_keypair()
        self.public_key = public.decode()
        self._secret_key = secret
        self._members_by_key: dict[str, str] = {}  # z85 public key -> node id; replaced whole, read by the ZAP thread
        self._principals_by_key: dict[str, str] = {}  # z85 client key -> principal; likewise
        self._principals_loaded = False  # the first read of the principals reached us (see the rules)
        self.refused_keys = 0  # handshakes from keys of no member (written by the ZAP thread)
        self.refused_client_keys = 0  # handshakes from keys of no principal (likewise)
        self._lock = threading.Lock()
        self._auth = _MemberAuthenticator(ctx, self)
        self._auth.start()
        for domain in (PEER_ZAP_DOMAIN, CLIENT_ZAP_DOMAIN):
            self._auth.configure_curve_callback(domain, credentials_provider=self)
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

    def verified_principal(self, record: dict[str, Any]) -> bool:
        """A principal's record is well formed and carries a proof made with our cluster key."""
        try:
            name, curve_key, proof = record["name"], record["key"], record["proof"]
            acl = Acl.from_dict(record)
            expected = principal_proof(self._cluster_key, self._cluster, name, curve_key, acl)
            return isinstance(proof, str) and hmac.compare_digest(expected, proof)
        except (KeyError, TypeError, ValueError):
            return False

    def set_members(self, members: Mapping[str, MemberInfo]) -> None:
        """The keys the peer port admits from now on (the session hands over only verified members)."""
        self._members_by_key = {m.curve_key: node for node, m in members.items() if m.curve_key}

    def set_principals(self, principals: list[dict[str, Any]]) -> None:
        """The keys the client port admits from now on (the session hands over only verified principals)."""
        self._principals_by_key = {p["key"]: p["name"] for p in principals}
        self._principals_loaded = True

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (the peer ROUTER, before it binds) a CURVE server whose handshakes ZAP must approve."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, PEER_ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def serve_clients(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (the client ROUTER, before it binds) a CURVE server under the cluster's client key."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client_server_secret(self._cluster_key))
        sock.setsockopt(zmq.ZAP_DOMAIN, CLIENT_ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def connect_to(self, sock: zmq.Socket, member: MemberInfo) -> None:
        """Make ``sock`` (a DEALER to ``member``, before it connects) a CURVE client that knows the member's key."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, member.curve_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)

    # The ZAP handler's questions (asked on its thread, in its asyncio loop).
    def callback(self, domain: str, key: bytes) -> bool | Awaitable[bool]:
        z85_key = key.decode()
        if domain == CLIENT_ZAP_DOMAIN:
            if z85_key in self._principals_by_key:
                return True
            return self._refused_client() if self._principals_loaded else self._client_admitted_once_loaded(z85_key)
        if domain == PEER_ZAP_DOMAIN and z85_key in self._members_by_key:
            return True
        if domain != PEER_ZAP_DOMAIN:
            return self._refused()
        return self._admitted_once_seen(z85_key)

    async def _client_admitted_once_loaded(self, z85_key: str) -> bool:
        """A client key before the node's first read of the principals: wait for that read (see the rules)."""
        deadline = time.monotonic() + ADMIT_WAIT_S
        while not self._principals_loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return z85_key in self._principals_by_key or self._refused_client()

    def _refused_client(self) -> bool:
        with self._lock:
            self.refused_client_keys += 1
        return False

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

    def user_of(self, key: bytes) -> str:
        """The member or principal whose key this is: the connection's User-Id."""
        z85_key = key.decode()
        return self._members_by_key.get(z85_key) or self._principals_by_key.get(z85_key, "")

    def stop(self) -> None:
        self._auth.stop()


class _MemberAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, naming a connection's User-Id after the member or principal whose key it
    presented."""

    def __init__(self, ctx: zmq.Context, security: NodeSecurity) -> None:
        super().__init__(ctx)
        self._security = security

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._security.user_of(z85.encode(client_public_key))
