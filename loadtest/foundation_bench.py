"""The foundation benchmark, all figures measured in one run (a script, not a test).

Prints: topic -> owners lookups per second against uhashring ``get_node`` (goal >= 10x); bytes per route at
1M and 5M routes against a bare dict floor (goal <= 1.2x); shard balance and moved fraction on join and leave
for 3, 5 and 10 nodes next to raw uhashring.

Usage: ``python -m shardmq.loadtest.foundation_bench [--routes 1000000,5000000]``
"""

from __future__ import annotations

import argparse
import platform
import time

from . import ring_figures, route_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", default="1000000,5000000", help="comma-separated route counts")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"shardmq foundation benchmark  python {platform.python_version()}  {platform.machine()}\n")
    print("== ring: placement balance, movement, lookup rate")
    ring_figures.main()
    print("\n== router: memory per route")
    route_memory.main(["--routes", args.routes])
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
