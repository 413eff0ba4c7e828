"""Locust users for shardmq, built on the gevent SDK (``GreenClient``, one client per user).

Run it through ``python -m shardmq.loadtest.run_loadtest`` (starts a cluster, preloads routes, charts the run), or
by hand against a running cluster:

    SHARDMQ_ENDPOINTS=tcp://127.0.0.1:7101,tcp://127.0.0.1:7102 SHARDMQ_ROUTES=100000 \\
        locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 30s

Environment (read once, at import):

- ``SHARDMQ_ENDPOINTS``  comma-separated client endpoints; user k connects to endpoint k mod N first (the rest
  are its failover list), so users spread evenly over the nodes.
- ``SHARDMQ_ROUTES``     M: publishers pick topics ``devices/{i:08d}/telemetry`` with 0 <= i < M (the preloaded
  exact routes).
- ``SHARDMQ_QOS``        QoS of publishes and subscriptions (default 1).
- ``SHARDMQ_RATE``       operations per second per publisher/churn user; 0 (default) = closed loop, as fast as
  the acks come back.
- ``SHARDMQ_USERS``      which user classes run, with optional weights: ``ExactPublisher:4,WildcardSubscriber:1``
  (default: all four with their default weights). Locust's own class names on the command line and
  ``--tags``/``--exclude-tags`` (tags: publish, exact, hot, wildcard, deliver, churn) work as well.
- ``SHARDMQ_WILDCARDS``  filters for WildcardSubscriber, one per user round robin (default
  ``devices/+/telemetry,+/+/telemetry``: one in a shard, one in the root set every node holds).
- ``SHARDMQ_HOT_FRACTION`` / ``SHARDMQ_HOT_SHARE``  HotPublisher skew (default 0.01 / 0.8: 80 % of publishes go
  to 1 % of the topics).
- ``SHARDMQ_CHURN_HELD``  how many filters a ChurnUser holds at most (default 20).
- ``SHARDMQ_TIMEOUT``    SDK request timeout in seconds (default 5; a call is also hard-bounded by gevent).
- ``SHARDMQ_PAYLOAD``    payload size in bytes (default 100), starting with the send time (``time.time()``).

Request names are deliberately few (one per kind of operation, never one per topic): locust keeps a stats entry
per (type, name), and a name per route over 1M routes cut its rate by 60 %.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable

import gevent
import zmq
from locust import User, constant, constant_throughput, tag, task
from locust.env import Environment

from shardmq.client.green import GreenClient, ShardMQError
from shardmq.loadtest.workload import PAYLOAD_SIZE as DEFAULT_PAYLOAD
from shardmq.loadtest.workload import device_topic, make_payload, sent_at

ERRORS = (ShardMQError, TimeoutError, zmq.ZMQError)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in (os.environ.get(name) or default).split(",") if item.strip()]


ENDPOINTS = _env_list("SHARDMQ_ENDPOINTS", "tcp://127.0.0.1:7101")
ROUTES = max(1, int(_env_float("SHARDMQ_ROUTES", 100_000)))
QOS = int(_env_float("SHARDMQ_QOS", 1))
RATE = _env_float("SHARDMQ_RATE", 0.0)
TIMEOUT = _env_float("SHARDMQ_TIMEOUT", 5.0)
PAYLOAD_SIZE = max(32, int(_env_float("SHARDMQ_PAYLOAD", DEFAULT_PAYLOAD)))
HOT_FRACTION = _env_float("SHARDMQ_HOT_FRACTION", 0.01)
HOT_SHARE = _env_float("SHARDMQ_HOT_SHARE", 0.8)
CHURN_HELD = max(1, int(_env_float("SHARDMQ_CHURN_HELD", 20)))
WILDCARDS = _env_list("SHARDMQ_WILDCARDS", "devices/+/telemetry,+/+/telemetry")
# A hard bound on one SDK call: a request may time out, fail over (HELLO) and time out again.
HARD_TIMEOUT = 3 * TIMEOUT + 2
RECEIVE_SLICE = 1.0  # seconds one WildcardSubscriber task waits for deliveries before yielding to locust
RECEIVE_BATCH = 5000  # at most this many deliveries per task run

_user_seq = itertools.count()


def _wait_time() -> Callable[..., float]:
    return constant_throughput(RATE) if RATE > 0 else constant(0)


class ShardMQUser(User):
    """One GreenClient per user, connected to node k mod N first; every SDK call is reported to locust."""

    abstract = True
    wait_time = _wait_time()

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.index = next(_user_seq)
        start = self.index % len(ENDPOINTS)
        self.endpoints = ENDPOINTS[start:] + ENDPOINTS[:start]
        self.client: GreenClient | None = None
        self.seq = 0

    def on_start(self) -> None:
        self.ensure_client()

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def ensure_client(self) -> GreenClient | None:
        """The user's client, connecting first when needed (a failed connect is reported, then retried later)."""
        if self.client is None:
            client: list[GreenClient] = []
            if not self.call("connect", "connect", lambda: client.append(GreenClient(self.endpoints, timeout=TIMEOUT))):
                gevent.sleep(1.0)  # do not spin on a cluster that is not there
                return None
            self.client = client[0]
        return self.client

    def report(
        self, request_type: str, name: str, ms: float, length: int = 0, exc: BaseException | None = None
    ) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=ms, response_length=length, exception=exc, context={}
        )

    def call(self, request_type: str, name: str, fn: Callable[[], object], length: int = 0) -> bool:
        """Run one SDK call under a hard time bound and report it; True when it succeeded."""
        started = time.perf_counter()
        exc: BaseException | None = None
        try:
            with gevent.Timeout(HARD_TIMEOUT, TimeoutError(f"no answer within {HARD_TIMEOUT:.0f}s")):
                fn()
        except ERRORS as error:
            exc = error
        self.report(request_type, name, (time.perf_counter() - started) * 1000, length, exc)
        return exc is None

    def publish(self, topic: str, name: str) -> None:
        client = self.ensure_client()
        if client is None:
            return
        self.seq += 1
        payload = make_payload(self.seq, PAYLOAD_SIZE)
        self.call("publish", name, lambda: client.publish(topic, payload, qos=QOS), len(payload))

    def drain(self) -> None:
        """Hand over (and so acknowledge) messages already read off the socket; they are not reported."""
        if self.client is not None:
            while self.client.receive(timeout=0) is not None:
                pass


