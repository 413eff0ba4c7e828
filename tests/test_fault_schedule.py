"""Fault schedules against a real cluster: every acknowledged QoS 1 message is consumed (Kafka's rule).

Each test runs ``shardmq.loadtest.fault_schedule`` (its own etcd + 3 nodes, R=2, lease TTL 2 s, in a temp dir it
removes, every process stopped by pid) and asserts that no acknowledged message went undelivered unless the SDK
reported an interruption of that subscriber around it, that every subscriber still receives after the last fault,
that the cluster settled after every fault, and that nothing the run started is left running.

The seeded schedule runs six faults, one of each kind (a schedule draws its kinds in a shuffled cycle): seed 3
gives restart_same@n3, sigstop@n3, etcd_stop, stall_sub@s1, etcd_cut@n3, rejoin_new@n1, so one node is restarted,
paused and cut from etcd in turn. Its first four faults are the 4-fault schedule of seed 3 that ran here before, next
to seed 12's (stall_sub, rejoin_new, restart_same, etcd_cut): one cluster instead of two covers the same kinds and
saves a start, a warm-up, a tail and a drain. The focused tests run one fault of each kind. Node logs of a failing
run are copied into the test's tmp_path.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from shardmq.loadtest.fault_schedule import KINDS, Report, Subscriber, run_schedule

READY_TIMEOUT = 45.0  # settling after a restart: retire, promote, register, hand-offs back (slower under load)


def log_tails(log_dir: Path, lines: int = 40) -> str:
    """The last lines of each node log the run kept (it keeps them only when it failed), for CI's output."""
    if not log_dir.is_dir():
        return ""
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def check(report: Report, log_dir: Path) -> None:
    table = report.table()
    print(table)
    print(log_tails(log_dir))
    assert not report.error, f"the run itself failed: {report.error}\n{table}"
    assert not report.leaked, f"left running: {report.leaked}\n{table}"
    # A fault the cluster did not settle after ends the schedule there (the node logs are kept).
    unsettled = [f"{f.index}:{f.kind}@{f.target}" for f in report.faults if not f.settled]
    assert not unsettled, f"cluster not settled within {READY_TIMEOUT}s after: {unsettled}\n{table}"
    assert report.acked > 0, table
    assert report.unexplained == 0, (
        f"{report.unexplained} acknowledged messages never delivered outside any reported interruption\n{table}"
    )
    quiet = [s.name for s in report.subscribers if s.after_last_fault == 0]
    assert not quiet, f"subscribers that received nothing acknowledged after the last fault: {quiet}\n{table}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", [3])
def test_seeded_schedule_loses_no_acknowledged_message(seed: int, tmp_path: Path) -> None:
    report = run_schedule(seed, duration=20, faults=6, ready_timeout=READY_TIMEOUT, log_dir=tmp_path / "logs")
    check(report, tmp_path / "logs")
    assert sorted(f.kind for f in report.faults) == sorted(KINDS), report.table()


@pytest.mark.timeout(75)
@pytest.mark.parametrize("kind", KINDS)
def test_single_fault_loses_no_acknowledged_message(kind: str, tmp_path: Path) -> None:
    report = run_schedule(1, duration=8, faults=1, kinds=[kind], ready_timeout=READY_TIMEOUT, log_dir=tmp_path / "logs")
    check(report, tmp_path / "logs")
    assert [f.kind for f in report.faults] == [kind], report.table()


def test_interruption_window_explains_only_losses_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window is [noticed - 2 * TTL, resubscribed], and a publish running during it (sent before its end,
    acknowledged after its start) is explained: from the SDK's interruption_log when it has one, else from
    the raise alone. No cluster: a Subscriber without its thread or socket."""
    sub = Subscriber.__new__(Subscriber)
    sub.interruptions, sub.errors, sub._log_seen = [], Counter(), 0
    sub.client = SimpleNamespace()  # an SDK without interruption_log: the raise time is all there is
    monkeypatch.setattr("time.monotonic", lambda: 100.0)
    sub._record_interruptions("node restarted")
    assert sub.explains(96.0, 96.0, lease_ttl=2) and sub.explains(100.0, 100.0, lease_ttl=2)
    assert not sub.explains(95.9, 95.9, lease_ttl=2) and not sub.explains(100.1, 100.1, lease_ttl=2)
    # A publish sent inside the window and acknowledged after it: it may have been routed before the subscription
    # was back. One sent before the window and acknowledged in it may have been routed inside it.
    assert sub.explains(99.9, 100.3, lease_ttl=2) and sub.explains(95.0, 96.5, lease_ttl=2)
    sub.client = SimpleNamespace(interruption_log=[(150.0, "fenced")])
    monkeypatch.setattr("time.monotonic", lambda: 153.0)
    sub._record_interruptions("fenced")
    sub._record_interruptions("again, nothing new logged", raised=False)
    assert [(i.noticed, i.resubscribed) for i in sub.interruptions] == [(100.0, 100.0), (150.0, 153.0)]
    assert sub.explains(146.0, 146.0, lease_ttl=2) and sub.explains(153.0, 153.0, lease_ttl=2)
    assert not sub.explains(145.0, 145.0, lease_ttl=2) and not sub.explains(120.0, 120.0, lease_ttl=2)
