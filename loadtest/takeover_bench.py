"""Persistent session takeover: how long a client waits when it comes back through another node.

Starts a local 3-node cluster (R=2). For each value of ``--queued`` (a comma-separated list, e.g. ``0,100``), one
client with ``clean_session=False`` subscribes at QoS 1 and closes; then, ``--rounds`` times: that many QoS 1
messages are published while it is away, and it connects again through the next node (n1 -> n2 -> n3 -> n1 ...),
which takes the session over from the node that held it (every round is a cross-node takeover). Per round it
measures the connect (socket, CURVE handshake, HELLO to WELCOME: directory read, SESSION_TAKE, routes, directory
write) and the time until the last queued message was received, and checks every queued message came once, in
order; and, as a baseline in the same run, a clean connect (and close) to the same node.

    .venv/bin/python -m shardmq.loadtest.takeover_bench --rounds 200 --queued 0,100

Prints p50, p99, max and mean of each, in milliseconds (p99: the sample at rank round(0.99 x (rounds - 1)) of the
sorted ones, so with 200 rounds the 198th smallest, below the two largest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def takeovers(eps: list[str], rounds: int, queued: int, payload: int) -> dict[str, list[float]] | None:
    """``rounds`` cross-node takeovers of one session with ``queued`` messages waiting each time; None (after
    saying why) if a round lost, duplicated or reordered a message or found no session."""
    cid = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"{cid}/t"
    client = Client([eps[0]], client_id=cid, clean_session=False, session_expiry=300)
    client.subscribe(f"{cid}/#", qos=1)
    client.close()
    connects: list[float] = []
    drained: list[float] = []
    clean: list[float] = []  # a clean connect to the same node: what any connect costs (CURVE, HELLO)
    pad = b"x" * max(0, payload - 12)
    with Client([eps[0]]) as pub:
        for r in range(rounds):
            sent = [b"%d-%d-" % (r, i) + pad for i in range(queued)]
            for data in sent:
                pub.publish(topic, data, qos=1)
            target = eps[(r + 1) % len(eps)]
            start = time.perf_counter()
            client = Client([target], client_id=cid, clean_session=False, session_expiry=300)
            connected = time.perf_counter()
            got = []
            while len(got) < len(sent) and (m := client.receive(timeout=5.0)) is not None:
                got.append(m.payload)
            done = time.perf_counter()
            if not client.session_present or got != sent:
                print(f"queued {queued}, round {r}: session_present={client.session_present}, {len(got)} of "
                      f"{len(sent)} messages or out of order", file=sys.stderr)  # fmt: skip
                return None
            client.close()
            connects.append(1000 * (connected - start))
            drained.append(1000 * (done - start))
            start = time.perf_counter()
            with Client([target]):
                clean.append(1000 * (time.perf_counter() - start))
    with Client([eps[0]], client_id=cid):  # a clean connect ends the session
        pass
    return {
        "takeover connect (HELLO to WELCOME)": connects,
        "takeover, last queued message received": drained,
        "clean connect (baseline, same run)": clean,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--queued", default="0,100", help="QoS 1 messages queued while away; a list runs each")
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    args = parser.parse_args(argv)
    results: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp), nodes=3, lease_ttl=5, log_level="warning")
        lc.up(timeout=60)
        lc.export_credentials()  # every Client below authenticates as the cluster's operator
        try:
            assert lc.state is not None
            eps = [p.client_endpoint for p in lc.state.nodes]
            for queued in (int(q) for q in args.queued.split(",")):
                found = takeovers(eps, args.rounds, queued, args.payload)
                if found is None:
                    return 1
                results[queued] = found
        finally:
            lc.down()
    for queued, series in results.items():
        print(f"{args.rounds} cross-node takeovers, {queued} queued QoS 1 messages of {args.payload} bytes each, "
              "3 nodes R=2")  # fmt: skip
        for name, samples in series.items():
            if queued == 0 and name.startswith("takeover, last"):
                continue  # nothing queued: the same as the connect
            print(f"  {name}: p50 {percentile(samples, 0.5):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms, "
                  f"max {max(samples):.1f} ms, mean {statistics.mean(samples):.1f} ms, "
                  f"min {min(samples):.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
