"""Fault-schedule checker: every acknowledged QoS 1 message is consumed (Kafka's rule), through a seeded run of faults.

The runner starts its own cluster (a private etcd and 3 nodes, R=2, a short lease) in a temp dir it removes, and
every node reaches etcd through its own TCP relay (``TcpProxy``) so that one node can be cut from etcd while its
process and its clients stay up. QoS 1 publisher/subscriber pairs run through the whole schedule: publisher i is
homed on one node, its subscriber on the next, each pair on its own topics (spread over many shards), plus one
wildcard subscriber that takes every pair's topics. Payloads are unique (``<publisher>:<seq>``); a publish that
returns is acknowledged, one that raises is not (counted as failed, and the next publish has a new payload).

Faults, drawn one at a time from ``random.Random(seed)`` (kinds in a seeded shuffled cycle, so a short schedule
covers several kinds; targets and gaps drawn too), each followed by a wait for the cluster to settle and a gap of
steady traffic:

- ``restart_same``: kill -9 of a node and an immediate restart with the same id on the same endpoints;
- ``rejoin_new``: kill -9 of a node and an immediate restart with the same id on new endpoints;
- ``sigstop``: SIGSTOP of a node for 1.5x the lease TTL, then SIGCONT;
- ``etcd_stop``: SIGSTOP of etcd for ~2 s, then SIGCONT;
- ``etcd_cut``: a node's relay to etcd cut for 2x the TTL (its process and clients stay up), then healed;
- ``stall_sub``: one subscriber stops reading for ~10 s, then resumes.

At the end publishing stops, subscribers are drained until quiet, and per subscriber the checker counts the
acknowledged messages it should have, those delivered (unique), duplicates, and the acknowledged ones never
delivered. A loss is *explained* only when its publish was in progress during an interruption window of its
subscriber, ``[noticed - 2 * lease_ttl, resubscribed]``: sent before the subscription was live again and
acknowledged after the gap may have begun (a message is routed somewhere between its send and its ack, and only
a subscription live when it was routed is owed it). The SDK reports the interruption (``receive`` raising
``ShardMQError`` with code ``interrupted``; ``Client.interruption_log`` gives the time it was noticed). The
headline is UNEXPLAINED losses, which must be 0.

Usage: ``python -m shardmq.loadtest.fault_schedule --seed 1 --duration 60 --faults 4`` prints a table per fault
and totals, and exits 1 when unexplained losses > 0. Every loop is bounded in count and in time; everything the
run started (processes by pid, relays, threads, the temp dir) is stopped or removed in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from shardmq.client import Client, ShardMQError
from shardmq.loadtest.tcp_proxy import TcpProxy
from shardmq.testing import LocalCluster, Proc, pid_runs, stop_proc

KINDS = ("restart_same", "rejoin_new", "sigstop", "etcd_stop", "etcd_cut", "stall_sub")
NODES = ("n1", "n2", "n3")
CLIENT_TIMEOUT = 2.0  # SDK request timeout: a silent node is failed over within a couple of these
TOPICS_PER_PAIR = 8  # several topics per publisher, so its traffic crosses shards owned by every node
STALL_S = 10.0
ETCD_STOP_S = 2.0
WARMUP_S = 2.0
MIN_GAP_S = 2.0  # steady traffic after a fault has settled, before the next one
TAIL_S = 3.0  # steady traffic after the last fault: every subscriber must receive in it
READY_TIMEOUT_S = 20.0  # a cluster not settled by then is reported as such (the table's note), and the run goes on
QUIET_S = 3.0  # drain: a subscriber is done once nothing arrived for this long (QoS 1 resends run every 2 s)
DRAIN_LIMIT_S = 30.0
JOIN_S = 15.0  # a worker blocked in a publish/receive gets out within a few SDK timeouts


def interrupted_code() -> str:
    """The code ``receive`` raises an SDK-reported interruption with (named in the issue 9 design)."""
    return "interrupted"


# ---------------------------------------------------------------------------------------------------- endpoints
class EndpointBook:
    """Where every node's client endpoint is now; a rejoin on new ports bumps ``version``.

    Workers (each owning its Client) pick the change up between calls, so no Client is touched by two threads.
    """

    def __init__(self, endpoints: dict[str, str]) -> None:
        self._lock = threading.Lock()
        self._endpoints = dict(endpoints)
        self.version = 0

    def set(self, node: str, endpoint: str) -> None:
        with self._lock:
            if self._endpoints.get(node) != endpoint:
                self._endpoints[node] = endpoint
                self.version += 1

    def ordered(self, home: str) -> list[str]:
        """The failover list of a client homed on ``home``: its node first, then the others in id order."""
        with self._lock:
            names = sorted(self._endpoints)
            start = names.index(home) if home in names else 0
            return [self._endpoints[n] for n in names[start:] + names[:start]]


class _Worker(threading.Thread):
    def __init__(self, name: str, home: str, book: EndpointBook) -> None:
        super().__init__(name=name, daemon=True)
        self.label = name
        self.home = home
        self.book = book
        self.stop = threading.Event()
        self._seen_version = book.version
        self.client = Client(book.ordered(home), client_id=f"{name}-{uuid.uuid4().hex[:6]}", timeout=CLIENT_TIMEOUT)

    def _follow_endpoints(self) -> None:
        if self.book.version != self._seen_version:
            self._seen_version = self.book.version
            self.client.endpoints = self.book.ordered(self.home)


# ---------------------------------------------------------------------------------------------------- publisher
class Publisher(_Worker):
    """Publishes QoS 1 with unique payloads; what returned is acknowledged (with its time), what raised is not."""

    def __init__(
        self, name: str, home: str, book: EndpointBook, topics: list[str], interval: float, max_messages: int
    ) -> None:
        super().__init__(name, home, book)
        self.topics = topics
        self.interval = interval
        self.max_messages = max_messages
        self.acked: dict[bytes, float] = {}  # payload -> time.monotonic() the publish returned
        self.sent: dict[bytes, float] = {}  # payload -> time.monotonic() the publish was called
        self.ack_times: list[float] = []
        self.failed = 0
        self.failed_times: list[float] = []
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        try:
            for seq in range(self.max_messages):
                if self.stop.is_set():
                    break
                self._follow_endpoints()
                payload = f"{self.label}:{seq}".encode()
                self.sent[payload] = time.monotonic()
                try:
                    self.client.publish(self.topics[seq % len(self.topics)], payload, qos=1)
                except (ShardMQError, TimeoutError, zmq.ZMQError) as exc:
                    # Not acknowledged: it may or may not arrive, and nothing is promised about it.
                    self.failed += 1
                    self.failed_times.append(time.monotonic())
                    self.errors[getattr(exc, "code", type(exc).__name__)] += 1
                    self.stop.wait(0.05)
                    continue
                now = time.monotonic()
                self.acked[payload] = now
                self.ack_times.append(now)
                self.stop.wait(self.interval)
        finally:
            with contextlib.suppress(Exception):
                self.client.close()

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an ack in [start, end]: how long this publisher's traffic was held up."""
        times = [start, *[t for t in self.ack_times if start <= t <= end], end]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# ---------------------------------------------------------------------------------------------------- subscriber
