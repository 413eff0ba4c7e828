"""What the protocol core asks of the world around it: the one interface a shell (or the simulation) implements.

Rules of this file:
- The core never touches a socket, a clock, a thread or etcd. Everything it wants done outside itself is a call
  on ``Effects``: a frame to a peer or a client, a timer, a request to the etcd session, the end of the process.
  ``shardmq.shard.node`` carries these out with zmq sockets, a timer heap and the etcd session thread;
  ``shardmq.testing.simulation`` with an in-memory network, a virtual clock and an in-memory etcd.
- A send answers whether it was queued (a peer or client that cannot take a frame now is an answer the core
  acts on: a failed request, a detached session, a dropped QoS 0 message counted), never whether it arrived.
- etcd requests are asynchronous: their answer comes back as a later call into the core (``then``), so the
  event loop never waits for etcd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Effects(Protocol):
    def send_peer(self, node: str, parts: list[bytes]) -> bool:
        """Queue a frame to a member; False when it cannot be queued (not a member, its queue is full)."""
        ...

    def send_client(self, rid: bytes, parts: list[bytes]) -> bool:
        """Queue a frame to a client; False when it cannot (its queue is full, or it is gone: then the shell
        calls ``NodeCore.client_unreachable`` before returning)."""
        ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` (with the core's clock advanced) ``delay`` seconds from now."""
        ...

    def poll_view(self) -> None:
        """Ask the etcd session for a fresh view now rather than at its next poll."""
        ...

    def read_assignment(self, then: Callable[[bytes | None, int, bool], None]) -> None:
        """Read the assignment document: ``then(document, mod_revision, ok)``; ``ok`` False when etcd could not
        be read."""
        ...

    def write_assignment(self, document: bytes, expected_revision: int, then: Callable[[int | None], None]) -> None:
        """Compare-and-swap the assignment: ``then(new_revision)``, None when the swap (or etcd) failed."""
        ...

    def set_leaving(self) -> None:
        """Flag this member as leaving in etcd (the leader then drains every shard off it)."""
        ...

    def forget_peer(self, node: str) -> None:
        """Close the connection to a member that is gone (a new one is made if it comes back)."""
        ...

    def stop(self) -> None:
        """End the process (after a graceful leave, or when removed from the cluster)."""
        ...

    def persist(self, changes: list[tuple[Any, ...]], then: Callable[[], None]) -> None:
        """Store one batch of changes (``protocol.durable.Change``) as one transaction, and call ``then`` once it
        is committed (durably, per the shell's fsync policy): the core sends no acknowledgement of these changes
        before. Called only with ``ProtocolConfig.durable``."""
        ...

    def shell_status(self) -> dict[str, Any]:
        """What only the shell knows, for STATUS: endpoints, memory, uptime, wire byte counts."""
        ...
