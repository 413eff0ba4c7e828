"""The node loop's drain (one method of the shell, with a stand-in socket): when it stops reading a socket."""

from __future__ import annotations

import pytest
import zmq

from shardmq.shard.node import DRAIN_BATCH, FLUSH_AT, Node, NodeConfig


class _Frames:
    """Stands in for a node socket (one class under test: ``Node._drain``): hands out ``count`` frames."""

    def __init__(self, count: int) -> None:
        self.left = count

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.left:
            raise zmq.Again()
        self.left -= 1
        return [b"rid", b"PUB", b"{}", b""]

    def get(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.left else 0


@pytest.mark.parametrize("waiting_per_frame", [0, 1, 100])
def test_a_drain_ends_once_enough_is_queued_or_waiting_for_lookups(waiting_per_frame: int) -> None:
    """Publishes queued behind lookups count like queued messages: the drain ends, so the loop reads the peer
    socket (where the lookup answers are) before more publishes pile up behind them."""
    node = Node(NodeConfig("n1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "http://127.0.0.1:3"))
    frames = _Frames(DRAIN_BATCH)
    handled = []

    def handle(parts: list[bytes]) -> None:
        handled.append(parts)
        node.core.entry.queued_publishes += waiting_per_frame

    node._drain(frames, handle, "client")  # type: ignore[arg-type]
    expected = DRAIN_BATCH if waiting_per_frame == 0 else -(-FLUSH_AT // waiting_per_frame)
    assert len(handled) == min(DRAIN_BATCH, expected)


def test_publishes_waiting_do_not_cut_short_the_peer_drain_that_brings_their_answers() -> None:
    node = Node(NodeConfig("n1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "http://127.0.0.1:3"))
    node.core.entry.queued_publishes = 10 * FLUSH_AT
    handled = []
    node._drain(_Frames(DRAIN_BATCH), handled.append, "peer")  # type: ignore[arg-type]
    assert len(handled) == DRAIN_BATCH
