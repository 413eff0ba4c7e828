"""Retained messages: where a retain publish is stored, how it is replicated, and what a new subscriber gets.

Rules of this file:
- Where. The retained message of topic ``T`` lives at the owners of ``T``'s own shard (``shard_for_key(T, S)``,
  the shard of ``T``'s exact routes), in the owner side's ``RetainedTable`` (one ``RetainedIndex`` for the node,
  and each shard's topics). It moves with the shard: a hand-off's SNAPSHOT carries it, ``release`` drops it (``owner``).
- One writer per shard: its primary. The entry node sends a retain publish's change (RETAIN; an empty payload
  deletes) to the primary only. The primary takes it only if it is the primary at the shard epoch the entry
  sent, else it answers RETAIN_ACK ``stale`` with its own shard epoch, and the entry re-reads the assignment and
  sends again (``STALE_RETRIES``, as ``subscriptions`` does). The primary stamps the change ``(shard epoch,
  seq)``, applies it and sends it (``replica``) to the shard's other owners and the targets of its hand-off
  stream of the shard; RETAIN_ACK goes back only once each answered. A replica that leaves the view counts as
  done; one that does not answer in ``request_timeout`` fails the write (``unavailable``: the publish fails and
  the client retries). One node orders a shard's writes and each peer connection is FIFO, so replicas see them
  in the same order: no version vectors, no tombstones (the stamp only keeps a write that arrives twice from
  undoing a newer one).
- Replicas apply a change from the shard's primary in their view (same shard epoch) or from a newer shard epoch;
  a hand-off target also from the source that streams the shard to it (``HandoffTarget.may_forward``). A replica
  that is itself the source of a hand-off of the shard relays the change on to its targets and answers once they
  did, so a target never flips without a write confirmed meanwhile.
- Batches (RETAINS). A node's own unconditional record writes made while it handles one batch of events (the
  session queues' records and deletions, ``queue_write``) are sent at the flush (``send_batched``), one RETAINS per
  shard (a lone one as RETAIN). The primary takes a RETAINS whole or not at all, stamps its items with consecutive
  sequence numbers, sends it on as one replica RETAINS per replica and hand-off target before it applies it itself
  (the replicas apply meanwhile), and answers one RETAIN_ACK once each answered, as for one RETAIN; ``stale``
  sends the whole batch again (grouped again). Every record is applied, and so journaled, one by one.
- Per primary (RETAINM). The batched writes of one flush are grouped by their shard's primary: a primary with two or
  more shards gets one RETAINM, a part per shard with its shard epoch. Each part is taken or refused on its own as
  one RETAINS would be; the taken ones go on as one RETAINM per replica node (the parts of the shards it holds or is
  a hand-off target of), and RETAINM_ACK answers per shard (``stale``, ``failed``; the rest stored) once every such
  node answered. A replica node that fails a part (refused, silent) fails that shard only; a stale part alone is
  sent again. A replica relays a part to the hand-off targets of its shard as RETAINS does.
- A session record's write may be conditional (``wills``): RETAIN ``if_will`` names the will id the writer expects
  the stored record to hold ("" none); the primary, which orders every write of the shard, applies it only then
  (``clear_will``: it stores the stored record without its will), else answers RETAIN_ACK ``conflict`` with the
  stored record and applies nothing. That compare-and-set at the one writer is what makes a will publish once.
- A new retained message that would take the node past ``max_retained_bytes`` (payload + topic) is refused with
  ``overloaded``: never stored silently past it, never evicted.
- Subscribe. After a SUB's SUBACK, the subscriber's node asks for the retained messages of its granted filters:
  an exact filter at the primary of its shard (then the other owners, in order, on a timeout), a wildcard filter
  at every member (one RETAINED_GET per member carries all of the SUB's filters it is asked). A member answers
  from every shard it holds (RETAINED_REPLY, chunked by count and bytes, ``more`` on all but the last). The
  subscriber's node keeps one copy per topic: the primary's in its view, else another owner's (the newer stamp);
  a copy from a node that owns the shard in neither role is ignored (an ex-owner in its grace period may hold a
  message deleted since). The messages go to that one client only, at min(stored qos, granted qos), with
  ``retain`` set, through the normal QoS 1 window and backlog; one that finds the backlog full is not delivered,
  counted (``retained.refused_overloaded``) and reported to the client (ERROR ``overloaded``), never cut silently.
  A member that does not answer within ``retained_fetch_timeout`` is counted (``retained.fetch_timeouts``) and
  its shards' messages are missing from that subscribe (a known limit).
- Cost of a subscribe: one frame per member for a wildcard filter, plus one index query at each member (one
  index for every shard it holds; ``RetainedIndex.match`` follows the filter's rarest literal level): it grows
  with the members and with what matches, not with the total retained.
- Pure: no I/O, no clock; replies and deliveries are sorted by topic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.router.codec import Frame, ProtocolError
from shardmq.router.matching import filter_matches
from shardmq.router.retained_table import RetainedMessage, RetainedTable, Stamp
from shardmq.router.topics import TopicError, validate_topic_filter, validate_topic_name

from .records import (
    PartsReplication,
    Publish,
    Replication,
    RetainBatch,
    RetainedFetch,
    RetainParts,
    RetainWrite,
    Session,
    placement_key,
)
from .subscriptions import STALE_RETRIES
from .view import ROOT
from .wills import will_id, without_will

if TYPE_CHECKING:
    from .node import NodeCore

REPLY_CHUNK = 5000  # retained messages per RETAINED_REPLY frame at most (and max_payload bytes)
BATCH_MAX = 5000  # writes per RETAINS frame at most (and max_payload bytes)
RANK_PRIMARY, RANK_OWNER = 2, 1  # which copy a subscriber's node keeps when members answer differently


# One shard's part of a RETAINM going to a replica: (shard, shard epoch, stamp (epoch, first seq), its items).
Part = tuple[int, int, tuple[int, int], list[tuple[str, int, bytes]]]


def is_wild(filt: str) -> bool:
    return "+" in filt or "#" in filt


class RetainedSide:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.seq = 0  # the stamp's sequence number of the writes this node accepted as primary
        self.batched: list[RetainWrite] = []  # writes to send at the flush, a RETAINS per shard (``queue_write``)

    @property
    def table(self) -> RetainedTable:
        return self.core.owner.retained

    # ------------------------------------------------------------------ entry: a retain publish
    def publish(self, pub: Publish, on_done: Callable[[str | None, str], None]) -> None:
        """Send ``pub``'s retained change to its shard's primary; ``on_done(code, reason)``: code None = stored."""
        self._write(RetainWrite("", 0, pub.topic, pub.qos, pub.payload, on_done))

    def _write(self, w: RetainWrite) -> None:
        core = self.core
        a = core.view.assignment
        if a is None:
            w.then(codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry shortly")
            return
        shard = shard_for_key(placement_key(w.topic), a.shard_count)
        state = a.state(shard)
        if not state.owners or (state.owners[0] != core.me and state.owners[0] not in core.view.members):
            w.then(codec.E_UNAVAILABLE, f"shard {shard} has no reachable primary; retry shortly")
            return
        w.primary, w.shard = state.owners[0], shard
        header = {"id": 0, "shard": shard, "shard_epoch": state.epoch, "topic": w.topic, "qos": w.qos,
                  "replica": False}  # fmt: skip
        if w.if_will is not None:  # a session record's conditional write (``wills``)
            header["if_will"] = w.if_will
            if w.clear_will:
                header["clear_will"] = True
        if w.primary == core.me:
            self._accept(core.me, header, [(w.topic, w.qos, w.payload)], lambda answer: self._answered(w, answer))
            return
        rid = header["id"] = core.requests.open(w, self)
        if not core.effects.send_peer(w.primary, codec.encode(codec.RETAIN, header, w.payload)):
            core.requests.close(rid)
            w.then(codec.E_UNAVAILABLE, f"primary {w.primary} of shard {shard} is unreachable")
            return
        core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_write(rid))

    def _expire_write(self, rid: int) -> None:
        w = self.core.requests.close(rid)
        if isinstance(w, RetainWrite):
            self.core.metrics["retained.write_timeouts"] += 1
            w.then(codec.E_TIMEOUT, f"primary {w.primary} of shard {w.shard} did not confirm the retained message")
        elif isinstance(w, RetainBatch):
            self.core.metrics["retained.write_timeouts"] += 1
            for one in w.writes:
                one.then(codec.E_TIMEOUT, f"primary {w.primary} of shard {w.shard} did not confirm the write")
        elif isinstance(w, RetainParts):
            self.core.metrics["retained.write_timeouts"] += 1
            for shard, writes in w.shards.items():
                for one in writes:
                    one.then(codec.E_TIMEOUT, f"primary {w.primary} of shard {shard} did not confirm the write")

    def _answered(self, w: RetainWrite, answer: dict[str, Any]) -> None:
        """The primary's answer: {} stored, {"stale": epoch}, {"conflict": stored record} (a conditional write
        that did not apply), or {"code", "reason"}."""
        core = self.core
        if "conflict" in answer and w.on_conflict is not None:
            w.on_conflict(answer["conflict"])
            return
        if "code" in answer:
            w.then(answer["code"], answer["reason"])
            return
        stale = answer.get("stale")
        if stale is None:
            core.metrics["retained.writes_acked"] += 1
            w.then(None, "")
            return
        if w.attempt >= STALE_RETRIES:
            w.then(codec.E_UNAVAILABLE, f"shard {w.shard}'s primary kept answering stale (shard epoch {stale})")
            return
        w.attempt += 1
        core.metrics["retained.stale_retries"] += 1
        core.refresh_assignment(lambda _ok: self._write(w), force=True)

    def on_retain_ack(self, sender: str, frame: Frame) -> None:
        h = frame.header
        w = self.core.requests.get(h["id"])
        if isinstance(w, Replication):
            self._settle(h["id"], sender)
            return
        if isinstance(w, RetainBatch) and w.primary == sender:
            self.core.requests.close(h["id"])
            stale = h.get("stale")
            self._batch_answered(w, {"stale": stale} if type(stale) is int else {})
            return
        if not isinstance(w, RetainWrite) or w.primary != sender:
            return
        self.core.requests.close(h["id"])
        if h.get("conflict") is True:
            self._answered(w, {"conflict": frame.payload})
            return
        stale = h.get("stale")
        self._answered(w, {"stale": stale} if type(stale) is int else {})

    def write_record(
        self, topic: str, payload: bytes, then: Callable[[str | None, str], None], if_will: str | None = None,
        clear_will: bool = False, on_conflict: Callable[[bytes], None] | None = None,
    ) -> None:
        """A node's own record (the session directory, ``sessions``): written like a retain publish, through the
        shard's primary (an empty payload deletes). ``if_will``: only if the stored record's pending will has
        that id (``wills``: the primary, the one writer, makes claiming a will atomic); ``on_conflict(stored)``
        otherwise."""
        self._write(RetainWrite("", 0, topic, 1, payload, then, if_will=if_will, clear_will=clear_will,
                                on_conflict=on_conflict))  # fmt: skip

    # ------------------------------------------------------------------ batched writes: RETAINS
    def queue_write(self, topic: str, payload: bytes, then: Callable[[str | None, str], None]) -> None:
        """A node's own unconditional record write (as ``write_record``), sent at the end of this batch of events
        with the other writes of its shard in one RETAINS (``send_batched``): the session queues' records and their
        deletions (``sessions``), many per forwarded batch. ``then(code, reason)`` as for ``write_record``."""
        self.batched.append(RetainWrite("", 0, topic, 1, payload, then))

    def send_batched(self) -> None:
        """Send the writes queued since the last flush (``NodeCore.flush``): one RETAINS per shard, in the order
        they were queued (at most ``BATCH_MAX`` items and ``max_payload`` bytes each; a lone write as RETAIN)."""
        core = self.core
        while self.batched:  # what the answers given here (a refusal, a local primary's) queue goes out too
            writes, self.batched = self.batched, []
            a = core.view.assignment
            if a is None:
                for w in writes:
                    w.then(codec.E_UNAVAILABLE, "the cluster has no shard assignment yet; retry shortly")
                continue
            by_shard: dict[int, list[RetainWrite]] = {}
            for w in writes:
                by_shard.setdefault(shard_for_key(placement_key(w.topic), a.shard_count), []).append(w)
            by_primary: dict[str, dict[int, list[RetainWrite]]] = {}
            for shard in sorted(by_shard):
                state = a.state(shard)
                if not state.owners or (state.owners[0] != core.me and state.owners[0] not in core.view.members):
                    for w in by_shard[shard]:
                        w.then(codec.E_UNAVAILABLE, f"shard {shard} has no reachable primary; retry shortly")
                    continue
                by_primary.setdefault(state.owners[0], {})[shard] = by_shard[shard]
            for primary in sorted(by_primary):
                self._send_to_primary(primary, by_primary[primary])

    def _send_to_primary(self, primary: str, by_shard: dict[int, list[RetainWrite]]) -> None:
        """The writes of ``primary``'s shards in as few frames as the limits allow (``BATCH_MAX`` items,
        ``max_payload`` bytes): one RETAINM carries several shards' parts; a frame of one shard goes as RETAINS
        (a lone write as RETAIN)."""
        limit = self.core.cfg.max_payload
        frame: dict[int, list[RetainWrite]] = {}
        count = size = 0
        for shard in sorted(by_shard):
            for w in by_shard[shard]:
                if count and (count >= BATCH_MAX or size + len(w.payload) > limit):
                    self._send_frame(primary, frame)
                    frame, count, size = {}, 0, 0
                frame.setdefault(shard, []).append(w)
                count += 1
                size += len(w.payload)
        if frame:
            self._send_frame(primary, frame)

    def _send_frame(self, primary: str, frame: dict[int, list[RetainWrite]]) -> None:
        if len(frame) == 1:
            [(shard, writes)] = frame.items()
            self._write_batch(shard, writes)
        else:
            self._write_parts(primary, frame)

    def _write_batch(self, shard: int, writes: list[RetainWrite]) -> None:
        core = self.core
        if len(writes) == 1:
            self._write(writes[0])
            return
        a = core.view.assignment
        assert a is not None
        state = a.state(shard)
        if not state.owners or (state.owners[0] != core.me and state.owners[0] not in core.view.members):
            for w in writes:
                w.then(codec.E_UNAVAILABLE, f"shard {shard} has no reachable primary; retry shortly")
            return
        primary = state.owners[0]
        batch = RetainBatch(primary, shard, writes, attempt=max(w.attempt for w in writes))
        for w in writes:
            w.primary, w.shard = primary, shard
        header = {"id": 0, "shard": shard, "shard_epoch": state.epoch, "replica": False,
                  "items": [[w.topic, w.qos] for w in writes], "sizes": [len(w.payload) for w in writes]}  # fmt: skip
        core.metrics["retained.batches_out"] += 1
        if primary == core.me:
            items = [(w.topic, w.qos, w.payload) for w in writes]
            self._accept(core.me, header, items, lambda answer: self._batch_answered(batch, answer))
            return
        self._send_writes(primary, codec.RETAINS, header, writes, batch)

    def _batch_answered(self, batch: RetainBatch, answer: dict[str, Any]) -> None:
        """The primary's one answer for a RETAINS: every write of it has that answer (see ``_answered``); a stale
        batch is grouped again once the assignment is read again."""
        core = self.core
        if "code" in answer:
            for w in batch.writes:
                w.then(answer["code"], answer["reason"])
            return
        stale = answer.get("stale")
        if stale is None:
            core.metrics["retained.writes_acked"] += len(batch.writes)
            for w in batch.writes:
                w.then(None, "")
            return
        if batch.attempt >= STALE_RETRIES:
            for w in batch.writes:
                w.then(codec.E_UNAVAILABLE, f"shard {batch.shard}'s primary kept answering stale (shard epoch {stale})")
            return
        core.metrics["retained.stale_retries"] += 1
        for w in batch.writes:
            w.attempt = batch.attempt + 1

        def again(_ok: bool) -> None:
            self.batched.extend(batch.writes)
            self.send_batched()

        core.refresh_assignment(again, force=True)

    # ------------------------------------------------------------------ many shards of one primary: RETAINM
    def _write_parts(self, primary: str, by_shard: dict[int, list[RetainWrite]]) -> None:
        """The writes of several shards whose primary is ``primary`` in one RETAINM: one part per shard with its
        shard epoch, answered per shard (``_parts_answered``)."""
        core = self.core
        a = core.view.assignment
        assert a is not None
        record = RetainParts(primary, by_shard)
        parts: list[list[int]] = []
        writes: list[RetainWrite] = []
        for shard in sorted(by_shard):
            parts.append([shard, a.epoch(shard), len(by_shard[shard])])
            for w in by_shard[shard]:
                w.primary, w.shard = primary, shard
                writes.append(w)
        header: dict[str, Any] = {"id": 0, "replica": False, "parts": parts,
                                  "items": [[w.topic, w.qos] for w in writes],
                                  "sizes": [len(w.payload) for w in writes]}  # fmt: skip
        core.metrics["retained.batches_out"] += 1
        core.metrics["retained.multi_out"] += 1
        if primary == core.me:
            taken = self._parts_of(header, [(w.topic, w.qos, w.payload) for w in writes])
            self._accept_parts(taken, lambda answers: self._parts_answered(record, answers))
            return
        self._send_writes(primary, codec.RETAINM, header, writes, record)

    def _send_writes(
        self, primary: str, frame_type: bytes, header: dict[str, Any], writes: list[RetainWrite],
        waiting: RetainBatch | RetainParts,
    ) -> None:
        """Send a batch of writes (RETAINS or RETAINM, the payloads back to back) to their primary, ``waiting``
        in the request registry for its answer or ``request_timeout``; an unreachable primary fails them all."""
        core = self.core
        rid = header["id"] = core.requests.open(waiting, self)
        if not core.effects.send_peer(primary, codec.encode(frame_type, header, b"".join(w.payload for w in writes))):
            core.requests.close(rid)
            for w in writes:
                w.then(codec.E_UNAVAILABLE, f"primary {primary} of shard {w.shard} is unreachable")
            return
        core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_write(rid))

    @staticmethod
    def _parts_of(
        h: dict[str, Any], items: list[tuple[str, int, bytes]],
    ) -> list[tuple[dict[str, Any], list[tuple[str, int, bytes]]]]:  # fmt: skip
        """A RETAINM's parts as (one RETAINS-like header per shard, its items): ``shard``, ``shard_epoch`` and, for
        a replica's, ``stamp``."""
        out: list[tuple[dict[str, Any], list[tuple[str, int, bytes]]]] = []
        at = 0
        for part in h["parts"]:
            shard, shard_epoch, count = part[0], part[1], part[2]
            ph: dict[str, Any] = {"shard": shard, "shard_epoch": shard_epoch}
            if len(part) == 5:
                ph["stamp"] = [part[3], part[4]]
            out.append((ph, items[at : at + count]))
            at += count
        return out

    def on_retainm(self, sender: str, frame: Frame) -> None:
        """Writes of several shards (RETAINM): each shard's part as one RETAINS, answered per shard in one
        RETAINM_ACK (a primary's: ``_accept_parts``; a replica's: ``_replica_parts``)."""
        core = self.core
        h = frame.header
        try:
            pairs = codec.split_batch(frame)
            if sum(p[2] for p in h["parts"]) != len(pairs) or len({p[0] for p in h["parts"]}) != len(h["parts"]):
                raise ProtocolError(codec.E_BAD_FRAME, "RETAINM parts must name each shard once and count its items",
                                    h["id"])  # fmt: skip
            if any(len(p) != (5 if h["replica"] else 3) for p in h["parts"]):
                raise ProtocolError(codec.E_BAD_HEADER, "RETAINM parts carry a stamp exactly when replica is true",
                                    h["id"])  # fmt: skip
        except ProtocolError as exc:
            core.metrics[f"errors.{exc.code}"] += 1
            core.refuse_peer(sender, frame, exc.code, exc.reason)
            return
        taken = self._parts_of(h, [(topic, qos, payload) for (topic, qos), payload in pairs])

        def reply(answers: dict[int, dict[str, Any]]) -> None:
            stale = [[shard, a["stale"]] for shard, a in sorted(answers.items()) if "stale" in a]
            failed = [[shard, a["code"], a["reason"]] for shard, a in sorted(answers.items()) if "code" in a]
            parts = codec.encode(codec.RETAINM_ACK, {"id": h["id"], "stale": stale, "failed": failed})
            core.durable.after(lambda: core.effects.send_peer(sender, parts))  # what it confirms is stored first

        if h["replica"]:
            self._replica_parts(sender, taken, reply)
        else:
            self._accept_parts(taken, reply)

    def on_retainm_ack(self, sender: str, frame: Frame) -> None:
        h = frame.header
        record = self.core.requests.get(h["id"])
        failed = {f[0]: (f[1], f[2]) for f in h["failed"]}
        if isinstance(record, PartsReplication):
            self._settle_parts(h["id"], sender, failed)
        elif isinstance(record, RetainParts) and record.primary == sender:
            self.core.requests.close(h["id"])
            answers: dict[int, dict[str, Any]] = {s: {"stale": e} for s, e in h["stale"]}
            answers |= {s: {"code": c, "reason": r} for s, (c, r) in failed.items()}
            self._parts_answered(record, answers)

    def _accept_parts(
        self, taken: list[tuple[dict[str, Any], list[tuple[str, int, bytes]]]],
        reply: Callable[[dict[int, dict[str, Any]]], None],
    ) -> None:  # fmt: skip
        """As the primary of each part's shard: each part taken whole or not at all (``_admit``), stamped and
        applied as a RETAINS; the taken parts go on in one RETAINM per replica node (each with the shards it
        holds). ``reply(answers)`` once all answered: shard -> its answer ({} stored, or as ``_admit``)."""
        core = self.core
        a = core.view.assignment
        answers: dict[int, dict[str, Any]] = {}
        admitted: list[Part] = []  # shard, shard epoch, seq, items
        growth = 0
        for ph, items in taken:
            refusal, items, more = self._admit(ph, items, held_more=growth)
            if refusal is not None:
                answers[ph["shard"]] = refusal
                continue
            growth += more
            first = self.seq + 1
            self.seq += len(items)
            admitted.append((ph["shard"], ph["shard_epoch"], (ph["shard_epoch"], first), items))
        by_node: dict[str, list[Part]] = {}
        members = core.view.members
        for part in admitted:
            assert a is not None
            shard = part[0]
            targets = (set(a.owners(shard)) | (core.owner.source.relay_targets(shard) or set())) - {core.me}
            for t in sorted(targets):
                if t in members:
                    by_node.setdefault(t, []).append(part)
        applied = False
        early: list[dict[int, tuple[str, str]]] = []

        def replicated(failed: dict[int, tuple[str, str]]) -> None:
            if not applied:
                early.append(failed)
                return
            for shard, _, _, _ in admitted:
                if shard in failed:
                    reason = f"replicas of shard {shard} did not confirm: {failed[shard][1]}"
                    answers[shard] = {"code": codec.E_UNAVAILABLE, "reason": reason}
                else:
                    answers[shard] = {}
            reply(answers)

        # As ``_accept``: the replicas apply while this node does.
        self._replicate_parts(by_node, replicated)
        for shard, _, (stamp_epoch, first), items in admitted:
            for i, (topic, qos, payload) in enumerate(items):
                self.apply(shard, topic, qos, payload, (stamp_epoch, first + i))
        applied = True
        if early:
            replicated(early[0])

    def _replicate_parts(
        self, by_node: dict[str, list[Part]],
        then: Callable[[dict[int, tuple[str, str]]], None],
    ) -> None:  # fmt: skip
        """One RETAINM to each node of ``by_node`` with its parts (shard, stamp epoch, first seq, items) stamped;
        ``then(failed shards)`` once each answered, left the view, or the time ran out."""
        core = self.core
        if not by_node:
            then({})
            return
        record = PartsReplication(set(by_node), {n: [p[0] for p in ps] for n, ps in by_node.items()}, then)
        rid = core.requests.open(record, self)
        core.metrics["retained.replicated"] += len(by_node)
        for node in sorted(by_node):
            items = [it for p in by_node[node] for it in p[3]]
            parts = [[shard, shard_epoch, len(its), *stamp] for shard, shard_epoch, stamp, its in by_node[node]]
            header = {"id": rid, "replica": True, "parts": parts,
                      "items": [[t, q] for t, q, _ in items], "sizes": [len(p) for _, _, p in items]}  # fmt: skip
            if not core.effects.send_peer(node, codec.encode(codec.RETAINM, header, b"".join(p for _, _, p in items))):
                self._settle_parts(rid, node, {})  # not a member any more: it holds nothing of ours
        if rid in core.requests:
            core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_parts(rid))

    def _settle_parts(self, rid: int, node: str, failed: dict[int, tuple[str, str]]) -> None:
        record = self.core.requests.get(rid)
        if isinstance(record, PartsReplication) and node in record.pending:
            record.pending.discard(node)
            record.failed |= {s: failed[s] for s in record.shards[node] if s in failed}
            if not record.pending:
                self.core.requests.close(rid)
                record.then(record.failed)

    def _expire_parts(self, rid: int) -> None:
        record = self.core.requests.close(rid)
        if isinstance(record, PartsReplication):
            self.core.metrics["retained.replica_timeouts"] += 1
            self.core.log.warning("retained_replica_timeout", replicas=sorted(record.pending))
            for node in record.pending:
                for shard in record.shards[node]:
                    record.failed.setdefault(shard, (codec.E_TIMEOUT, f"{node} did not answer in time"))
            record.then(record.failed)

    def _replica_parts(
        self, sender: str, taken: list[tuple[dict[str, Any], list[tuple[str, int, bytes]]]],
        reply: Callable[[dict[int, dict[str, Any]]], None],
    ) -> None:  # fmt: skip
        """A replica's RETAINM: each part applied as a replica RETAINS would be (``_replica``), or refused alone;
        the applied ones relayed to this node's hand-off targets, one RETAINM per target; answered per shard."""
        core = self.core
        a = core.view.assignment
        answers: dict[int, dict[str, Any]] = {}
        relay: dict[str, list[Part]] = {}
        poll = False
        for ph, items in taken:
            shard, shard_epoch, stamp = ph["shard"], ph["shard_epoch"], ph["stamp"]
            bad = self._check(ph, items)
            ours = a.epoch(shard) if a is not None and bad is None else 0
            if bad is None and not (
                (a is not None and shard_epoch == ours and a.owners(shard)[:1] == (sender,))
                or shard_epoch > ours or core.owner.target.may_forward(shard, sender)
            ):  # fmt: skip
                bad = (codec.E_NOT_ALLOWED, f"{sender} is not the primary of shard {shard}")
            if bad is not None:
                core.metrics[f"errors.{bad[0]}"] += 1
                answers[shard] = {"code": bad[0], "reason": bad[1]}
                continue
            poll |= shard_epoch > ours
            for i, (topic, qos, payload) in enumerate(items):
                self.apply(shard, topic, qos, payload, (stamp[0], stamp[1] + i))
            owners = set(a.owners(shard)) if a is not None else set()
            for t in sorted(core.owner.source.relay_targets(shard) or ()):
                if t not in owners and t != sender and t in core.view.members:
                    relay.setdefault(t, []).append((shard, shard_epoch, (stamp[0], stamp[1]), items))
                    core.metrics["handoff.retained_forwarded"] += len(items)
        if poll:
            core.effects.poll_view()

        def done(failed: dict[int, tuple[str, str]]) -> None:
            for shard, (_, reason) in failed.items():
                answers[shard] = {"code": codec.E_UNAVAILABLE,
                                  "reason": f"hand-off targets of shard {shard} did not confirm: {reason}"}  # fmt: skip
            reply(answers)

        self._replicate_parts(relay, done)

    def _parts_answered(self, record: RetainParts, answers: dict[int, dict[str, Any]]) -> None:
        """The primary's answer to a RETAINM, per shard (as ``_batch_answered`` for each shard's writes): stored,
        refused, or stale (those shards' writes are grouped again once the assignment is read again; the others
        are done)."""
        core = self.core
        again: list[RetainWrite] = []
        for shard in sorted(record.shards):
            writes = record.shards[shard]
            answer = answers.get(shard, {})
            if "code" in answer:
                for w in writes:
                    w.then(answer["code"], answer["reason"])
                continue
            stale = answer.get("stale")
            if stale is None:
                core.metrics["retained.writes_acked"] += len(writes)
                for w in writes:
                    w.then(None, "")
                continue
            if max(w.attempt for w in writes) >= STALE_RETRIES:
                for w in writes:
                    w.then(codec.E_UNAVAILABLE, f"shard {shard}'s primary kept answering stale (shard epoch {stale})")
                continue
            for w in writes:
                w.attempt += 1
            again.extend(writes)
        if not again:
            return
        core.metrics["retained.stale_retries"] += 1

        def resend(_ok: bool) -> None:
            self.batched.extend(again)
            self.send_batched()

        core.refresh_assignment(resend, force=True)

    def read_record(self, topic: str, then: Callable[[bytes | None], None]) -> None:
        """A node's own read of one record: the exact fetch of a subscriber (the primary, then the other owners,
        each given ``lookup_timeout``)."""
        core = self.core
        if core.view.assignment is None:
            then(None)
            return
        # A dead primary costs one lookup_timeout, as a publish's LOOKUP: the takeover waiting on this read must
        # still reach the next owner within its own request_timeout.
        fetch = RetainedFetch(None, {topic: 1}, {}, {}, {}, then=then, timeout=core.cfg.lookup_timeout)
        fetch.tried[topic] = []
        self._ask_exact(fetch, topic)
        self._send_gets(fetch, core.requests.open(fetch, self), dict(fetch.asked))

    # ------------------------------------------------------------------ the primary and its replicas
    def on_retain(self, sender: str, frame: Frame) -> None:
        h = frame.header
        items = [(h["topic"], h["qos"], frame.payload)]
        if h["replica"]:
            self._replica(sender, frame, items)
            return
        self._accept(sender, h, items, self._reply_to(sender, h))

    def on_retains(self, sender: str, frame: Frame) -> None:
        """A batch of one shard's writes (RETAINS): as that many RETAIN frames, in order, answered once for all
        (the primary stamps, applies and replicates them together; a replica applies and relays them together)."""
        core = self.core
        h = frame.header
        try:
            pairs = codec.split_batch(frame)
        except ProtocolError as exc:
            core.metrics[f"errors.{exc.code}"] += 1
            core.refuse_peer(sender, frame, exc.code, exc.reason, shard=h["shard"])
            return
        items = [(topic, qos, payload) for (topic, qos), payload in pairs]
        if h["replica"]:
            self._replica(sender, frame, items)
            return
        self._accept(sender, h, items, self._reply_to(sender, h))

    def _reply_to(self, sender: str, h: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        """How the primary answers a peer's RETAIN or RETAINS (see ``_answered`` for the answers)."""
        core = self.core

        def reply(answer: dict[str, Any]) -> None:
            if "code" in answer:
                core.refuse_request(sender, h["id"], answer["code"], answer["reason"], shard=h["shard"])
            elif "conflict" in answer:  # nothing was written: nothing to wait for
                parts = codec.encode(codec.RETAIN_ACK, {"id": h["id"], "conflict": True}, answer["conflict"])
                core.effects.send_peer(sender, parts)
            else:  # the changes this confirms are stored first (``durable``)
                parts = codec.encode(codec.RETAIN_ACK, {"id": h["id"], **answer})
                core.durable.after(lambda: core.effects.send_peer(sender, parts))

        return reply

    def _check(self, h: dict[str, Any], items: list[tuple[str, int, bytes]]) -> tuple[str, str] | None:
        """(code, reason) when a RETAIN's or RETAINS' fields are wrong (for any receiver), else None."""
        core = self.core
        shard = h["shard"]
        if shard == ROOT or not core.view.shards_ok([shard]):
            return codec.E_BAD_HEADER, f"shard {shard} is outside this cluster"
        if "if_will" in h and not isinstance(h["if_will"], str):
            return codec.E_BAD_HEADER, "RETAIN if_will must be a will id (string)"
        if not items:
            return codec.E_BAD_HEADER, "RETAINS needs at least one item"
        in_shard: set[str] = set()  # placement keys found in the shard (a session's records share one)
        for topic, qos, _ in items:
            if qos not in (0, 1):
                return codec.E_INVALID_QOS, f"qos must be 0 or 1, got {qos}"
            try:
                validate_topic_name(topic)
            except TopicError as exc:
                return exc.code, exc.reason
            key = placement_key(topic)
            if key not in in_shard:
                if shard_for_key(key, core.view.shard_count) != shard:
                    return codec.E_BAD_HEADER, f"topic {topic!r} is not in shard {shard}"
                in_shard.add(key)
        return None

    def _accept(
        self, sender: str, h: dict[str, Any], items: list[tuple[str, int, bytes]],
        reply: Callable[[dict[str, Any]], None],
    ) -> None:  # fmt: skip
        """As the shard's primary: take the changes (one RETAIN's, or a RETAINS' in order), stamp, apply and
        replicate them (one replica frame per replica), then ``reply`` once for all."""
        core = self.core
        refusal, items, _ = self._admit(h, items)
        if refusal is not None:
            reply(refusal)
            return
        shard = h["shard"]
        a = core.view.assignment
        assert a is not None
        ours = a.epoch(shard)
        first = self.seq + 1
        self.seq += len(items)
        members = core.view.members
        targets = (set(a.owners(shard)) | (self.core.owner.source.relay_targets(shard) or set())) - {core.me}
        header: dict[str, Any] = {"id": 0, "shard": shard, "shard_epoch": ours, "replica": True,
                                  "stamp": [ours, first]}  # fmt: skip
        if len(items) == 1 and "items" not in h:  # a RETAIN's change goes on as a RETAIN
            frame_type, (topic, qos, payload) = codec.RETAIN, items[0]
            header |= {"topic": topic, "qos": qos}
        else:
            frame_type, payload = codec.RETAINS, b"".join(p for _, _, p in items)
            header |= {"items": [[t, q] for t, q, _ in items], "sizes": [len(p) for _, _, p in items]}

        applied = False
        early: list[bool] = []  # the replicas' outcome, when it came before the changes were applied here

        def replicated(failed: bool) -> None:
            if not applied:  # no replica to wait for (or none reachable): answered once applied here, below
                early.append(failed)
            elif failed:
                reply({"code": codec.E_UNAVAILABLE, "reason": f"replicas of shard {shard} did not confirm in time"})
            else:
                reply({})

        # The replicas get the changes first and apply them while this node does: a batch costs the slower of
        # the two, not their sum. Nothing is answered before both hold them.
        self._replicate(sorted(t for t in targets if t in members), frame_type, header, payload, replicated)
        for i, (topic, qos, payload) in enumerate(items):
            self.apply(shard, topic, qos, payload, (ours, first + i))
        applied = True
        if early:
            replicated(early[0])

    def _admit(
        self, h: dict[str, Any], items: list[tuple[str, int, bytes]], held_more: int = 0,
    ) -> tuple[dict[str, Any] | None, list[tuple[str, int, bytes]], int]:  # fmt: skip
        """As the primary of ``h``'s shard: (None, the items to apply, bytes they add) when one shard's changes may
        be applied, else (the answer, [], 0): ``code``, ``stale`` or ``conflict`` (see ``_answered``). ``held_more``:
        bytes other changes taken with these (a RETAINM's other shards) will add."""
        core = self.core
        bad = self._check(h, items)
        if bad is not None:
            core.metrics[f"errors.{bad[0]}"] += 1
            return {"code": bad[0], "reason": bad[1]}, [], 0
        if core.fenced():
            return {"code": codec.E_FENCED, "reason": f"{core.me} cannot renew its etcd lease"}, [], 0
        shard, shard_epoch = h["shard"], h["shard_epoch"]
        a = core.view.assignment
        ours = a.epoch(shard) if a is not None else 0
        if a is None or shard_epoch != ours or a.owners(shard)[:1] != (core.me,):
            if shard_epoch > ours:
                core.effects.poll_view()
            core.metrics["retained.stale"] += 1
            return {"stale": ours}, [], 0
        if_will = h.get("if_will")
        if if_will is not None:  # a session record's conditional write (RETAIN only): decided here, by the one writer
            topic = items[0][0]
            held = self.table.get(shard, topic)
            stored = held.payload if held is not None else b""
            if will_id(stored) != if_will:
                core.metrics["wills.write_conflicts"] += 1
                return {"conflict": stored}, [], 0
            if h.get("clear_will") is True:
                items = [(topic, items[0][1], without_will(stored))]
        growth = self._growth(shard, items)
        if growth > 0 and self.table.bytes + held_more + growth > core.cfg.max_retained_bytes:
            core.metrics[f"errors.{codec.E_OVERLOADED}"] += 1
            core.log.warning("retained_full", shard=shard, shard_epoch=ours, bytes=self.table.bytes,
                             limit=core.cfg.max_retained_bytes)  # fmt: skip
            reason = f"{core.me} holds {self.table.bytes} bytes of retained messages, the limit is " \
                     f"{core.cfg.max_retained_bytes}: the retained message was not stored"  # fmt: skip
            return {"code": codec.E_OVERLOADED, "reason": reason}, [], 0
        return None, items, growth

    def _growth(self, shard: int, items: list[tuple[str, int, bytes]]) -> int:
        """Bytes held more once ``items`` are applied: a deletion in the same batch frees its record's bytes (a
        batch of a session's new records and acknowledged ones is not refused for what it adds alone)."""
        table = self.table
        total = 0
        for topic, _, payload in items:
            if payload:
                total += table.growth(shard, topic, payload)
            elif (old := table.get(shard, topic)) is not None:
                total -= table.cost(topic, old.payload)
        return total

    def _replicate(self, targets: list[str], frame_type: bytes, header: dict[str, Any], payload: bytes,
                   then: Callable[[bool], None]) -> None:  # fmt: skip
        core = self.core
        if not targets:
            then(False)
            return
        record = Replication(set(targets), then)
        rid = header["id"] = core.requests.open(record, self)
        core.metrics["retained.replicated"] += len(targets)
        parts = codec.encode(frame_type, header, payload)
        for target in targets:
            if not core.effects.send_peer(target, parts):
                self._settle(rid, target)  # not a member any more: it holds nothing of ours
        if rid in core.requests:
            core.effects.call_later(core.cfg.request_timeout, lambda: self._expire_replication(rid))

    def _settle(self, rid: int, node: str, failed: bool = False) -> None:
        record = self.core.requests.get(rid)
        if isinstance(record, Replication) and node in record.pending:
            record.pending.discard(node)
            record.failed |= failed
            if not record.pending:
                self.core.requests.close(rid)
                record.then(record.failed)

    def _expire_replication(self, rid: int) -> None:
        record = self.core.requests.close(rid)
        if isinstance(record, Replication):
            self.core.metrics["retained.replica_timeouts"] += 1
            self.core.log.warning("retained_replica_timeout", replicas=sorted(record.pending))
            record.then(True)

    def _replica(self, sender: str, frame: Frame, items: list[tuple[str, int, bytes]]) -> None:
        """A replica change (RETAIN, or RETAINS: item i stamped ``stamp`` seq + i) from the shard's primary or the
        source of its hand-off: applied, relayed to this node's own hand-off targets, answered once for all."""
        core = self.core
        h = frame.header
        bad = self._check(h, items)
        stamp = h.get("stamp")
        if bad is None and not (isinstance(stamp, list) and len(stamp) == 2 and all(type(x) is int for x in stamp)):
            bad = (codec.E_BAD_HEADER, f"a replica {frame.type.decode()} needs stamp [shard_epoch:int, seq:int]")
        if bad is not None:
            core.metrics[f"errors.{bad[0]}"] += 1
            core.refuse_peer(sender, frame, *bad)
            return
        shard, shard_epoch = h["shard"], h["shard_epoch"]
        a = core.view.assignment
        ours = a.epoch(shard) if a is not None else 0
        primary = a is not None and shard_epoch == ours and a.owners(shard)[:1] == (sender,)
        if not (primary or shard_epoch > ours or core.owner.target.may_forward(shard, sender)):
            core.refuse_peer(sender, frame, codec.E_NOT_ALLOWED, f"{sender} is not the primary of shard {shard}")
            return
        if shard_epoch > ours:
            core.effects.poll_view()
        for i, (topic, qos, payload) in enumerate(items):
            self.apply(shard, topic, qos, payload, (stamp[0], stamp[1] + i))
        # A hand-off source relays what it is sent to its own targets (those that do not own the shard: the
        # primary sent those the change itself), and answers once they hold it.
        owners = set(a.owners(shard)) if a is not None else set()
        relay = sorted(t for t in (core.owner.source.relay_targets(shard) or ())
                       if t not in owners and t != sender and t in core.view.members)  # fmt: skip

        def done(failed: bool) -> None:
            if failed:
                reason = f"hand-off targets of shard {shard} did not confirm"
                core.refuse_request(sender, h["id"], codec.E_UNAVAILABLE, reason, shard=shard)
            else:  # the changes this confirms are stored first (``durable``)
                parts = codec.encode(codec.RETAIN_ACK, {"id": h["id"]})
                core.durable.after(lambda: core.effects.send_peer(sender, parts))

        if relay:
            core.metrics["handoff.retained_forwarded"] += len(relay) * len(items)
        self._replicate(relay, frame.type, {**h, "id": 0}, frame.payload, done)

    def apply(self, shard: int, topic: str, qos: int, payload: bytes, stamp: Stamp) -> None:
        if payload:
            if self.table.set(shard, topic, RetainedMessage(payload, qos, stamp)):
                self.core.metrics["retained.stored"] += 1
        elif self.table.delete(shard, topic, stamp):
            self.core.metrics["retained.deleted"] += 1

    # ------------------------------------------------------------------ a member answers RETAINED_GET
    def on_get(self, sender: str, frame: Frame) -> None:
        core = self.core
        filters = frame.header["filters"]
        for filt in filters:
            try:
                validate_topic_filter(filt)
            except TopicError as exc:
                core.metrics[f"errors.{exc.code}"] += 1
                core.refuse_peer(sender, frame, exc.code, exc.reason)
                return
        for parts in self._reply_frames(frame.header["id"], self.matching(filters)):
            core.effects.send_peer(sender, parts)

    def matching(self, filters: list[str]) -> list[tuple[str, int, RetainedMessage]]:
        """(topic, shard, message) of every retained message held here that one of ``filters`` matches, by topic."""
        table = self.table
        found: dict[str, tuple[int, RetainedMessage]] = {}
        count = self.core.view.shard_count
        for filt in filters:
            if is_wild(filt):
                for topic, message in table.match(filt):
                    found[topic] = (shard_for_key(placement_key(topic), count), message)
            else:
                shard = shard_for_key(placement_key(filt), count)
                message = table.get(shard, filt)
                if message is not None:
                    found[filt] = (shard, message)
        return [(topic, shard, message) for topic, (shard, message) in sorted(found.items())]

    def _reply_frames(self, rid: int, found: list[tuple[str, int, RetainedMessage]]) -> list[list[bytes]]:
        limit = self.core.cfg.max_payload
        frames: list[list[bytes]] = []
        items: list[list[Any]] = []
        blobs: list[bytes] = []
        size = 0
        for topic, shard, m in found:
            if items and (len(items) >= REPLY_CHUNK or size + len(m.payload) > limit):
                frames.append(self._reply(rid, items, blobs, more=True))
                items, blobs, size = [], [], 0
            items.append([topic, m.qos, shard, m.stamp[0], m.stamp[1]])
            blobs.append(m.payload)
            size += len(m.payload)
        frames.append(self._reply(rid, items, blobs, more=False))
        return frames

    @staticmethod
    def _reply(rid: int, items: list[list[Any]], blobs: list[bytes], more: bool) -> list[bytes]:
        header = {"id": rid, "items": items, "sizes": [len(b) for b in blobs], "more": more}
        return codec.encode(codec.RETAINED_REPLY, header, b"".join(blobs))

    # ------------------------------------------------------------------ the subscriber's node
    def fetch(self, session: Session, filters: list[str], qos: int) -> None:
        """Ask for the retained messages of a SUB's granted ``filters`` (see the rules) and deliver them."""
        core = self.core
        a = core.view.assignment
        if not filters or a is None:
            return
        members = core.view.members
        fetch = RetainedFetch(session, {f: qos for f in filters}, {}, {}, {})
        wild = [f for f in filters if is_wild(f)]
        if wild:
            for node in sorted(set(members) | {core.me}):
                fetch.asked[node] = list(wild)
        for filt in filters:
            if not is_wild(filt):
                fetch.tried[filt] = []
                self._ask_exact(fetch, filt)
        self._send_gets(fetch, core.requests.open(fetch, self), dict(fetch.asked))

    def _ask_exact(self, fetch: RetainedFetch, filt: str) -> str | None:
        """Add ``filt`` to what the next owner of its shard not tried yet is asked; that owner, or None."""
        core = self.core
        a = core.view.assignment
        assert a is not None
        shard = shard_for_key(placement_key(filt), a.shard_count)
        tried = fetch.tried[filt]
        for owner in a.owners(shard):
            if owner not in tried and (owner == core.me or owner in core.view.members):
                tried.append(owner)
                asked = fetch.asked.setdefault(owner, [])
                if filt not in asked:
                    asked.append(filt)
                return owner
        return None

    def _send_gets(self, fetch: RetainedFetch, fid: int, asks: dict[str, list[str]]) -> None:
        core = self.core
        for node in sorted(asks):
            if node == core.me:
                found = self.matching(asks[node])
                self._merge(fetch, node, [[t, m.qos, s, *m.stamp] for t, s, m in found], [m.payload for *_, m in found])
                continue
            core.metrics["retained.gets_out"] += 1
            fetch.pending[node] = fetch.pending.get(node, 0) + 1
            if not core.effects.send_peer(node, codec.encode(codec.RETAINED_GET, {"id": fid, "filters": asks[node]})):
                self._node_failed(fid, node)
        if fid not in core.requests:
            return
        if not fetch.pending:
            self._finish(fid)
            return
        timeout = fetch.timeout if fetch.timeout is not None else core.cfg.retained_fetch_timeout
        timeout = core.cfg.request_timeout if timeout is None else timeout
        waiting = frozenset(asks) - {core.me}
        core.effects.call_later(timeout, lambda: self._expire_fetch(fid, waiting))

    def on_reply(self, sender: str, frame: Frame) -> None:
        core = self.core
        h = frame.header
        fetch = core.requests.get(h["id"])
        if not isinstance(fetch, RetainedFetch) or sender not in fetch.pending:
            return
        try:
            pairs = codec.split_batch(frame)
        except ProtocolError as exc:
            core.refuse_peer(sender, frame, exc.code, exc.reason)
            self._node_failed(h["id"], sender)
            return
        self._merge(fetch, sender, [item for item, _ in pairs], [payload for _, payload in pairs])
        if h["more"]:
            fetch.partial[sender] = True
            return
        fetch.pending[sender] -= 1
        if not fetch.pending[sender]:
            del fetch.pending[sender]
        if not fetch.pending:
            self._finish(h["id"])

    def _merge(self, fetch: RetainedFetch, sender: str, items: list[list[Any]], payloads: list[bytes]) -> None:
        a = self.core.view.assignment
        if a is None:
            return
        count = a.shard_count
        got = fetch.got
        for (topic, qos, shard, epoch, seq), payload in zip(items, payloads, strict=True):
            if not (0 <= shard < count):
                continue
            owners = a.owners(shard)
            if sender not in owners:
                continue  # not an owner in our view: its copy may be one deleted since (see the rules)
            rank = RANK_PRIMARY if owners[0] == sender else RANK_OWNER
            held = got.get(topic)
            if held is None or (rank, epoch, seq) > (held[0], held[3], held[4]):
                got[topic] = (rank, qos, payload, epoch, seq)

    def _node_failed(self, fid: int, node: str) -> None:
        """``node`` will not answer (gone, unreachable, timed out): ask the next owner for its exact filters."""
        core = self.core
        fetch = core.requests.get(fid)
        if not isinstance(fetch, RetainedFetch) or node not in fetch.pending:
            return
        del fetch.pending[node]
        core.metrics["retained.fetch_timeouts"] += 1
        retry: dict[str, list[str]] = {}
        for filt in fetch.asked.get(node, []):
            owner = None if is_wild(filt) else self._ask_exact(fetch, filt)
            if owner is not None:
                retry.setdefault(owner, []).append(filt)
        if retry:
            self._send_gets(fetch, fid, retry)
        elif not fetch.pending and fid in core.requests:
            self._finish(fid)

    def _expire_fetch(self, fid: int, nodes: frozenset[str]) -> None:
        fetch = self.core.requests.get(fid)
        if isinstance(fetch, RetainedFetch):
            for node in sorted(nodes & fetch.pending.keys()):
                self.core.log.warning("retained_fetch_timeout", peer=node)
                self._node_failed(fid, node)

    def _finish(self, fid: int) -> None:
        core = self.core
        fetch = core.requests.close(fid)
        if not isinstance(fetch, RetainedFetch):
            return
        session = fetch.session
        if session is None:
            if fetch.then is not None:
                held = fetch.got.get(next(iter(fetch.filters)))
                fetch.then(None if held is None else held[2])
            return
        if core.destination.sessions.get(session.rid) is not session:
            return  # the client left meanwhile
        refused = 0
        for topic in sorted(fetch.got):
            _, qos, payload, _, _ = fetch.got[topic]
            granted = max((q for f, q in fetch.filters.items() if filter_matches(f, topic)), default=None)
            if granted is None:
                continue
            if core.destination.deliver_retained(session, topic, min(qos, granted), payload):
                core.metrics["retained.delivered"] += 1
            else:
                refused += 1
        if refused:
            core.metrics["retained.refused_overloaded"] += refused
            core.metrics[f"errors.{codec.E_OVERLOADED}"] += 1
            reason = f"{refused} retained messages for this subscription were not delivered: the backlog is full"
            core.send_client(session.rid, codec.error_parts(codec.E_OVERLOADED, reason))

    # ------------------------------------------------------------------ requests failing
    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None:
        if isinstance(request, RetainWrite):
            self.core.requests.close(rid)
            request.then(code, f"node {sender} refused: {reason}")
        elif isinstance(request, RetainBatch):
            self.core.requests.close(rid)
            self._batch_answered(request, {"code": code, "reason": f"node {sender} refused: {reason}"})
        elif isinstance(request, RetainParts):
            self.core.requests.close(rid)
            refusal = {"code": code, "reason": f"node {sender} refused: {reason}"}
            self._parts_answered(request, dict.fromkeys(request.shards, refusal))
        elif isinstance(request, Replication):
            self._settle(rid, sender, failed=True)
        elif isinstance(request, PartsReplication):
            refused = (code, f"node {sender} refused: {reason}")
            self._settle_parts(rid, sender, dict.fromkeys(request.shards.get(sender, ()), refused))
        elif isinstance(request, RetainedFetch):
            self._node_failed(rid, sender)

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None:
        if isinstance(request, RetainWrite):
            # The primary left: a promoted replica holds what it confirmed; ask it once the view shows it.
            self.core.requests.close(rid)
            self._answered(request, {"stale": self.core.view.shard_epoch(request.shard)})
        elif isinstance(request, RetainBatch):
            self.core.requests.close(rid)
            self._batch_answered(request, {"stale": self.core.view.shard_epoch(request.shard)})
        elif isinstance(request, RetainParts):
            self.core.requests.close(rid)
            view = self.core.view
            self._parts_answered(request, {s: {"stale": view.shard_epoch(s)} for s in request.shards})
        elif isinstance(request, Replication):
            self._settle(rid, node)  # a replica that left holds nothing any more: it counts as done
        elif isinstance(request, PartsReplication):
            self._settle_parts(rid, node, {})  # likewise
        elif isinstance(request, RetainedFetch):
            self._node_failed(rid, node)
