"""The gevent flavour: waits cooperate with the hub, one client per greenlet."""

from __future__ import annotations

import uuid

import gevent
import gevent.event
import pytest

from shardmq.client.green import GreenClient


def test_green_clients_share_the_hub(endpoints: list[str]) -> None:
    topic = f"green/{uuid.uuid4().hex[:8]}"
    ticks = 0
    received: list[bytes] = []
    stop = False

    def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            gevent.sleep(0.01)

    def subscriber(ready: gevent.event.Event) -> None:
        with GreenClient(endpoints[:1] + endpoints[1:]) as c:
            c.subscribe(topic, qos=1)
            ready.set()
            while len(received) < 5 and (msg := c.receive(timeout=3.0)) is not None:
                received.append(msg.payload)

    def publisher(ready: gevent.event.Event) -> None:
        ready.wait()
        gevent.sleep(0.5)  # the subscriber now waits in receive(); the ticker must keep running meanwhile
        with GreenClient(endpoints[2:] + endpoints[:2]) as c:
            for i in range(5):
                c.publish(topic, str(i).encode(), qos=1)

    ready = gevent.event.Event()
    tick = gevent.spawn(ticker)
    with gevent.Timeout(20):
        gevent.joinall([gevent.spawn(subscriber, ready), gevent.spawn(publisher, ready)], raise_error=True)
    stop = True
    tick.join()
    assert received == [str(i).encode() for i in range(5)]
    # The ticker kept running while clients waited on sockets: the hub was never blocked.
    assert ticks >= 20


def test_gevent_timeout_bounds_a_wait(endpoints: list[str]) -> None:
    with GreenClient(endpoints) as c, pytest.raises(gevent.Timeout), gevent.Timeout(0.3):
        c.receive(timeout=None)
