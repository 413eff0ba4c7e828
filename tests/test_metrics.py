"""Prometheus metrics: a real node's /metrics endpoint shows wire load per channel, routes and errors."""

from __future__ import annotations

import time
import urllib.request
import uuid

from shardmq.shard.metrics import SIZE_BOUNDS, WireStats
from shardmq.testing import LocalCluster


def scrape(url: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
    return samples


def test_wire_stats_buckets_and_copies() -> None:
    stats = WireStats()
    stats.count("peer", "n2", "out", [b"FWD", b"x" * 60, b""])
    stats.count("peer", "n2", "out", [b"FWD", b"x" * 2000, b""])
    copy = stats.copy()
    ch = copy[("peer", "n2", "out")]
    assert (ch.frames, ch.bytes) == (2, 63 + 2003)
    assert ch.sizes[0] == 1 and ch.sizes[SIZE_BOUNDS.index(4096)] == 1
    stats.count("peer", "n2", "out", [b"x"])
    assert copy[("peer", "n2", "out")].frames == 2  # a copy does not move with the live counters


def test_node_serves_prometheus_metrics(cluster: LocalCluster, connect) -> None:
    assert cluster.state is not None
    node = cluster.state.nodes[0]
    assert node.metrics_endpoint and node.metrics_endpoint.startswith("http://127.0.0.1:")
    topic = f"metrics/{uuid.uuid4().hex[:8]}"
    sub = connect(1)
    sub.subscribe(topic, qos=1)
    pub = connect(0)
    for _ in range(20):
        pub.publish(topic, b"x" * 100, qos=1)
    deadline = time.monotonic() + 5
    while True:  # the node refreshes its snapshot once a second
        samples = scrape(node.metrics_endpoint)
        out_peer = sum(
            v for k, v in samples.items() if k.startswith('shardmq_frames_total{channel="peer"') and '"out"' in k
        )
        if out_peer >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert out_peer >= 20  # 20 forwards to n2 at least
    assert any(k.startswith("shardmq_message_size_bytes_bucket") for k in samples)
    assert samples["shardmq_routes"] >= 0 and samples["shardmq_assignment_version"] >= 1
    assert samples['shardmq_shards{role="replica"}'] > 0
    assert 'shardmq_events_total{name="publishes.in"}' in samples
    # The route cache, exported from the same counters as status (tests/test_route_cache.py checks their meaning).
    cache = pub.status()["route_cache"]
    assert 0 <= samples['shardmq_route_cache_lookups_total{result="hit"}'] <= cache["hits"]
    assert 0 <= samples['shardmq_route_cache_lookups_total{result="miss"}'] <= cache["misses"]
    assert samples["shardmq_route_cache_entries"] >= 0 and samples["shardmq_route_cache_watchers"] >= 0
    assert samples["shardmq_lookups_in_flight"] >= 0 and samples["shardmq_publishes_waiting"] >= 0
