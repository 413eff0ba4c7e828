"""Route memory and publish latency of a 4-node local cluster (R=2) from 10k to 10M routes (a script, not a test).

What it does, in one run:

1. Start etcd + 4 nodes (R=2). Loader clients (``--loaders``, default 2; one thread and one ``Client`` each,
   disjoint ranges) all connect to **n1**, so n2..n4 hold nothing but owner routes; n1 holds owner routes *and*
   its clients' subscriptions (local filter index + session dict), which is subscriber-side memory, not
   route-table memory.
2. A latency subscriber on n2 subscribes (QoS 1) to 100 topics of the same shape that the loaders never use, and
   a publisher connects to n3. Baseline: a latency run, then each node's VmRSS (``/proc/<pid>/status``).
3. For each step (cumulative, default 10k, 100k, 1M, 10M routes): load up to the step through
   ``Client.subscribe_many(..., chunk=10_000, progress=...)`` with a progress bar and the load rate, then read
   VmRSS and ``status()`` of every node, measure the bare-dict floor of the same topics in a fresh child process,
   and time ``--latency-publishes`` QoS 1 publishes (publish -> deliver, p50/p99).
4. Optionally (``--everywhere-routes``, default 1M) a second cluster with R = N = 4: every node holds every route,
   the replicate-everywhere table of EMQ X / emqttd, measured rather than extrapolated.

Figures:

* **bytes/route/replica** = RSS growth of n2..n4 since the baseline / routes they hold (pooled). It includes
  everything an owner pays for a route: its own copy of the topic string (decoded from the ROUTE_ADD frame), the
  dict entry in its shard's index, and malloc / pymalloc slack and frame buffers kept by the allocator.
* **dict floor** = VmRSS growth of a fresh child process that builds ``dict.fromkeys(topics)`` from freshly made
  topic strings (the same 80-byte topics, strings included, because the node stores its own copies), divided by
  the topic count. The object bytes of the same dict (``sys.getsizeof`` of the dict and every key) are printed too.
* **subscriber side on n1** = (n1's growth - its owner routes x bytes/route/replica) / n1's local filters.
* **replicate-everywhere** per node = bytes/route/replica x every route in the cluster (the route table only; n1's
  subscriber side comes on top in both designs); partitioned is what was measured.

Guards: a step is skipped (and the run stops) when its predicted memory would leave less than ``--reserve-gib``
of MemAvailable or its predicted load time exceeds ``--max-load-seconds``; a watchdog aborts a load when
MemAvailable drops under 1 GiB. Everything listens on 127.0.0.1, every cluster is brought down (try/finally, by
pid) and the temp dirs are removed.

Usage: ``python -m shardmq.loadtest.million_routes [--max-routes 10000000] [--steps 10000,100000,1000000,...]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import multiprocessing
import os
import random
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardmq.client import Client
from shardmq.testing import LocalCluster, Proc

TOPIC_BYTES = 80
CHUNK = 10_000
LATENCY_TOPICS = 100
LATENCY_BASE = 1 << 40  # indexes of the latency topics: far beyond any loaded route
LOADER_NODE, SUBSCRIBER_NODE, PUBLISHER_NODE = "n1", "n2", "n3"
GOAL_RATIO = 1.2
MIB = 2**20
GIB = 2**30
_K = 0x9E3779B97F4A7C15F39CC0605CEDC834
_MASK = (1 << 128) - 1


def topic(i: int) -> str:
    """The i-th 80-byte topic, ``devices/<uuid-like>/telemetry/<n>/xxx...`` (distinct for distinct i < 2**128)."""
    h = f"{(i * _K) & _MASK:032x}"
    t = f"devices/{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}/telemetry/{i % 97}/"
    return t + "x" * (TOPIC_BYTES - len(t))


def vmrss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ---------------------------------------------------------------------------------------------------- dict floor
def _floor_child(n: int) -> tuple[int, int]:
    """In a fresh process: VmRSS growth and object bytes of ``{topic: None}`` for the first n topics."""
    gc.collect()
    before = vmrss()
    d = dict.fromkeys(topic(i) for i in range(n))
    after = vmrss()
    objects = sys.getsizeof(d) + sum(sys.getsizeof(k) for k in d)
    return after - before, objects


@dataclass
class Floor:
    rss_per_route: float
    objects_per_route: float


def measure_floor(n: int) -> Floor:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        growth, objects = pool.submit(_floor_child, n).result()
    return Floor(growth / n, objects / n)


# ---------------------------------------------------------------------------------------------------- loading
class Progress:
    """A text progress bar with the load rate, fed by several loader threads."""

    def __init__(self, start: int, stop: int, loaders: int) -> None:
        self.start, self.stop = start, stop
        self.done = [0] * loaders
        self.began = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.finished = threading.Event()

    def callback(self, k: int) -> Any:
        def progress(n: int) -> None:
            self.done[k] = n

        return progress

    def line(self) -> str:
        done = sum(self.done)
        total = self.stop - self.start
        took = max(time.perf_counter() - self.began, 1e-9)
        rate = done / took
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        eta = (total - done) / rate if rate else 0.0
        return (
            f"  [{bar:<30}] {frac:6.1%}  {self.start + done:>12,} / {self.stop:,} routes  "
            f"{rate:>9,.0f} routes/s  ETA {eta:5.0f} s"
        )

    def run(self) -> None:
        every = 0.5 if self.tty else 5.0
        while not self.finished.wait(every):
            print("\r" + self.line() if self.tty else self.line(), end="" if self.tty else "\n", flush=True)
        print("\r" + self.line() if self.tty else self.line(), flush=True)


def load(loaders: list[Client], start: int, stop: int, abort: threading.Event) -> tuple[int, float]:
    """Subscribe topics [start, stop) through the loaders in parallel; (routes loaded, seconds)."""
    bounds = [start + (stop - start) * k // len(loaders) for k in range(len(loaders) + 1)]
    progress = Progress(start, stop, len(loaders))
    errors: list[BaseException] = []

    def topics(lo: int, hi: int) -> Iterator[str]:
        for i in range(lo, hi):
            if i % CHUNK == 0 and abort.is_set():
                return
            yield topic(i)

    def work(k: int) -> None:
        try:
            loaders[k].subscribe_many(
                topics(bounds[k], bounds[k + 1]), qos=0, chunk=CHUNK, progress=progress.callback(k)
            )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            abort.set()

    def watchdog() -> None:
        while not progress.finished.wait(1.0):
            if mem_available() < GIB:
                print("  MemAvailable < 1 GiB: aborting this load", flush=True)
                abort.set()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(loaders))]
    helpers = [threading.Thread(target=progress.run, daemon=True), threading.Thread(target=watchdog, daemon=True)]
    for t in [*helpers, *threads]:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - progress.began
    progress.finished.set()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    return sum(progress.done), took


# ---------------------------------------------------------------------------------------------------- latency
@dataclass
class Latency:
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    received: int = 0
    sent: int = 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


def measure_latency(pub: Client, sub: Client, topics: list[str], count: int, warmup: int = 100) -> Latency:
    """``count`` stop-and-wait QoS 1 publishes to random topics of ``topics``: publish -> deliver and ack times."""
    total = warmup + count
    delays: list[float] = []
    seen: set[int] = set()
    done = threading.Event()

    def receive() -> None:
        deadline = None
        while len(seen) < total:
            if done.is_set():
                deadline = deadline or time.monotonic() + 5.0
                if time.monotonic() > deadline:
                    return
            msg = sub.receive(timeout=0.5)
            if msg is None:
                continue
            now = time.perf_counter_ns()
            sent, seq = struct.unpack("!qI", msg.payload[:12])
            if seq in seen:  # a redelivery
                continue
            seen.add(seq)
            if seq >= warmup:
                delays.append((now - sent) / 1e6)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    rng = random.Random(7)
    acks: list[float] = []
    for seq in range(total):
        started = time.perf_counter_ns()
        pub.publish(rng.choice(topics), struct.pack("!qI", started, seq), qos=1)
        if seq >= warmup:
            acks.append((time.perf_counter_ns() - started) / 1e6)
    done.set()
    receiver.join()
    return Latency(pct(delays, 0.5), pct(delays, 0.99), pct(acks, 0.5), pct(acks, 0.99), len(delays), count)


# ---------------------------------------------------------------------------------------------------- a cluster run
@dataclass
class NodeFigures:
    rss: int
    growth: int
    routes: int
    local_filters: int
    root_set: int


@dataclass
class Step:
    routes: int
    load_rate: float
    load_seconds: float
    nodes: dict[str, NodeFigures]
    owner_bpr: float
    floor: Floor | None
    subscriber_bpf: float
    latency: Latency
    notes: list[str] = field(default_factory=list)


def node_figures(lc: LocalCluster, base: dict[str, tuple[int, int]]) -> dict[str, NodeFigures]:
    assert lc.state is not None
    out = {}
    for proc in lc.state.nodes:
        rss = vmrss(proc.pid)
        with Client([proc.client_endpoint], timeout=60.0) as c:
            s = c.status()
        if len(s["members"]) != lc.node_count or not s["settled"]:
            raise RuntimeError(f"{proc.name} is not settled with {lc.node_count} members: {s['members']}")
        base_rss, base_routes = base.get(proc.name, (rss, s["routes"]))
        out[proc.name] = NodeFigures(
            rss, rss - base_rss, s["routes"] - base_routes, s["local_filters"], s["root_set_size"]
        )
    return out


def owner_cost(nodes: dict[str, NodeFigures]) -> float:
    owners = [f for name, f in nodes.items() if name != LOADER_NODE]
    routes = sum(f.routes for f in owners)
    return sum(f.growth for f in owners) / routes if routes else float("nan")


def subscriber_cost(nodes: dict[str, NodeFigures], owner_bpr: float) -> float:
    n1 = nodes[LOADER_NODE]
    return (n1.growth - n1.routes * owner_bpr) / n1.local_filters if n1.local_filters > LATENCY_TOPICS else 0.0


def print_nodes(step: Step, replication: int, n_nodes: int) -> None:
    distinct = step.routes + LATENCY_TOPICS
    print(
        f"  {'node':<5} {'routes held':>12} {'local filters':>13} {'RSS MiB':>9} {'growth MiB':>10} "
        f"{'B/route held':>12} {'replicate-everywhere table MiB':>31}"
    )
    for name, f in step.nodes.items():
        everywhere = step.owner_bpr * distinct  # every route on every node; n1's subscriber side comes on top
        per = f.growth / f.routes if f.routes else float("nan")
        print(
            f"  {name:<5} {f.routes:>12,} {f.local_filters:>13,} {f.rss / MIB:>9.1f} {f.growth / MIB:>10.1f} "
            f"{per:>12.1f} {everywhere / MIB:>31.1f}"
        )
    held = sum(f.routes for f in step.nodes.values())
    print(f"  routes held in all: {held:,} (= R x {held / distinct:.3f} distinct routes; R = {replication})")
    if step.floor:
        ratio = step.owner_bpr / step.floor.rss_per_route
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(
            f"  owner memory per route per replica (n2..n4): {step.owner_bpr:.1f} B;  bare dict of the same "
            f"topics: {step.floor.rss_per_route:.1f} B RSS ({step.floor.objects_per_route:.1f} B of objects);  "
            f"ratio {ratio:.2f}x (goal <= {GOAL_RATIO}x: {verdict})"
        )
    route_part = step.owner_bpr * distinct
    print(
        f"  route-table memory in the cluster: partitioned (x R={replication}) {route_part * replication / MIB:,.0f}"
        f" MiB, replicate-everywhere (x N={n_nodes}) {route_part * n_nodes / MIB:,.0f} MiB; per node "
        f"{route_part * replication / n_nodes / MIB:,.0f} vs {route_part / MIB:,.0f} MiB"
    )
    if step.subscriber_bpf:
        print(
            f"  subscriber side on {LOADER_NODE} (local index + sessions, not route table; where {LOADER_NODE} owns "
            f"the shard its route and its local index share one topic string): {step.subscriber_bpf:.1f} B per "
            "local filter"
        )
    lat = step.latency
    print(
        f"  publish -> deliver ({lat.received:,}/{lat.sent:,} QoS 1): p50 {lat.p50_ms:.2f} ms, "
        f"p99 {lat.p99_ms:.2f} ms; publish -> PUBACK p50 {lat.ack_p50_ms:.2f} ms, p99 {lat.ack_p99_ms:.2f} ms"
    )


def run_cluster(
    steps: list[int], replication: int, args: argparse.Namespace, with_floor: bool = True
) -> tuple[list[Step], list[str]]:
    """Bring a 4-node cluster up, load the steps, measure each; always bring it down."""
    results: list[Step] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shardmq-routes-") as tmp:
        lc = LocalCluster(
            Path(tmp), nodes=args.nodes, replication=replication, lease_ttl=args.lease_ttl, log_level="warning"
        )
        print(f"\nstarting etcd + {args.nodes} nodes (R={replication}, lease TTL {args.lease_ttl} s) ...", flush=True)
        lc.up()
        lc.export_credentials()
        clients: list[Client] = []
        try:
            assert lc.state is not None
            by_name: dict[str, Proc] = {p.name: p for p in lc.state.nodes}
            loaders = [Client([by_name[LOADER_NODE].client_endpoint], timeout=600.0) for _ in range(args.loaders)]
            sub = Client([by_name[SUBSCRIBER_NODE].client_endpoint], timeout=60.0)
            pub = Client([by_name[PUBLISHER_NODE].client_endpoint], timeout=60.0)
            clients += [*loaders, sub, pub]
            lat_topics = [topic(LATENCY_BASE + k) for k in range(LATENCY_TOPICS)]
            sub.subscribe_many(lat_topics, qos=1)
            measure_latency(pub, sub, lat_topics, min(args.latency_publishes, 500))  # warm the paths up
            # The baseline latency run comes before the baseline RSS, so the publish path's own allocations (on
            # n2 and n3) are in the baseline and not counted as route memory.
            lat0 = measure_latency(pub, sub, lat_topics, args.latency_publishes)
            time.sleep(1.0)
            base_nodes = node_figures(lc, {})
            base = {name: (f.rss, f.routes) for name, f in base_nodes.items()}
            print(
                f"baseline ({LATENCY_TOPICS} latency routes only): RSS per node "
                + ", ".join(f"{n} {f.rss / MIB:.0f} MiB" for n, f in base_nodes.items())
                + f"; publish -> deliver p50 {lat0.p50_ms:.2f} ms, p99 {lat0.p99_ms:.2f} ms",
                flush=True,
            )
            results.append(Step(0, 0.0, 0.0, base_nodes, float("nan"), None, 0.0, lat0))
            loaded = 0
            avail_start = mem_available()
            abort = threading.Event()
            for target in steps:
                if loaded:
                    used = max(avail_start - mem_available(), 0) / loaded  # whole-machine cost per route so far
                    floor_need = (results[-1].floor.rss_per_route * 1.2 * target) if results[-1].floor else 0
                    need = used * (target - loaded) + floor_need
                    avail = mem_available()
                    if need > avail - args.reserve_gib * GIB:
                        notes.append(
                            f"stopped before {target:,} routes: predicted {need / GIB:.1f} GiB more, "
                            f"{avail / GIB:.1f} GiB available (reserve {args.reserve_gib} GiB)"
                        )
                        print("  " + notes[-1])
                        break
                    predicted = (target - loaded) / results[-1].load_rate
                    if predicted > args.max_load_seconds:
                        notes.append(
                            f"stopped before {target:,} routes: predicted load time {predicted:.0f} s "
                            f"> {args.max_load_seconds} s"
                        )
                        print("  " + notes[-1])
                        break
                print(
                    f"\nloading routes {loaded:,} -> {target:,} through {args.loaders} clients on {LOADER_NODE}",
                    flush=True,
                )
                added, took = load(loaders, loaded, target, abort)
                if abort.is_set():
                    notes.append(
                        f"load to {target:,} aborted after {loaded + added:,} routes (memory watchdog "
                        "or a loader error); not measured"
                    )
                    print("  " + notes[-1])
                    break
                loaded = target
                rate = added / took
                print(
                    f"  {added:,} routes in {took:.1f} s: {rate:,.0f} routes/s "
                    f"({rate * replication:,.0f} route replicas/s)",
                    flush=True,
                )
                time.sleep(1.0)
                nodes = node_figures(lc, base)
                owner_bpr = owner_cost(nodes)
                floor = measure_floor(target) if with_floor else None
                latency = measure_latency(pub, sub, lat_topics, args.latency_publishes)
                step = Step(target, rate, took, nodes, owner_bpr, floor, subscriber_cost(nodes, owner_bpr), latency)
                results.append(step)
                print(f"\n{target:,} routes:")
                print_nodes(step, replication, args.nodes)
        finally:
            for c in clients:
                c.close()
            lc.down()
    return results, notes


def summary(steps: list[Step], n_nodes: int) -> None:
    names = list(steps[0].nodes)
    print(
        "\n| routes | load rate (routes/s) | "
        + " | ".join(f"{n} RSS MiB" for n in names)
        + " | B/route/replica (n2..n4) | dict floor B/route | ratio | subscriber side B/filter (n1) "
        "| replicate-everywhere table MiB/node | p50 ms | p99 ms |"
    )
    print("|" + "---|" * (len(names) + 9))
    for s in steps:
        rss = " | ".join(f"{s.nodes[n].rss / MIB:,.0f}" for n in names)
        if not s.routes:
            print(
                f"| {LATENCY_TOPICS} (baseline) | - | {rss} | - | - | - | - | - | {s.latency.p50_ms:.2f} "
                f"| {s.latency.p99_ms:.2f} |"
            )
            continue
        floor = f"{s.floor.rss_per_route:.1f}" if s.floor else "-"
        ratio = f"{s.owner_bpr / s.floor.rss_per_route:.2f}x" if s.floor else "-"
        everywhere = s.owner_bpr * (s.routes + LATENCY_TOPICS) / MIB
        print(
            f"| {s.routes:,} | {s.load_rate:,.0f} | {rss} | {s.owner_bpr:.1f} | {floor} | {ratio} "
            f"| {s.subscriber_bpf:.1f} | {everywhere:,.0f} | {s.latency.p50_ms:.2f} | {s.latency.p99_ms:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-routes", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    parser.add_argument(
        "--steps",
        default="10000,100000,1000000,10000000",
        help="comma-separated cumulative route counts (default: 10k,100k,1M,10M)",
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--replication", type=int, default=2)
    parser.add_argument("--loaders", type=int, default=2, help="loader clients (threads), all on n1")
    parser.add_argument("--latency-publishes", type=int, default=2000)
    parser.add_argument("--lease-ttl", type=int, default=10)
    parser.add_argument("--max-load-seconds", type=float, default=600.0)
    parser.add_argument("--reserve-gib", type=float, default=2.0)
    parser.add_argument(
        "--everywhere-routes",
        type=lambda s: int(s.replace("_", "")),
        default=1_000_000,
        help="routes to load into a second cluster with R = N (0: skip)",
    )
    args = parser.parse_args(argv)
    steps = sorted({int(s.replace("_", "")) for s in args.steps.split(",") if s.strip()})
    steps = [s for s in steps if s <= args.max_routes]
    if not steps or steps[-1] < args.max_routes:
        steps.append(args.max_routes)
    print(
        f"machine: {os.cpu_count()} cores, MemAvailable {mem_available() / GIB:.1f} GiB, Python "
        f"{sys.version.split()[0]}; {TOPIC_BYTES}-byte topics; steps {', '.join(f'{s:,}' for s in steps)}"
    )

    began = time.perf_counter()
    results, notes = run_cluster(steps, args.replication, args)
    summary(results, args.nodes)
    for note in notes:
        print(f"note: {note}")

    if args.everywhere_routes and args.replication < args.nodes:
        measured = [s for s in results if s.routes == args.everywhere_routes]
        everywhere, notes_e = run_cluster([args.everywhere_routes], args.nodes, args, with_floor=False)
        for note in notes_e:
            print(f"note: {note}")
        if len(everywhere) > 1:
            e = everywhere[-1]
            print(
                f"\nreplicate-everywhere measured (R = N = {args.nodes}) at {e.routes:,} routes vs partitioned "
                f"(R = {args.replication}) in the first run:"
            )
            print(f"  {'node':<5} {'R=N growth MiB':>15} {'R=N routes':>12} {'R=2 growth MiB':>15} {'R=2 routes':>12}")
            for name, f in e.nodes.items():
                p = measured[0].nodes[name] if measured else None
                print(
                    f"  {name:<5} {f.growth / MIB:>15.1f} {f.routes:>12,} "
                    f"{(p.growth / MIB if p else float('nan')):>15.1f} {(p.routes if p else 0):>12,}"
                )
            total_e = sum(f.growth for f in e.nodes.values())
            if measured:
                total_p = sum(f.growth for f in measured[0].nodes.values())
                print(
                    f"  cluster RSS growth: R=N {total_e / MIB:,.1f} MiB, R={args.replication} "
                    f"{total_p / MIB:,.1f} MiB ({total_e / total_p:.2f}x); owner B/route/replica at R=N: "
                    f"{e.owner_bpr:.1f} (R={args.replication}: {measured[0].owner_bpr:.1f})"
                )
    print(f"\nwhole run: {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
