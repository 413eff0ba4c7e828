"""Durability (item 6): the node's SQLite store (``shard.store``) and the core's journal and ack gating
(``protocol.durable``), without processes.

What is checked: every kind of change round-trips through a reopened store, in the order the core restores it
(inflight messages first, flagged dup, then the backlog); a batch that fails part-way leaves nothing, and a
transaction a killed process had not committed is not there; a data directory of another node id is refused;
in the simulated cluster, a retained write is acknowledged only once the primary's and the replica's stores
committed it, and the restored core serves what it stored.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shardmq.protocol.durable import BACKLOG, INFLIGHT, StoredSession
from shardmq.ring import shard_for_key
from shardmq.shard.store import Store, StoreError
from shardmq.testing.simulation import Sim, SimConfig


def test_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.apply([
        ("retained", 3, "a/b", 1, 7, 1, b"one"),
        ("retained", 3, "a/c", 0, 7, 2, b"two"),
        ("retained", 4, "x/y", 1, 2, 9, b"three"),
        ("retained", 3, "a/b", 1, 7, 3, b"one again"),  # replaces
        ("retained_del", 3, "a/c"),
        ("retained", 5, "gone/1", 1, 1, 1, b"g"),
        ("retained_drop", 5),
        ("session", "c1", 60.0, {"s/+": 1, "t": 0}, "alice"),
        ("message", "c1", BACKLOG, 0, "s/1", b"b0", False, ("n2", 5), False),
        ("message", "c1", BACKLOG, 1, "s/2", b"b1", True, None, False),
        ("message", "c1", INFLIGHT, 4, "s/0", b"i4", False, ("n1", 1), False),
        ("message", "c1", INFLIGHT, 9, "s/9", b"i9", False, None, False),
        ("message_del", "c1", INFLIGHT, 9),
        ("session", "c2", 5.0, {}, None),
        ("message", "c2", BACKLOG, 0, "z", b"z", False, None, False),
        ("messages_del", "c2"),
        ("session", "c3", 5.0, {"q": 1}, None),
        ("message", "c3", BACKLOG, 0, "q", b"q", False, None, False),
        ("session_del", "c3"),
    ])  # fmt: skip
    store.close()
    again = Store(tmp_path, "n1")
    retained, sessions = again.load()
    assert retained == [(3, "a/b", 1, 7, 3, b"one again"), (4, "x/y", 1, 2, 9, b"three")]
    assert sessions == [
        StoredSession("c1", 60.0, {"s/+": 1, "t": 0}, [
            ("s/0", b"i4", False, ("n1", 1), True),  # inflight: resent flagged dup
            ("s/1", b"b0", False, ("n2", 5), False),
            ("s/2", b"b1", True, None, False),
        ], principal="alice"),
        StoredSession("c2", 5.0, {}, []),
    ]  # fmt: skip
    assert again.counts() == {"retained": 2, "sessions": 2, "messages": 3}
    again.close()


def test_failed_batch_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.apply([("retained", 1, "kept", 1, 1, 1, b"k")])
    with pytest.raises(ValueError, match="unknown store change"):
        store.apply([("retained", 1, "lost", 1, 1, 2, b"l"), ("no such change",)])
    assert [r[1] for r in store.load()[0]] == ["kept"]
    store.close()


def test_uncommitted_transaction_is_not_there(tmp_path: Path) -> None:
    """A process killed inside a transaction (after its writes, before COMMIT) leaves only what committed."""
    script = f"""
import os, signal
from shardmq.shard.store import Store
store = Store({str(tmp_path)!r}, "n1")
store.apply([("retained", 1, "committed", 1, 1, 1, b"c")])
store.db.execute("BEGIN")
store.db.execute("INSERT INTO retained VALUES ('uncommitted', 1, 1, 1, 2, x'00')")
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert done.returncode == -9
    store = Store(tmp_path, "n1")
    assert [r[1] for r in store.load()[0]] == ["committed"]
    store.close()


def test_other_nodes_data_dir_is_refused(tmp_path: Path) -> None:
    Store(tmp_path, "n1").close()
    with pytest.raises(StoreError, match="belongs to node 'n1', not 'n2'"):
        Store(tmp_path, "n2")
    with pytest.raises(StoreError, match="--fsync"):
        Store(tmp_path / "x", "n1", "sometimes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- the core, simulated
SHARDS = 16


def durable_cluster() -> Sim:
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2, durable=True))
    for _ in range(3):
        sim.join()
    assert sim.settle()
    return sim


@pytest.mark.timeout(60)
def test_retained_ack_waits_for_every_store() -> None:
    sim = durable_cluster()
    topic = "d/1"
    shard = shard_for_key(topic, SHARDS)
    a = sim.etcd.doc
    assert a is not None
    primary, replica = a.owners(shard)
    entry = next(n for n in sorted(sim.nodes) if n not in (primary, replica))
    held = sim.nodes[replica].persist_held = []
    pid = sim.publish(entry, topic, retain=True)
    assert pid is not None
    sim.settle(max_rounds=4)  # 1 s of simulated time: less than the request timeout
    assert sim.publishes[pid][4] is None, "acknowledged before the replica's store committed"
    assert held and any(c[0] == "retained" and c[2] == topic for changes, _ in held for c in changes)
    sim.nodes[replica].persist_held = None
    for changes, then in held:
        sim.nodes[replica].persisted.extend(changes)
        then()
        sim.nodes[replica].core.flush()  # what the shell's loop does after an event
    assert sim.settle()
    assert sim.publishes[pid][4] == "acked"
    for node in (primary, replica):
        stored = [c for c in sim.nodes[node].persisted if c[0] == "retained" and c[2] == topic]
        assert stored and stored[-1][1] == shard


@pytest.mark.timeout(60)
def test_restore_serves_stored_retained_and_continues_the_stamp() -> None:
    sim = durable_cluster()
    core = next(iter(sim.nodes.values())).core
    core.durable.restore([(2, "r/x", 1, 5, 41, b"p")], [])
    held = core.owner.retained.get(2, "r/x")
    assert held is not None and (held.payload, held.stamp) == (b"p", (5, 41))
    assert core.retained.seq >= 41  # a later write as primary gets a higher sequence number
    assert not any(c[0] == "retained" and c[2] == "r/x" for c in core.durable.changes)  # not written back
