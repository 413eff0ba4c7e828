"""The rebalance coordinator: a pure state machine that turns observations into hand-off and commit decisions.

The leader node feeds it what etcd says (the assignment document with its revision, the members) and what peers
say (a new replica reporting its snapshot complete), plus the time; it answers with actions for the node to carry
out: ``StartHandoff`` (tell a source to stream a shard to new replicas) and ``Commit`` (compare-and-swap the
assignment). It never performs I/O and never reads a clock.

Rules of this file:
- The assignment in etcd is the only truth about owners. The coordinator plans from the last document it
  observed and emits at most one ``Commit`` per step, always against that document's revision; a lost race
  (``on_commit`` with no revision) just means "observe again and replan".
- Order of concerns in a step: (1) create the first assignment once membership has been stable for ``settle``
  seconds; (2) promote surviving replicas of shards that lost an owner (one commit, epoch + 1, before anything
  else, so publishes find a live primary as soon as the lease of a dead node expires); (3) flip the moves whose
  new replicas all reported ready, and moves that copy nothing; (4) start new hand-offs within the
  concurrency limits of ``next_batch``.
- A move is forgotten (and re-planned later) if its shard's epoch changed under it, a node in it died, or it
  did not finish within ``handoff_timeout``: progress never depends on one peer answering.
- Leaving members are alive (they may still be sources) but get no shards in the target, so every shard
  drains off them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shardmq.ring import Assignment, ShardMap, ShardState, promote_survivors

from .planner import Move, apply_flip, next_batch, plan


@dataclass(frozen=True, slots=True)
class StartHandoff:
    move_id: int
    move: Move
    epoch: int  # the shard's epoch the move was planned against; the source rejects a different one


@dataclass(frozen=True, slots=True)
class Commit:
    assignment: Assignment
    expected_revision: int
    reason: str  # "initial", "promote" or "flip"
    flipped: tuple[int, ...] = ()  # shards whose ownership this commit changes (for counters and logs)


Action = StartHandoff | Commit


@dataclass(frozen=True, slots=True)
class Member:
    weight: int = 1
    leaving: bool = False


@dataclass(slots=True)
class InFlight:
    move_id: int
    move: Move
    epoch: int
    started: float
    waiting: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Counters:
    handoffs_started: int = 0
    shards_flipped: int = 0
    promotions: int = 0
    lost_shards: int = 0
    abandoned: int = 0
    commits_failed: int = 0
    handoffs_done: int = 0
    handoff_seconds_total: float = 0.0
    handoff_seconds_max: float = 0.0


def target_table(
    members: Mapping[str, Member], shard_count: int, replication: int
) -> tuple[tuple[str, ...], ...] | None:
    """The balanced placement for the live (non-leaving) members, or None without any; cached per member set."""
    live = tuple(sorted((n, m.weight) for n, m in members.items() if not m.leaving))
    return _build_table(live, shard_count, replication) if live else None


@functools.lru_cache(maxsize=8)
def _build_table(
    live: tuple[tuple[str, int], ...], shard_count: int, replication: int
) -> tuple[tuple[str, ...], ...]:
    return ShardMap.build(dict(live), shard_count, replication).table


class Coordinator:
    def __init__(
        self,
        shard_count: int,
        replication: int,
        max_concurrent: int = 256,
        max_per_node: int = 128,
        handoff_timeout: float = 30.0,
        settle: float = 1.0,
    ) -> None:
        self.shard_count = shard_count
        self.replication = replication
        self.max_concurrent = max_concurrent
        self.max_per_node = max_per_node
        self.handoff_timeout = handoff_timeout
        self.settle = settle
        self.assignment: Assignment | None = None
        self.revision = 0
        self.members: dict[str, Member] = {}
        self.members_changed_at = 0.0
        self.in_flight: dict[int, InFlight] = {}  # shard -> move in progress
        self.remaining = 0  # moves the last plan still had to do
        self.counters = Counters()
        self.abandoned: list[tuple[int, str]] = []  # (shard, why) for the shell to log; it clears the list
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ inputs
    def observe(self, assignment: Assignment | None, revision: int, members: Mapping[str, Member], now: float) -> None:
        if dict(members) != self.members:
            self.members = dict(members)
            self.members_changed_at = now
        if assignment is not None and revision >= self.revision:
            self.assignment, self.revision = assignment, revision

    def on_ready(self, move_id: int, node: str) -> None:
        for flight in self.in_flight.values():
            if flight.move_id == move_id:
                flight.waiting.discard(node)
                return

    def on_refused(self, move_id: int) -> None:
        """A source or target refused a move (stale epoch, fenced): forget it; the next step plans it again."""
        self._forget(lambda f: f.move_id == move_id, "refused by a node")

    def on_commit(self, commit: Commit, new_revision: int | None, now: float | None = None) -> dict[int, float]:
        """The shell's result for ``commit``: the document's new revision, or None when the CAS lost a race.

        Returns how long each hand-off this commit finished took (shard -> seconds from HANDOFF to the flip).
        """
        c = self.counters
        if new_revision is None:
            c.commits_failed += 1
            return {}
        self.assignment, self.revision = commit.assignment, new_revision
        durations: dict[int, float] = {}
        for shard in commit.flipped:
            flight = self.in_flight.pop(shard, None)
            if flight is not None and now is not None:  # a hand-off finished: HANDOFF sent -> ownership flipped
                took = durations[shard] = now - flight.started
                c.handoffs_done += 1
                c.handoff_seconds_total += took
                c.handoff_seconds_max = max(c.handoff_seconds_max, took)
        if commit.reason == "flip":
            self.counters.shards_flipped += len(commit.flipped)
        elif commit.reason == "promote":
            self.counters.promotions += len(commit.flipped)
        return durations

    # ------------------------------------------------------------------ decisions
    def target(self) -> tuple[tuple[str, ...], ...]:
        table = target_table(self.members, self.shard_count, self.replication)
        assert table is not None  # step() only asks with a live member
        return table

    def settled(self) -> bool:
        """True when the assignment is the target for the current members and nothing is moving."""
        live = [n for n, m in self.members.items() if not m.leaving]
        return bool(
            self.assignment is not None and live and not self.in_flight and self.assignment.table == self.target()
        )

    def step(self, now: float) -> list[Action]:
        alive = set(self.members)
        if not any(not m.leaving for m in self.members.values()):
            return []
        a = self.assignment
        if a is None:
            if now - self.members_changed_at < self.settle:
                return []
            return [Commit(Assignment.initial(self.target(), self.replication), 0, "initial")]

        promotions = promote_survivors(a, alive)
        if promotions:
            self._forget(lambda f: bool(set(f.move.busy_nodes()) - alive), "a node in the move died")
            lost = [s for s, st in promotions.items() if not st.owners]
            self.counters.lost_shards += len(lost)
            return [Commit(a.with_states(promotions), self.revision, "promote", tuple(sorted(promotions)))]

        self._forget(lambda f: a.epoch(f.move.shard) != f.epoch, "the shard changed under the move")
        self._forget(lambda f: now - f.started > self.handoff_timeout, "timed out")

        changes: dict[int, ShardState] = {}
        for shard, flight in self.in_flight.items():
            if not flight.waiting:
                changes[shard] = apply_flip(a, flight.move)
        moves = plan(a, self.target(), alive)
        self.remaining = len(moves)
        actions: list[Action] = []
        busy = [f.move for f in self.in_flight.values()]
        for move in next_batch(moves, busy, self.max_concurrent, self.max_per_node):
            if not move.add:  # a reorder or a pure removal: nothing to copy, flip now
                changes[move.shard] = apply_flip(a, move)
            elif not move.source:  # every owner is gone: nothing survives to copy
                self.counters.lost_shards += 1
                changes[move.shard] = ShardState(move.new_owners, a.epoch(move.shard) + 1)
            else:
                flight = InFlight(next(self._ids), move, a.epoch(move.shard), now, set(move.add))
                self.in_flight[move.shard] = flight
                self.counters.handoffs_started += 1
                actions.append(StartHandoff(flight.move_id, move, flight.epoch))
        if changes:
            actions.append(Commit(a.with_states(changes), self.revision, "flip", tuple(sorted(changes))))
        return actions

    def _forget(self, doomed: Callable[[InFlight], bool], why: str) -> None:
        for shard in [s for s, f in self.in_flight.items() if doomed(f)]:
            del self.in_flight[shard]
            self.counters.abandoned += 1
            self.abandoned.append((shard, why))

    def progress(self) -> dict[str, int | bool]:
        """Counters for status and logs. The drain costs nothing to count: owners answer lookups synchronously,
        so a source never holds accepted-but-unfinished work for a shard; route changes that reach it during a
        move are forwarded (``handoff.changes_forwarded`` in the node's metrics), never buffered."""
        c = self.counters
        return {
            "moves_in_progress": len(self.in_flight),
            "moves_remaining": self.remaining,
            "handoffs_started": c.handoffs_started,
            "shards_flipped": c.shards_flipped,
            "promotions": c.promotions,
            "lost_shards": c.lost_shards,
            "abandoned_moves": c.abandoned,
            "commits_failed": c.commits_failed,
            "handoffs_done": c.handoffs_done,
            "handoff_ms_mean": round(1000 * c.handoff_seconds_total / c.handoffs_done) if c.handoffs_done else 0,
            "handoff_ms_max": round(1000 * c.handoff_seconds_max),
            "settled": self.settled(),
        }
