"""Locust load test of a local shardmq cluster holding many routes, with charts (a script, not a test).

1. Start a private etcd + ``--nodes`` nodes on 127.0.0.1 (``LocalCluster``; temp dir unless ``--dir``).
2. Preload ``--routes`` exact routes ``devices/{i:08d}/telemetry`` through the SDK's bulk subscribe, split over
   ``--loaders`` subscriber clients spread over the nodes (progress line and load rate). These clients stay
   connected (their routes live as long as they do) and drain what is delivered to them during the run.
3. Run locust headless as a subprocess on ``loadtest/locustfile.py`` for ``--duration`` seconds, while a plain
   thread samples every node's ``status()`` (routes, clients, metric counters) every ``--sample-interval`` s.
   Locust runs in its own process because importing locust monkey-patches the importer with gevent; the
   runner's preload and sampler threads stay real threads.
4. ALWAYS stop the cluster (try/finally), then write charts and print a summary.

Results (one folder, ``--results``, default ``results/<timestamp>``): ``locust_stats.csv``,
``locust_stats_history.csv``, ``locust_failures.csv``, ``locust_exceptions.csv``, ``report.html``,
``locust.log``, ``node_metrics.csv``, ``throughput.png``, ``latency.png``, ``node_rates.png``, ``node_routes.png``,
``summary.json``, ``summary.txt``, ``run.json``, ``cluster-logs/``.

Usage: ``python -m shardmq.loadtest.run_loadtest [--routes 100000] [--duration 30] [--users 20] [--nodes 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq

from shardmq.client import Client, ShardMQError
from shardmq.testing import LocalCluster

from . import report
from .workload import device_topic

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SDK_ERRORS = (ShardMQError, TimeoutError, zmq.ZMQError)


class LoadAborted(Exception):
    """Raised from the bulk-subscribe progress callback to stop a preload (stop asked, or out of time)."""


class RouteHolder(threading.Thread):
    """Subscribes one slice of the exact routes with one blocking Client, keeps them alive (clean session: they
    live while the client is connected) and drains what the run delivers to them until ``stop`` is set."""

    def __init__(
        self, index: int, endpoints: list[str], lo: int, hi: int, qos: int, chunk: int, stop: threading.Event,
        load_deadline: float, hard_deadline: float,
    ) -> None:  # fmt: skip
        super().__init__(name=f"route-holder-{index}", daemon=True)
        start = index % len(endpoints)
        self.endpoints = endpoints[start:] + endpoints[:start]  # holder i lives on node i mod N
        self.lo, self.hi, self.qos, self.chunk = lo, hi, qos, chunk
        self.stop, self.load_deadline, self.hard_deadline = stop, load_deadline, hard_deadline
        self.loaded = threading.Event()
        self.done = 0
        self.error: BaseException | None = None
        self.node: str | None = None
        self.delivered = 0
        self.receive_errors = 0

    def _progress(self, done: int) -> None:
        self.done = done
        if self.stop.is_set() or time.monotonic() > self.load_deadline:
            raise LoadAborted(f"preload stopped after {done:,} routes")

    def run(self) -> None:
        client: Client | None = None
        try:
            client = Client(self.endpoints, timeout=60.0)
            self.node = client.node
            topics = (device_topic(i) for i in range(self.lo, self.hi))
            client.subscribe_many(topics, qos=self.qos, chunk=self.chunk, progress=self._progress)
        except Exception as exc:  # reported by preload(): LoadAborted, SDK errors, anything unexpected
            self.error = exc
        finally:
            self.loaded.set()
        try:
            while client is not None and self.error is None and not self.stop.is_set():
                if time.monotonic() > self.hard_deadline:
                    break
                try:
                    if client.receive(timeout=0.2) is not None:
                        self.delivered += 1
                except SDK_ERRORS:
                    self.receive_errors += 1
                    self.stop.wait(0.2)
        finally:
            if client is not None:
                with contextlib.suppress(*SDK_ERRORS):
                    client.close()


def preload(endpoints: list[str], routes: int, loaders: int, qos: int, chunk: int, timeout: float,
            stop: threading.Event, hard_deadline: float) -> list[RouteHolder]:  # fmt: skip
    """Start the route holders and wait (bounded) until every slice is subscribed; prints progress."""
    loaders = max(1, min(loaders, routes)) if routes else 0
    deadline = time.monotonic() + timeout
    holders = [
        RouteHolder(i, endpoints, routes * i // loaders, routes * (i + 1) // loaders, qos, chunk, stop, deadline,
                    hard_deadline)
        for i in range(loaders)
    ]  # fmt: skip
    print(f"preloading {routes:,} exact routes (qos {qos}) from {loaders} subscriber clients ...", flush=True)
    started = last = time.perf_counter()
    for h in holders:
        h.start()
    while not all(h.loaded.wait(0.5) for h in holders):
        now = time.perf_counter()
        if now - last >= 2.0:
            last = now
            done = sum(h.done for h in holders)
            print(f"  loaded {done:>12,} / {routes:,} routes  ({done / (now - started):>9,.0f} routes/s)", flush=True)
        if time.monotonic() > deadline + 120:  # a frame in flight when the preload timed out: give up waiting
            break
    took = time.perf_counter() - started
    done = sum(h.done for h in holders)
    errors = [h.error for h in holders if h.error is not None]
    if errors or done < routes:
        raise RuntimeError(f"preload failed after {done:,} of {routes:,} routes: {errors[0] if errors else 'timeout'}")
    print(
        f"  {routes:,} routes in {took:.1f} s  ({routes / max(took, 1e-9):,.0f} routes/s); holders on nodes "
        f"{sorted({h.node or '?' for h in holders})}",
        flush=True,
    )
    return holders


class NodeSampler(threading.Thread):
    """Every ``interval`` s: ``status()`` of every node (one blocking Client per node, single endpoint, so a
    sample is always from the node it names)."""

    def __init__(self, nodes: list[tuple[str, str]], interval: float, stop: threading.Event,
                 hard_deadline: float) -> None:  # fmt: skip
        super().__init__(name="node-sampler", daemon=True)
        self.nodes, self.interval, self.stop, self.hard_deadline = nodes, interval, stop, hard_deadline
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self.lock = threading.Lock()

    def sample_once(self, clients: dict[str, Client]) -> None:
        for name, endpoint in self.nodes:
            try:
                if name not in clients:
                    clients[name] = Client([endpoint], timeout=2.0)
                status = clients[name].status()
            except SDK_ERRORS:
                self.errors += 1
                with contextlib.suppress(*SDK_ERRORS):
                    clients.pop(name).close()
                continue
            sample = {
                "t": time.time(),
                "node": name,
                "routes": status.get("routes", 0),
                "clients": status.get("clients", 0),
                "root_set_size": status.get("root_set_size", 0),
                # Wire bytes per channel ("bytes_in.client", "bytes_out.peer.n2", ...) join the counters to chart.
                "metrics": {
                    **status.get("metrics", {}),
                    **status.get("wire_bytes", {}),
                    **{f"route_cache.{k}": status.get("route_cache", {}).get(k, 0) for k in ("hits", "misses")},
                },
            }
            with self.lock:
                self.samples.append(sample)

    def run(self) -> None:
        clients: dict[str, Client] = {}
        next_at = time.monotonic()
        try:
            while not self.stop.is_set() and time.monotonic() < self.hard_deadline:
                self.sample_once(clients)
                next_at += self.interval
                self.stop.wait(max(0.0, next_at - time.monotonic()))
            self.sample_once(clients)  # the counters at the very end
        finally:
            for client in clients.values():
                with contextlib.suppress(*SDK_ERRORS):
                    client.close()

    def live_line(self) -> str:
        """Cluster-wide rates over the last two samples of every node."""
        with self.lock:
            samples = list(self.samples)
        latest: dict[str, list[dict[str, Any]]] = {}
        for s in samples:
            latest.setdefault(s["node"], []).append(s)
        totals = {"publishes.in": 0.0, "forwards.out": 0.0, "deliveries.qos0": 0.0, "deliveries.qos1": 0.0}
        routes = 0
        for series in latest.values():
            routes += series[-1]["routes"]
            if len(series) >= 2:
                a, b = series[-2], series[-1]
                dt = max(b["t"] - a["t"], 1e-9)
                for key in totals:
                    totals[key] += max(0, b["metrics"].get(key, 0) - a["metrics"].get(key, 0)) / dt
        rates = "  ".join(f"{k} {v:,.0f}/s" for k, v in totals.items())
        return f"{rates}  routes held {routes:,}"


def run_locust(args: argparse.Namespace, endpoints: list[str], results: Path, sampler: NodeSampler) -> int:
    prefix = results / report.LOCUST_PREFIX
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
        "--csv", str(prefix), "--csv-full-history", "--html", str(results / "report.html"), "--only-summary",
        *shlex.split(args.locust_args),
    ]  # fmt: skip
    env = {
        **os.environ,
        "SHARDMQ_ENDPOINTS": ",".join(endpoints),
        "SHARDMQ_ROUTES": str(args.routes),
        "SHARDMQ_QOS": str(args.qos),
        "SHARDMQ_RATE": str(args.rate),
        "SHARDMQ_USERS": args.user_mix,
        "PYTHONUNBUFFERED": "1",
    }
    if args.wildcards:
        env["SHARDMQ_WILDCARDS"] = args.wildcards
    print(
        f"locust: {args.users} users (spawn {args.spawn_rate}/s) for {args.duration} s; mix "
        f"{args.user_mix or 'default'}; qos {args.qos}; log {results / 'locust.log'}",
        flush=True,
    )
    (results / "locust.cmd").write_text(shlex.join(cmd) + "\n")
    with open(results / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            started = time.monotonic()
            deadline = started + args.duration + 90  # ramp-down, stop and report writing
            last_line = started
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                if time.monotonic() - last_line >= 5:
                    last_line = time.monotonic()
                    print(f"  t={last_line - started:4.0f}s  {sampler.live_line()}", flush=True)
        finally:
            if proc.poll() is None:
                print("locust did not finish in time: stopping it", flush=True)
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return proc.returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3, help="nodes in the local cluster (default 3)")
    p.add_argument("--routes", type=int, default=100_000, help="exact routes to preload (default 100000; up to 10M)")
    p.add_argument("--duration", type=int, default=30, help="locust run time in seconds (default 30)")
    p.add_argument("--users", type=int, default=20, help="locust users (default 20)")
    p.add_argument("--spawn-rate", type=float, default=10.0, help="users started per second (default 10)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the locust users (default 1)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="operations/s per publisher or churn user; 0 = closed loop (default)"
    )
    p.add_argument("--user-mix", default="", help="SHARDMQ_USERS, e.g. 'ExactPublisher:4,WildcardSubscriber:1'")
    p.add_argument("--wildcards", default="", help="SHARDMQ_WILDCARDS (default devices/+/telemetry,+/+/telemetry)")
    p.add_argument("--loaders", type=int, default=0, help="preload subscriber clients (default: one per node)")
    p.add_argument(
        "--preload-qos", type=int, choices=(0, 1), default=None, help="QoS of the preloaded routes (default: --qos)"
    )
    p.add_argument("--chunk", type=int, default=10_000, help="filters per bulk SUB frame (default 10000)")
    p.add_argument("--preload-timeout", type=float, default=3600.0, help="seconds allowed for the preload")
    p.add_argument("--sample-interval", type=float, default=1.0, help="node status sampling period in seconds")
    p.add_argument("--shard-count", type=int, default=None)
    p.add_argument("--replication", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="cluster directory (default: a temp dir, removed after)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default results/<timestamp>)")
    p.add_argument("--locust-args", default="", help="extra locust arguments, e.g. '--tags publish'")
    args = p.parse_args(argv)
    if not 1 <= args.routes <= 50_000_000:
        p.error("--routes must be between 1 and 50,000,000")
    if args.nodes < 1 or args.users < 1 or args.duration < 1:
        p.error("--nodes, --users and --duration must be at least 1")
    args.loaders = args.loaders or args.nodes
    args.preload_qos = args.qos if args.preload_qos is None else args.preload_qos
    args.results = args.results or Path("results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: Path = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    (results / "run.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2) + "\n")
    temp_dir = None if args.dir else tempfile.mkdtemp(prefix="shardmq-loadtest-")
    cluster_dir = Path(args.dir or temp_dir)
    # Every loop below is bounded by this: preload, run, ramp-down and slack.
    hard_deadline = time.monotonic() + args.preload_timeout + args.duration + 600
    lc = LocalCluster(cluster_dir, nodes=args.nodes, shard_count=args.shard_count, replication=args.replication,
                      log_level="warning")  # fmt: skip
    stop = threading.Event()
    holders: list[RouteHolder] = []
    sampler: NodeSampler | None = None
    code = 0
    print(f"starting etcd + {args.nodes} nodes in {cluster_dir} ...", flush=True)
    try:
        state = lc.up()
        lc.export_credentials()  # locust's processes inherit it
        endpoints = state.client_endpoints()
        holders = preload(endpoints, args.routes, args.loaders, args.preload_qos, args.chunk, args.preload_timeout,
                          stop, hard_deadline)  # fmt: skip
        sampler = NodeSampler([(n.name, n.client_endpoint) for n in state.nodes], args.sample_interval, stop,
                              hard_deadline)  # fmt: skip
        sampler.start()
        code = run_locust(args, endpoints, results, sampler)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        code = 130
    except (RuntimeError, TimeoutError, *SDK_ERRORS) as exc:
        print(f"load test failed: {exc}", flush=True)
        code = 1
    finally:
        stop.set()
        for thread in [*([sampler] if sampler else []), *holders]:
            thread.join(timeout=15)
        print("stopping the cluster ...", flush=True)
        lc.down()
        logs = cluster_dir / "logs"
        if logs.is_dir():
            shutil.copytree(logs, results / "cluster-logs", dirs_exist_ok=True)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if sampler is not None:
        report.write_node_csv(sampler.samples, results / report.NODE_CSV)
    charts = report.make_charts(results)
    summary = report.summarize(results)
    summary["preload"] = {"routes": args.routes, "holders": len(holders),
                          "delivered_to_holders": sum(h.delivered for h in holders),
                          "holder_receive_errors": sum(h.receive_errors for h in holders)}  # fmt: skip
    summary["sampler_errors"] = sampler.errors if sampler else None
    summary["locust_exit_code"] = code
    text = report.format_summary(summary)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\ndelivered to the preload subscribers (exact routes): {summary['preload']['delivered_to_holders']:,}")
    total = summary["requests"].get("Aggregated")
    if total:
        print(
            f"TOTAL {total['rps']:,.1f} req/s, {total['failures']:,} failures, p50 {total['p50_ms']} ms, "
            f"p99 {total['p99_ms']} ms (publishes, deliveries and subscribes together; per name above)"
        )
    if code not in (0, 1):
        print(f"locust exited with code {code}: see {results / 'locust.log'}")
    made = [p.name for p in (results / "report.html", results / "locust_stats.csv") if p.exists()]
    print(f"results: {results}  ({len(charts)} charts, {', '.join(made) or 'no locust output'}, {report.NODE_CSV})")
    # Locust exits 1 when any request failed; that is a finding of the run, not a crash of the runner.
    return 0 if code in (0, 1) else code


if __name__ == "__main__":
    sys.exit(main())