@dataclass
class Interruption:
    noticed: float  # time.monotonic() the SDK noticed it (its interruption_log), else when receive raised
    resubscribed: float  # when receive raised: the SDK has resubscribed by then
    reason: str


class Subscriber(_Worker):
    """Receives continuously (and so acknowledges) and records every SDK-reported interruption."""

    def __init__(self, name: str, home: str, book: EndpointBook, filters: list[str], publishers: list[str]) -> None:
        super().__init__(name, home, book)
        self.filters = filters
        self.publishers = publishers  # whose acknowledged messages this subscriber must get
        self.client.subscribe_many(filters, qos=1)
        self.received: Counter[bytes] = Counter()
        self.interruptions: list[Interruption] = []
        self.errors: Counter[str] = Counter()
        self.last_message = time.monotonic()
        self.stall_until = 0.0
        self.stalls: list[tuple[float, float]] = []
        self._log_seen = 0

    def stall(self, seconds: float) -> None:
        now = time.monotonic()
        self.stalls.append((now, now + seconds))
        self.stall_until = now + seconds

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if time.monotonic() < self.stall_until:
                    self.stop.wait(0.05)  # not reading: the node's window and queues fill, and nothing is acked
                    continue
                self._follow_endpoints()
                try:
                    msg = self.client.receive(timeout=0.2)
                except ShardMQError as exc:
                    if exc.code == interrupted_code():
                        self._record_interruptions(exc.reason)
                    else:
                        self.errors[exc.code] += 1
                        self.stop.wait(0.05)
                    continue
                except (TimeoutError, zmq.ZMQError) as exc:
                    self.errors[type(exc).__name__] += 1
                    self.stop.wait(0.05)
                    continue
                if msg is None:
                    continue
                self.last_message = time.monotonic()
                self.received[msg.payload] += 1
        finally:
            # An interruption the SDK logged but had no receive left to raise still opened a window.
            self._record_interruptions("logged, not raised before the end", raised=False)
            with contextlib.suppress(Exception):
                self.client.close()

    def _record_interruptions(self, reason: str, raised: bool = True) -> None:
        now = time.monotonic()
        log = list(getattr(self.client, "interruption_log", None) or [])
        fresh, self._log_seen = log[self._log_seen :], len(log)
        if not fresh and raised:  # an SDK without the log: the raise is all we know of it
            fresh = [(now, reason)]
        for entry in fresh:
            noticed, why = (entry[0], entry[1]) if isinstance(entry, tuple | list) else (now, reason)
            self.interruptions.append(Interruption(float(noticed), now, str(why)))

    def explains(self, sent_at: float, acked_at: float, lease_ttl: float) -> bool:
        """The publish ran during a window: sent before the subscription was back, acknowledged after the gap
        may have begun."""
        return any(sent_at <= i.resubscribed and acked_at >= i.noticed - 2 * lease_ttl for i in self.interruptions)


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class FaultRecord:
    index: int
    kind: str
    target: str
    at_s: float  # seconds from the start of publishing
    held_s: float  # how long the fault itself lasted
    ready_s: float  # from the fault's end until the cluster was settled again (or the wait gave up)
    recovery_s: float = 0.0  # longest gap between acks of any publisher from the fault's start to the next one
    acked: int = 0
    failed: int = 0
    lost_unexplained: int = 0
    lost_explained: int = 0
    settled: bool = True  # the cluster settled (3 members, balanced) within ready_timeout after the fault
    note: str = ""
    started: float = field(default=0.0, repr=False)
    ended: float = field(default=0.0, repr=False)  # start of the next slot


