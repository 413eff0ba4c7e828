"""``shardmq demo``: a local cluster routing real traffic, and a report of what it did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


# A client process with a will, killed -9 by the demo: the node finds its connection gone within
# 3 x --client-idle-check (1 s here, 10 s by default) and publishes the will.
WILL_CLIENT = """
import sys, time
from shardmq.client import Client
c = Client([sys.argv[1]], client_id="door-sensor", credentials=sys.argv[2],
           will=("status/door-sensor", b"offline (its will)", 1, True))
print("ready", flush=True)
time.sleep(120)
"""


def drain(client: Client, quiet: float = 0.5) -> list:
    """Everything ``client`` receives until ``quiet`` seconds pass without a message."""
    got = []
    while (msg := client.receive(timeout=quiet)) is not None:
        got.append(msg)
    return got


def show_sessions(cluster: LocalCluster, endpoints: list[str], admin: Path | bool) -> None:
    """Retained messages, a persistent session that moves between nodes, a shared subscription and a will."""
    def on(i: int) -> list[str]:
        return endpoints[i % len(endpoints) :] + endpoints[: i % len(endpoints)]

    print("\n== retained messages, persistent sessions, shared subscriptions, wills")
    with Client(on(1), client_id="hall-switch", credentials=admin) as switch:
        switch.publish("lights/hall/state", b"on", qos=1, retain=True)
    with Client(on(2), client_id="late-viewer", credentials=admin) as viewer:
        viewer.subscribe("lights/+/state", qos=1)
        got = drain(viewer)
        print(f"   retained: lights/hall/state=on stored at its shard; a later subscriber of lights/+/state on "
              f"{viewer.node} got {[(m.topic, m.payload.decode(), 'retain' if m.retain else 'live') for m in got]}")

    phone = Client(on(0), client_id="phone", credentials=admin, clean_session=False, session_expiry=300)
    phone.subscribe("alerts/#", qos=1)
    first_node = phone.node
    phone.close()
    with Client(on(1), client_id="alarm", credentials=admin) as alarm:
        for i in range(3):
            alarm.publish(f"alerts/door/{i}", f"alert {i}".encode(), qos=1)
    phone = Client(on(2), client_id="phone", credentials=admin, clean_session=False, session_expiry=300)
    got = drain(phone)
    print(f"   persistent session: 'phone' subscribed alerts/# on {first_node} and went away; 3 alerts were "
          f"acknowledged meanwhile (queued, replicated at the owners of its session shard); it came back on "
          f"{phone.node}: session_present={phone.session_present}, got {[m.payload.decode() for m in got]}")
    phone.close()
    with Client(on(2), client_id="phone", credentials=admin):  # a clean connect ends the persistent session
        pass

    workers = [Client(on(i), client_id=f"worker-{i}", credentials=admin) for i in range(2)]
    for w in workers:
        w.subscribe("$share/workers/jobs/#", qos=1)
    with Client(on(2), client_id="dispatcher", credentials=admin) as dispatcher:
        for i in range(10):
            dispatcher.publish(f"jobs/{i}", b"job %d" % i, qos=1)
    counts = {f"worker-{i} on {w.node}": len(drain(w)) for i, w in enumerate(workers)}
    print(f"   shared subscription $share/workers/jobs/#: 10 jobs, each to one member: {counts}")
    for w in workers:
        w.close()

    with Client(on(1), client_id="door-watcher", credentials=admin) as watcher:
        watcher.subscribe("status/#", qos=1)
        proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, on(0)[0], str(admin)], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # "ready": connected, its will stored
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            msg = watcher.receive(timeout=10.0)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if msg is not None:
            print(f"   will: a client process with a will was killed -9 (pid {proc.pid}); {watcher.node} delivered "
                  f"{msg.topic}={msg.payload.decode()!r} {time.monotonic() - killed:.1f} s later (bound: 3 x "
                  "--client-idle-check, 1 s in this demo)")
        else:
            print("   will: the killed client's will did not arrive within 10 s")


def run_demo(directory: Path, nodes: int = 3) -> None:
    cluster = LocalCluster(directory, nodes=nodes, log_level="warning", node_args=["--client-idle-check", "1"])
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
        show_sessions(cluster, endpoints, admin)
        show_security(cluster, endpoints)
        print("\n== cluster status (routes are held by shard owners, R=2 replicas; root-set filters on every node)")
        print_status(cluster.status())
        for c in [*clients.values(), publisher]:
            c.close()
    finally:
        print("\n== stopping the cluster (only the processes this demo started)")
        cluster.down()
        print("   done")
