"""Queued-message throughput: QoS 1 publishes to offline persistent sessions, acknowledged, in messages per second.

Starts a local 3-node cluster (R=2). ``--sessions`` clients with ``clean_session=False`` subscribe at QoS 1 to one
topic on n1 and close (their sessions stay, offline, at n1). A publisher on n2 publishes ``--messages`` QoS 1
messages with ``publish_many`` (``--batch`` per frame) and each returns once acknowledged, i.e. (with replicated
sessions) once every session's replicated queue at its session shard's owners holds it. Then the clients come back
(through n3) and the bench checks each got every message. Prints the publish rate (acknowledged msg/s).

    .venv/bin/python -m shardmq.loadtest.session_queue_bench --messages 5000 --sessions 1

Run the same file with another checkout's interpreter to compare (its nodes run that checkout's code).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp), nodes=3, lease_ttl=5, log_level="warning")
        lc.up(timeout=60)
        lc.export_credentials()
        try:
            assert lc.state is not None
            eps = [p.client_endpoint for p in lc.state.nodes]
            p = uuid.uuid4().hex[:8]
            topic = f"{p}/q"
            cids = [f"bench-{p}-{i}" for i in range(args.sessions)]
            for cid in cids:
                with Client([eps[0]], client_id=cid, clean_session=False, session_expiry=600) as c:
                    c.subscribe(topic, qos=1)
            pad = b"x" * max(0, args.payload - 8)
            messages = [(topic, b"%07d" % i + pad) for i in range(args.messages)]
            with Client([eps[1]], timeout=30.0) as pub:
                pub.publish_many(messages[:100], qos=1, batch=args.batch)  # warm: lookups, caches
                start = time.perf_counter()
                pub.publish_many(messages[100:], qos=1, batch=args.batch)
                took = time.perf_counter() - start
            rate = (args.messages - 100) / took
            missing = 0
            for cid in cids:
                with Client([eps[2]], client_id=cid, clean_session=False, session_expiry=600, timeout=30.0) as c:
                    got = set()
                    while (m := c.receive(timeout=2.0)) is not None:
                        got.add(m.payload)
                    missing += sum(1 for _, data in messages if data not in got)
            print(f"messages={args.messages - 100} sessions={args.sessions} batch={args.batch} "
                  f"payload={args.payload} acked_msg_per_s={rate:.0f} s={took:.2f} missing={missing}")  # fmt: skip
        finally:
            lc.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
