"""``shardmq demo``: a local cluster routing real traffic, and a report of what it did."""

from __future__ import annotations

import time
from pathlib import Path

from shardmq.client import Client, ShardMQError
from shardmq.testing import LocalCluster

from .main import print_status

SUBSCRIBERS = [
    # (name, node index, filters)
    ("dashboard", 0, ["sensors/+/temperature"]),
    ("archiver", 1, ["sensors/#"]),
    ("kitchen-app", 2, ["+/kitchen/#", "sensors/kitchen/temperature"]),
    ("everything", 0, ["#"]),
    ("sys-monitor", 1, ["$SYS/#"]),
]
PUBLISHES = [
    "sensors/kitchen/temperature",
    "sensors/garage/temperature",
    "sensors/garage/humidity",
    "lights/kitchen/ceiling",
    "sensors",
    "$SYS/broker/clients",
]


def show_security(cluster: LocalCluster, endpoints: list[str]) -> None:
    """Both ports speak CURVE: a stranger is refused, and a principal's ACL holds."""
    print("\n== security (CURVE on every connection; each principal has an ACL)")
    try:
        Client(endpoints, credentials=False, timeout=5.0)
    except ShardMQError as exc:
        print(f"   a client without credentials: {exc.code} ({exc.reason.split(': ', 1)[0]})")
    path = cluster.add_credentials("kitchen-sensor", publish=["sensors/kitchen/#"])
    print(f"   made principal kitchen-sensor (may publish to sensors/kitchen/#): {path.name}")
    with Client(endpoints, credentials=path) as sensor:
        sensor.publish("sensors/kitchen/temp", b"21.5", qos=1)
        print("   kitchen-sensor published to sensors/kitchen/temp: acknowledged")
        for call, what in ((lambda: sensor.publish("sensors/hall/temp", b"3", qos=1), "publish to sensors/hall/temp"),
                           (lambda: sensor.subscribe("sensors/#"), "subscribe to sensors/#")):  # fmt: skip
            try:
                call()
            except ShardMQError as exc:
                print(f"   kitchen-sensor {what}: {exc.code}")


def run_demo(directory: Path, nodes: int = 3) -> None:
    cluster = LocalCluster(directory, nodes=nodes, log_level="warning")
    print(f"== starting a private etcd and {nodes} shard nodes under {cluster.dir}")
    state = cluster.up()
    admin = cluster.admin_credentials  # the operator's credentials (CURVE key + an ACL allowing everything)
    endpoints = state.client_endpoints()
    try:
        for node in state.nodes:
            print(f"   {node.name}: {node.client_endpoint} (pid {node.pid})")
        clients: dict[str, Client] = {}
        print("\n== subscribing (each client on a different node; routes go to the shards that own them)")
        for name, idx, filters in SUBSCRIBERS:
            # Put the preferred node first; the rest are failover endpoints.
            ordered = endpoints[idx % len(endpoints) :] + endpoints[: idx % len(endpoints)]
            c = clients[name] = Client(ordered, client_id=name, credentials=admin)
            for f in filters:
                c.subscribe(f, qos=1)
            print(f"   {name:<12} on {c.node}: {', '.join(filters)}")
        publisher = Client(endpoints[1:] + endpoints[:1], client_id="publisher", credentials=admin)
        print(f"\n== publishing with QoS 1 from a client on {publisher.node} (each call returns after its ack)")
        for i, topic in enumerate(PUBLISHES):
            publisher.publish(topic, f"reading {i}".encode(), qos=1)
            print(f"   published {topic}")
        deadline = time.monotonic() + 2.0
        print("\n== what each subscriber received (exactly one copy per matching publish)")
        for name, _, _filters in SUBSCRIBERS:
            got = []
            while (msg := clients[name].receive(timeout=max(0.0, deadline - time.monotonic()) + 0.2)) is not None:
                got.append(msg.topic)
            print(f"   {name:<12} {len(got)} message(s): {', '.join(got) or '-'}")
        print("\n   note: '#' and '+/kitchen/#' do not match '$SYS/...' topics (MQTT 3.1.1 section 4.7.2)")
        show_security(cluster, endpoints)
        print("\n== cluster status (routes are held by shard owners, R=2 replicas; root-set filters on every node)")
        print_status(cluster.status())
        for c in [*clients.values(), publisher]:
            c.close()
    finally:
        print("\n== stopping the cluster (only the processes this demo started)")
        cluster.down()
        print("   done")
