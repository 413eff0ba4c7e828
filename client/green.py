"""The gevent flavour of the SDK, for locust and other gevent programs.

Rules of this file:
- Only the zmq module and the batching defaults differ from ``Client``: the protocol is the shared
  ``core.ClientCore`` and the shell is ``Client``'s, so every fix to either reaches this flavour unchanged.
- Built on ``zmq.green``: plain ``zmq`` blocks the whole gevent hub while it waits.
- ``RCVTIMEO`` is silently ignored under ``zmq.green``, so the SDK never relies on it: every wait is a
  ``poll`` with a timeout, which ``zmq.green`` makes cooperative, and callers that need a hard bound wrap a call
  in ``gevent.Timeout``.
- A socket is never shared between greenlets: make one GreenClient per greenlet (per locust user).
- No automatic batching of QoS 0 publishes (``batching = False``: ``max_batch`` is 1, a larger one is refused):
  ``Client``'s batching relies on a background OS thread to send what is pending when the application goes idle,
  and an OS thread must not touch a ``zmq.green`` socket (its waits belong to the hub of the greenlet's thread),
  nor does a gevent program expect hidden threads. Every ``publish`` is therefore sent at once, as before;
  ``publish_many`` still puts many messages in one PUBS frame.
"""

from __future__ import annotations

import zmq.green as zmq_green

from .client import Client, Message, ShardMQError, Will


class GreenClient(Client):
    zmq_module = zmq_green
    default_max_batch = 1
    batching = False


__all__ = ["GreenClient", "Message", "ShardMQError", "Will"]