class ExactPublisher(ShardMQUser):
    """Publishes to the M exact topics ``devices/{i:08d}/telemetry``, uniformly."""

    weight = 4

    @tag("publish", "exact")
    @task
    def publish_exact(self) -> None:
        self.publish(device_topic(random.randrange(ROUTES)), f"publish qos{QOS} exact")


class HotPublisher(ShardMQUser):
    """Skewed: HOT_SHARE of the publishes go to the HOT_FRACTION hot topics (spread over the id space)."""

    weight = 2
    hot_count = max(1, round(ROUTES * HOT_FRACTION))
    hot_stride = max(1, ROUTES // hot_count)

    @tag("publish", "hot")
    @task
    def publish_skewed(self) -> None:
        if random.random() < HOT_SHARE:
            topic, name = device_topic(random.randrange(self.hot_count) * self.hot_stride % ROUTES), "hot"
        else:
            topic, name = device_topic(random.randrange(ROUTES)), "tail"
        self.publish(topic, f"publish qos{QOS} {name}")


class WildcardSubscriber(ShardMQUser):
    """Subscribes to one wildcard filter (round robin over SHARDMQ_WILDCARDS) and reports every delivery.

    A delivery is reported as "deliver" with the end-to-end latency (now - send time in the payload); a QoS 1
    redelivery (``dup``) as "deliver dup".
    """

    weight = 1
    wait_time = constant(0)  # receive() itself waits

    def on_start(self) -> None:
        self.filter = WILDCARDS[self.index % len(WILDCARDS)]
        self.subscribed = False
        super().on_start()
        self.ensure_subscribed()

    def ensure_subscribed(self) -> bool:
        client = self.ensure_client()
        if client is not None and not self.subscribed:
            self.subscribed = self.call("subscribe", "subscribe wildcard", lambda: client.subscribe(self.filter, QOS))
            if not self.subscribed:
                gevent.sleep(1.0)
        return self.subscribed

    @tag("wildcard", "deliver")
    @task
    def receive(self) -> None:
        if not self.ensure_subscribed():
            return
        assert self.client is not None
        deadline = time.monotonic() + RECEIVE_SLICE
        for _ in range(RECEIVE_BATCH):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            started = time.perf_counter()
            try:
                with gevent.Timeout(left + HARD_TIMEOUT, TimeoutError("receive did not return")):
                    msg = self.client.receive(timeout=left)
            except ERRORS as exc:
                self.report("deliver", "receive", (time.perf_counter() - started) * 1000, 0, exc)
                return
            if msg is None:
                return
            sent = sent_at(msg.payload)
            latency = max(0.0, (time.time() - sent) * 1000) if sent is not None else 0.0
            self.report("deliver", "deliver dup" if msg.dup else "deliver", latency, len(msg.payload))


class ChurnUser(ShardMQUser):
    """Subscribe/unsubscribe churn on random exact filters of fresh device ids (``devices/{i:08d}/telemetry``
    with M <= i < 2M: nobody publishes there, so every change is a route added to or removed from the owners).
    Holds at most SHARDMQ_CHURN_HELD filters; at each step subscribes a new one or drops a held one."""

    weight = 1

    def on_start(self) -> None:
        self.held: list[str] = []
        super().on_start()

    @tag("churn")
    @task
    def churn(self) -> None:
        client = self.ensure_client()
        if client is None:
            return
        self.drain()
        if len(self.held) >= CHURN_HELD or (self.held and random.random() < 0.5):
            filt = self.held.pop(random.randrange(len(self.held)))
            self.call("unsubscribe", "unsubscribe", lambda: client.unsubscribe(filt))
        else:
            filt = device_topic(ROUTES + random.randrange(ROUTES))
            if self.call("subscribe", "subscribe", lambda: client.subscribe(filt, QOS)):
                self.held.append(filt)


USER_CLASSES: dict[str, type[ShardMQUser]] = {
    cls.__name__: cls for cls in (ExactPublisher, HotPublisher, WildcardSubscriber, ChurnUser)
}


def select_users(spec: str) -> dict[str, int]:
    """Apply ``SHARDMQ_USERS`` (``Name[:weight],...``): chosen classes get the weight, the others become abstract
    (locust then ignores them). Returns the chosen classes and weights."""
    chosen: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        if name not in USER_CLASSES:
            raise ValueError(f"SHARDMQ_USERS: unknown user class {name!r}; choose from {', '.join(USER_CLASSES)}")
        chosen[name] = int(weight) if weight else USER_CLASSES[name].weight
    if not chosen:
        return {name: cls.weight for name, cls in USER_CLASSES.items()}
    for name, cls in USER_CLASSES.items():
        if name in chosen:
            cls.weight = chosen[name]
        else:
            cls.abstract = True
    return chosen


select_users(os.environ.get("SHARDMQ_USERS", ""))
