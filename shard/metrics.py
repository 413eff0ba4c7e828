"""Wire-load accounting and the Prometheus endpoint of a node.

Rules of this file:
- ``WireStats`` is plain counting done by the event loop: frames and bytes in and out per channel (``client``, or
  ``peer`` with the peer's id) and message sizes in power-of-two buckets. It costs a few additions per frame and
  no allocation on the hot path.
- The Prometheus HTTP server runs in its own thread (prometheus-client's), so it never reads live loop state:
  the loop publishes a ``MetricsSnapshot`` (copies) once a second, and the collector turns the latest snapshot
  into metric families at scrape time. Swapping one reference is atomic, so no lock is needed.
- Names: ``shardmq_frames_total``, ``shardmq_bytes_total`` and ``shardmq_message_size_bytes`` (labels
  ``channel``, ``peer``, ``direction``); gauges for routes, shards, root-set size, clients, assignment version,
  fenced and leader; counters ``shardmq_errors_total{code}``, ``shardmq_drops_total{reason}``,
  ``shardmq_handoff_total{what}``, ``shardmq_route_cache_total{what}`` (invalidations) and
  ``shardmq_events_total{name}`` for every other node counter; the route cache's
  ``shardmq_route_cache_lookups_total{result="hit"|"miss"}`` and its ``entries``/``watchers`` gauges;
  ``shardmq_client_dropped_total{client}`` for the clients in status ``clients_dropped`` (at most 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

SIZE_BOUNDS = (64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576)


def _bucket(size: int) -> int:
    for i, bound in enumerate(SIZE_BOUNDS):
        if size <= bound:
            return i
    return len(SIZE_BOUNDS)


@dataclass(slots=True)
class Channel:
    frames: int = 0
    bytes: int = 0
    sizes: list[int] = field(default_factory=lambda: [0] * (len(SIZE_BOUNDS) + 1))

    def add(self, size: int) -> None:
        self.frames += 1
        self.bytes += size
        self.sizes[_bucket(size)] += 1


class WireStats:
    """Counts what crosses the wire, keyed by (channel, peer, direction); peer is "" for clients."""

    def __init__(self) -> None:
        self.channels: dict[tuple[str, str, str], Channel] = {}

    def count(self, channel: str, peer: str, direction: str, parts: list[bytes]) -> None:
        key = (channel, peer, direction)
        ch = self.channels.get(key)
        if ch is None:
            ch = self.channels[key] = Channel()
        ch.add(sum(len(p) for p in parts))

    def copy(self) -> dict[tuple[str, str, str], Channel]:
        return {k: Channel(c.frames, c.bytes, list(c.sizes)) for k, c in self.channels.items()}


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    node: str
    counters: dict[str, int]
    status: dict[str, Any]
    wire: dict[tuple[str, str, str], Channel]


class NodeCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: MetricsSnapshot | None = None

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot
        if snap is None:
            return
        labels = ["channel", "peer", "direction"]
        frames = CounterMetricFamily("shardmq_frames", "Frames sent and received per channel", labels=labels)
        size = CounterMetricFamily("shardmq_bytes", "Bytes sent and received per channel", labels=labels)
        hist = HistogramMetricFamily("shardmq_message_size_bytes", "Size of each frame", labels=labels)
        for (channel, peer, direction), ch in sorted(snap.wire.items()):
            key = [channel, peer, direction]
            frames.add_metric(key, ch.frames)
            size.add_metric(key, ch.bytes)
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, SIZE_BOUNDS), "+Inf"], ch.sizes, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric(key, buckets, sum_value=ch.bytes)
        yield frames
        yield size
        yield hist

        st = snap.status
        gauges = {
            "routes": ("Routes held (filter, node pairs) in owned shards and the root set", st.get("routes", 0)),
            "root_set_size": ("Filters in the root set, kept on every node", st.get("root_set_size", 0)),
            "clients": ("Connected client sessions", st.get("clients", 0)),
            "local_filters": ("Distinct filters subscribed by this node's clients", st.get("local_filters", 0)),
            "assignment_version": ("Version of the shard assignment this node sees", st.get("assignment_version", 0)),
            "rss_bytes": ("Resident memory of the node process", st.get("rss_bytes", 0)),
            "bytes_per_route": ("RSS growth since start per route held", st.get("bytes_per_route") or 0),
            "hops_per_publish": ("Mean inter-node hops of a publish", st.get("hops_per_publish", 0)),
            "lookups_in_flight": ("LOOKUPs this entry node waits for", st.get("lookups_in_flight", 0)),
            "publishes_waiting": ("Publishes queued behind lookups at this entry node", st.get("publishes_waiting", 0)),
            "clients_paused": ("1 while the node reads no client frames", int(st.get("clients_paused", 0))),
            "fenced": ("1 while the node cannot vouch for its etcd lease", int(bool(st.get("fenced")))),
            "qos1_inflight": ("QoS 1 messages written to clients, not yet acknowledged", st.get("qos1_inflight", 0)),
            "qos1_backlog": ("QoS 1 messages waiting for room in a client's window", st.get("qos1_backlog", 0)),
            "qos1_held_bytes": ("Payload bytes of QoS 1 messages kept for clients", st.get("qos1_held_bytes", 0)),
            "leader": ("1 on the node that runs the rebalancer", int(st.get("leader") == snap.node)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"shardmq_{name}", doc, value=value)
        cache = st.get("route_cache") or {}
        lookups = CounterMetricFamily(
            "shardmq_route_cache_lookups", "Publishes' shard lookups at this entry node", labels=["result"]
        )
        lookups.add_metric(["hit"], cache.get("hits", 0))
        lookups.add_metric(["miss"], cache.get("misses", 0))
        yield lookups
        yield GaugeMetricFamily("shardmq_route_cache_entries", "Cached lookup answers", value=cache.get("entries", 0))
        yield GaugeMetricFamily(
            "shardmq_route_cache_watchers", "Entry nodes told when this owner's routes change (per shard)",
            value=cache.get("watchers", 0),
        )  # fmt: skip
        shards = GaugeMetricFamily("shardmq_shards", "Shards held by this node", labels=["role"])
        shards.add_metric(["replica"], st.get("shards", 0))
        shards.add_metric(["primary"], st.get("primary_shards", 0))
        yield shards
        # Only the clients status lists (the most drops, bounded): a label per client would be unbounded.
        client_drops = CounterMetricFamily(
            "shardmq_client_dropped", "QoS 0 messages dropped for a slow client (the worst ones)", labels=["client"]
        )
        for entry in st.get("clients_dropped") or []:
            client_drops.add_metric([entry["client"]], entry["dropped"])
        yield client_drops

        families = {
            "errors": CounterMetricFamily("shardmq_errors", "Rejected inputs by error code", labels=["code"]),
            "drops": CounterMetricFamily(
                "shardmq_drops", "Messages dropped by reason (frames for reasons ending in _frames)", labels=["reason"]
            ),
            "handoff": CounterMetricFamily("shardmq_handoff", "Shard hand-off counters", labels=["what"]),
            "route_cache": CounterMetricFamily(
                "shardmq_route_cache",
                "Route cache invalidations sent and received, timeouts and refreshes",
                labels=["what"],
            ),
            "events": CounterMetricFamily("shardmq_events", "Other node counters", labels=["name"]),
        }
        for name, value in sorted(snap.counters.items()):
            head, _, rest = name.partition(".")
            family = head if head in ("errors", "drops", "handoff", "route_cache") else "events"
            families[family].add_metric([rest if family != "events" else name], value)
        yield from families.values()


def serve_metrics(port: int, address: str = "127.0.0.1") -> tuple[NodeCollector, int]:
    """Start the /metrics HTTP server; returns the collector to feed and the bound port."""
    registry = CollectorRegistry(auto_describe=False)
    collector = NodeCollector()
    registry.register(collector)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return collector, server.server_address[1]
