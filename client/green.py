"""The gevent flavour of the SDK, for locust and other gevent programs.

Rules of this file:
- Built on ``zmq.green``: plain ``zmq`` blocks the whole gevent hub while it waits.
- ``RCVTIMEO`` is silently ignored under ``zmq.green``, so the SDK never relies on it: every wait is a
  ``poll`` with a timeout, which ``zmq.green`` makes cooperative, and callers that need a hard bound wrap a call
  in ``gevent.Timeout``.
- A socket is never shared between greenlets: make one GreenClient per greenlet (per locust user).
"""

from __future__ import annotations

import zmq.green as zmq_green

from .client import Client, Message, ShardMQError


class GreenClient(Client):
    zmq_module = zmq_green


__all__ = ["GreenClient", "Message", "ShardMQError"]
