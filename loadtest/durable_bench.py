"""Durability (item 6) on a real 3-node cluster (R=2): what storing costs, and how long a full restart takes.

Throughput, for each mode (a fresh cluster each): ``memory`` (no ``--data-dir``: the baseline), ``batch``
(``--data-dir``, ``--fsync batch``: one fsync per loop turn) and ``off`` (``--data-dir``, ``--fsync off``):

- ``qos1_batched``: QoS 1 publishes in frames of 500 (``publish_many``) to a persistent subscriber that is
  online at another node and acknowledges as it reads; every message is stored at the holder (written to its
  window, deleted on DACK) before the FWD_ACK. Rate from the first publish to the last PUBACK.
- ``qos1_sequential``: one QoS 1 publish at a time (each waits for its PUBACK): the latency a store adds.
- ``retained``: retained QoS 1 publishes in frames of 500, each stored at both owners before its PUBACK.

Each figure is printed with its ratio to ``memory`` measured in the same run.

Recovery (mode ``batch``): ``--retained`` retained messages and ``--queued`` acknowledged QoS 1 messages queued
for an offline persistent session held at n1; every node killed -9; ``cluster restart``; times from the kill:
the nodes are members again (``restart`` returned), the client (reconnecting to n1 in a loop) has its session
back with every queued message, and a wildcard subscriber gets every retained message.

    .venv/bin/python -m shardmq.loadtest.durable_bench [--messages 20000] [--retained 10000] [--queued 1000]
    .venv/bin/python -m shardmq.loadtest.durable_bench --recovery-only --recoveries 3   # mode batch, no throughput

``--recoveries N`` repeats the kill and restart N times on the same cluster (each round queues its messages again
and rewrites the same retained topics), and prints each round and the median.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from shardmq.client import Client, ShardMQError
from shardmq.testing import LocalCluster, pid_runs

MODES = ("memory", "batch", "off")


def cluster(directory: Path, mode: str) -> LocalCluster:
    lc = LocalCluster(directory, nodes=3, log_level="warning", lease_ttl=2, shard_count=256,
                      data_dirs=mode != "memory", fsync="off" if mode == "off" else "batch")  # fmt: skip
    lc.up(timeout=60)
    return lc


def endpoints(lc: LocalCluster) -> dict[str, str]:
    assert lc.state is not None
    return {p.name: p.client_endpoint for p in lc.state.nodes}


def throughput(lc: LocalCluster, messages: int, sequential: int) -> dict[str, float]:
    eps, creds = endpoints(lc), lc.admin_credentials
    ready = threading.Event()
    got: list[int] = []

    def subscriber() -> None:
        with Client([eps["n1"]], credentials=creds, client_id="bench-sub", clean_session=False, session_expiry=600,
                    timeout=60.0) as c:  # fmt: skip
            c.subscribe("bench/q/#", qos=1)
            ready.set()
            n = 0
            while n < messages + sequential and (c.receive(timeout=30.0)) is not None:
                n += 1
            got.append(n)

    thread = threading.Thread(target=subscriber, daemon=True)
    thread.start()
    if not ready.wait(30):
        raise SystemExit("the subscriber did not subscribe")
    payload = b"x" * 64
    out: dict[str, float] = {}
    with Client([eps["n2"]], credentials=creds, timeout=60.0) as pub:
        started = time.perf_counter()
        pub.publish_many((("bench/q/t", payload) for _ in range(messages)), qos=1, batch=500)
        out["qos1_batched"] = messages / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(sequential):
            pub.publish("bench/q/t", payload, qos=1)
        out["qos1_sequential"] = sequential / (time.perf_counter() - started)
        started = time.perf_counter()
        pub.publish_many(((f"bench/r/{i}", payload) for i in range(messages)), qos=1, batch=500, retain=True)
        out["retained"] = messages / (time.perf_counter() - started)
    thread.join(60)
    if got != [messages + sequential]:
        raise SystemExit(f"the subscriber got {got} of {messages + sequential}")
    return out


def recovery(lc: LocalCluster, retained: int, queued: int) -> dict[str, float]:
    eps, creds = endpoints(lc), lc.admin_credentials
    cid = "bench-durable"
    with Client([eps["n1"]], credentials=creds, client_id=cid, clean_session=False, session_expiry=600) as c:
        c.subscribe("rec/q/#", qos=1)
    with Client([eps["n3"]], credentials=creds, timeout=60.0) as pub:
        pub.publish_many(((f"rec/r/{i}", b"r%d" % i) for i in range(retained)), qos=1, batch=500, retain=True)
        pub.publish_many((("rec/q/t", b"q%d" % i) for i in range(queued)), qos=1, batch=500)
    assert lc.state is not None
    killed = time.perf_counter()
    for proc in lc.state.nodes:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in lc.state.nodes:
        while pid_runs(proc):
            time.sleep(0.01)
    lc.restart(timeout=120)
    out = {"members_s": time.perf_counter() - killed}
    eps = endpoints(lc)
    deadline = time.monotonic() + 120
    while True:  # the client reconnects to its holder until its session is back with every queued message
        try:
            with Client([eps["n1"]], credentials=creds, client_id=cid, clean_session=False, session_expiry=600,
                        timeout=5.0) as c:  # fmt: skip
                if c.session_present:
                    n = 0
                    while n < queued and c.receive(timeout=10.0) is not None:
                        n += 1
                    if n != queued:
                        raise SystemExit(f"the session came back with {n} of {queued} queued messages")
                    out["session_s"] = time.perf_counter() - killed
                    break
                raise SystemExit("the session did not come back (session_present false)")
        except (ShardMQError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    while True:  # a wildcard subscriber, until it gets every retained message
        with Client(list(eps.values()), credentials=creds, timeout=10.0) as sub:
            sub.subscribe("rec/r/#", qos=1)
            n = 0
            while sub.receive(timeout=1.0) is not None:
                n += 1
        if n >= retained:
            out["retained_s"] = time.perf_counter() - killed
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{n} of {retained} retained messages after the restart")
        time.sleep(0.2)
    with Client([eps["n1"]], credentials=creds, client_id=cid):  # end the session
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardmq.loadtest.durable_bench",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sequential", type=int, default=1_000)
    parser.add_argument("--retained", type=int, default=10_000)
    parser.add_argument("--queued", type=int, default=1_000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--recoveries", type=int, default=1, help="kill -9 and restart rounds (mode batch)")
    parser.add_argument("--recovery-only", action="store_true",
                        help="mode batch only, no throughput: just the full-restart recovery")  # fmt: skip
    args = parser.parse_args(argv)
    if args.recovery_only:
        args.modes = "batch"
    results: dict[str, dict[str, float]] = {}
    for mode in args.modes.split(","):
        directory = Path(tempfile.mkdtemp(prefix=f"shardmq-durable-{mode}-"))
        lc = cluster(directory, mode)
        try:
            if not args.recovery_only:
                results[mode] = throughput(lc, args.messages, args.sequential)
                base = results.get("memory")
                print(f"{mode:7s} " + " ".join(
                    f"{k}={v:8.0f}/s" + (f" ({v / base[k]:.2f}x memory)" if base and mode != "memory" else "")
                    for k, v in results[mode].items()
                ), flush=True)  # fmt: skip
            if mode == "batch":
                rounds = [recovery(lc, args.retained, args.queued) for _ in range(args.recoveries)]
                for i, rec in enumerate(rounds, 1):
                    print(f"recovery {i} retained={args.retained} queued={args.queued}: members_s="
                          f"{rec['members_s']:.1f} session_s={rec['session_s']:.1f} retained_s="
                          f"{rec['retained_s']:.1f}", flush=True)  # fmt: skip
                if len(rounds) > 1:
                    print("recovery median of", len(rounds), " ".join(
                        f"{k}={statistics.median(r[k] for r in rounds):.1f}" for k in ("members_s", "session_s",
                                                                                        "retained_s")))  # fmt: skip
        except BaseException:
            lc.down()
            print(f"failed: the cluster's logs are kept in {directory / 'logs'}", flush=True)
            raise
        else:
            lc.down()
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
