"""Queued-message throughput: QoS 1 publishes to persistent sessions, acknowledged, in messages per second, against
a baseline measured in the same run.

Starts a local 3-node cluster (R=2). Each round measures two loads with the same publisher (on n2, ``--messages``
QoS 1 messages with ``publish_many``, ``--batch`` per frame; each returns once acknowledged):

- ``baseline``: ``--sessions`` clean clients (at most ``--baseline-clients``, which then share the sessions' topics)
  connected to n1, subscribed at QoS 1, not reading while the publisher
  runs: the messages go into their windows and backlogs at n1, and the forward is acknowledged once queued there
  (a clean session's queue is not replicated). The same holder path as below, without the replicated queue.
- ``replicated``: ``--sessions`` clients with ``clean_session=False`` subscribe at QoS 1 on n1 and close (their
  sessions stay, offline, at n1): a forward is acknowledged once every session's replicated queue at its session
  shard's owners holds the message.

With ``--spread`` each session subscribes to a topic of its own and the messages go to them in turn (message i to
session i mod ``--sessions``): many devices, each with a few messages per forwarded frame, the sessions' records in
many shards. Without it every session subscribes to the same topic and gets every message.

Then every client reads (the persistent ones come back through n3) and the bench checks each got every message.
Prints one line per load and round, then the ratio of the medians.

    .venv/bin/python -m shardmq.loadtest.session_queue_bench --messages 5000 --sessions 1
    .venv/bin/python -m shardmq.loadtest.session_queue_bench --messages 5000 --sessions 1000 --spread

Keep ``--messages`` under the nodes' ``max_queued`` (10,000) + ``max_inflight``: the baseline's clients do not read
while it runs. Run the same file with another checkout's interpreter to compare (its nodes run that checkout's
code).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster


def publish_rate(endpoint: str, messages: list[tuple[str, bytes]], batch: int) -> tuple[float, float]:
    """(acknowledged msg/s, seconds) of publishing ``messages`` at QoS 1; the first 100 warm lookups and caches."""
    with Client([endpoint], timeout=30.0) as pub:
        pub.publish_many(messages[:100], qos=1, batch=batch)
        start = time.perf_counter()
        pub.publish_many(messages[100:], qos=1, batch=batch)
        took = time.perf_counter() - start
    return (len(messages) - 100) / took, took


def drain(client: Client, expect: int) -> set[bytes]:
    """What ``client`` receives until it has ``expect`` distinct messages or 2 s pass without one."""
    got: set[bytes] = set()
    while len(got) < expect and (m := client.receive(timeout=2.0)) is not None:
        got.add(m.payload)
    return got


def missed(messages: list[tuple[str, bytes]], got: set[bytes], topic: str | None = None) -> int:
    """Messages (of ``topic`` only, when given) not in ``got``."""
    return sum(1 for t, data in messages if data not in got and (topic is None or t == topic))


def expect(messages: list[tuple[str, bytes]], topic: str) -> int:
    return sum(1 for t, _ in messages if t == topic)


def load(prefix: str, count: int, sessions: int, spread: bool, pad: bytes) -> tuple[list[str], list[tuple[str, bytes]]]:
    """(each session's topic, the messages): one topic for all, or with ``spread`` one per session, in turn."""
    topics = [f"{prefix}/{i}" for i in range(sessions)] if spread else [prefix] * sessions
    return topics, [(topics[i % sessions], b"%07d" % i + pad) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=1, help="each round measures both loads, baseline first")
    parser.add_argument("--spread", action="store_true", help="a topic per session, the messages to each in turn")
    parser.add_argument("--baseline-clients", type=int, default=200, help="clean clients at most (they share topics)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the cluster (``finally``) when killed
    rates: dict[str, list[float]] = {"baseline": [], "replicated": []}
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp), nodes=3, lease_ttl=5, log_level="warning")
        lc.up(timeout=60)
        lc.export_credentials()
        try:
            assert lc.state is not None
            eps = [p.client_endpoint for p in lc.state.nodes]
            pad = b"x" * max(0, args.payload - 8)
            for _ in range(args.rounds):
                p = uuid.uuid4().hex[:8]
                # baseline: clean sessions, connected, not reading
                topics, messages = load(f"{p}/clean", args.messages, args.sessions, args.spread, pad)
                # One client per session, up to --baseline-clients (file descriptors: a client is a zmq context);
                # past it client k subscribes to the topics of sessions k, k + n, ...: the same messages and holder.
                n = min(args.sessions, args.baseline_clients)
                clients = [Client([eps[0]], timeout=30.0) for _ in range(n)]
                mine = [sorted(set(topics[k::n])) for k in range(n)]
                try:
                    for c, own in zip(clients, mine, strict=True):
                        for topic in own:
                            c.subscribe(topic, qos=1)
                    rate, took = publish_rate(eps[1], messages, args.batch)
                    missing = 0
                    for c, own in zip(clients, mine, strict=True):
                        got = drain(c, sum(expect(messages, t) for t in own))
                        missing += sum(missed(messages, got, t) for t in own)
                finally:
                    for c in clients:
                        c.close()
                rates["baseline"].append(rate)
                print(f"load=baseline messages={args.messages - 100} sessions={args.sessions} spread={args.spread} "
                      f"batch={args.batch} "
                      f"payload={args.payload} acked_msg_per_s={rate:.0f} s={took:.2f} missing={missing}",
                      flush=True)  # fmt: skip
                # replicated: persistent sessions, offline
                topics, messages = load(f"{p}/q", args.messages, args.sessions, args.spread, pad)
                cids = [f"bench-{p}-{i}" for i in range(args.sessions)]
                for cid, topic in zip(cids, topics, strict=True):
                    with Client([eps[0]], client_id=cid, clean_session=False, session_expiry=600) as c:
                        c.subscribe(topic, qos=1)
                rate, took = publish_rate(eps[1], messages, args.batch)
                missing = 0
                for cid, topic in zip(cids, topics, strict=True):
                    with Client([eps[2]], client_id=cid, clean_session=False, session_expiry=600, timeout=30.0) as c:
                        missing += missed(messages, drain(c, expect(messages, topic)), topic)
                    with Client([eps[2]], client_id=cid):  # a clean connect ends the session (and its records)
                        pass
                rates["replicated"].append(rate)
                print(f"load=replicated messages={args.messages - 100} sessions={args.sessions} spread={args.spread} "
                      f"batch={args.batch} "
                      f"payload={args.payload} acked_msg_per_s={rate:.0f} s={took:.2f} missing={missing}",
                      flush=True)  # fmt: skip
        finally:
            lc.down()
    base, repl = statistics.median(rates["baseline"]), statistics.median(rates["replicated"])
    print(f"median baseline={base:.0f} replicated={repl:.0f} replicated/baseline={repl / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
