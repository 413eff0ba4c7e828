"""What the load test sends, shared by the locustfile and the runner (no locust import here: importing locust
monkey-patches the whole process with gevent).

- Topics: ``devices/{i:08d}/telemetry``; the runner preloads exact routes for 0 <= i < M and publishers pick i
  in that range; churn users use fresh ids M <= i < 2M.
- Payload: ``size`` bytes starting with the send time, ``b"<time.time()> <seq> xxx..."``, so a subscriber on the
  same machine computes the end-to-end latency.
"""

from __future__ import annotations

import time

PAYLOAD_SIZE = 100


def device_topic(i: int) -> str:
    return f"devices/{i:08d}/telemetry"


def make_payload(seq: int, size: int = PAYLOAD_SIZE, now: float | None = None) -> bytes:
    return (b"%.6f %d " % (time.time() if now is None else now, seq)).ljust(size, b"x")


def sent_at(payload: bytes) -> float | None:
    """The send time written by ``make_payload``, or None when the payload carries none."""
    try:
        return float(payload.split(b" ", 1)[0])
    except ValueError:
        return None
