"""Where the CPU of a publish goes: delivered msg/s and CPU microseconds per message in every process on the path.

A 3-node ``LocalCluster``; one subscriber process on n1 and one publisher process on n3 (the compare_brokers
workload: 100-byte payloads, one topic). The publisher sends ``--count`` messages with ``publish`` (at QoS 0
the SDK batches them; at QoS 1 each waits for its PUBACK) or, with ``--many``, with ``publish_many`` (frames of
128; at QoS 1 the 128 are in flight together). Printed: delivered msg/s, and for the publisher,
the entry node (n3), the subscriber's node (n1) and the subscriber, the CPU time each spent (user + system)
divided by the messages delivered, plus each node's frames and route-cache counters.

Usage: ``python -m shardmq.loadtest.publish_path [--count 1000000] [--many] [--qos 1]``. A script, not a test:
it asserts
nothing. Everything it starts is stopped by pid at the end and its temp dir removed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from typing import Any

from shardmq.client import Client
from shardmq.testing import LocalCluster

TOPIC = "path/probe"
PAYLOAD = b"x" * 100


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:  # fields 14 and 15: utime and stime of the process, in clock ticks
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscriber(endpoint: str, count: int, qos: int, ready: Any, out: Any) -> None:
    with Client([endpoint]) as c:
        c.subscribe(TOPIC, qos=qos)
        ready.set()
        got = 0
        start_cpu = _cpu_self()
        while got < count and c.receive(timeout=5) is not None:
            got += 1
        out.put((got, time.perf_counter(), _cpu_self() - start_cpu))


def publisher(endpoint: str, count: int, many: bool, qos: int, out: Any) -> None:
    with Client([endpoint], timeout=30.0) as c:
        start_cpu, started = _cpu_self(), time.perf_counter()
        if many:
            c.publish_many(((TOPIC, PAYLOAD) for _ in range(count)), qos=qos, batch=128)
        else:
            for _ in range(count):
                c.publish(TOPIC, PAYLOAD, qos=qos)
        c.status()  # answered once the node has read every frame before it
        out.put((started, _cpu_self() - start_cpu))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--many", action="store_true", help="publish with publish_many instead of publish")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="shardmq-path-") as tmp:
        cluster = LocalCluster(tmp, nodes=3, log_level="warning")
        state = cluster.up(timeout=60)
        cluster.export_credentials()
        try:
            endpoints = state.client_endpoints()
            sub_q, pub_q, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
            sub = ctx.Process(target=subscriber, args=(endpoints[0], args.count, args.qos, ready, sub_q))
            sub.start()
            if not ready.wait(30):
                raise SystemExit("the subscriber did not subscribe within 30 s")
            nodes_before = [_cpu_of(n.pid) for n in state.nodes]
            pub = ctx.Process(target=publisher, args=(endpoints[2], args.count, args.many, args.qos, pub_q))
            pub.start()
            started, pub_cpu = pub_q.get(timeout=600)
            got, finished, sub_cpu = sub_q.get(timeout=600)
            nodes_cpu = [_cpu_of(n.pid) - b for n, b in zip(state.nodes, nodes_before, strict=True)]
            pub.join(30)
            sub.join(30)
            took = finished - started
            print(f"{got:,} of {args.count:,} delivered in {took:.2f} s: {got / took:,.0f} msg/s "
                  f"({'publish_many' if args.many else 'publish'}, 100-byte payloads, QoS {args.qos})")  # fmt: skip
            per = max(got, 1) / 1e6
            rows = [("publisher", pub_cpu), ("entry node n3", nodes_cpu[2]), ("subscriber's node n1", nodes_cpu[0]),
                    ("subscriber", sub_cpu), ("idle node n2", nodes_cpu[1])]  # fmt: skip
            for name, cpu in rows:
                print(f"  {name:<22} {cpu:6.2f} s CPU  {cpu / per:6.2f} us/message")
            for endpoint in endpoints:
                with Client([endpoint]) as c:
                    st = c.status()
                m = st["metrics"]
                print(f"  {st['node']}: client frames in {m.get('frames_in.client', 0):,}, peer frames in "
                      f"{m.get('frames_in.peer', 0):,}, hops/publish {st['hops_per_publish']}, "
                      f"route cache {st['route_cache']}")  # fmt: skip
        finally:
            cluster.down()


if __name__ == "__main__":
    main()