@dataclass
class SubscriberFigures:
    name: str
    home: str
    filters: list[str]
    acknowledged: int
    delivered: int  # unique acknowledged messages received
    unacked_delivered: int  # received although the publish raised (allowed)
    duplicates: int
    lost: int
    lost_explained: int
    lost_unexplained: int
    after_last_fault: int  # acknowledged after the last fault and delivered
    interruptions: int  # windows recorded from SDK reports
    sdk_interruptions: int  # getattr(client, "interruptions", 0)
    sdk_dropped: int  # getattr(client, "dropped", 0)
    failovers: int
    errors: dict[str, int]
    lost_sample: list[str]


@dataclass
class Report:
    seed: int
    lease_ttl: int
    kinds: list[str]
    faults: list[FaultRecord]
    subscribers: list[SubscriberFigures]
    publish_s: float
    acked: int
    failed: int
    publish_errors: dict[str, int]
    leaked: list[str]
    error: str = ""

    @property
    def unexplained(self) -> int:
        return sum(s.lost_unexplained for s in self.subscribers)

    @property
    def explained(self) -> int:
        return sum(s.lost_explained for s in self.subscribers)

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.subscribers)

    def table(self) -> str:
        rate = self.acked / self.publish_s if self.publish_s else 0.0
        delivered = sum(s.delivered for s in self.subscribers)
        delivery_rate = delivered / self.publish_s if self.publish_s else 0.0
        lines = [
            f"fault schedule seed={self.seed} lease_ttl={self.lease_ttl}s kinds={','.join(self.kinds)}",
            "",
            f"{'#':>2} {'fault':<13} {'target':<7} {'at_s':>6} {'held_s':>6} {'ready_s':>7} {'recov_s':>7} "
            f"{'acked':>6} {'failed':>6} {'unexpl':>6} {'expl':>5}  note",
        ]
        for f in self.faults:
            lines.append(
                f"{f.index:>2} {f.kind:<13} {f.target:<7} {f.at_s:>6.1f} {f.held_s:>6.1f} {f.ready_s:>7.1f} "
                f"{f.recovery_s:>7.2f} {f.acked:>6} {f.failed:>6} {f.lost_unexplained:>6} {f.lost_explained:>5}  "
                f"{f.note}"
            )
        lines += [
            "",
            f"{'subscriber':<10} {'home':<5} {'acked':>6} {'deliv':>6} {'unacked+':>8} {'dups':>5} {'lost':>5} "
            f"{'expl':>5} {'UNEXPL':>6} {'after':>6} {'intr':>4} {'sdk_i':>5} {'drop':>4} {'fover':>5}  errors",
        ]
        for s in self.subscribers:
            lines.append(
                f"{s.name:<10} {s.home:<5} {s.acknowledged:>6} {s.delivered:>6} {s.unacked_delivered:>8} "
                f"{s.duplicates:>5} {s.lost:>5} {s.lost_explained:>5} {s.lost_unexplained:>6} "
                f"{s.after_last_fault:>6} {s.interruptions:>4} {s.sdk_interruptions:>5} {s.sdk_dropped:>4} "
                f"{s.failovers:>5}  {dict(s.errors) or ''}"
            )
            if s.lost_sample:
                lines.append(f"{'':<10} never delivered (first ones): {', '.join(s.lost_sample)}")
        lines += [
            "",
            f"publishing {self.publish_s:.1f}s: {self.acked} acknowledged ({rate:,.0f}/s), {self.failed} failed "
            f"{self.publish_errors or ''}; {delivered} deliveries ({delivery_rate:,.0f}/s)",
            f"duplicates {self.duplicates}; lost explained {self.explained}; "
            f"UNEXPLAINED acknowledged-but-never-delivered {self.unexplained}",
        ]
        if self.leaked:
            lines.append(f"LEAKED processes: {self.leaked}")
        if self.error:
            lines.append(f"run error: {self.error}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {**asdict(self), "unexplained": self.unexplained, "explained": self.explained},
            default=str,
            indent=2,
        )


