"""Membership and shard ownership: the view from etcd, hand-offs between owners, the leader's rebalancer.

Rules of this file:
- One thread owns every socket and every piece of routing state. The etcd session thread only hands member
  snapshots in over an inproc PULL socket.
- A node stops acting as an owner (self-fences) while ``fenced()``: its etcd session cannot vouch for its lease
  (see ``membership.py`` for when).
- The leader runs the coordinator: it turns its decisions into hand-offs and assignment commits.
- Hand-off: the source snapshots the shard to the new replicas, then streams its changes; a new replica takes
  the snapshot and, when complete, tells the coordinator it is ready. The next coordinator tick flips every ready
  move in one etcd commit.
- An ex-owner keeps serving and forwarding ``handoff_grace`` seconds after a flip (stale senders have a grace
  period to catch up), then drops its copy of the shard once nothing (hand-off, grace) still needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from shardmq.rebalance import Commit, Coordinator, Member, StartHandoff, target_table
from shardmq.ring import Assignment
from shardmq.router import codec
from shardmq.router.codec import Frame
from shardmq.router.partition import placement_key

from .base import NodeBase
from .membership import MemberInfo, read_assignment, write_assignment
from .state import ROOT, Forwarding

# The fence check runs when the lease would come into doubt (and at least this often): a fixed 100 ms tick woke
# every node ten times a second and, measured, made a saturated subscriber's node send smaller batches and drop.
FENCE_CHECK_INTERVAL = 1.0
FENCE_CHECK_MIN = 0.02

SNAPSHOT_CHUNK = 5000
REANNOUNCE_DELAY = 1.0  # a few member polls: by then every peer has seen us gone and back


class OwnershipMixin(NodeBase):
    if TYPE_CHECKING:  # from RoutingMixin

        def _change_routes(self, kind: bytes, filters: list[str], on_done: Callable[[list[str]], None]) -> None: ...

        def _invalidate_caches(self, shards: Iterable[int], then: Callable[[], None] | None = None) -> bool: ...

        def watch_everywhere(self, shards: Iterable[int]) -> None: ...

    if TYPE_CHECKING:  # from ClientsMixin

        def end_sessions(self, code: str, reason: str) -> None: ...

    if TYPE_CHECKING:  # from RoutingMixin

        def replay_route_changes(self) -> None: ...

    # ------------------------------------------------------------------ membership and ownership
    def fenced(self) -> bool:
        # Also fenced between registering again and seeing the view that goes with the new registration.
        return self.session.fenced(time.monotonic()) or self._registration < self.session.registrations

    def _fence_tick(self) -> None:
        """Clients of a node that cannot vouch for its lease move elsewhere at once: peers drop this node's
        routes when the lease expires, and a subscriber left here would then miss messages without knowing."""
        if self.fenced() and self._registration:  # registered once: before that no client could subscribe
            if not self.sessions_ended_fenced:
                self.sessions_ended_fenced = True
                self.log.warning("lease_in_doubt_clients_told", clients=len(self.sessions), epoch=self.epoch)
                self.end_sessions(codec.E_FENCED, f"node {self.me} lost contact with etcd; connect to another node")
        else:
            self.sessions_ended_fenced = False
        until_doubt = self.session.fenced_from() - time.monotonic()
        self.call_later(min(FENCE_CHECK_INTERVAL, max(FENCE_CHECK_MIN, until_doubt)), self._fence_tick)

    def on_snapshot(self, snapshot: dict[str, Any], document: bytes) -> None:
        """A new view from etcd: members, leader and (when it changed) the assignment document."""
        members = {m["node"]: MemberInfo.from_dict(m) for m in snapshot["members"]}
        if self.me not in members and self.members.get(self.me) is not None:
            self.log.warning("removed_from_cluster", epoch=self.epoch)  # `shardmq cluster remove` deleted our key
            self.stop()
            return
        self.leader = snapshot.get("leader")
        registration = int(snapshot.get("registration", 1))
        if registration > self._registration:
            if self._registration:
                # We lost our lease and registered again: peers saw us gone and dropped our routes, so messages
                # for our clients were lost meanwhile. They are told (their sessions end) unless the fence check
                # already did; subscriptions made since are announced again once everyone has seen us back.
                if not self.sessions_ended_fenced:
                    self.end_sessions(codec.E_FENCED, f"node {self.me} lost its etcd lease; connect to another node")
                self.call_later(REANNOUNCE_DELAY, self._reannounce_routes)
                # Owners that saw us gone forgot which of their answers we cache: ask them all again.
                self.route_cache.clear()
            self._registration = registration
        if members != self.members:
            self.on_members(members, int(snapshot["epoch"]))
        me = members.get(self.me)
        self.member_revision = me.revision if me is not None else 0
        if self.deferred_route_changes:
            self.replay_route_changes()
        if document and snapshot["assignment_revision"] > self.assignment_revision:
            self._set_assignment(Assignment.from_json(document), snapshot["assignment_revision"])
        if self.leader == self.me and self.coordinator is None:
            self.coordinator = Coordinator(
                int(self.settings["shard_count"]),
                int(self.settings["replication"]),
                handoff_timeout=self.cfg.handoff_timeout,
            )
            self.log.info("leader_elected", epoch=self.epoch)
        elif self.leader != self.me:
            self.coordinator = None
        self._lead()
        self._maybe_finish_leaving()

    def on_members(self, members: dict[str, MemberInfo], epoch: int) -> None:
        # A member that restarted (new incarnation) or moved (new endpoints) is another process: what we knew of
        # the old one (its routes, our connection, requests waiting on it) goes, as if it had left and joined.
        replaced = {
            n for n, m in members.items() if n in self.members and n != self.me and not m.same_process(self.members[n])
        }
        joined = (set(members) - set(self.members) - {self.me}) | replaced
        gone = (set(self.members) - set(members)) | replaced
        # Same process at the same address, registered again after a lost lease: our connection to it is still
        # right, and closing it would drop what we queued on it just before (a hand-off's SNAPSHOT, measured:
        # 86 moves then waited out handoff_timeout).
        same_socket = {
            n for n in replaced
            if (members[n].incarnation, members[n].peer_endpoint)
            == (self.members[n].incarnation, self.members[n].peer_endpoint)
        }  # fmt: skip
        had_members = bool(self.members)
        self.members = members
        self.epoch = epoch
        for node in gone:
            sock = None if node in same_socket else self.dealers.pop(node, None)
            if sock is not None:
                sock.close(linger=0)
            removed = self.routes.remove_node(node)
            self._fail_peer_requests(node)
            self.log.warning("member_lost", peer=node, routes_removed=removed, epoch=self.epoch)
        if had_members and joined:
            self._announce_root_routes(joined)
        self.log.info("membership", epoch=self.epoch, members=sorted(members), joined=sorted(joined), gone=sorted(gone))

    def _announce_root_routes(self, nodes: set[str]) -> None:
        """Root-set routes live on every node: give a newcomer ours (every node does the same)."""
        local = {f for idx in (self.local_q0, self.local_q1) for f in idx.filters() if placement_key(f) is None}
        if not local:
            return
        items = [[ROOT, 0, f] for f in sorted(local)]
        for node in nodes:
            self.send_peer(node, codec.encode(codec.ROUTE_ADD, {"id": 0, "node": self.me, "epoch": 0, "routes": items}))

    def _set_assignment(self, new: Assignment, revision: int) -> None:
        if revision <= self.assignment_revision:
            return
        old = self.assignment
        self.assignment, self.assignment_revision = new, revision
        mine = set(new.shards_of(self.me))
        for shard in mine:
            if self.incoming.pop(shard, None) is not None and shard in self.snapshot_sources:
                # The fill flipped: the source keeps forwarding until it sees the flip plus its grace period.
                source = self.snapshot_sources[shard]
                self.call_later(2 * self.cfg.handoff_grace, lambda s=shard, src=source: self._forget_source(s, src))
        if old is not None:
            # Entry nodes that cached our answers for a shard that flipped must ask its new owners.
            changed = [s for s in range(new.shard_count) if new.epoch(s) != old.epoch(s)]
            self._invalidate_caches(changed)
            # An owner that left took with it the record of who caches its answers (a promotion): every entry
            # node may, and the next route change in such a shard invalidates them all.
            self.watch_everywhere(
                s for s in changed if self.me in new.owners(s) and any(o not in self.members for o in old.owners(s))
            )
            for shard in set(old.shards_of(self.me)) - mine:
                self.call_later(self.cfg.handoff_grace, lambda shard=shard: self._release(shard))
            for shard, fw in list(self.forwarding.items()):
                if new.epoch(shard) > fw.epoch:  # flipped: stale senders have a grace period to catch up
                    self._stop_forwarding_later(shard, fw.epoch)
        self.log.info(
            "assignment", version=new.version, revision=revision, shards_held=len(mine),
            primaries=len(new.primaries_of(self.me)), epoch=self.epoch,
        )  # fmt: skip

    def _stop_forwarding_later(self, shard: int, epoch: int) -> None:
        self.call_later(self.cfg.handoff_grace, lambda: self._stop_forwarding(shard, epoch))

    def _stop_forwarding(self, shard: int, epoch: int) -> None:
        fw = self.forwarding.get(shard)
        if fw is not None and fw.epoch == epoch:
            del self.forwarding[shard]
            self._release(shard)

    def _release(self, shard: int) -> None:
        """Drop our copy of a shard we no longer own, once nothing (hand-off, grace) still needs it."""
        a = self.assignment
        if a is None or self.me in a.owners(shard) or shard in self.incoming or shard in self.forwarding:
            return
        dropped = self.routes.drop_shard(shard)
        self.metrics["handoff.shards_released"] += 1
        self.log.info("shard_released", shard=shard, epoch=a.epoch(shard), routes_dropped=dropped)
        self._maybe_finish_leaving()

    def _refresh_assignment(self, force: bool = False) -> bool:
        """Read the assignment from etcd now (a peer told us our view is old); at most every 100 ms unless
        ``force``. False when etcd could not be read."""
        now = time.monotonic()
        if now - self._last_refresh < 0.1 and not force:
            return True
        self._last_refresh = now
        try:
            document, revision = read_assignment(self.etcd, self.cfg.cluster)
        except Exception as exc:
            self.log.warning("etcd_error", error=str(exc), epoch=self.epoch)
            return False
        if document:
            self._set_assignment(Assignment.from_json(document), revision)
        return True

    def _reannounce_routes(self) -> None:
        filters = sorted({f for idx in (self.local_q0, self.local_q1) for f in idx.filters()})
        self.log.info("routes_reannounced", filters=len(filters), epoch=self.epoch)
        self.metrics["routes.reannounced"] += len(filters)
        self._change_routes(codec.ROUTE_ADD, filters, lambda failures: None)

    def _maybe_finish_leaving(self) -> None:
        a = self.assignment
        if not self.session.leaving or a is None or self.forwarding or self.incoming:
            return
        if not a.shards_of(self.me):
            self.log.info("left_cluster", epoch=self.epoch)
            self.stop()

    # ------------------------------------------------------------------ rebalance (leader only)
    def _lead(self) -> None:
        """Run the coordinator: the leader turns its decisions into hand-offs and assignment commits."""
        c = self.coordinator
        if c is None or self.leader != self.me or self.fenced():
            return
        now = time.monotonic()
        c.observe(
            self.assignment,
            self.assignment_revision,
            {n: Member(m.weight, m.leaving) for n, m in self.members.items()},
            now,
        )
        for action in c.step(now):
            if isinstance(action, StartHandoff):
                self._start_handoff(action)
            else:
                self._commit(c, action)
        for shard, why in c.abandoned:
            self.log.warning("move_abandoned", shard=shard, reason=why, epoch=self.epoch)
        c.abandoned.clear()
        busy = bool(c.in_flight or c.remaining or self.assignment is None)
        if busy and now - self._last_progress_log > 1.0:
            self._last_progress_log = now
            self.log.info("rebalance_progress", **c.progress(), epoch=self.epoch)
        if busy and not self._lead_scheduled:
            self._lead_scheduled = True
            self.call_later(0.05, self._lead_tick)

    def _lead_tick(self) -> None:
        self._lead_scheduled = False
        self._lead()

    def _start_handoff(self, action: StartHandoff) -> None:
        move = action.move
        header = {
            "id": action.move_id, "shard": move.shard, "epoch": action.epoch,
            "targets": list(move.add), "coordinator": self.me,
        }  # fmt: skip
        self.log.info("handoff_start", shard=move.shard, epoch=action.epoch, source=move.source, targets=move.add)
        if move.source == self.me:
            self._on_handoff(self.me, Frame(codec.HANDOFF, header))
        else:
            self.send_peer(move.source, codec.encode(codec.HANDOFF, header))

    def _commit(self, c: Coordinator, commit: Commit) -> None:
        try:
            revision = write_assignment(
                self.etcd, self.cfg.cluster, commit.assignment.to_json(), commit.expected_revision
            )
        except Exception as exc:
            self.log.warning("etcd_error", error=str(exc), epoch=self.epoch)
            revision = None
        durations = c.on_commit(commit, revision, time.monotonic())
        if revision is None:
            self.session.poll_now()
            return
        self.metrics[f"rebalance.commits.{commit.reason}"] += 1
        for shard, took in durations.items():  # every move, at debug level; the commit line sums them up
            self.log.debug("move_done", shard=shard, epoch=commit.assignment.epoch(shard), ms=round(took * 1000))
        self.log.info(
            "assignment_committed", reason=commit.reason, shards=len(commit.flipped),
            handoffs=len(durations), handoff_ms_max=round(1000 * max(durations.values(), default=0)),
            version=commit.assignment.version, epoch=self.epoch,
        )  # fmt: skip
        self._set_assignment(commit.assignment, revision)

    # ------------------------------------------------------------------ peer frames
    def _on_handoff(self, sender: str, frame: Frame) -> None:
        """We are the source of a move: snapshot the shard to the new replicas, then stream its changes."""
        h = frame.header
        shard, epoch = h["shard"], h["epoch"]
        if not self._shards_ok([shard]):
            self._refuse_move(frame, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return
        if self.fenced():
            self._refuse_move(frame, codec.E_FENCED, f"{self.me} cannot renew its etcd lease")
            return
        a = self.assignment
        if a is None or a.epoch(shard) < epoch:
            self._refresh_assignment()
            a = self.assignment
        if a is None or a.epoch(shard) != epoch or self.me not in a.owners(shard):
            self._refuse_move(frame, codec.E_STALE_EPOCH, f"{self.me} does not own shard {shard} at epoch {epoch}")
            return
        targets = [t for t in h["targets"] if t != self.me]
        unknown = [t for t in targets if t not in self.members]
        if unknown:
            # Our view has not caught up with a target that (re)joined: a snapshot sent now would be dropped and
            # the move would wait out handoff_timeout. Refused, the coordinator plans it again at its next tick.
            self._refuse_move(frame, codec.E_UNAVAILABLE, f"{self.me} does not know {unknown} as members yet")
            self.session.poll_now()
            return
        fw = self.forwarding.get(shard)
        if fw is None or fw.epoch != epoch:
            fw = self.forwarding[shard] = Forwarding(set(), epoch)
        fw.targets.update(targets)
        fw.move_id = h["id"]
        # A move the coordinator abandons never flips: stop streaming to its targets after the timeout.
        self.call_later(
            self.cfg.handoff_timeout + self.cfg.handoff_grace, lambda: self._stop_abandoned(shard, epoch, h["id"])
        )
        routes = [[filt, list(nodes)] for filt, nodes in self.routes.shard_routes(shard)]
        size = 0
        for target in targets:
            for start in range(0, max(len(routes), 1), SNAPSHOT_CHUNK):
                chunk = routes[start : start + SNAPSHOT_CHUNK]
                header = {
                    "id": h["id"], "shard": shard, "epoch": epoch, "routes": chunk,
                    "last": start + SNAPSHOT_CHUNK >= len(routes), "coordinator": h["coordinator"],
                }  # fmt: skip
                parts = codec.encode(codec.SNAPSHOT, header)
                size += len(parts[1])
                self.send_peer(target, parts)
        self.metrics["handoff.snapshots_sent"] += len(targets)
        self.metrics["handoff.routes_sent"] += len(routes) * len(targets)
        self.metrics["handoff.bytes_sent"] += size
        self.log.info("handoff_snapshot", shard=shard, epoch=epoch, targets=targets, routes=len(routes), bytes=size)

    def _on_snapshot(self, sender: str, frame: Frame) -> None:
        """We are a new replica: take the snapshot; when complete, tell the coordinator we are ready."""
        h = frame.header
        shard, epoch = h["shard"], h["epoch"]
        if not self._shards_ok([shard]):
            self._refuse_move(frame, codec.E_BAD_HEADER, f"shard {shard} is outside this cluster")
            return
        a = self.assignment
        if a is not None and a.epoch(shard) > epoch:
            self._refuse_move(frame, codec.E_STALE_EPOCH, f"snapshot of shard {shard} is for epoch {epoch}, "
                              f"it is at {a.epoch(shard)}")
            return
        if self.incoming.get(shard) != h["id"]:
            self.incoming[shard] = h["id"]
            self.snapshot_sources[shard] = sender
            move_id = h["id"]
            # Twice the coordinator's timeout: it may flip the move up to handoff_timeout after starting it, and
            # we must not give up on a fill that is about to become ours.
            self.call_later(2 * self.cfg.handoff_timeout, lambda: self._abandon_incoming(shard, move_id, sender))
        for filt, nodes in h["routes"]:
            for node in nodes:
                self.routes.add(shard, filt, node)
        self.metrics["handoff.routes_received"] += len(h["routes"])
        self.metrics["handoff.bytes_received"] += len(orjson.dumps(h["routes"]))
        if h["last"]:
            ready = {"id": h["id"], "shard": shard, "epoch": epoch, "node": self.me}
            self.send_peer(h["coordinator"], codec.encode(codec.HANDOFF_READY, ready))

    def _forget_source(self, shard: int, source: str) -> None:
        """Stop accepting forwarded changes from a hand-off source (its stream is over)."""
        if self.snapshot_sources.get(shard) == source:
            del self.snapshot_sources[shard]

    def _abandon_incoming(self, shard: int, move_id: int, source: str) -> None:
        if self.incoming.get(shard) != move_id:
            return  # the move flipped (the flip schedules _forget_source) or a newer fill replaced it
        # Our view may not show the flip yet (it lags by a poll): decide on a fresh read, never on a stale one.
        if not self._refresh_assignment(force=True):
            self.call_later(self.cfg.handoff_grace, lambda: self._abandon_incoming(shard, move_id, source))
            return
        if self.incoming.pop(shard, None) == move_id:  # the fresh view may have made us the owner meanwhile
            self._forget_source(shard, source)  # abandoned: the source stopped streaming too
            self._release(shard)

    def _refuse_move(self, frame: Frame, code: str, reason: str) -> None:
        """Tell the coordinator (not whoever relayed the frame) that this move cannot proceed, by move id."""
        h = frame.header
        self.metrics[f"fencing.refused.{code}"] += 1
        self.log.warning("move_refused", shard=h.get("shard"), code=code, reason=reason, epoch=self.epoch)
        extra = {"move_id": h.get("id"), "shard": h.get("shard")}
        if h.get("coordinator") == self.me and self.coordinator is not None:
            self.coordinator.on_refused(h["id"])
        elif isinstance(h.get("coordinator"), str):
            self.send_peer(h["coordinator"], codec.error_parts(code, reason, None, **extra))

    def _stop_abandoned(self, shard: int, epoch: int, move_id: int) -> None:
        fw = self.forwarding.get(shard)
        never_flipped = self.assignment is not None and self.assignment.epoch(shard) == epoch
        if fw is not None and fw.epoch == epoch and fw.move_id == move_id and never_flipped:
            del self.forwarding[shard]
            self.metrics["handoff.abandoned_streams"] += 1

    def _on_handoff_ready(self, sender: str, frame: Frame) -> None:
        if self.coordinator is not None:
            # Only mark it: the next coordinator tick flips every ready move in one etcd commit.
            self.coordinator.on_ready(frame.header["id"], frame.header["node"])

    # ------------------------------------------------------------------ placement
    def target_table(self) -> tuple[tuple[str, ...], ...] | None:
        """The balanced placement for the current live (non-leaving) members."""
        members = {n: Member(m.weight, m.leaving) for n, m in self.members.items()}
        return target_table(members, int(self.settings["shard_count"]), int(self.settings["replication"]))
