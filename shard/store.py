"""The node's store under ``--data-dir``: one SQLite database in WAL mode, written one transaction per loop turn.

Why SQLite: it ships with Python (``sqlite3``, no new dependency), its write-ahead log turns many changes into one
append and one fsync per commit (the batching we want: every change of a loop turn in one transaction), a
transaction that did not commit is not there after a crash, and its file format and tools are well known. LMDB
would be faster for large values but needs a binding we would add, and gives no more durability.

Rules of this file:
- One file per node: ``DATA_DIR/shardmq.db`` (with its ``-wal`` and ``-shm``). The first open records the node
  id; a data directory of another node id is refused (two nodes sharing one would restore each other's state).
- What it holds is what the core journals (``protocol.durable``): the retained store's records (retained messages
  and the ``$session/`` directory, keyed by topic, with their shard and stamp), and the persistent sessions this
  node holds (settings; queued messages keyed by (kind, n): inflight by message id, backlog by position).
- ``apply(changes)`` writes one batch in one transaction and returns once it committed. ``fsync="batch"``:
  ``synchronous=FULL``, the WAL is fsynced at every commit, so a commit survives a power loss. ``fsync="off"``:
  ``synchronous=OFF``, no fsync: a commit survives the process (kill -9: the OS holds the write) but not a
  power loss or an OS crash of the machine (the loss window is what the OS had not written yet, by default up to
  ~30 s of dirty pages on Linux).
- ``load()`` reads everything back, in the order the core restores it.
- Called from the node's loop thread only (the connection is not shared).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import orjson

from shardmq.protocol.durable import BACKLOG, INFLIGHT, StoredSession
from shardmq.protocol.records import Queued

FsyncPolicy = Literal["batch", "off"]
FSYNC_POLICIES: tuple[str, ...] = ("batch", "off")
DB_FILE = "shardmq.db"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, shard INTEGER NOT NULL, qos INTEGER NOT NULL, epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL, payload BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retained_by_shard ON retained (shard);
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY, expiry REAL NOT NULL, filters BLOB NOT NULL, principal TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    client_id TEXT NOT NULL, kind INTEGER NOT NULL, n INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    retain INTEGER NOT NULL, pid_node TEXT, pid_seq INTEGER, dup INTEGER NOT NULL,
    PRIMARY KEY (client_id, kind, n)
) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The data directory cannot be used (another node's, unreadable, a newer schema): the message says why."""


class Store:
    def __init__(self, data_dir: str | Path, node_id: str, fsync: FsyncPolicy = "batch") -> None:
        if fsync not in FSYNC_POLICIES:
            raise StoreError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.dir = Path(data_dir)
        self.path = self.dir / DB_FILE
        self.fsync = fsync
        self.commits = 0
        self.commit_seconds = 0.0  # time spent in apply(), fsync included
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync == 'batch' else 'OFF'}")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        self._claim(node_id)

    def _claim(self, node_id: str) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        owner, version = meta.get("node_id"), meta.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{self.path} has store schema {version}; this shardmq reads schema {SCHEMA_VERSION}")
        if owner is not None and owner != node_id:
            self.close()
            raise StoreError(f"{self.path} belongs to node {owner!r}, not {node_id!r}: give each node its own "
                             "--data-dir (a node restarts with the id its data directory was made for)")  # fmt: skip
        if owner is None:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("node_id", node_id), ("schema", SCHEMA_VERSION)])  # fmt: skip
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writing
    def apply(self, changes: Iterable[tuple[Any, ...]]) -> None:
        """Write ``changes`` (``protocol.durable.Change``) in one transaction; returns once committed."""
        started = time.perf_counter()
        db = self.db
        ex = db.execute
        ex("BEGIN")
        try:
            for change in changes:
                kind = change[0]
                if kind == "retained":
                    _, shard, topic, qos, epoch, seq, payload = change
                    ex("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?, ?)",
                       (topic, shard, qos, epoch, seq, payload))  # fmt: skip
                elif kind == "message":
                    _, cid, mkind, n, topic, payload, retain, pid, dup = change
                    ex("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (cid, mkind, n, topic, payload, int(retain), pid[0] if pid else None,
                        pid[1] if pid else None, int(dup)))  # fmt: skip
                elif kind == "message_del":
                    ex("DELETE FROM messages WHERE client_id = ? AND kind = ? AND n = ?", change[1:])
                elif kind == "retained_del":
                    ex("DELETE FROM retained WHERE topic = ?", (change[2],))
                elif kind == "retained_drop":
                    ex("DELETE FROM retained WHERE shard = ?", (change[1],))
                elif kind == "session":
                    _, cid, expiry, filters, principal = change
                    ex("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                       (cid, expiry, orjson.dumps(filters), principal))  # fmt: skip
                elif kind == "session_del":
                    ex("DELETE FROM sessions WHERE client_id = ?", (change[1],))
                    ex("DELETE FROM messages WHERE client_id = ?", (change[1],))
                elif kind == "messages_del":
                    ex("DELETE FROM messages WHERE client_id = ?", (change[1],))
                else:
                    raise ValueError(f"unknown store change {kind!r}")
        except BaseException:
            ex("ROLLBACK")
            raise
        ex("COMMIT")
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ reading
    def load(self) -> tuple[list[tuple[int, str, int, int, int, bytes]], list[StoredSession]]:
        """(retained records as (shard, topic, qos, epoch, seq, payload), persistent sessions), as stored."""
        db = self.db
        retained = [
            (shard, topic, qos, epoch, seq, bytes(payload))
            for topic, shard, qos, epoch, seq, payload in db.execute(
                "SELECT topic, shard, qos, epoch, seq, payload FROM retained ORDER BY shard, topic")
        ]  # fmt: skip
        sessions: dict[str, StoredSession] = {}
        for cid, expiry, filters, principal in db.execute(
            "SELECT client_id, expiry, filters, principal FROM sessions ORDER BY client_id"
        ):
            sessions[cid] = StoredSession(cid, float(expiry), dict(orjson.loads(filters)), principal=principal)
        rows = db.execute(
            "SELECT client_id, kind, topic, payload, retain, pid_node, pid_seq, dup FROM messages "
            "ORDER BY client_id, kind, n"
        )  # inflight (kind 0) by message id, then the backlog (kind 1) by position
        for cid, kind, topic, payload, retain, pid_node, pid_seq, dup in rows:
            session = sessions.get(cid)
            if session is None:
                continue  # a message whose session is gone (cannot happen through apply; ignored)
            pid = (pid_node, pid_seq) if pid_node is not None else None
            # An inflight message may have reached the client before the restart: it goes again flagged dup.
            item: Queued = (topic, bytes(payload), bool(retain), pid, bool(dup) or kind == INFLIGHT)
            session.messages.append(item)
        assert INFLIGHT < BACKLOG  # the ORDER BY above relies on it
        return retained, list(sessions.values())

    def counts(self) -> dict[str, int]:
        """Rows per table (for tests and status)."""
        return {
            table: self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("retained", "sessions", "messages")
        }
