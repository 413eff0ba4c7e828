"""Shared subscriptions: balance across members and throughput.

Starts a local 3-node cluster (R=2). ``--members`` clients join ``$share/bench/<run>/+`` spread over n1 and n2
(member i on n1 when i is even), each reading in a thread of its own; a plain subscriber of the same filter on n2
reads everything as a check. A publisher on n3 sends ``--messages`` messages (QoS 1 one at a time, or QoS 0
batched by the SDK) over ``--topics`` topics. It prints msg/s (publish start to the last shared message received),
how many each member got (and on which node), the largest and smallest share against the mean, and the check that
every message reached exactly one member.

    .venv/bin/python -m shardmq.loadtest.shared_bench --members 4 --messages 5000 --qos 1

Members per node differ with an odd ``--members``: the entry node weights nodes by their members, so each member
still gets about the same share.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(Path(tmp), nodes=3, lease_ttl=5, log_level="warning")
        lc.up(timeout=60)
        lc.export_credentials()
        try:
            assert lc.state is not None
            eps = {p.name: p.client_endpoint for p in lc.state.nodes}
            run = uuid.uuid4().hex[:8]
            share = f"$share/bench/{run}/+"
            members = [Client([eps["n1" if i % 2 == 0 else "n2"]]) for i in range(args.members)]
            for m in members:
                m.subscribe(share, qos=args.qos)
            plain = Client([eps["n2"]])
            plain.subscribe(f"{run}/+", qos=args.qos)
            got: list[list[bytes]] = [[] for _ in members]
            plain_got: list[bytes] = []
            total = [0]
            last = [0.0]
            lock = threading.Lock()
            stop = threading.Event()

            def read(client: Client, into: list[bytes], counted: bool) -> None:
                while not stop.is_set():
                    msg = client.receive(timeout=0.2)
                    if msg is None:
                        continue
                    into.append(msg.payload[:12])
                    if counted:
                        with lock:
                            total[0] += 1
                            last[0] = time.perf_counter()

            threads = [
                threading.Thread(target=read, args=(m, g, True), daemon=True)
                for m, g in zip(members, got, strict=True)
            ]
            threads.append(threading.Thread(target=read, args=(plain, plain_got, False), daemon=True))
            for t in threads:
                t.start()
            pad = b"x" * max(0, args.payload - 12)
            start = time.perf_counter()
            with Client([eps["n3"]]) as pub:
                for i in range(args.messages):
                    pub.publish(f"{run}/t{i % args.topics}", b"%011d-" % i + pad, qos=args.qos)
                pub.flush()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and total[0] < args.messages:
                time.sleep(0.05)
            time.sleep(0.5)  # duplicates, if any, would arrive now
            stop.set()
            for t in threads:
                t.join()
            took = (last[0] or time.perf_counter()) - start
            counts = Counter(p for g in got for p in g)
            mean = args.messages / len(members)
            print(f"members={len(members)} messages={args.messages} qos={args.qos} topics={args.topics} "
                  f"payload={args.payload}")  # fmt: skip
            print(f"shared msg/s={total[0] / took:,.0f} (received {total[0]} in {took:.2f} s)")
            for i, g in enumerate(got):
                print(f"  member {i} on {'n1' if i % 2 == 0 else 'n2'}: {len(g)} ({len(g) / mean:.2f}x mean)")
            sizes = [len(g) for g in got]
            print(f"balance: max/mean={max(sizes) / mean:.2f} min/mean={min(sizes) / mean:.2f}")
            missing = args.messages - len(counts)
            duplicated = sum(1 for n in counts.values() if n > 1)
            print(f"exactly once across the group: missing={missing} duplicated={duplicated}; "
                  f"plain subscriber got {len(set(plain_got))} of {args.messages}")  # fmt: skip
            for m in [*members, plain]:
                m.close()
            return 0 if missing == 0 and duplicated == 0 else 1
        finally:
            lc.down()


if __name__ == "__main__":
    sys.exit(main())
