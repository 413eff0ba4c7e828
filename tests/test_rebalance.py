"""Rebalancing with real processes: kill -9, SIGSTOP, graceful leave and return, all under QoS 1 load.

Each test runs its own 3-node cluster (lease TTL 2 s) on loopback and stops it, by pid, at the end. Figures
(recovery time, duplicates, retries) are printed for the record, never asserted: timing on this machine is noisy.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from rebalance_load import Publisher, Subscriber, current_assignment, topics_with_primary
from tcp_proxy import TcpProxy

from shardmq.client import Client
from shardmq.testing import LocalCluster, free_port, pid_runs

LEASE_TTL = 2


@pytest.fixture
def small_cluster(tmp_path) -> Iterator[LocalCluster]:
    lc = LocalCluster(
        tmp_path / "c", nodes=3, lease_ttl=LEASE_TTL, log_level="info", node_args=["--client-idle-check", "1"]
    )
    lc.up(timeout=60)
    yield lc
    procs = list(lc.state.nodes) if lc.state else []
    lc.down()
    assert not any(pid_runs(p) for p in procs)


def statuses(lc: LocalCluster) -> list[dict]:
    out = []
    for proc in lc.live_nodes():
        with Client([proc.client_endpoint], timeout=2.0) as c:
            out.append(c.status())
    return out


def final_round(endpoints: list[str], topics: list[str]) -> Publisher:
    """One more acked message per topic after the dust settled: proves every route is still in place."""
    final = Publisher("final", endpoints, topics, interval=0.0, max_messages=len(topics))
    final.start()
    final.join(timeout=60)
    assert len(final.acked) == len(topics)
    return final


def check_delivery(subs: list[Subscriber], pubs: list[Publisher]) -> dict[str, int]:
    for sub in subs:
        sub.finish()
    figures = {"acked": sum(len(p.acked) for p in pubs), "retries": sum(p.retries for p in pubs)}
    for sub in subs:
        assert sub.missing(pubs) == [], f"{sub.name} lost acknowledged messages"
        assert sub.order_violations == 0, f"{sub.name} saw out-of-order first deliveries"
        figures[f"duplicates.{sub.name}"] = sub.duplicates()
    return figures


def test_kill_primary_under_qos1_load(small_cluster: LocalCluster) -> None:
    lc = small_cluster
    assert lc.state is not None
    n1, n2, n3 = lc.state.client_endpoints()
    topics = topics_with_primary(lc, "n2", 30, "kill") + [f"other/{i}" for i in range(10)]
    subs = [Subscriber([n1, n3], "a", topics), Subscriber([n3, n1], "b", topics)]
    on_victim = Subscriber([n2, n1, n3], "c", topics)  # its node dies: the SDK fails over and resubscribes
    for sub in [*subs, on_victim]:
        sub.start()
    pubs = [Publisher("p1", [n1, n3], topics), Publisher("p2", [n3, n1], topics), Publisher("p3", [n2, n1], topics)]
    for pub in pubs:
        pub.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    lc.stop_node("n2", sig=signal.SIGKILL)
    time.sleep(LEASE_TTL + 4)
    for pub in pubs:
        pub.stop.set()
        pub.join(timeout=10)
    lc.wait_ready(2, timeout=60)
    deadline = time.monotonic() + 30
    while on_victim.client.failovers < 1 and time.monotonic() < deadline:  # it notices the silence, then moves
        time.sleep(0.2)
    assert on_victim.client.failovers >= 1
    time.sleep(0.5)  # let its resubscription land
    final = final_round([n1, n3], topics)
    figures = check_delivery(subs, [*pubs, final])
    on_victim.finish(limit=20)
    assert not on_victim.missing([final]), "the failed-over subscriber did not get its subscriptions back"
    recovery = max(p.longest_gap_after(killed_at) for p in pubs[:2])
    print(f"\nkill -9 n2: recovery {recovery:.2f}s (lease TTL {LEASE_TTL}s), {figures}")
    a = current_assignment(lc)
    assert "n2" not in a.nodes() and a.replication == 2
    assert all(len(a.owners(s)) == 2 for s in range(a.shard_count))


def test_graceful_leave_and_return_under_load(small_cluster: LocalCluster) -> None:
    lc = small_cluster
    assert lc.state is not None
    n1, n2, _ = lc.state.client_endpoints()
    topics = topics_with_primary(lc, "n3", 20, "leave") + [f"stay/{i}" for i in range(20)] + ["w/+/x"]
    subs = [Subscriber([n1, n2], "a", topics[:-1]), Subscriber([n2, n1], "b", ["leave/#", "stay/#"])]
    for sub in subs:
        sub.start()
    pubs = [Publisher("p1", [n1, n2], topics[:-1]), Publisher("p2", [n2, n1], topics[:-1])]
    for pub in pubs:
        pub.start()
    time.sleep(1.0)
    lc.leave("n3", timeout=90)
    after_leave = statuses(lc)
    assert all(s["members"] == ["n1", "n2"] and s["settled"] for s in after_leave)
    lc.join("n3", timeout=90)
    time.sleep(1.0)
    for pub in pubs:
        pub.stop.set()
        pub.join(timeout=10)
    final = final_round([n1, n2], topics[:-1])
    figures = check_delivery(subs, [*pubs, final])
    after_return = statuses(lc)
    assert all(s["settled"] for s in after_return)
    loads = [s["shards"] for s in after_return]
    assert max(loads) / (sum(loads) / len(loads)) <= 1.05
    print(f"\nleave + return n3: {figures}, shards per node {loads}")


def test_paused_primary_fences_itself(small_cluster: LocalCluster) -> None:
    lc = small_cluster
    assert lc.state is not None
    n1, n2, n3 = lc.state.client_endpoints()
    paused = next(p for p in lc.state.nodes if p.name == "n2")
    topics = topics_with_primary(lc, "n2", 20, "pause")
    before = current_assignment(lc)
    subs = [Subscriber([n1, n3], "a", topics), Subscriber([n3, n1], "b", topics)]
    for sub in subs:
        sub.start()
    pubs = [Publisher("p1", [n1, n3], topics), Publisher("p2", [n3, n1], topics)]
    for pub in pubs:
        pub.start()
    time.sleep(1.0)
    import os

    os.kill(paused.pid, signal.SIGSTOP)
    try:
        time.sleep(3 * LEASE_TTL)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    time.sleep(1.0)
    for pub in pubs:
        pub.stop.set()
        pub.join(timeout=10)
    lc.wait_ready(3, timeout=60)
    final = final_round([n1, n3], topics)
    figures = check_delivery(subs, [*pubs, final])
    after = current_assignment(lc)
    # The paused node lost its lease: its shards moved on with higher epochs, every one of them.
    for shard in before.shards_of("n2"):
        assert after.epoch(shard) > before.epoch(shard)
    log = (lc.dir / "logs" / "n2.log").read_text()
    assert "lease_lost" in log or "registered" in log.split("lease_lost")[-1]
    versions = {s["assignment_version"] for s in statuses(lc)}
    assert len(versions) == 1, f"nodes disagree on the assignment after heal: {versions}"
    print(f"\nSIGSTOP n2 for {3 * LEASE_TTL}s: {figures}")


def test_isolated_node_stops_acking_and_rejoins(tmp_path) -> None:
    """n3 reaches etcd and is reached by its peers only through proxies the test cuts: a partition."""
    lc = LocalCluster(tmp_path / "c", nodes=2, lease_ttl=LEASE_TTL, log_level="info")
    lc.up(timeout=60)
    proxies: list[TcpProxy] = []
    try:
        assert lc.state is not None
        etcd_proxy = TcpProxy(int(lc.state.etcd_url.rsplit(":", 1)[1]))
        peer_port = free_port()
        peer_proxy = TcpProxy(peer_port)
        proxies += [etcd_proxy, peer_proxy]
        lc.start_node(
            "n3",
            ["--peer-endpoint", f"tcp://127.0.0.1:{peer_port}",
             "--advertise-peer-endpoint", f"tcp://127.0.0.1:{peer_proxy.port}"],
            etcd_url=f"http://127.0.0.1:{etcd_proxy.port}",
        )  # fmt: skip
        lc.wait_ready(3, timeout=60)
        n1, n2, n3 = lc.state.client_endpoints()
        topics = topics_with_primary(lc, "n3", 20, "iso")
        subs = [Subscriber([n1, n2], "a", topics), Subscriber([n2, n1], "b", topics)]
        for sub in subs:
            sub.start()
        pubs = [Publisher("p1", [n1, n2], topics), Publisher("p2", [n2, n1], topics)]
        minority = Publisher("m", [n3], topics)  # talks to the isolated node only
        for pub in [*pubs, minority]:
            pub.start()
        time.sleep(1.5)
        cut_at = time.monotonic()
        etcd_proxy.cut()
        peer_proxy.cut()
        time.sleep(3 * LEASE_TTL)
        last_minority_ack = max(minority.ack_times, default=cut_at)
        # The minority stops acknowledging before its lease can expire (it self-fences at 2/3 of the TTL).
        late = last_minority_ack - cut_at
        assert late < LEASE_TTL, f"isolated node acked {late:.2f}s after the cut"
        assert minority.retries > 0
        etcd_proxy.heal()
        peer_proxy.heal()
        lc.wait_ready(3, timeout=60)
        for pub in [*pubs, minority]:
            pub.stop.set()
            pub.join(timeout=10)
        final = final_round([n1, n2], topics)
        figures = check_delivery(subs, [*pubs, minority, final])
        views = statuses(lc)
        assert len({s["assignment_version"] for s in views}) == 1 and all(s["settled"] for s in views)
        print(f"\nisolate n3: minority acked until {last_minority_ack - cut_at:+.2f}s after the cut; {figures}")
    finally:
        lc.down()
        for proxy in proxies:
            proxy.close()
