"""The node's etcd session: lease, registration and the member list.

Rules of this file:
- etcd is the only authority on membership. A node is a member while its key
  ``/shardmq/<cluster>/members/<node>`` exists; the key is attached to a lease the session keeps alive, so a node
  that dies (or cannot reach etcd) drops out when its lease expires, without anyone deciding it.
- The session runs in its own thread because every etcd call is a blocking HTTP request; it never touches node
  state. It hands each new member snapshot to the node's event loop over an inproc zmq PUSH socket, so the loop
  stays single-threaded. The loop's own etcd reads and writes (an assignment read, the leader's commits) are
  requests to this thread (``request``), answered on the same socket: the loop never waits for etcd.
- It reads the cluster's keys when something under ``/shardmq/<cluster>/`` changed (an etcd watch stream, read by
  a second thread that only wakes the session) and at least every ``poll_interval`` (1 s) in case the stream is
  down; keep-alives go out every sixth of the lease TTL whatever happens (``KEEPALIVES_PER_TTL``). Reading every
  250 ms instead cost each node ~2 ms of CPU four times a second, which showed as the p99 of publish latency at
  low load.
- A snapshot's ``epoch`` (the membership epoch) is the highest etcd ``create_revision`` among the member keys:
  every node that sees the same member set computes the same epoch, and a join always raises it.
- Cluster settings (shard count, replication) are written once at ``/shardmq/<cluster>/config`` with a
  create-if-absent transaction; the first writer wins and every node reads the stored value.
- Shard ownership lives in one document, ``/shardmq/<cluster>/assignment`` (``shardmq.ring.Assignment``), and
  changes only by compare-and-swap on its mod_revision (``write_assignment``): two writers can never both
  succeed from the same version, so a shard's epoch and owners are decided once.
- ``/shardmq/<cluster>/leader`` names the node that runs the rebalancer. It is created with the creator's
  lease, so it vanishes with that node and the next campaigner takes over.
- A node stops acting as an owner (self-fences) once two thirds of its lease TTL passed without a successful
  keep-alive, i.e. before the lease can expire and etcd can hand its shards to someone else.
- Our own key missing from a read means one of two things, told apart by a keep-alive: the lease expired (the
  process was paused, or cut off from etcd, past the TTL), and the session registers again; or the lease lives
  and an operator deleted the key (``shardmq cluster remove``), and only then does a view without us go to the
  node, which stops. Without that check, a node resumed after a pause read its key gone before its next
  keep-alive found the lease lost, took the view for a removal and exited (seen in the fault schedule).
- Reaching etcd (``EtcdAccess``): a private loopback etcd, or one that spans machines over TLS (``https://``
  with a CA file, and a client certificate where etcd asks for one) with etcd's own users. etcd's JSON gateway,
  which etcd3gw speaks, does not take TLS common names as users: the session authenticates with
  ``/v3/auth/authenticate`` and sends the token on every request, and authenticates again when etcd says a token
  expired (simple tokens last 300 s). A refused user or password, or an etcd that wants a user and got none, is
  an ``EtcdAuthError`` naming the flag to fix, raised at the first request, i.e. at start.
- A process registers under a new ``incarnation``, never as its predecessor: a node id's earlier process (killed
  and restarted by a supervisor, maybe on other ports, maybe before its lease ran out) held routes this one never
  received. Before registering, the session retires it (``retire_previous``): it revokes the lease behind the
  id's member key, which deletes that key (and the leader key, if it held it), then waits until the assignment
  lists the id in no shard, i.e. the leader promoted the survivors. Only then does it register, as a newcomer
  that ordinary hand-offs fill. With no other live member there is nothing to recover, and it registers at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import etcd3gw
import orjson
import requests
import structlog
import zmq
from etcd3gw.utils import _encode

from shardmq.protocol.view import MemberInfo
from shardmq.ring import Assignment

log = structlog.get_logger("shardmq.membership")

# Six keep-alives per TTL rather than etcd's customary three: a node fences itself two thirds of the TTL after its
# last successful keep-alive, so with three an etcd outage of 2 s (TTL 5 s) could fence every node, depending on
# where in the keep-alive period it began; with six, an outage up to half the TTL never does.
KEEPALIVES_PER_TTL = 6


class EtcdAuthError(RuntimeError):
    """etcd refused our credentials, or wants some we do not have: a setting to fix, not a failure to wait out."""


@dataclass(frozen=True, slots=True)
class EtcdAccess:
    """How to reach etcd: its URL (``https://`` for TLS), the CA that signed its certificate, our client
    certificate where it asks for one, and the etcd user we authenticate as (empty: etcd runs without users)."""

    url: str
    user: str = ""
    password: str = field(default="", repr=False)
    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""

    @classmethod
    def from_files(
        cls, url: str, user: str = "", password_file: str = "", ca_cert: str = "", client_cert: str = "",
        client_key: str = "",
    ) -> EtcdAccess:
        """The password is read from a file (mode 0600), never from the command line, where ``ps`` shows it."""
        try:
            password = Path(password_file).read_text().strip() if password_file else ""
        except OSError as exc:
            raise EtcdAuthError(f"cannot read --etcd-password-file {password_file}: {exc.strerror}") from exc
        if user and not password:
            raise EtcdAuthError(f"etcd user {user!r} needs a password: pass --etcd-password-file")
        return cls(url, user, password, ca_cert, client_cert, client_key)


class _TokenSession(requests.Session):
    """A requests session that carries etcd's auth token, authenticating first and again when it expired."""

    def __init__(self, access: EtcdAccess, base_url: str, timeout: float) -> None:
        super().__init__()
        self._access = access
        self._base_url = base_url
        self._timeout = timeout
        self._token_lock = threading.Lock()  # the session thread and the watch thread share it
        if access.client_cert and access.client_key:
            self.cert = (access.client_cert, access.client_key)

    def _send(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if self._access.ca_cert:
            # Per request: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's ``verify``.
            kwargs.setdefault("verify", self._access.ca_cert)
        return super().request(method, url, *args, **kwargs)

    def _authenticate(self) -> None:
        access = self._access
        response = self._send(
            "POST", f"{self._base_url}/v3/auth/authenticate", json={"name": access.user, "password": access.password},
            timeout=self._timeout,
        )  # fmt: skip
        if response.status_code != 200:
            reason = _etcd_error(response)
            raise EtcdAuthError(f"etcd at {access.url} refused user {access.user!r}: {reason}; check --etcd-user and "
                                "--etcd-password-file")  # fmt: skip
        self.headers["Authorization"] = response.json()["token"]

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self._access.user and "Authorization" not in self.headers:
            with self._token_lock:
                if "Authorization" not in self.headers:
                    self._authenticate()
        response = self._send(method, url, *args, **kwargs)
        if response.status_code in (400, 401):
            reason = _etcd_error(response)
            if "user name is empty" in reason:
                raise EtcdAuthError(f"etcd at {self._access.url} has authentication on: pass --etcd-user and "
                                    "--etcd-password-file")  # fmt: skip
            if "invalid auth token" in reason and self._access.user:
                with self._token_lock:
                    self._authenticate()
                response = self._send(method, url, *args, **kwargs)
        return response


def _etcd_error(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]


def etcd_client(access: EtcdAccess | str, timeout: float = 5.0) -> etcd3gw.Etcd3Client:
    """An etcd3gw client for ``access`` (a bare URL: no TLS files, no user)."""
    if isinstance(access, str):
        access = EtcdAccess(access)
    parsed = urlparse(access.url if "://" in access.url else f"http://{access.url}")
    protocol = "https" if parsed.scheme == "https" else "http"
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 2379
    session = _TokenSession(access, f"{protocol}://{host}:{port}", timeout)
    return etcd3gw.client(host=host, port=port, protocol=protocol, timeout=timeout, session=session)


def cluster_prefix(cluster: str) -> str:
    return f"/shardmq/{cluster}/"


def ensure_cluster_config(client: etcd3gw.Etcd3Client, cluster: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Store ``settings`` unless the cluster already has some; return what is stored."""
    key = cluster_prefix(cluster) + "config"
    client.create(key, orjson.dumps(settings))
    stored = client.get(key)
    return orjson.loads(stored[0])


def read_members(client: etcd3gw.Etcd3Client, cluster: str) -> tuple[int, dict[str, MemberInfo]]:
    members: dict[str, MemberInfo] = {}
    epoch = 0
    for value, meta in client.get_prefix(cluster_prefix(cluster) + "members/"):
        revision = int(meta.get("create_revision", 0))
        info = replace(MemberInfo.from_dict(orjson.loads(value)), revision=revision)
        members[info.node_id] = info
        epoch = max(epoch, revision)
    return epoch, members


def read_principals(client: etcd3gw.Etcd3Client, cluster: str) -> list[dict[str, Any]]:
    """Every principal record stored (``shard.security.sign_principal``), unverified; unreadable ones skipped."""
    records = []
    for value, _meta in client.get_prefix(cluster_prefix(cluster) + "principals/"):
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(value)
            if isinstance(record, dict):
                records.append(record)
    return records


def put_principal(client: etcd3gw.Etcd3Client, cluster: str, record: dict[str, Any]) -> None:
    client.put(cluster_prefix(cluster) + f"principals/{record['name']}", orjson.dumps(record))


def delete_principal(client: etcd3gw.Etcd3Client, cluster: str, name: str) -> bool:
    return bool(client.delete(cluster_prefix(cluster) + f"principals/{name}"))


def read_assignment(client: etcd3gw.Etcd3Client, cluster: str) -> tuple[bytes | None, int]:
    """The stored assignment document and its etcd mod_revision (0 when there is none)."""
    found = client.get(cluster_prefix(cluster) + "assignment", metadata=True)
    if not found:
        return None, 0
    value, meta = found[0]
    return bytes(value), int(meta["mod_revision"])


def write_assignment(client: etcd3gw.Etcd3Client, cluster: str, document: bytes, expected_revision: int) -> int | None:
    """Compare-and-swap the assignment: succeeds only if nobody wrote it since ``expected_revision``.

    Returns the document's new revision, or None when another writer got there first.

    ``expected_revision`` 0 means "create it; it must not exist yet". This transaction is the only way an
    ownership change (and so a shard epoch) is ever made.
    """
    key = _encode(cluster_prefix(cluster) + "assignment")
    compare = (
        {"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}
        if expected_revision == 0
        else {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}
    )
    txn = {"compare": [compare], "success": [{"request_put": {"key": key, "value": _encode(document)}}], "failure": []}
    result = client.transaction(txn)
    return int(result["header"]["revision"]) if result.get("succeeded") else None


class EtcdSession(threading.Thread):
    """Keeps this node registered, campaigns for leadership and streams snapshots to ``notify_endpoint``.

    A snapshot is ``{"epoch", "members", "leader", "assignment", "assignment_revision"}``; it is pushed whenever
    any of them changed. ``lease_valid_until`` (monotonic seconds) is how long the last successful keep-alive
    guarantees our lease; the node self-fences before that (see ``fenced``).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        etcd: EtcdAccess | str,
        cluster: str,
        me: MemberInfo,
        notify_endpoint: str,
        lease_ttl: int = 5,
        poll_interval: float = 1.0,
        admit: Callable[[MemberInfo], bool] | None = None,
        admit_principal: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        super().__init__(name="etcd-session", daemon=True)
        self._admit = admit  # which registrations are members (None: every one, an insecure cluster)
        # Which principal records hold (None: principals are not read, an insecure cluster).
        self._admit_principal = admit_principal
        self._rejected: set[tuple[Any, ...]] = set()  # logged refusals: (node, revision), principal records
        self._ctx = ctx
        self._cluster = cluster
        self._me = me
        self._notify_endpoint = notify_endpoint
        self._ttl = lease_ttl
        self._poll = poll_interval
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._lease: Any = None
        self._registered_as: MemberInfo | None = None
        # Every etcd call is bounded well inside the lease, so a stuck call cannot outlive our ownership.
        self.client = etcd_client(etcd, timeout=max(0.5, lease_ttl / 4))
        self.lease_valid_until = 0.0
        self.leaving = False
        self.registrations = 0  # more than one: the lease was lost once, and peers dropped our routes
        self.retiring = True  # until the previous incarnation of our id is out of the assignment (see the rules)
        self._requests: queue.SimpleQueue[tuple[int, str, tuple[Any, ...]]] = queue.SimpleQueue()

    def request(self, token: int, kind: str, *args: Any) -> None:
        """Ask for an etcd read or write from the node's loop: ``read_assignment`` or ``write_assignment``
        (document, expected_revision). The answer comes back on the notify socket as
        ``[b"answer", {"token", "ok", "revision"}, document]``."""
        self._requests.put((token, kind, args))
        self._wake.set()

    def _answer_requests(self, push: zmq.Socket) -> None:
        """Answer what the loop asked, in order; every read waiting is answered by one read of etcd (a burst of
        them, e.g. many refusals at once, must not starve the keep-alives of this thread)."""
        pending: list[tuple[int, str, tuple[Any, ...]]] = []
        while True:
            try:
                pending.append(self._requests.get_nowait())
            except queue.Empty:
                break
        read: tuple[bool, bytes | None, int | None] | None = None
        for token, kind, args in pending:
            document: bytes | None = b""
            revision: int | None = None
            ok = True
            try:
                if kind == "read_assignment":
                    if read is None:
                        try:
                            read = (True, *read_assignment(self.client, self._cluster))
                        except Exception as exc:
                            log.warning("etcd_error", node=self._me.node_id, request=kind, error=str(exc))
                            read = (False, b"", None)
                    ok, document, revision = read
                else:
                    revision = write_assignment(self.client, self._cluster, *args)
                    read = None  # a later read must see this write
            except Exception as exc:
                log.warning("etcd_error", node=self._me.node_id, request=kind, error=str(exc))
                ok = False
            answer = {"token": token, "ok": ok, "revision": revision}
            push.send_multipart([b"answer", orjson.dumps(answer), document or b""])

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def poll_now(self) -> None:
        """Ask for a fresh snapshot without waiting for the next poll interval."""
        self._wake.set()

    def fenced(self, now: float) -> bool:
        """True once two thirds of the lease TTL passed without a successful keep-alive: stop acting as owner
        before the lease can expire, so that no two nodes act for one shard at the same time."""
        return now > self.fenced_from()

    def fenced_from(self) -> float:
        """The time.monotonic() from which ``fenced`` holds unless a keep-alive succeeds before."""
        return self.lease_valid_until - self._ttl / 3

    def _register(self) -> None:
        started = time.monotonic()
        self._lease = self.client.lease(self._ttl)
        try:
            self._put_member()
        except Exception:
            # A lease without our member key would be kept alive for nothing while nobody sees us: start over.
            lease, self._lease = self._lease, None
            with contextlib.suppress(Exception):
                lease.revoke()
            raise
        self.lease_valid_until = started + self._ttl
        self.registrations += 1
        log.info("registered", node=self._me.node_id, lease_ttl=self._ttl, registrations=self.registrations)

    def retire_previous(self) -> None:
        """Take our id's earlier process out of the cluster before we register (see the rules of this file)."""
        node = self._me.node_id
        key = cluster_prefix(self._cluster) + f"members/{node}"
        found = self.client.get(key, metadata=True)
        if found:
            previous = MemberInfo.from_dict(orjson.loads(found[0][0]))
            lease = int(found[0][1].get("lease", 0) or 0)
            if lease:
                etcd3gw.Lease(lease, self.client).revoke()
            else:
                self.client.delete(key)
            log.warning("previous_incarnation_retired", node=node, incarnation=previous.incarnation,
                        peer_endpoint=previous.peer_endpoint)  # fmt: skip
        started = last_log = time.monotonic()
        while not self._stopping.is_set():
            _, members = read_members(self.client, self._cluster)
            document, _ = read_assignment(self.client, self._cluster)
            held = 0
            if document:
                assignment = Assignment.from_json(document)
                held = len(assignment.shards_of(node)) + len(assignment.joining_of(node))
            others = set(members) - {node}
            if not held or not others:
                if held:  # nobody left who could hold the routes: the cluster starts over from what clients send
                    log.warning("no_survivor_to_recover_from", node=node, shards=held)
                break
            now = time.monotonic()
            if now - last_log >= 2.0:
                last_log = now
                log.info("waiting_for_old_incarnation_to_be_replaced", node=node, shards=held,
                         waited_s=round(now - started, 1))  # fmt: skip
            self._stopping.wait(0.2)
        self.retiring = False

    def _admitted(self, members: dict[str, MemberInfo]) -> tuple[int, dict[str, MemberInfo]]:
        """The members whose registration ``admit`` accepts (``shard.security``: a key proven with the cluster
        key), and the membership epoch among them; the others are logged once per registration."""
        assert self._admit is not None
        kept = {n: m for n, m in members.items() if self._admit(m)}
        for node, m in members.items():
            if node not in kept and (node, m.revision) not in self._rejected:
                self._rejected.add((node, m.revision))
                log.warning("member_rejected", node=self._me.node_id, peer=node, revision=m.revision,
                            reason="its key is not proven with this cluster's key")  # fmt: skip
        return max((m.revision for m in kept.values()), default=0), kept

    def _admitted_principals(self) -> list[dict[str, Any]]:
        """The principal records whose proof holds, sorted by name; the others are logged once per content."""
        assert self._admit_principal is not None
        kept = []
        for record in read_principals(self.client, self._cluster):
            if self._admit_principal(record):
                kept.append({k: record[k] for k in ("name", "key", "publish", "subscribe", "admin")})
            elif (seen := ("principal", repr(record.get("name")), str(record.get("proof")))) not in self._rejected:
                self._rejected.add(seen)
                log.warning("principal_rejected", node=self._me.node_id, principal=record.get("name"),
                            reason="its record is not proven with this cluster's key")  # fmt: skip
        return sorted(kept, key=lambda p: str(p["name"]))

    def _put_member(self) -> None:
        me = replace(self._me, leaving=self.leaving, revision=0)
        key = cluster_prefix(self._cluster) + f"members/{me.node_id}"
        self.client.put(key, orjson.dumps(me.to_dict()), self._lease)
        self._registered_as = me

    def _keep_alive(self) -> bool:
        started = time.monotonic()
        if self._lease.refresh() <= 0:
            log.warning("lease_lost", node=self._me.node_id)
            self._lease = None
            self.lease_valid_until = 0.0
            return False
        self.lease_valid_until = started + self._ttl
        return True

    def _leader(self) -> str | None:
        key = cluster_prefix(self._cluster) + "leader"
        found = self.client.get(key)
        if not found and self._lease is not None:
            self.client.create(key, self._me.node_id, self._lease)
            found = self.client.get(key)
        return found[0].decode() if found else None

    def _watch(self) -> None:
        """Wake the session whenever a key under the cluster prefix changes; reconnects while the session runs.

        It ends at the first event after ``stop`` (the session revokes its lease on the way out, which deletes
        its member key: that is such an event), or with the process: it is a daemon thread."""
        prefix = cluster_prefix(self._cluster)
        range_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # every key that starts with the prefix
        request = {"create_request": {"key": _encode(prefix), "range_end": _encode(range_end)}}
        url = self.client.get_url("/watch")
        while not self._stopping.is_set():
            try:
                # The client's session: it carries etcd's TLS files and auth token.
                with self.client.session.post(url, json=request, stream=True, timeout=(2.0, None)) as response:
                    for line in response.iter_lines():
                        if self._stopping.is_set():
                            return
                        if b'"events"' in line:
                            self._wake.set()
            except Exception as exc:  # etcd restarting or unreachable: the periodic read still runs
                log.debug("etcd_watch_broken", node=self._me.node_id, error=str(exc))
            self._stopping.wait(1.0)

    def run(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.connect(self._notify_endpoint)
        last: dict[str, Any] | None = None
        next_refresh = 0.0
        threading.Thread(target=self._watch, name=f"etcd-watch-{self._me.node_id}", daemon=True).start()
        try:
            while not self._stopping.is_set():
                try:
                    now = time.monotonic()
                    if self.retiring:
                        self.retire_previous()
                        continue
                    if self._lease is None:
                        self._register()
                        next_refresh = now + self._ttl / KEEPALIVES_PER_TTL
                    elif now >= next_refresh:
                        if not self._keep_alive():
                            continue
                        next_refresh = now + self._ttl / KEEPALIVES_PER_TTL
                    if self._registered_as is not None and self._registered_as.leaving != self.leaving:
                        self._put_member()
                    self._answer_requests(push)  # after the keep-alive: the lease comes first
                    epoch, members = read_members(self.client, self._cluster)
                    if self._me.node_id not in members and self._lease is not None and not self._keep_alive():
                        # Our key went with our lease (we were paused or cut off past the TTL): register again.
                        # A view without us would tell the node it was removed, and it would stop.
                        continue
                    if self._admit is not None:
                        epoch, members = self._admitted(members)
                    document, revision = read_assignment(self.client, self._cluster)
                    snapshot = {
                        "epoch": epoch,
                        "members": [m.to_dict() for m in members.values()],
                        "leader": self._leader(),
                        "assignment_revision": revision,
                        "registration": self.registrations,
                    }
                    if self._admit_principal is not None:
                        snapshot["principals"] = self._admitted_principals()
                    if snapshot != last:
                        last = snapshot
                        push.send_multipart([b"view", orjson.dumps(snapshot), document or b""])
                except Exception as exc:  # etcd unreachable: keep trying; the lease decides membership
                    log.warning("etcd_error", node=self._me.node_id, error=str(exc))
                    self._stopping.wait(0.2)
                self._wake.wait(max(0.0, min(self._poll, next_refresh - time.monotonic())))
                self._wake.clear()
        finally:
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    self._lease.revoke()
            push.close(linger=0)
