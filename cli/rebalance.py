"""``shardmq rebalance plan|apply``: what the rebalancer would move, and watching it do so.

The leader node rebalances by itself whenever membership changes; ``plan`` is a dry run computed here from the
same inputs (the assignment and members in etcd, the pure planner), and ``apply`` waits until the cluster is
settled while printing the leader's progress.
"""

from __future__ import annotations

import time
from typing import Any

from shardmq.client import Client, ShardMQError
from shardmq.rebalance import plan, summarize
from shardmq.ring import Assignment, ShardMap
from shardmq.shard.membership import read_assignment, read_members
from shardmq.testing import LocalCluster


def plan_report(lc: LocalCluster) -> dict[str, Any]:
    assert lc.state is not None
    client = lc.etcd_client()
    document, revision = read_assignment(client, lc.state.cluster)
    if document is None:
        raise RuntimeError("the cluster has no assignment yet")
    current = Assignment.from_json(document)
    _, members = read_members(client, lc.state.cluster)
    live = {n: m.weight for n, m in members.items() if not m.leaving}
    target = ShardMap.build(live, current.shard_count, current.replication).table
    moves = plan(current, target, set(members))
    counts: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for proc in lc.live_nodes():
        try:
            with Client([proc.client_endpoint], timeout=10.0, credentials=lc.admin_credentials) as c:
                for shard, (routes, size) in c.status(detail=True).get("routes_per_shard", {}).items():
                    counts[int(shard)], sizes[int(shard)] = routes, size
        except (ShardMQError, TimeoutError):
            pass
    summary = summarize(current, moves, counts, sizes)
    return {
        "assignment_version": current.version,
        "assignment_revision": revision,
        "members": sorted(members),
        "leaving": sorted(n for n, m in members.items() if m.leaving),
        "moves": summary.moves,
        "replica_copies": summary.replica_copies,
        "replica_drops": summary.replica_drops,
        "routes_to_copy": summary.routes_to_copy,
        "bytes_to_copy": summary.bytes_to_copy,
        "lost_shards": summary.lost_shards,
        "load_before": summary.load_before,
        "load_after": summary.load_after,
        "balance_before": round(summary.balance_before, 3),
        "balance_after": round(summary.balance_after, 3),
        "first_moves": [
            {"shard": m.shard, "source": m.source, "add": m.add, "remove": m.remove, "new_owners": m.new_owners}
            for m in moves[:10]
        ],
    }


def print_plan(report: dict[str, Any]) -> None:
    print(f"assignment version {report['assignment_version']}; members {report['members']}"
          f"{'; leaving ' + str(report['leaving']) if report['leaving'] else ''}")
    if not report["moves"]:
        print("nothing to move: the assignment is the balanced target")
        return
    print(f"moves: {report['moves']} shards, {report['replica_copies']} replica copies, "
          f"{report['replica_drops']} replica drops, lost shards: {report['lost_shards']}")
    print(f"to copy: {report['routes_to_copy']} routes, {report['bytes_to_copy']} bytes")
    print(f"{'node':<8} {'before':>8} {'after':>8}")
    for node in sorted(set(report["load_before"]) | set(report["load_after"])):
        print(f"{node:<8} {report['load_before'].get(node, 0):>8} {report['load_after'].get(node, 0):>8}")
    print(f"balance (max/mean replicas): {report['balance_before']} -> {report['balance_after']}")


def apply(lc: LocalCluster, timeout: float = 300.0) -> None:
    """Wait for the leader to finish, printing its progress once a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = []
        for proc in lc.live_nodes():
            try:
                with Client([proc.client_endpoint], timeout=2.0, credentials=lc.admin_credentials) as c:
                    statuses.append(c.status())
            except (ShardMQError, TimeoutError):
                pass
        progress = next((s["rebalance"] for s in statuses if "rebalance" in s), None)
        if statuses and all(s["settled"] for s in statuses) and progress and not progress["moves_in_progress"]:
            print(f"settled: {progress['shards_flipped']} shards flipped, {progress['promotions']} promotions, "
                  f"{progress['lost_shards']} lost")
            return
        if progress:
            print(f"moving: {progress['moves_in_progress']} in progress, {progress['moves_remaining']} remaining, "
                  f"{progress['shards_flipped']} flipped", flush=True)
        time.sleep(1.0)
    raise TimeoutError(f"the cluster did not settle within {timeout}s")
