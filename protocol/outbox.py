"""Messages that leave the node in batches: forwards to peers, their acks, and deliveries to clients.

Rules of this file:
- The event loop handles a batch of incoming frames, queueing forwards (FWD), acks (FWD_ACK) and deliveries
  (MSG) here, then flushes once: every destination gets one frame per kind instead of one per message. Nothing
  waits for a timer, so at low load a batch is a single message and adds no latency; under load, messages that
  queued up in the same drain share a frame. A drain ends early once ``queued`` reaches the node's
  ``FLUSH_AT``, so a burst of batched publishes is not held back until hundreds of frames were read.
- Order is kept per destination: items leave in the order they were queued.
- A frame never carries more payload than ``max_payload`` (what the receiver accepts); a single larger message
  still goes alone, as a plain FWD/MSG.
- One item goes as the plain frame (FWD, MSG), so a lone message looks exactly as before batching existed.
- A QoS 0 run (an item with ``sizes``: many messages to one topic, from a PUBS or FWDS run) stays one item and
  goes out as one run of a batch frame (``codec.encode_runs``): nobody on the way handles its messages one by
  one. ``queued`` counts messages, not items.
- Pure: it builds frames; the core's ``flush`` hands them to the shell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from shardmq.router import codec


@dataclass(slots=True)
class Forward:
    fid: int
    topic: str
    qos: int
    payload: bytes
    sizes: list[int] | None = None  # a QoS 0 run: ``payload`` is these messages back to back (codec.Run)
    # QoS 0: the publisher's routing id, whose report counts these messages if the frame is not sent; None: nobody
    # to tell (a will, an internal publish) or already counted (the item also went to a node that is gone)
    client: bytes | None = None
    pid: int = 0  # a QoS 1 publish's id at its entry node (the same for every destination); 0: none
    # [client id, origin] of the persistent sessions it reaches through routes moved from a dead holder (``sessions``)
    sessions: list[list[str]] | None = None

    @property
    def count(self) -> int:
        return 1 if self.sizes is None else len(self.sizes)


def _fwds_item(f: Forward) -> list:
    """A FWDS item: [id, topic, qos(, pid(, sessions))], as short as it can be."""
    if f.sessions:
        return [f.fid, f.topic, f.qos, f.pid, f.sessions]
    return [f.fid, f.topic, f.qos, f.pid] if f.pid else [f.fid, f.topic, f.qos]


@dataclass(slots=True)
class Delivery:
    topic: str
    qos: int
    mid: int | None
    dup: bool
    payload: bytes
    sizes: list[int] | None = None  # as for Forward
    retain: bool = False  # a retained message for a new subscription (MSG ``retain``); live messages never are

    @property
    def count(self) -> int:
        return 1 if self.sizes is None else len(self.sizes)


@dataclass(slots=True)
class Outbox:
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    forwards: dict[str, list[Forward]] = field(default_factory=dict)
    acks: dict[str, list[int]] = field(default_factory=dict)
    deliveries: dict[bytes, list[Delivery]] = field(default_factory=dict)
    pubacks: dict[bytes, list[int | None]] = field(default_factory=dict)
    queued: int = 0  # forwards and deliveries since the last flush: the loop flushes early past FLUSH_AT

    def __bool__(self) -> bool:
        return bool(self.forwards or self.acks or self.deliveries or self.pubacks)

    def puback(self, rid: bytes, ref: int | None) -> None:
        self.pubacks.setdefault(rid, []).append(ref)

    def forward_queue(self, dest: str) -> list[Forward]:
        """The list ``forward`` appends to, for a caller queueing many items to one peer within one frame;
        it adds what it appended to ``queued`` itself."""
        return self.forwards.setdefault(dest, [])

    def delivery_queue(self, rid: bytes) -> list[Delivery]:
        """The list ``deliver`` appends to (see ``forward_queue``)."""
        return self.deliveries.setdefault(rid, [])

    def forward(self, dest: str, item: Forward) -> None:
        self.forwards.setdefault(dest, []).append(item)
        self.queued += 1

    def ack(self, dest: str, fid: int) -> None:
        self.acks.setdefault(dest, []).append(fid)

    def deliver(self, rid: bytes, item: Delivery) -> None:
        self.deliveries.setdefault(rid, []).append(item)
        self.queued += 1

    def _chunks(self, items: list[Forward] | list[Delivery]) -> Iterator[list]:
        chunk: list = []
        size = 0
        for item in items:
            if chunk and size + len(item.payload) > self.max_payload:
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += len(item.payload)
        if chunk:
            yield chunk

    def peer_frames(self) -> Iterator[tuple[str, list[bytes], list[Forward]]]:
        """(peer, frame parts, the forwards it carries) for every queued forward and ack; empties the box."""
        forwards, acks = self.forwards, self.acks
        self.forwards, self.acks, self.queued = {}, {}, 0
        for dest, ids in acks.items():
            yield dest, codec.encode(codec.FWD_ACK, {"ids": ids}), []
        for dest, items in forwards.items():
            for chunk in self._chunks(items):
                if len(chunk) == 1 and chunk[0].sizes is None:
                    f = chunk[0]
                    header = {"id": f.fid, "topic": f.topic, "qos": f.qos}
                    if f.pid:
                        header["pid"] = f.pid
                    if f.sessions:
                        header["sessions"] = f.sessions
                    yield dest, codec.encode(codec.FWD, header, f.payload), chunk
                else:
                    runs = [(_fwds_item(f), f.sizes, f.payload) for f in chunk]
                    yield dest, codec.encode_runs(codec.FWDS, {}, runs), chunk

    def client_frames(self) -> Iterator[tuple[bytes, list[bytes], list[Delivery]]]:
        """(client routing id, frame parts, the deliveries it carries); empties the box."""
        deliveries, self.deliveries, self.queued = self.deliveries, {}, 0
        pubacks, self.pubacks = self.pubacks, {}
        for rid, refs in pubacks.items():  # one PUBACK per client per flush, naming them all
            yield rid, codec.encode(codec.PUBACK, {"ids": refs}), []
        for rid, items in deliveries.items():
            for chunk in self._chunks(items):
                if len(chunk) == 1 and chunk[0].sizes is None:
                    d = chunk[0]
                    header: dict = {"topic": d.topic, "qos": d.qos}
                    if d.mid is not None:
                        header["mid"] = d.mid
                    if d.dup:
                        header["dup"] = True
                    if d.retain:
                        header["retain"] = True
                    yield rid, codec.encode(codec.MSG, header, d.payload), chunk
                else:
                    runs = [([d.topic, d.qos, d.mid, d.dup, True] if d.retain else [d.topic, d.qos, d.mid, d.dup],
                             d.sizes, d.payload) for d in chunk]  # fmt: skip
                    yield rid, codec.encode_runs(codec.MSGS, {}, runs), chunk