# ---------------------------------------------------------------------------------------------------- runner
class FaultSchedule:
    def __init__(
        self,
        seed: int,
        duration: float = 60.0,
        faults: int = 4,
        kinds: Sequence[str] | None = None,
        pairs: int = 3,
        lease_ttl: int = 2,
        rate: float = 50.0,
        ready_timeout: float = READY_TIMEOUT_S,
        log_dir: Path | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        unknown = set(kinds or ()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.duration = duration
        self.fault_count = faults
        self.kinds = list(kinds or KINDS)
        self.pairs = pairs
        self.lease_ttl = lease_ttl
        self.rate = rate  # per publisher, messages per second
        self.ready_timeout = ready_timeout
        self.log_dir = log_dir
        self.say = say or (lambda line: print(line, flush=True))
        self.lc: LocalCluster | None = None
        self.relays: dict[str, TcpProxy] = {}
        self.started_procs: list[Proc] = []
        self.paused: set[int] = set()  # pids we SIGSTOPped and not yet SIGCONTed
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []
        self.book: EndpointBook | None = None

    # -------------------------------------------------------------- schedule
    def plan(self) -> list[tuple[str, str]]:
        """(kind, target) per fault: kinds in a seeded shuffled cycle, targets drawn from the same generator."""
        order: list[str] = []
        while len(order) < self.fault_count:
            cycle = list(self.kinds)
            self.rng.shuffle(cycle)
            order += cycle
        plan = []
        for kind in order[: self.fault_count]:
            if kind == "etcd_stop":
                target = "etcd"
            elif kind == "stall_sub":
                target = self.rng.choice([f"s{i}" for i in range(1, self.pairs + 1)] + ["swild"])
            else:
                target = self.rng.choice(NODES)
            plan.append((kind, target))
        return plan

    # -------------------------------------------------------------- processes
    def _start_node(self, node: str, client_ep: str | None = None, peer_ep: str | None = None) -> Proc:
        assert self.lc is not None
        last: Exception | None = None
        for _ in range(3):  # a port just freed by a kill -9, or a free port taken meanwhile: try again shortly
            try:
                proc = self.lc.start_node(
                    node, etcd_url=f"http://127.0.0.1:{self.relays[node].port}",
                    client_endpoint=client_ep, peer_endpoint=peer_ep,
                )  # fmt: skip
            except RuntimeError as exc:  # start_node reaped the process that did not start
                last = exc
                time.sleep(0.5)
                continue
            self.started_procs.append(Proc(**asdict(proc)))
            if self.book is not None:
                self.book.set(node, proc.client_endpoint)
            return proc
        raise RuntimeError(f"could not start {node}: {last}")

    def _node(self, node: str) -> Proc:
        assert self.lc is not None and self.lc.state is not None
        return next(p for p in self.lc.state.nodes if p.name == node)

    def _pause(self, proc: Proc) -> None:
        if pid_runs(proc):
            self.paused.add(proc.pid)
            os.kill(proc.pid, signal.SIGSTOP)

    def _resume(self, proc: Proc) -> None:
        if proc.pid in self.paused:
            self.paused.discard(proc.pid)
            if pid_runs(proc):
                os.kill(proc.pid, signal.SIGCONT)

    # -------------------------------------------------------------- faults
    def apply(self, kind: str, target: str) -> str:
        """Run one fault to its end (the faulted thing is back); returns a note for the table."""
        assert self.lc is not None and self.lc.state is not None
        ttl = self.lease_ttl
        if kind in ("restart_same", "rejoin_new"):
            old = self._node(target)
            self.lc.stop_node(target, sig=signal.SIGKILL)
            if kind == "restart_same":
                proc = self._start_node(target, old.client_endpoint, old.peer_endpoint)
            else:
                proc = self._start_node(target)
            return f"pid {old.pid} -> {proc.pid}, {proc.client_endpoint}"
        if kind == "sigstop":
            proc = self._node(target)
            self._pause(proc)
            try:
                time.sleep(1.5 * ttl)
            finally:
                self._resume(proc)
            return f"stopped {1.5 * ttl:.1f}s"
        if kind == "etcd_stop":
            assert self.lc.state.etcd is not None
            self._pause(self.lc.state.etcd)
            try:
                time.sleep(ETCD_STOP_S)
            finally:
                self._resume(self.lc.state.etcd)
            return f"stopped {ETCD_STOP_S:.1f}s"
        if kind == "etcd_cut":
            relay = self.relays[target]
            relay.cut()
            try:
                time.sleep(2 * ttl)
            finally:
                relay.heal()
            return f"cut {2 * ttl:.1f}s"
        if kind == "stall_sub":
            sub = next(s for s in self.subscribers if s.label == target)
            sub.stall(STALL_S)
            time.sleep(STALL_S)
            return f"not reading {STALL_S:.0f}s (home {sub.home})"
        raise ValueError(kind)

    def _wait_ready(self) -> tuple[float, str]:
        assert self.lc is not None
        started = time.monotonic()
        try:
            self.lc.wait_ready(len(NODES), timeout=self.ready_timeout)
            return time.monotonic() - started, ""
        except (TimeoutError, RuntimeError) as exc:
            return time.monotonic() - started, f"not settled: {exc}"

    # -------------------------------------------------------------- run
    def run(self) -> Report:
        tmp = tempfile.mkdtemp(prefix="shardmq-faults-")
        report: Report | None = None
        error = ""
        records: list[FaultRecord] = []
        t_start = t_end = time.monotonic()
        try:
            self.lc = LocalCluster(Path(tmp), nodes=0, lease_ttl=self.lease_ttl, replication=2, log_level="info")
            self.say(f"starting etcd + {len(NODES)} nodes (R=2, lease TTL {self.lease_ttl}s) in {tmp}")
            self.lc.up(timeout=60)  # etcd only: the nodes are started below, each behind its own relay to etcd
            self.lc.export_credentials()
            assert self.lc.state is not None and self.lc.state.etcd is not None
            self.started_procs.append(Proc(**asdict(self.lc.state.etcd)))
            etcd_port = int(self.lc.state.etcd_url.rsplit(":", 1)[1])
            for node in NODES:
                self.relays[node] = TcpProxy(etcd_port)
            for node in NODES:
                self._start_node(node)
            self.lc.node_count = len(NODES)
            self.lc.wait_ready(len(NODES), timeout=60)
            self.book = EndpointBook({p.name: p.client_endpoint for p in self.lc.state.nodes})
            self._start_workers()
            plan = self.plan()
            self.say(f"schedule (seed {self.seed}): {', '.join(f'{k}@{t}' for k, t in plan)}")
            t_start = time.monotonic()
            time.sleep(WARMUP_S)
            slot = max(0.0, self.duration - WARMUP_S - TAIL_S) / max(1, len(plan))
            for index, (kind, target) in enumerate(plan, 1):
                started = time.monotonic()
                self.say(f"[{started - t_start:6.1f}s] fault {index}/{len(plan)}: {kind} {target}")
                note = self.apply(kind, target)
                held = time.monotonic() - started
                ready, problem = self._wait_ready()
                records.append(
                    FaultRecord(index, kind, target, started - t_start, held, ready, settled=not problem,
                                note=problem or note, started=started)
                )  # fmt: skip
                self.say(f"          held {held:.1f}s, settled after {ready:.1f}s {problem}")
                if problem:
                    # Later faults would land on a cluster already broken, and could run the caller out of time
                    # before the report and the logs: stop the schedule here.
                    break
                time.sleep(max(MIN_GAP_S, started + slot - time.monotonic()))
            time.sleep(TAIL_S)
            t_end = time.monotonic()
        except Exception as exc:  # report what was measured; the caller sees the error in the report
            error = f"{type(exc).__name__}: {exc}"
            self.say(f"run error: {error}")
            t_end = time.monotonic()
        finally:
            try:
                self._quiesce()
                report = self._report(records, t_start, t_end, error)
            finally:
                leaked = self._teardown()
                if report is not None:
                    report.leaked = leaked
                failed = report is None or report.unexplained or report.error or leaked
                keep = self.log_dir is not None and (failed or any(not r.settled for r in records))
                if keep and self.log_dir is not None:
                    with contextlib.suppress(OSError):
                        shutil.copytree(Path(tmp) / "logs", self.log_dir, dirs_exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
        assert report is not None
        return report

    def _start_workers(self) -> None:
        assert self.book is not None
        run = uuid.uuid4().hex[:6]
        interval = 1.0 / self.rate
        # Bounded in count too: more than the rate can publish over the run with every fault at its longest.
        max_messages = int(self.rate * (self.duration + self.fault_count * 20 + 60))
        for i in range(1, self.pairs + 1):
            pub_home, sub_home = NODES[(i - 1) % len(NODES)], NODES[i % len(NODES)]
            topics = [f"fs/{run}/p{i}/{j}" for j in range(TOPICS_PER_PAIR)]
            self.subscribers.append(Subscriber(f"s{i}", sub_home, self.book, topics, [f"p{i}"]))
            self.publishers.append(Publisher(f"p{i}", pub_home, self.book, topics, interval, max_messages))
        wild_home = NODES[(self.pairs + 1) % len(NODES)]
        self.subscribers.append(
            Subscriber("swild", wild_home, self.book, [f"fs/{run}/+/+"], [p.label for p in self.publishers])
        )
        for worker in [*self.subscribers, *self.publishers]:
            worker.start()

    def _quiesce(self) -> None:
        """Stop publishing, then let subscribers drain until nothing arrived for QUIET_S (bounded)."""
        for pub in self.publishers:
            pub.stop.set()
        for pub in self.publishers:
            pub.join(timeout=JOIN_S)
        for sub in self.subscribers:
            sub.stall_until = 0.0
        deadline = time.monotonic() + DRAIN_LIMIT_S
        while time.monotonic() < deadline:
            if all(time.monotonic() - s.last_message >= QUIET_S for s in self.subscribers if s.is_alive()):
                break
            time.sleep(0.1)
        for sub in self.subscribers:
            sub.stop.set()
        for sub in self.subscribers:
            sub.join(timeout=JOIN_S)

    def _report(self, records: list[FaultRecord], t_start: float, t_end: float, error: str) -> Report:
        ttl = self.lease_ttl
        acked: dict[bytes, float] = {}
        sent: dict[bytes, float] = {}
        for pub in self.publishers:
            acked.update(pub.acked)
            sent.update(pub.sent)
        bounds = [r.started for r in records] + [t_end]
        for r, end in zip(records, bounds[1:], strict=True):
            r.ended = end
            r.recovery_s = max((p.longest_gap(r.started, end) for p in self.publishers), default=0.0)
            r.acked = sum(1 for p in self.publishers for t in p.ack_times if r.started <= t < end)
            r.failed = sum(1 for p in self.publishers for t in p.failed_times if r.started <= t < end)
        last_fault_end = records[-1].started + records[-1].held_s + records[-1].ready_s if records else t_start
        figures = []
        for sub in self.subscribers:
            mine = {m: t for m, t in acked.items() if m.split(b":", 1)[0].decode() in sub.publishers}
            delivered = sum(1 for m in mine if m in sub.received)
            lost = sorted((m for m in mine if m not in sub.received), key=lambda m: mine[m])
            explained = {m for m in lost if sub.explains(sent[m], mine[m], ttl)}
            unexplained = [m for m in lost if m not in explained]
            for m in lost:  # attribute each loss to the fault slot it was acknowledged in
                slot = next((r for r in records if r.started <= mine[m] < r.ended), None)
                if slot is not None:
                    if m in explained:
                        slot.lost_explained += 1
                    else:
                        slot.lost_unexplained += 1
            figures.append(
                SubscriberFigures(
                    name=sub.label,
                    home=sub.home,
                    filters=sub.filters,
                    acknowledged=len(mine),
                    delivered=delivered,
                    unacked_delivered=sum(1 for m in sub.received if m not in acked),
                    duplicates=sum(n - 1 for n in sub.received.values()),
                    lost=len(lost),
                    lost_explained=len(explained),
                    lost_unexplained=len(unexplained),
                    after_last_fault=sum(1 for m, t in mine.items() if t > last_fault_end and m in sub.received),
                    interruptions=len(sub.interruptions),
                    sdk_interruptions=int(getattr(sub.client, "interruptions", 0) or 0),
                    sdk_dropped=int(getattr(sub.client, "dropped", 0) or 0),
                    failovers=sub.client.failovers,
                    errors=dict(sub.errors),
                    lost_sample=[f"{m.decode()}@{mine[m] - t_start:.1f}s" for m in unexplained[:5]],
                )
            )
        errors: Counter[str] = Counter()
        for pub in self.publishers:
            errors.update(pub.errors)
        return Report(
            seed=self.seed,
            lease_ttl=ttl,
            kinds=self.kinds,
            faults=records,
            subscribers=figures,
            publish_s=max(0.0, t_end - t_start),
            acked=len(acked),
            failed=sum(p.failed for p in self.publishers),
            publish_errors=dict(errors),
            leaked=[],
            error=error,
        )

    def _teardown(self) -> list[str]:
        """Stop everything this run started, by pid; returns what still runs afterwards (should be nothing)."""
        for worker in [*self.publishers, *self.subscribers]:
            worker.stop.set()
        for worker in [*self.publishers, *self.subscribers]:
            worker.join(timeout=JOIN_S)
        if self.lc is not None and self.lc.state is not None:
            # A stopped process would sit on SIGTERM until the grace period ends: let it run first.
            for proc in [*([self.lc.state.etcd] if self.lc.state.etcd else []), *self.lc.state.nodes]:
                self._resume(proc)
        for relay in self.relays.values():
            relay.heal()
        if self.lc is not None:
            with contextlib.suppress(Exception):
                self.lc.down()
        for proc in self.started_procs:  # a killed node's Proc left lc.state when its successor started
            with contextlib.suppress(Exception):
                stop_proc(proc, sig=signal.SIGKILL)
        for relay in self.relays.values():
            relay.close()
        return [f"{p.name} (pid {p.pid})" for p in self.started_procs if pid_runs(p)] + [
            w.label for w in [*self.publishers, *self.subscribers] if w.is_alive()
        ]


def run_schedule(
    seed: int,
    duration: float = 60.0,
    faults: int = 4,
    kinds: Sequence[str] | None = None,
    **options: Any,
) -> Report:
    return FaultSchedule(seed, duration, faults, kinds, **options).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing (at least)")
    parser.add_argument("--faults", type=int, default=4)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--pairs", type=int, default=3, help="publisher/subscriber pairs (plus one wildcard)")
    parser.add_argument("--lease-ttl", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50.0, help="QoS 1 publishes per second per publisher")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for settling")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy node logs here when the check fails")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    report = run_schedule(
        args.seed, args.duration, args.faults, [k for k in args.kinds.split(",") if k],
        pairs=args.pairs, lease_ttl=args.lease_ttl, rate=args.rate, ready_timeout=args.ready_timeout,
        log_dir=args.keep_logs,
    )  # fmt: skip
    print()
    print(report.table())
    if args.json:
        args.json.write_text(report.to_json())
    return 1 if report.unexplained or report.error or report.leaked else 0


if __name__ == "__main__":
    sys.exit(main())
