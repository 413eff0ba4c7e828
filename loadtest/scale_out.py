"""Scale-out: N nodes carrying N publisher/subscriber pairs, each pair on its own topics, for N = 1..max.

For each N a fresh ``LocalCluster`` of N nodes; N publisher and N subscriber processes. Publisher i connects to
node i, subscriber i to node (i + 1) mod N (so with N >= 2 every message crosses two nodes; with N = 1 both use
node 1), and pair i has its own ``--topics-per-pair`` exact topics (``scale/<i>/<j>``). The publisher sends QoS 0
messages of ``--payload`` bytes, each carrying a unique sequence number, round robin over its topics as fast as
it can for ``--seconds``, then ``flush()``es (the node confirmed reading every one); the subscriber counts the
distinct sequence numbers it received and stops once it has them all, or 5 s after the last one once its
publisher is done.

Printed per N: aggregate delivered msg/s (all messages received / from the first send to the last receive),
loss (sent - received) and what was counted lost (QoS 0 may drop under overload: the subscribers' ``dropped``,
the nodes' ``drops.*``, and their ``errors.*`` for QoS 0 publishes an entry node failed, e.g. ``unavailable``
when no route owner answered its lookup within ``lookup_timeout`` behind a backlog; the entry node reports those
to the publisher, whose ``flush()`` raises them: counted per publisher as ``failed``),
each pair's rate, and the CPU time (user + system, from ``/proc/<pid>/stat``, every thread of the process) that
each node and client process spent during the run, per message. Then the ratio aggregate / (N x the one-pair
aggregate), and against N/2 x the N = 2 aggregate (from N = 2 on every message crosses two nodes, with N = 1
one). Where messages went missing, per pair and per node where they were last counted.

Reading it on a small machine: with fewer cores than processes (3N + 1 with etcd), the measured aggregate shows
the shape only: the processes share the cores. What a machine with a core per process would reach follows from
the CPU figures: every process p was busy ``cpu_p / window`` of the run, so the busiest one (the bottleneck) caps
the aggregate at ``measured / max_p(cpu_p / window)`` (``projected``, assuming the CPU per message stays what it
was here). The per-core figure of one pair is ``1 / (CPU per message of its bottleneck process)``.

Usage: ``python -m shardmq.loadtest.scale_out [--min-nodes 1] [--max-nodes 5] [--seconds 5] [--topics-per-pair
100] [--payload 100]``. A script, not a test (``tests/test_scale_out.py`` runs it small). Everything it starts is
stopped by pid at the end, and its temp dir removed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shardmq.loadtest.compare_brokers import print_table

SEQ_BYTES = 8
IDLE_S = 5.0  # a subscriber stops this long after its last message once its publisher is done
START_TIMEOUT_S = 60.0
# Node counters of messages not delivered (per message); frame counts and the share already reported are not.
LOSS_COUNTERS = ("drops.", "errors.")
NOT_MESSAGES = ("_frames", "_reported", "errors.from_peer", "errors.internal", "errors.not_member")
# Printed for every node when messages went missing: where they were last seen.
TRACE_COUNTERS = ("publishes.", "forwards.", "frames_", "errors.", "lookups.", "peers.", "batches.", "clients.")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def topics_of(pair: int, count: int) -> list[str]:
    return [f"scale/{pair}/{j}" for j in range(count)]


# ---------------------------------------------------------------------------------------------- client processes
def subscriber_main(
    pair: int, endpoint: str, topics: list[str], seconds: float, expected: Any, out: Any, release: Any
) -> None:
    """Subscribe, report ready, count distinct sequence numbers until all ``expected`` came (or IDLE_S after the
    last one once ``expected`` is known), report, and exit only once released (the parent reads our CPU)."""
    from shardmq.client import Client

    try:
        with Client([endpoint], timeout=30.0) as c:
            c.subscribe_many(topics, qos=0)
            out.put(("ready", pair, os.getpid()))
            seen = bytearray()  # one byte per sequence number: cheaper than a set at hundreds of thousands
            unique = duplicates = 0
            first = last = known = 0.0
            ended = "all received"
            give_up = time.monotonic() + seconds + 3 * START_TIMEOUT_S  # the publisher died without a word
            while True:
                msg = c.receive(timeout=0.2)
                if msg is not None:
                    seq = int.from_bytes(msg.payload[:SEQ_BYTES], "little")
                    if seq >= len(seen):
                        seen.extend(bytes(max(seq + 1 - len(seen), 65536)))
                    if seen[seq]:
                        duplicates += 1
                    else:
                        seen[seq] = 1
                        unique += 1
                    last = time.monotonic()
                    if not first:
                        first = last
                    if unique & 1023 and unique != expected.value:  # look at the end only now and then
                        continue
                now = time.monotonic()
                want = expected.value
                if want >= 0:
                    known = known or now
                    if unique >= want:
                        break
                    if now - max(last, known) > IDLE_S:
                        ended = f"nothing for {IDLE_S:g} s"
                        break
                if now > give_up:
                    ended = "gave up"
                    break
            out.put(("sub", pair, {"received": unique, "duplicates": duplicates, "first": first, "last": last,
                                   "dropped": c.dropped, "ended": ended}))  # fmt: skip
            release.wait(START_TIMEOUT_S)
    except BaseException as exc:  # the parent reports it and stops everything
        out.put(("error", pair, f"subscriber {pair}: {exc!r}"))


def publisher_main(
    pair: int, endpoint: str, topics: list[str], seconds: float, payload: int, go: Any, out: Any, release: Any
) -> None:
    """Connect, report ready, wait for ``go``, publish as fast as possible for ``seconds``, flush, report."""
    from shardmq.client import Client, ShardMQError

    try:
        with Client([endpoint], timeout=60.0) as c:
            out.put(("ready", pair, os.getpid()))
            if not go.wait(START_TIMEOUT_S):
                raise TimeoutError("no start signal")
            pad = b"x" * (payload - SEQ_BYTES)
            n_topics = len(topics)
            publish = c.publish
            seq = 0
            first = time.monotonic()
            deadline = first + seconds
            while True:
                publish(topics[seq % n_topics], seq.to_bytes(SEQ_BYTES, "little") + pad)
                seq += 1
                if seq & 1023 == 0 and time.monotonic() > deadline:
                    break
            try:
                c.flush()  # returns once every publish has left the entry node: nothing left in a client buffer
            except ShardMQError as exc:
                if exc.count is None:  # not the entry node's report of failed publishes (counted below)
                    raise
            flushed = time.monotonic()
            out.put(("pub", pair, {"sent": seq, "first": first, "flushed": flushed, "failed": c.publish_failed}))
            release.wait(START_TIMEOUT_S)
    except BaseException as exc:
        out.put(("error", pair, f"publisher {pair}: {exc!r}"))


# ---------------------------------------------------------------------------------------------- one N
@dataclass
class Result:
    nodes: int
    sent: int = 0
    received: int = 0
    duplicates: int = 0
    window: float = 0.0
    aggregate: float = 0.0
    pair_rates: list[float] = field(default_factory=list)
    pairs: list[str] = field(default_factory=list)  # one line per pair: sent, received, how the count ended
    # Messages someone counted as not delivered: the subscribers' ``dropped`` (reported to them), the nodes' drops.*
    # and errors.* counters (a QoS 0 publish an entry node failed, e.g. ``unavailable`` when no owner answered its
    # lookup within ``lookup_timeout``, is also reported to its publisher: ``publish_failed``).
    dropped_reported: int = 0
    publish_failed: int = 0  # the QoS 0 publishes the entry nodes reported failed to their publishers
    node_drops: dict[str, int] = field(default_factory=dict)
    node_counters: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> the counters that trace a loss
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds during the run
    messages: dict[str, int] = field(default_factory=dict)  # process -> messages it handled
    pids: dict[str, int] = field(default_factory=dict)  # process -> pid (all stopped when ``run_one`` returns)
    error: str | None = None

    @property
    def loss(self) -> int:
        return self.sent - self.received

    def us_per_message(self, proc: str) -> float:
        return self.cpu[proc] / max(1, self.messages[proc]) * 1e6

    @property
    def bottleneck(self) -> tuple[str, float]:
        """The busiest process and the share of the window it was on a CPU."""
        proc = max(self.cpu, key=lambda p: self.cpu[p])
        return proc, self.cpu[proc] / self.window if self.window > 0 else 0.0

    @property
    def projected(self) -> float:
        """The aggregate with a core per process: until the busiest process is busy the whole window."""
        _, busy = self.bottleneck
        return self.aggregate / busy if busy > 0 else 0.0


def run_one(n: int, args: argparse.Namespace, tmp: Path) -> Result:
    from shardmq.client import Client
    from shardmq.testing import LocalCluster

    ctx = mp.get_context("spawn")
    res = Result(n)
    cluster = LocalCluster(tmp / f"n{n}", nodes=n, log_level="warning")
    procs: list[Any] = []
    release = ctx.Event()
    try:
        state = cluster.up(timeout=120)
        cluster.export_credentials()
        nodes = state.nodes  # n1..nN
        endpoints = [p.client_endpoint for p in nodes]
        out, go = ctx.Queue(), ctx.Event()
        expected = [ctx.Value("q", -1, lock=False) for _ in range(n)]
        for i in range(n):
            topics = topics_of(i, args.topics_per_pair)
            sub_args = (i, endpoints[(i + 1) % n], topics, args.seconds, expected[i], out, release)
            pub_args = (i, endpoints[i], topics, args.seconds, args.payload, go, out, release)
            sub = ctx.Process(target=subscriber_main, args=sub_args, daemon=True, name=f"scale-sub-{i}")
            pub = ctx.Process(target=publisher_main, args=pub_args, daemon=True, name=f"scale-pub-{i}")
            procs += [sub, pub]
        for proc in procs:
            proc.start()
        pids: dict[str, int] = {f"node {p.name}": p.pid for p in nodes}
        subs: dict[int, dict[str, Any]] = {}
        pubs: dict[int, dict[str, Any]] = {}
        ready = 0
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready < 2 * n:
            try:
                kind, pair, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{2 * n - ready} client(s) not connected within {START_TIMEOUT_S:g} s") from None
            if kind == "error":
                raise RuntimeError(value)
            ready += 1
        # Every client is connected (and every subscription confirmed): they are told apart by the order of
        # their reports, so take their pids from the processes themselves.
        for proc in procs:
            pids[proc.name.replace("scale-", "").replace("-", " ")] = proc.pid
        res.pids = pids
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        go.set()
        while len(subs) < n or len(pubs) < n:
            try:
                kind, pair, value = out.get(timeout=args.seconds + 3 * START_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError("a client gave no result") from None
            if kind == "error":
                raise RuntimeError(value)
            if kind == "pub":
                pubs[pair] = value
                expected[pair].value = value["sent"]
            elif kind == "sub":
                subs[pair] = value
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        res.cpu = {name: after[name] - before[name] for name in pids}
        for j, endpoint in enumerate(endpoints):
            with Client([endpoint], timeout=10.0) as c:
                metrics = c.status()["metrics"]
            for key, value in metrics.items():
                if key.startswith(LOSS_COUNTERS) and value and not key.endswith(NOT_MESSAGES):
                    res.node_drops[f"{nodes[j].name} {key}"] = value
            res.node_counters[nodes[j].name] = {
                k: v for k, v in sorted(metrics.items()) if v and k.startswith(TRACE_COUNTERS)
            }
        res.sent = sum(p["sent"] for p in pubs.values())
        res.received = sum(s["received"] for s in subs.values())
        res.duplicates = sum(s["duplicates"] for s in subs.values())
        res.dropped_reported = sum(s["dropped"] for s in subs.values()) + sum(res.node_drops.values())
        res.publish_failed = sum(p["failed"] for p in pubs.values())
        start = min(p["first"] for p in pubs.values())
        end = max(s["last"] for s in subs.values())
        res.window = end - start
        res.aggregate = res.received / res.window if res.window > 0 else 0.0
        for i in range(n):
            took = subs[i]["last"] - pubs[i]["first"]
            res.pair_rates.append(subs[i]["received"] / took if took > 0 else 0.0)
            res.pairs.append(
                f"pair {i}: {pubs[i]['sent']:,} sent, {subs[i]['received']:,} received ({subs[i]['ended']}), "
                f"flushed {pubs[i]['flushed'] - pubs[i]['first']:.2f} s and last received "
                f"{subs[i]['last'] - pubs[i]['first']:.2f} s after its first send, dropped {subs[i]['dropped']:,}, "
                f"failed at the entry node {pubs[i]['failed']:,}"
            )
            res.messages[f"pub {i}"] = pubs[i]["sent"]
            res.messages[f"sub {i}"] = subs[i]["received"]
            # A node takes in its publisher's messages (entry) and, with N >= 2, delivers the previous pair's.
            res.messages[f"node {nodes[i].name}"] = pubs[i]["sent"]
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        release.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()  # by its pid, started here
                proc.join(5)
        cluster.down()
    return res


# ---------------------------------------------------------------------------------------------- report
def report(results: list[Result]) -> None:
    one = next((r for r in results if r.nodes == 1 and r.error is None), None)
    # With N = 1 a message crosses one node, from N = 2 on two (publisher and subscriber on different nodes): the
    # per-pair figure of N = 2 is the base of the scaling once every message crosses nodes.
    two = next((r for r in results if r.nodes == 2 and r.error is None), None)
    print("\naggregate (all processes share this machine's cores)\n")
    rows = [("N", "sent", "received", "loss", "counted lost", "aggregate msg/s", "pair msg/s min / med / max",
             "vs N x one pair", "projected msg/s", "projected vs N x one pair", "projected vs N/2 x N=2",
             "bottleneck (busy share)")]  # fmt: skip
    for r in results:
        if r.error is not None:
            rows.append((str(r.nodes), "FAILED", r.error[:60], *("-",) * 9))
            continue
        proc, busy = r.bottleneck
        base = one.aggregate if one else 0.0
        pbase = one.projected if one else 0.0
        rows.append((
            str(r.nodes),
            f"{r.sent:,}",
            f"{r.received:,}",
            f"{r.loss:,}",
            f"{r.dropped_reported:,}",
            f"{r.aggregate:,.0f}",
            " / ".join(f"{v:,.0f}" for v in (min(r.pair_rates), statistics.median(r.pair_rates), max(r.pair_rates))),
            f"{r.aggregate / (r.nodes * base):.2f}" if base else "-",
            f"{r.projected:,.0f}",
            f"{r.projected / (r.nodes * pbase):.2f}" if pbase else "-",
            f"{r.projected / (r.nodes / 2 * two.projected):.2f}" if two and two.projected and r.nodes >= 2 else "-",
            f"{proc} ({busy:.0%})",
        ))  # fmt: skip
    print_table(rows)
    print("\nloss = sent - received; counted lost = what the subscribers were told (DROPPED) and the nodes counted "
          "(drops.*, and errors.* of QoS 0 publishes an entry node failed, which their publishers were told too: "
          "publish_failed)")  # fmt: skip
    print("\nCPU per message, microseconds (CPU seconds of the process during the run / messages it handled: a "
          "publisher's sent, a subscriber's received, a node's entering from its publisher)\n")  # fmt: skip
    for r in results:
        if r.error is not None:
            continue
        cells = [f"{p} {r.us_per_message(p):.1f}" for p in sorted(r.cpu, key=_proc_order)]
        print(f"N={r.nodes}: " + ", ".join(cells))
        if r.loss:
            for line in r.pairs:
                print(f"      {line}")
            for node, counters in r.node_counters.items():
                print(f"      {node}: {counters}")
        if r.node_drops:
            print(f"      drops: {r.node_drops}")
    if one is not None:
        pub_us, node_us, sub_us = (one.us_per_message(p) for p in ("pub 0", "node n1", "sub 0"))
        worst = max(("publisher", pub_us), ("node", node_us), ("subscriber", sub_us), key=lambda x: x[1])
        print(f"\nper core: one pair at N=1 costs {pub_us:.1f} us (publisher), {node_us:.1f} us (node, entry and "
              f"delivery in one) and {sub_us:.1f} us (subscriber) of CPU per message, so with a core per process "
              f"one pair reaches about {1e6 / worst[1]:,.0f} msg/s (bound by the {worst[0]}).")  # fmt: skip
        many = [r for r in results if r.nodes >= 2 and r.error is None]
        if many:
            node_many = statistics.median(r.us_per_message(f"node n{j + 1}") for r in many for j in range(r.nodes))
            print(f"with N >= 2 a node both takes in its publisher's messages and delivers the previous pair's: "
                  f"{node_many:.1f} us of CPU per message it takes in (median over nodes and N); with a core per "
                  f"process the aggregate is about N x {1e6 / max(pub_us, node_many, sub_us):,.0f} msg/s, goal "
                  f">= 0.8 x N x the one-pair figure.")  # fmt: skip


def _proc_order(name: str) -> tuple[int, str]:
    return ({"node": 0, "pub": 1, "sub": 2}[name.split()[0]], name)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-nodes", type=int, default=1)
    parser.add_argument("--max-nodes", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each publisher sends")
    parser.add_argument("--topics-per-pair", type=int, default=100)
    parser.add_argument("--payload", type=int, default=100, help="bytes per message (>= 8: the sequence number)")
    args = parser.parse_args(argv)
    if args.payload < SEQ_BYTES:
        parser.error(f"--payload must be at least {SEQ_BYTES}")
    print(f"shardmq scale-out  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  python {platform.python_version()}  "
          f"{platform.machine()}  {os.cpu_count()} cores")  # fmt: skip
    print(f"workload: N nodes, N publisher/subscriber pairs (publisher i on node i, subscriber i on node i+1 mod N), "
          f"{args.topics_per_pair} exact topics per pair, QoS 0, {args.payload}-byte payloads, publishers flat out "
          f"for {args.seconds:g} s then flush")  # fmt: skip
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="shardmq-scale-") as tmp:
        for n in range(args.min_nodes, args.max_nodes + 1):
            print(f"\nN={n}: starting etcd + {n} node(s), {n} pair(s) ...", flush=True)
            r = run_one(n, args, Path(tmp))
            results.append(r)
            if r.error is not None:
                print(f"N={n}: FAILED: {r.error}", flush=True)
                continue
            print(f"N={n}: {r.received:,} of {r.sent:,} delivered in {r.window:.2f} s: {r.aggregate:,.0f} msg/s "
                  f"aggregate, loss {r.loss:,}, duplicates {r.duplicates:,}, counted lost {r.dropped_reported:,}, "
                  f"publish_failed {r.publish_failed:,}"
                  + (f" {r.node_drops}" if r.node_drops else ""), flush=True)  # fmt: skip
    report(results)
    return results


if __name__ == "__main__":
    main()
