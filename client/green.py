"""The gevent flavour of the SDK, for locust and other gevent programs.

Rules of this file:
- Built on ``zmq.green``: plain ``zmq`` blocks the whole gevent hub while it waits.
- ``RCVTIMEO`` is silently ignored under ``zmq.green``, so the SDK never relies on it: every wait is a
  ``poll`` with a timeout, which ``zmq.green`` makes cooperative, and callers that need a hard bound wrap a call
  in ``gevent.Timeout``.
- A socket is never shared between greenlets: make one GreenClient per greenlet (per locust user).
- No automatic batching of QoS 0 publishes (``default_max_batch = 1``, and a larger ``max_batch`` is refused):
  ``Client``'s batching relies on a background OS thread to send what is pending when the application goes idle,
  and an OS thread must not touch a ``zmq.green`` socket (its waits belong to the hub of the greenlet's thread),
  nor does a gevent program expect hidden threads. Every ``publish`` is therefore sent at once, as before;
  ``publish_many`` still puts many messages in one PUBS frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq.green as zmq_green

from .client import DEFAULT_LINGER, Client, Message, ShardMQError


class GreenClient(Client):
    zmq_module = zmq_green
    default_max_batch = 1

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        client_id: str | None = None,
        timeout: float = 5.0,
        connect: bool = True,
        *,
        max_batch: int | None = None,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        if max_batch not in (None, 1):
            raise ValueError(f"GreenClient does not batch publish() (max_batch=1); use publish_many, got {max_batch!r}")
        super().__init__(endpoints, client_id, timeout, connect, max_batch=1, linger=linger)


__all__ = ["GreenClient", "Message", "ShardMQError"]
