"""Outbox: batching of forwards, acks and deliveries (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardmq.protocol.outbox import Delivery, Forward, Outbox
from shardmq.router import codec


def test_one_item_goes_as_the_plain_frame() -> None:
    box = Outbox()
    box.forward("n2", Forward(7, "a/b", 1, b"x"))
    box.deliver(b"c1", Delivery("a/b", 1, 3, False, b"y"))
    [(dest, parts, carried)] = list(box.peer_frames())
    frame = codec.decode(parts)
    assert dest == "n2" and frame.type == codec.FWD and frame.header["id"] == 7 and frame.payload == b"x"
    assert [f.fid for f in carried] == [7]
    [(rid, parts, _)] = list(box.client_frames())
    frame = codec.decode(parts)
    assert rid == b"c1" and frame.type == codec.MSG and frame.header["mid"] == 3
    assert not box


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30), cap=st.integers(1, 100))
def test_batches_keep_order_and_respect_the_payload_cap(sizes: list[int], cap: int) -> None:
    box = Outbox(max_payload=cap)
    sent = [Forward(i, f"t/{i}", i % 2, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
    for f in sent:
        box.forward("n3", f)
    box.ack("n3", 99)
    received: list[tuple[int, str, int, bytes]] = []
    acked: list[int] = []
    for dest, parts, carried in box.peer_frames():
        assert dest == "n3"
        frame = codec.decode(parts, max_payload=max(cap, max(sizes)))
        if frame.type == codec.FWD_ACK:
            acked += frame.header["ids"]
            continue
        if frame.type == codec.FWD:
            batch = [((frame.header["id"], frame.header["topic"], frame.header["qos"]), frame.payload)]
        else:
            assert len(frame.payload) <= cap  # only a lone oversized message may exceed the cap
            batch = codec.split_batch(frame)
        assert [f.fid for f in carried] == [fid for (fid, _, _), _ in batch]
        received += [(fid, topic, qos, payload) for (fid, topic, qos), payload in batch]
    assert received == [(f.fid, f.topic, f.qos, f.payload) for f in sent]
    assert acked == [99]


def test_msgs_batch_round_trip() -> None:
    box = Outbox()
    box.deliver(b"c", Delivery("a", 0, None, False, b"1"))
    box.deliver(b"c", Delivery("b", 1, 4, True, b"22"))
    [(_, parts, carried)] = list(box.client_frames())
    frame = codec.decode(parts)
    assert frame.type == codec.MSGS and len(carried) == 2
    assert codec.split_batch(frame) == [(["a", 0, None, False], b"1"), (["b", 1, 4, True], b"22")]


@given(
    runs=st.lists(st.lists(st.binary(min_size=0, max_size=9), min_size=1, max_size=6), min_size=1, max_size=10),
    cap=st.integers(1, 60),
)
def test_runs_stay_one_item_and_arrive_as_their_messages_in_order(runs: list[list[bytes]], cap: int) -> None:
    box = Outbox(max_payload=cap)
    for i, payloads in enumerate(runs):
        sizes = [len(p) for p in payloads] if len(payloads) > 1 else None
        box.forward("n2", Forward(0, f"t/{i}", 0, b"".join(payloads), sizes))
        box.deliver(b"c", Delivery(f"t/{i}", 0, None, False, b"".join(payloads), sizes))
    expected = [(f"t/{i}", p) for i, payloads in enumerate(runs) for p in payloads]
    forwarded: list[tuple[str, bytes]] = []
    for _, parts, carried in box.peer_frames():
        frame = codec.decode(parts, max_payload=1 << 20)
        if frame.type == codec.FWD:
            forwarded.append((frame.header["topic"], frame.payload))
        else:
            assert len(frame.payload) <= cap or len(carried) == 1  # only a lone item may exceed the cap
            assert len(frame.header["items"]) == len(carried)  # one item per run, however many messages
            forwarded += [(topic, p) for (_, topic, _), p in codec.split_batch(frame)]
    delivered: list[tuple[str, bytes]] = []
    for _, parts, _ in box.client_frames():
        frame = codec.decode(parts, max_payload=1 << 20)
        if frame.type == codec.MSG:
            delivered.append((frame.header["topic"], frame.payload))
        else:
            delivered += [(topic, p) for (topic, _, _, _), p in codec.split_batch(frame)]
    assert forwarded == expected and delivered == expected

