"""MQTT session semantics, the same scenarios on mosquitto and on shardmq (issue #13, item 7).

Each scenario is a function of a ``Broker`` (which makes ``Driver`` objects, one per client connection) and returns
what it observed as plain data (JSON-able dicts and lists). A scenario only calls the broker-neutral ``Driver``
methods, so the same scenario runs against any broker that has a driver:

- ``mosquitto``: a mosquitto child process on a free 127.0.0.1 port (``compare_brokers.peer``, config in a temp dir,
  stopped by pid, temp dir removed), driven with paho-mqtt 2.x over MQTT 5 (3.1.1 where a scenario says so).
- ``shardmq``: a 3-node ``LocalCluster`` (started once for the run, stopped by pid, temp dir removed; or the
  caller's, e.g. a test fixture), driven with the SDK (``shardmq.client.Client``), each connection to one node, the
  nodes in turn so that a scenario's clients and reconnections cross nodes. A scenario that needs broker settings
  (``queue_limit_100``) on a caller's cluster reports ``{"unsupported": why}`` (the script starts a cluster for it).

Every scenario runs on a fresh broker (mosquitto: its own process; shardmq: its own topics and client ids, its
persistent sessions ended afterwards), uses unique topics and payloads, and waits a bounded time for everything. The
scenarios, what each broker did and why they differ are in ``docs/MQTT_SEMANTICS.md``.

Usage: ``python -m shardmq.loadtest.mqtt_semantics --broker mosquitto|shardmq|both [--only will,retained]
[--json FILE]``; ``both`` prints the observations side by side with the differences marked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import tempfile
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAIT = 5.0  # seconds: the most any single step (CONNACK, SUBACK, PUBACK, an expected message) may take
IDLE = 0.5  # seconds without a message after which a drain stops: loopback delivers in well under this
SESSION_EXPIRY = 300  # seconds: "keep my session" for MQTT 5 persistent sessions, far longer than a scenario


# ---------------------------------------------------------------------------------------------- the driver API
@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


@dataclass(frozen=True)
class Connack:
    session_present: bool
    reason: str


class Unsupported(Exception):
    """The broker under test cannot run a scenario as asked (shardmq: broker settings on a caller's cluster): the
    scenario is reported as ``{"unsupported": reason}``, not as an error."""


class Refused(Exception):
    """The broker refused a QoS 1 publish instead of accepting it (shardmq: ``overloaded``, a subscriber's queue is
    full); mosquitto never refuses, it drops."""


class Driver(ABC):
    """One client connection to the broker under test, with blocking calls and bounded waits."""

    @abstractmethod
    def connect(
        self,
        client_id: str,
        clean_session: bool = True,
        session_expiry: int | None = None,
        will: Will | None = None,
        keepalive: int = 60,
    ) -> Connack:
        """Connect and wait for the broker's answer. ``session_expiry`` (seconds) is MQTT 5's; a 3.1.1 driver
        ignores it (a 3.1.1 session with clean_session=False lasts until a clean connect)."""

    @abstractmethod
    def subscribe(self, topic_filter: str, qos: int) -> int:
        """Subscribe and wait for the grant: the granted QoS, or the broker's failure code (>= 0x80)."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Publish; for QoS > 0 wait for the broker's acknowledgement (``Refused`` if it says no)."""

    @abstractmethod
    def receive(self, timeout: float, ack: bool = True) -> Message | None:
        """The next message delivered to this connection, or None after ``timeout``. ``ack=False`` leaves a QoS 1
        message unacknowledged, as a consumer that died before processing it would."""

    @abstractmethod
    def disconnect_cleanly(self) -> None:
        """Send DISCONNECT (normal, so no will) and close the connection."""

    @abstractmethod
    def vanish(self) -> float:
        """Close the TCP connection without DISCONNECT, as the kernel does for a killed process. Returns
        ``time.monotonic()`` taken just before the close, the start of the broker's detection time."""

    @abstractmethod
    def go_silent(self) -> None:
        """Keep the TCP connection open but stop reading and writing (no PINGREQ): a hung client."""

    @abstractmethod
    def closed_by_server(self, timeout: float) -> dict[str, Any] | None:
        """If the broker ended this connection within ``timeout``: how (its reason, whether it sent DISCONNECT)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything, whatever state the connection is in (vanishes if still connected)."""


class Broker(ABC):
    """A running broker under test. ``running`` starts a fresh one with a scenario's settings."""

    name: str
    # Seconds the broker may take to notice a connection that vanished (socket closed without DISCONNECT), on top
    # of WAIT: mosquitto sees the TCP close at once; a shardmq node finds the client unreachable by its idle probe.
    vanish_detect: float = 0.0

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def running(self, settings: dict[str, int]) -> contextlib.AbstractContextManager[None]:
        """Start the broker with ``settings`` (only ``max_queued_messages`` so far); stop it on exit."""

    @abstractmethod
    def client(self, mqtt_version: int = 5) -> Driver:
        """A new, unconnected driver. Every driver made is closed when ``running`` exits."""


# ---------------------------------------------------------------------------------------------- mosquitto
class PahoDriver(Driver):
    """paho-mqtt 2.x with its network loop in our own thread, not ``loop_start``: paho's thread reconnects on its
    own after the broker drops the connection, which would turn a takeover into a ping-pong, and a thread we drive
    is one we can pause (``go_silent``)."""

    def __init__(self, port: int, mqtt_version: int) -> None:
        self.port = port
        self.mqtt_version = mqtt_version
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._silent = threading.Event()
        self._connected = threading.Event()
        self._gone = threading.Event()
        self._connack: Connack | None = None
        self._gone_how: dict[str, Any] | None = None
        self._acks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self._inbox: queue.Queue[tuple[Message, int]] = queue.Queue()
        self._closed_by_us = False

    # paho callbacks (run in the loop thread)
    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._connack = Connack(bool(flags.session_present), str(reason))
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._gone_how = {"reason": str(reason), "disconnect_packet": bool(flags.is_disconnect_packet_from_server)}
        self._gone.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._acked:
            self._acks[mid] = reasons[0].value
            self._acked.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        m = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup))
        self._inbox.put((m, msg.mid))

    def _loop(self) -> None:
        from paho.mqtt.client import MQTTErrorCode

        while not self._stop.is_set():
            if self._silent.is_set():
                time.sleep(0.05)
                continue
            if self._client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._gone.set()
                return

    def connect(
        self,
        client_id: str,
        clean_session: bool = True,
        session_expiry: int | None = None,
        will: Will | None = None,
        keepalive: int = 60,
    ) -> Connack:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        v5 = self.mqtt_version == 5
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": clean_session}
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,  # acks are the scenario's to give or withhold (receive(ack=...))
            **kwargs,
        )
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_subscribe, c.on_message = self._on_subscribe, self._on_message
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client = c
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry or 0
            c.connect("127.0.0.1", self.port, keepalive, clean_start=clean_session, properties=props)
        else:
            c.connect("127.0.0.1", self.port, keepalive)
        self._thread = threading.Thread(target=self._loop, name=f"paho-{client_id}", daemon=True)
        self._thread.start()
        if not self._connected.wait(WAIT) or self._connack is None:
            raise TimeoutError(f"{client_id}: no CONNACK in {WAIT} s")
        return self._connack

    def subscribe(self, topic_filter: str, qos: int) -> int:
        _rc, mid = self._client.subscribe(topic_filter, qos)
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, WAIT):
                raise TimeoutError(f"no SUBACK for {topic_filter} in {WAIT} s")
            return int(self._acks.pop(mid))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos, retain)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged in {WAIT} s")

    def receive(self, timeout: float, ack: bool = True) -> Message | None:
        try:
            m, mid = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if ack and m.qos > 0 and not self._gone.is_set():
            self._client.ack(mid, m.qos)
        return m

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(WAIT)

    def disconnect_cleanly(self) -> None:
        self._closed_by_us = True
        self._client.disconnect()
        self._gone.wait(WAIT)
        self._join()

    def vanish(self) -> float:
        self._closed_by_us = True
        self._join()
        sock = self._client.socket()
        t = time.monotonic()
        if sock is not None:
            sock.close()
        return t

    def go_silent(self) -> None:
        self._silent.set()

    def closed_by_server(self, timeout: float) -> dict[str, Any] | None:
        if not self._gone.wait(timeout) or self._closed_by_us:
            return None
        return self._gone_how or {"reason": "connection closed", "disconnect_packet": False}

    def close(self) -> None:
        if self._client is None:
            return
        if not self._gone.is_set() and not self._closed_by_us:
            self.vanish()
        self._join()
        # paho keeps its socket and a wake-up socket pair open until these run; close them so nothing leaks.
        with contextlib.suppress(Exception):
            self._client._sock_close()
        with contextlib.suppress(Exception):
            self._client._reset_sockets()


class MosquittoBroker(Broker):
    name = "mosquitto"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port: int | None = None
        self._drivers: list[Driver] = []

    def version(self) -> str:
        from shardmq.loadtest.compare_brokers import version_of

        return version_of(self.binary)

    @contextlib.contextmanager
    def running(self, settings: dict[str, int]) -> Iterator[None]:
        from shardmq.loadtest.compare_brokers import peer

        conf = "".join(f"{k} {v}\n" for k, v in settings.items())
        with tempfile.TemporaryDirectory(prefix="shardmq-mqtt-semantics-") as tmp, \
                peer("mosquitto", self.binary, Path(tmp), conf) as info:  # fmt: skip
            self.port = info["port"]
            try:
                yield
            finally:
                for d in self._drivers:
                    d.close()
                self._drivers.clear()
                self.port = None

    def client(self, mqtt_version: int = 5) -> Driver:
        if self.port is None:
            raise RuntimeError("broker not running")
        d = PahoDriver(self.port, mqtt_version)
        self._drivers.append(d)
        return d


# ---------------------------------------------------------------------------------------------- shardmq
SHARDMQ_NODE_ARGS = ["--client-idle-check", "1"]  # as the suite's shared cluster: a quiet client is probed after 1 s
SETTING_FLAGS = {"max_queued_messages": "--max-queued"}  # a scenario's broker setting -> the node option for it


def client_idle_check(node_args: list[str]) -> float:
    """The nodes' ``--client-idle-check`` (seconds) in their command-line arguments, else the node's default."""
    from dataclasses import fields

    from shardmq.shard.node import NodeConfig

    flag = "--client-idle-check"
    if flag in node_args:
        return float(node_args[node_args.index(flag) + 1])
    return float(next(f.default for f in fields(NodeConfig) if f.name == "client_idle_check"))  # type: ignore[arg-type]


class SdkDriver(Driver):
    """The blocking SDK (``shardmq.client.Client``) connected to one node. Where the Driver API asks for something
    the SDK's public calls do not do (withhold an acknowledgement, vanish, watch for a takeover), it uses the
    client's own lock and core, as the SDK's tests do; nothing here changes what the node sees from an SDK user."""

    def __init__(self, broker: ShardmqBroker, endpoint: str) -> None:
        self.broker = broker
        self.endpoint = endpoint
        self._client: Any = None  # shardmq.client.Client once connected
        self._taken_over: str | None = None  # the SESSION_END taken_over reason, once seen
        self._done = False  # closed cleanly, vanished or taken over: this connection receives nothing more
        self.interruptions: list[str] = []

    def connect(
        self,
        client_id: str,
        clean_session: bool = True,
        session_expiry: int | None = None,
        will: Will | None = None,
        keepalive: int = 60,
    ) -> Connack:
        """``keepalive`` is ignored: the node probes a quiet client after its ``--client-idle-check``. A persistent
        session always needs an expiry in shardmq; 3.1.1's (None: until a clean connect) becomes SESSION_EXPIRY."""
        from shardmq.client import Client

        kwargs: dict[str, Any] = {}
        if will is not None:
            kwargs["will"] = (will.topic, will.payload, will.qos, will.retain)
        if not clean_session:
            kwargs["session_expiry"] = session_expiry or SESSION_EXPIRY
            self.broker.persistent_ids.add(client_id)
        self._client = Client([self.endpoint], client_id=client_id, timeout=WAIT, credentials=self.broker.credentials,
                              clean_session=clean_session, **kwargs)  # fmt: skip
        return Connack(bool(self._client.session_present), "success")

    def subscribe(self, topic_filter: str, qos: int) -> int:
        from shardmq.client import ShardMQError

        try:
            self._client.subscribe(topic_filter, qos)
        except ShardMQError:
            return 0x80
        return qos  # shardmq grants the QoS asked for (0 or 1)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        from shardmq.client import ShardMQError
        from shardmq.router import codec

        try:
            self._client.publish(topic, payload, qos, retain)
        except ShardMQError as e:
            if e.code == codec.E_OVERLOADED:
                raise Refused(str(e)) from e
            raise

    def receive(self, timeout: float, ack: bool = True) -> Message | None:
        from shardmq.client import ShardMQError
        from shardmq.router import codec

        deadline = time.monotonic() + timeout
        while not self._done:
            try:
                m = self._client.receive(timeout) if ack else self._receive_unacked(timeout)
            except ShardMQError as e:
                if e.code == codec.E_TAKEN_OVER:
                    self._taken_over, self._done = e.reason, True
                    return None
                if e.code != codec.E_INTERRUPTED:
                    raise
                self.interruptions.append(e.reason)  # a gap in the subscriptions, reported: go on
                timeout = max(0.0, deadline - time.monotonic())
                continue
            if m is None:
                return None
            return Message(m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup))
        return None

    def _receive_unacked(self, timeout: float) -> Any:
        """``Client.receive`` without the DACK: acknowledgements due for earlier messages go first, then this
        message's is dropped, so the node keeps it in flight as a consumer that died before processing it."""
        c = self._client
        core = c._core
        with c._lock:
            due = core.take_dacks()
            if due is not None:
                c.sock.send_multipart(due)
            if not core.inbox:
                c._run(core.wait_for_message(timeout))
            message, _dack = core.take_message()
            core.dacks.clear()
            return message

    def disconnect_cleanly(self) -> None:
        self._done = True
        self._client.close()  # BYE: the node drops the connection; a persistent session stays

    def vanish(self) -> float:
        self._done = True
        c = self._client
        c._stop_flusher()
        t = time.monotonic()
        c._close_socket(linger=0)  # no BYE: the node finds out by its idle probe, as for a killed process
        return t

    def go_silent(self) -> None:
        """Nothing to stop: the SDK reads its socket (answering the node's PINGs) only inside a call."""

    def closed_by_server(self, timeout: float) -> dict[str, Any] | None:
        """shardmq's DISCONNECT 0x8E is SESSION_END taken_over, sent when the new connection is on another node
        (on the same node zmq hands the routing id over and the old connection hears nothing)."""
        c = self._client
        deadline = time.monotonic() + timeout
        while self._taken_over is None and not self._done:
            if c._core.taken_over is not None:
                self._taken_over = c._core.taken_over.reason
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with c._lock:  # read frames into the inbox without taking (or acknowledging) messages
                frame = c._recv(min(left, 0.1))
                if frame is not None:
                    c._handle_unsolicited(frame)
        if self._taken_over is None:
            return None
        self._done = True
        return {"reason": f"SESSION_END taken_over: {self._taken_over}", "disconnect_packet": True}

    def close(self) -> None:
        c, self._client = self._client, None
        if c is None:
            return
        with contextlib.suppress(Exception):
            if self._done:
                c._stop_flusher()
                c._close_socket(linger=0)
            else:
                c.close()


class ShardmqBroker(Broker):
    """A local shardmq cluster (etcd and ``nodes`` node processes, ``shardmq.testing.LocalCluster``), or one the
    caller runs (``cluster=``, e.g. a test's fixture). The cluster is started once and serves every scenario:
    each scenario's topics and client ids are its own, and ``running`` ends the persistent sessions it made, so a
    scenario starts as on a fresh broker. A scenario with broker settings (``max_queued_messages``) gets a cluster
    of its own started with the matching node options, stopped after it; on a caller's cluster it is
    ``Unsupported``. Drivers connect to the nodes in turn (n1, n2, n3, n1...), so every scenario's clients, its
    reconnections included, cross nodes: a reconnect moves the session to another node."""

    name = "shardmq"

    def __init__(self, cluster: Any = None, nodes: int = 3) -> None:
        self.nodes = nodes
        self._given = cluster  # a LocalCluster the caller started and stops
        self._own: Any = None  # the one this broker started for scenarios without settings
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        self._cluster: Any = None  # the one the running scenario uses
        self._next = 0
        self._drivers: list[SdkDriver] = []
        self.persistent_ids: set[str] = set()
        self.credentials: Any = None

    def version(self) -> str:
        from importlib.metadata import version

        from shardmq.router import codec

        return f"shardmq {version('shardmq')}, protocol v{codec.PROTOCOL_VERSION}"

    def _start(self, node_args: list[str]) -> tuple[Any, tempfile.TemporaryDirectory[str]]:
        from shardmq.testing import LocalCluster

        tmp = tempfile.TemporaryDirectory(prefix="shardmq-mqtt-semantics-")
        cluster = LocalCluster(tmp.name, nodes=self.nodes, lease_ttl=2, log_level="warning",
                               node_args=[*SHARDMQ_NODE_ARGS, *node_args])  # fmt: skip
        try:
            cluster.up(timeout=60)
        except BaseException:
            with contextlib.suppress(Exception):
                cluster.down()
            tmp.cleanup()
            raise
        return cluster, tmp

    @contextlib.contextmanager
    def running(self, settings: dict[str, int]) -> Iterator[None]:
        node_args = [a for k, v in settings.items() for a in (SETTING_FLAGS[k], str(v))]
        dedicated: tuple[Any, tempfile.TemporaryDirectory[str]] | None = None
        if node_args and self._given is not None:
            raise Unsupported(f"needs nodes started with {' '.join(node_args)}: run the script (its own clusters)")
        if node_args:
            dedicated = self._start(node_args)
            cluster = dedicated[0]
        elif self._given is not None:
            cluster = self._given
        else:
            cluster = self.start()
        self._cluster, self._next = cluster, 0
        self.credentials = cluster.admin_credentials
        # A vanished client is found unreachable by the idle probe (every --client-idle-check seconds, to clients
        # quiet that long) and its clean session dropped one more idle check later: at most 3 of them.
        self.vanish_detect = 3 * client_idle_check(cluster.node_args)
        try:
            yield
        finally:
            for d in self._drivers:
                d.close()
            self._drivers.clear()
            self._end_sessions()
            self._cluster = None
            if dedicated is not None:
                with contextlib.suppress(Exception):
                    dedicated[0].down()
                dedicated[1].cleanup()

    def _end_sessions(self) -> None:
        """A clean connect with each persistent client id used ends its session wherever it is held (SDK.md)."""
        from shardmq.client import Client

        endpoint = self._cluster.state.client_endpoints()[0]
        for cid in sorted(self.persistent_ids):
            with contextlib.suppress(Exception), Client([endpoint], client_id=cid, timeout=WAIT,
                                                        credentials=self.credentials):  # fmt: skip
                pass
        self.persistent_ids.clear()

    def client(self, mqtt_version: int = 5) -> Driver:
        """A driver for the next node in turn. shardmq has no MQTT versions: ``mqtt_version`` is ignored."""
        if self._cluster is None:
            raise RuntimeError("broker not running")
        endpoints = self._cluster.state.client_endpoints()
        d = SdkDriver(self, endpoints[self._next % len(endpoints)])
        self._next += 1
        self._drivers.append(d)
        return d

    def start(self) -> Any:
        """The cluster for scenarios without settings: the caller's, else one started now (once)."""
        if self._given is not None:
            return self._given
        if self._own is None:
            self._own, self._own_dir = self._start([])
        return self._own

    def stop(self) -> None:
        """Stop the cluster this broker started (by pid) and remove its directory."""
        if self._own is not None:
            with contextlib.suppress(Exception):
                self._own.down()
            self._own = None
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None


def make_broker(name: str) -> Broker:
    if name == "mosquitto":
        from shardmq.loadtest.compare_brokers import find_binary

        binary = find_binary("mosquitto")
        if binary is None:
            raise SystemExit("mosquitto not installed (Debian: apt-get install mosquitto)")
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as e:
            raise SystemExit("paho-mqtt not installed (pip install -e '.[loadtest]')") from e
        return MosquittoBroker(binary)
    if name == "shardmq":
        return ShardmqBroker()
    raise SystemExit(f"unknown broker {name!r} (mosquitto, shardmq or both)")


# ---------------------------------------------------------------------------------------------- helpers
def drain(d: Driver, idle: float = IDLE, limit: int = 5000, ack: bool = True) -> list[Message]:
    """Every message until none comes for ``idle`` seconds (at most ``limit``, at most 30 s)."""
    out: list[Message] = []
    deadline = time.monotonic() + 30
    while len(out) < limit and time.monotonic() < deadline:
        m = d.receive(idle, ack=ack)
        if m is None:
            break
        out.append(m)
    return out


def texts(msgs: list[Message]) -> list[str]:
    return [m.payload.decode() for m in msgs]


def brief(m: Message, base: str) -> dict[str, Any]:
    topic = m.topic[len(base) + 1 :] if m.topic.startswith(base + "/") else m.topic
    return {"topic": topic, "payload": m.payload.decode(), "qos": m.qos, "retain": m.retain, "dup": m.dup}


def seq_ranges(nums: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7, 8] -> [[1, 3], [7, 8]]: short enough to print what arrived out of hundreds."""
    out: list[list[int]] = []
    for n in sorted(nums):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


# ---------------------------------------------------------------------------------------------- scenarios
Observed = dict[str, Any]


def persistent_session(broker: Broker, base: str, mqtt_version: int) -> Observed:
    """Offline persistent session: QoS 1 queued, QoS 0 not (mosquitto default); unacked redelivered with DUP."""
    topic, cid = f"{base}/t", f"{base}-sub"
    expiry = SESSION_EXPIRY if mqtt_version == 5 else None
    a = broker.client(mqtt_version)
    first = a.connect(cid, clean_session=False, session_expiry=expiry)
    a.subscribe(topic, 1)
    a.disconnect_cleanly()
    pub = broker.client()
    pub.connect(f"{base}-pub")
    sent: list[str] = []
    for i in range(10):
        sent.append(f"q1-{i}")
        pub.publish(topic, sent[-1].encode(), qos=1)
        if i % 3 == 0:
            sent.append(f"q0-{i}")
            pub.publish(topic, sent[-1].encode(), qos=0)
    b = broker.client(mqtt_version)
    again = b.connect(cid, clean_session=False, session_expiry=expiry)
    got = drain(b)
    # Phase 2: messages delivered but never acknowledged, then the client dies: are they sent again, marked DUP?
    for i in range(5):
        pub.publish(topic, f"u-{i}".encode(), qos=1)
    held = drain(b, ack=False)
    b.vanish()
    c = broker.client(mqtt_version)
    third = c.connect(cid, clean_session=False, session_expiry=expiry)
    redelivered = drain(c)
    return {
        "mqtt_version": "5" if mqtt_version == 5 else "3.1.1",
        "session_present_first_connect": first.session_present,
        "session_present_on_reconnect": again.session_present,
        "published_in_order": sent,
        "received": texts(got),
        "received_qos": sorted({m.qos for m in got}),
        "received_dup": sorted({m.dup for m in got}),
        "qos0_received": [t for t in texts(got) if t.startswith("q0-")],
        "held_unacked_before_vanish": texts(held),
        "session_present_after_vanish": third.session_present,
        "redelivered_after_vanish": texts(redelivered),
        "redelivered_dup": [m.dup for m in redelivered],
    }


def persistent_session_v5(broker: Broker, base: str) -> Observed:
    return persistent_session(broker, base, 5)


def persistent_session_v311(broker: Broker, base: str) -> Observed:
    return persistent_session(broker, base, 4)


def takeover(broker: Broker, base: str) -> Observed:
    """A second connection with a connected client's id takes its session over."""
    topic, cid, will_topic = f"{base}/t", f"{base}-dup", f"{base}/will"
    watcher = broker.client()
    watcher.connect(f"{base}-watcher")
    watcher.subscribe(will_topic, 1)
    first = broker.client()
    first.connect(cid, will=Will(will_topic, b"will-of-first"), clean_session=False, session_expiry=SESSION_EXPIRY)
    first.subscribe(topic, 1)
    pub = broker.client()
    pub.connect(f"{base}-pub")
    for i in range(3):
        pub.publish(topic, f"t-{i}".encode(), qos=1)
    held = drain(first, ack=False)  # delivered to the first connection, not acknowledged by it
    second = broker.client()
    will2_set = Will(will_topic, b"will-of-second")
    c2 = second.connect(cid, will=will2_set, clean_session=False, session_expiry=SESSION_EXPIRY)
    first_closed = first.closed_by_server(WAIT)
    got2 = drain(second)
    for i in range(2):
        pub.publish(topic, f"t2-{i}".encode(), qos=1)
    after = drain(second)
    first_after = drain(first, idle=0.2)
    will = watcher.receive(1.0)
    # A third connection with clean start takes over too and ends the second's session, which MQTT 5 says
    # publishes the second's will (3.1.4, will delay 0).
    third = broker.client()
    c3 = third.connect(cid, clean_session=True)
    second_closed = second.closed_by_server(WAIT)
    will2 = watcher.receive(1.0)
    pub.publish(topic, b"t3-0", qos=1)
    got3 = drain(third)
    return {
        "first_held_unacked": texts(held),
        "first_closed_by_broker": first_closed,
        "first_will_published": will.payload.decode() if will else None,
        "second_session_present": c2.session_present,
        "second_received_on_connect": texts(got2),
        "second_received_dup": [m.dup for m in got2],
        "second_received_after": texts(after),
        "first_received_after_takeover": texts(first_after),
        "clean_takeover_session_present": c3.session_present,
        "second_closed_by_clean_takeover": second_closed,
        "second_will_published_on_clean_takeover": will2.payload.decode() if will2 else None,
        "clean_takeover_received": texts(got3),
    }


def clean_session_discards(broker: Broker, base: str) -> Observed:
    """Reconnecting with clean session drops the stored session and what it queued."""
    topic, cid = f"{base}/t", f"{base}-sub"
    a = broker.client()
    a.connect(cid, clean_session=False, session_expiry=SESSION_EXPIRY)
    a.subscribe(topic, 1)
    a.disconnect_cleanly()
    pub = broker.client()
    pub.connect(f"{base}-pub")
    for i in range(5):
        pub.publish(topic, f"c-{i}".encode(), qos=1)
    b = broker.client()
    cb = b.connect(cid, clean_session=True)
    got = drain(b)
    pub.publish(topic, b"c-live", qos=1)  # the old subscription went with the session
    live = drain(b)
    b.disconnect_cleanly()
    c = broker.client()
    cc = c.connect(cid, clean_session=False, session_expiry=SESSION_EXPIRY)
    later = drain(c)
    return {
        "clean_reconnect_session_present": cb.session_present,
        "clean_reconnect_received": texts(got),
        "old_subscription_live_received": texts(live),
        "persistent_reconnect_session_present": cc.session_present,
        "persistent_reconnect_received": texts(later),
    }


def retained(broker: Broker, base: str) -> Observed:
    """Retained messages to new subscribers (exact and wildcard filters), live flag, deletion, QoS downgrade."""
    pub = broker.client()
    pub.connect(f"{base}-pub")
    stored = [("a/b/c", "r-abc", 1), ("a/x/c", "r-axc", 0), ("a/b/d", "r-abd", 1), ("other", "r-other", 1)]
    for t, p, q in stored:
        pub.publish(f"{base}/{t}", p.encode(), qos=q, retain=True)

    def fresh(name: str, topic_filter: str, qos: int) -> tuple[Driver, list[dict[str, Any]]]:
        d = broker.client()
        d.connect(f"{base}-{name}")
        d.subscribe(f"{base}/{topic_filter}", qos)
        return d, [brief(m, base) for m in drain(d)]

    exact, exact_got = fresh("exact", "a/b/c", 1)
    plus, plus_got = fresh("plus", "a/+/c", 1)
    _hash, hash_got = fresh("hash", "a/#", 0)
    pub.publish(f"{base}/a/b/c", b"live-plain", qos=1)
    pub.publish(f"{base}/a/b/c", b"live-retained", qos=1, retain=True)
    live = [brief(m, base) for m in drain(exact)]
    pub.publish(f"{base}/a/x/c", b"", qos=1, retain=True)
    delete_seen_live = [brief(m, base) for m in drain(plus)]
    _after, after_got = fresh("after", "a/+/c", 1)
    return {
        "stored": [{"topic": t, "payload": p, "qos": q} for t, p, q in stored],
        "new_sub_exact_qos1": exact_got,
        "new_sub_plus_qos1": plus_got,
        "new_sub_hash_qos0": hash_got,
        "live_to_existing_sub": live,
        "empty_retained_seen_by_live_sub": delete_seen_live,
        "new_sub_plus_after_delete": after_got,
    }


class WillWatcher:
    """A subscriber to every will topic of a scenario that waits for one topic's will while others arrive: each
    message is timed when it is received (the driver's receive call, so within a loop turn of its arrival)."""

    def __init__(self, driver: Driver, base: str) -> None:
        self.driver, self.base = driver, base
        self.seen: dict[str, tuple[Message, float]] = {}  # topic -> (first message, time.monotonic() received)

    def wait(self, topic: str, until: float) -> tuple[Message, float] | None:
        while topic not in self.seen:
            left = until - time.monotonic()
            m = self.driver.receive(left) if left > 0 else None
            if m is None:
                return None
            self.seen.setdefault(m.topic, (m, time.monotonic()))
        return self.seen[topic]


def will(broker: Broker, base: str) -> Observed:
    """Will on vanish (socket closed without DISCONNECT), none on clean disconnect, and on keepalive expiry. The
    silent client goes silent first and is waited for last, so its wait overlaps the other two cases."""
    watcher = broker.client()
    watcher.connect(f"{base}-watcher")
    watcher.subscribe(f"{base}/will/#", 1)
    wills = WillWatcher(watcher, base)
    out: Observed = {}
    keepalive = 2
    k = broker.client()
    k.connect(f"{base}-silent", will=Will(f"{base}/will/silent", b"will-silent"), keepalive=keepalive)
    t_silent = time.monotonic()
    k.go_silent()
    v = broker.client()
    v.connect(f"{base}-vanish", will=Will(f"{base}/will/vanish", b"will-vanish"))
    t0 = v.vanish()
    got = wills.wait(f"{base}/will/vanish", time.monotonic() + WAIT + broker.vanish_detect)
    out["vanish_will"] = brief(got[0], base) if got else None
    out["vanish_to_will_ms"] = round((got[1] - t0) * 1000, 1) if got else None
    clean = broker.client()
    clean.connect(f"{base}-clean", will=Will(f"{base}/will/clean", b"will-clean"))
    clean.disconnect_cleanly()
    got = wills.wait(f"{base}/will/clean", time.monotonic() + 1.5)
    out["clean_disconnect_will"] = brief(got[0], base) if got else None
    got = wills.wait(f"{base}/will/silent", t_silent + max(4 * keepalive + 2, WAIT + broker.vanish_detect))
    out["keepalive_s"] = keepalive
    out["silent_will"] = brief(got[0], base) if got else None
    out["silent_to_will_ms"] = round((got[1] - t_silent) * 1000, 1) if got else None
    return out


def shared_subscription(broker: Broker, base: str) -> Observed:
    """$share/g/f: each message to one member; a member leaving; a member vanishing with unacked QoS 1 messages."""
    topic = f"{base}/s"
    pub = broker.client()
    pub.connect(f"{base}-pub")
    a, b = broker.client(), broker.client()
    a.connect(f"{base}-a")
    b.connect(f"{base}-b")
    grants = [a.subscribe(f"$share/g/{topic}", 1), b.subscribe(f"$share/g/{topic}", 1)]
    sent = [f"s-{i}" for i in range(100)]
    for p in sent:
        pub.publish(topic, p.encode(), qos=1)
    got_a, got_b = texts(drain(a)), texts(drain(b))
    both = set(got_a) & set(got_b)
    b.disconnect_cleanly()
    sent2 = [f"s2-{i}" for i in range(20)]
    for p in sent2:
        pub.publish(topic, p.encode(), qos=1)
    after_a = texts(drain(a))

    # A member that takes messages and never acknowledges them, then vanishes (session ends with the connection).
    topic_u = f"{base}/u"
    c, d = broker.client(), broker.client()
    c.connect(f"{base}-c")
    d.connect(f"{base}-d")
    c.subscribe(f"$share/g2/{topic_u}", 1)
    d.subscribe(f"$share/g2/{topic_u}", 1)
    sent3 = [f"u-{i}" for i in range(60)]
    for p in sent3:
        pub.publish(topic_u, p.encode(), qos=1)
    c_before = texts(drain(c))
    d_held = texts(drain(d, ack=False))
    d.vanish()
    c_after = texts(drain(c, idle=1.0 + broker.vanish_detect))
    reached = set(c_before) | set(c_after)

    # The same with a member whose session outlives its connection: do its unacked messages wait for it?
    topic_p = f"{base}/p"
    e, f = broker.client(), broker.client()
    e.connect(f"{base}-e")
    f.connect(f"{base}-f", clean_session=False, session_expiry=SESSION_EXPIRY)
    e.subscribe(f"$share/g3/{topic_p}", 1)
    f.subscribe(f"$share/g3/{topic_p}", 1)
    sent4 = [f"p-{i}" for i in range(20)]
    for p in sent4[:10]:
        pub.publish(topic_p, p.encode(), qos=1)
    e_before = texts(drain(e))
    f_held = texts(drain(f, ack=False))
    f.vanish()
    for p in sent4[10:]:
        pub.publish(topic_p, p.encode(), qos=1)
    e_after = texts(drain(e))
    f2 = broker.client()
    f2_ack = f2.connect(f"{base}-f", clean_session=False, session_expiry=SESSION_EXPIRY)
    f_back = drain(f2)
    delivered = set(e_before + e_after) | set(texts(f_back))
    return {
        "granted": grants,
        "published": len(sent),
        "member_a": len(got_a),
        "member_b": len(got_b),
        "to_both": sorted(both),
        "to_neither": sorted(set(sent) - set(got_a) - set(got_b)),
        "first_10_to": ["a" if p in got_a else "b" if p in got_b else "-" for p in sent[:10]],
        "after_b_left_published": len(sent2),
        "after_b_left_to_a": len(set(after_a) & set(sent2)),
        "unacked_published": len(sent3),
        "unacked_c_before_vanish": len(c_before),
        "unacked_d_held": len(d_held),
        "unacked_redelivered_to_c": len(set(d_held) & set(c_after)),
        "unacked_c_after_vanish": len(c_after),
        "unacked_never_acked_by_anyone": sorted(set(sent3) - reached, key=lambda s: int(s[2:])),
        "persistent_member_held": f_held,
        "persistent_member_held_redelivered_to_other": sorted(set(f_held) & set(e_before + e_after)),
        "persistent_member_offline_published": sent4[10:],
        "other_member_got_while_offline": e_after,
        "persistent_member_session_present": f2_ack.session_present,
        "persistent_member_got_on_return": texts(f_back),
        "persistent_member_return_dup": [m.dup for m in f_back],
        "persistent_member_never_delivered": sorted(set(sent4) - delivered),
    }


def queue_limit(broker: Broker, base: str, count: int) -> Observed:
    """An offline persistent session receives more QoS 1 messages than the broker queues per client."""
    topic, cid = f"{base}/t", f"{base}-sub"
    a = broker.client()
    a.connect(cid, clean_session=False, session_expiry=SESSION_EXPIRY)
    a.subscribe(topic, 1)
    a.disconnect_cleanly()
    pub = broker.client()
    pub.connect(f"{base}-pub")
    refused_at: int | None = None
    for i in range(count):
        try:
            pub.publish(topic, str(i).encode(), qos=1)
        except Refused:  # the broker said no instead of dropping: the rest would be refused as well
            refused_at = i
            break
    published = count if refused_at is None else refused_at
    b = broker.client()
    cb = b.connect(cid, clean_session=False, session_expiry=SESSION_EXPIRY)
    got = [int(t) for t in texts(drain(b, limit=count + 10))]
    return {
        "offered": count,
        "refused_at": refused_at,
        "published": published,
        "session_present": cb.session_present,
        "received": len(got),
        "received_ranges": seq_ranges(got),
        "in_order": got == sorted(got),
        "dropped": published - len(set(got)),
    }


def queue_limit_100(broker: Broker, base: str) -> Observed:
    return queue_limit(broker, base, 150)


def queue_limit_default(broker: Broker, base: str) -> Observed:
    return queue_limit(broker, base, 1100)


# ---------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Broker, str], Observed]
    summary: Callable[[Observed], str]
    settings: dict[str, int] = field(default_factory=dict)


def _sum_persistent(o: Observed) -> str:
    return (f"session_present={o['session_present_on_reconnect']}; got {len(o['received'])} of "
            f"{len(o['published_in_order'])} ({len(o['qos0_received'])} QoS 0), in order="
            f"{o['received'] == [p for p in o['published_in_order'] if p in o['received']]}; "
            f"unacked {len(o['held_unacked_before_vanish'])} redelivered {len(o['redelivered_after_vanish'])} "
            f"dup={sorted(set(o['redelivered_dup']))}")  # fmt: skip


def _sum_takeover(o: Observed) -> str:
    fc = o["first_closed_by_broker"] or {}
    return (f"first closed: {fc.get('reason')} (DISCONNECT sent={fc.get('disconnect_packet')}); "
            f"first's will published={o['first_will_published'] is not None}; second session_present="
            f"{o['second_session_present']}, got {len(o['second_received_on_connect'])} of "
            f"{len(o['first_held_unacked'])} unacked dup={sorted(set(o['second_received_dup']))}; "
            f"clean takeover session_present={o['clean_takeover_session_present']}, second's will published="
            f"{o['second_will_published_on_clean_takeover'] is not None}")  # fmt: skip


def _sum_clean(o: Observed) -> str:
    return (f"clean reconnect session_present={o['clean_reconnect_session_present']}, got "
            f"{len(o['clean_reconnect_received'])}; old subscription gone="
            f"{not o['old_subscription_live_received']}")  # fmt: skip


def _sum_retained(o: Observed) -> str:
    def show(ms: list[dict[str, Any]]) -> str:
        return ",".join(f"{m['topic']}(q{m['qos']},r{int(m['retain'])})" for m in ms)

    return (f"exact: {show(o['new_sub_exact_qos1'])}; a/+/c: {show(o['new_sub_plus_qos1'])}; a/# q0: "
            f"{show(o['new_sub_hash_qos0'])}; live: {show(o['live_to_existing_sub'])}; after delete a/+/c: "
            f"{show(o['new_sub_plus_after_delete'])}")  # fmt: skip


def _sum_will(o: Observed) -> str:
    return (f"vanish -> will in {o['vanish_to_will_ms']} ms; clean disconnect -> will="
            f"{o['clean_disconnect_will'] is not None}; silent (keepalive {o['keepalive_s']} s) -> will in "
            f"{o['silent_to_will_ms']} ms")  # fmt: skip


def _sum_shared(o: Observed) -> str:
    return (f"100 -> a {o['member_a']}, b {o['member_b']}, both {len(o['to_both'])}, neither "
            f"{len(o['to_neither'])}; b left: {o['after_b_left_to_a']}/{o['after_b_left_published']} to a; "
            f"vanish: d held {o['unacked_d_held']} unacked, {o['unacked_redelivered_to_c']} redelivered to c, "
            f"{len(o['unacked_never_acked_by_anyone'])} lost; persistent member vanished holding "
            f"{len(o['persistent_member_held'])}: back on return {len(o['persistent_member_got_on_return'])}, "
            f"while offline {len(o['other_member_got_while_offline'])}/{len(o['persistent_member_offline_published'])}"
            f" to other")  # fmt: skip


def _sum_queue(o: Observed) -> str:
    refused = "" if o.get("refused_at") is None else f" (publish {o['refused_at']} refused, stopped there)"
    return (f"published {o['published']} of {o.get('offered', o['published'])} offline{refused}, received "
            f"{o['received']} {o['received_ranges']}, dropped {o['dropped']}")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("persistent_session_v5", persistent_session_v5, _sum_persistent),
    Scenario("persistent_session_v311", persistent_session_v311, _sum_persistent),
    Scenario("takeover", takeover, _sum_takeover),
    Scenario("clean_session_discards", clean_session_discards, _sum_clean),
    Scenario("retained", retained, _sum_retained),
    Scenario("will", will, _sum_will),
    Scenario("shared_subscription", shared_subscription, _sum_shared),
    Scenario("queue_limit_100", queue_limit_100, _sum_queue, {"max_queued_messages": 100}),
    Scenario("queue_limit_default", queue_limit_default, _sum_queue),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def run_scenario(broker: Broker, scenario: Scenario) -> Observed:
    """Run one scenario on a fresh broker; its observations, ``{"unsupported": why}`` if the broker lacks a feature
    it needs, or ``{"error": ...}`` if it could not finish."""
    base = f"sem/{scenario.name}/{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    try:
        with broker.running(scenario.settings):
            obs = scenario.run(broker, base)
    except Unsupported as e:
        return {"unsupported": str(e)}
    except Exception as e:  # one scenario failing must not hide the others' results
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    obs["took_s"] = round(time.monotonic() - t0, 2)
    return obs


def summarize(scenario: Scenario, obs: Observed) -> str:
    if "unsupported" in obs:
        return f"UNSUPPORTED {obs['unsupported']}"
    return f"ERROR {obs['error']}" if "error" in obs else scenario.summary(obs)


TIMING_KEYS = ("took_s", "_ms")  # observations that are measurements, never equal across brokers


def compare(a: Observed, b: Observed) -> list[tuple[str, str, str, str]]:
    """Key by key: (key, a's value, b's value, mark): ``DIFF`` where they differ, ``timing`` for measurements."""
    def show(o: Observed, k: str) -> str:
        text = json.dumps(o[k], separators=(",", ":")) if k in o else "-"
        return text if len(text) <= 70 else text[:67] + "..."

    if "unsupported" in a or "unsupported" in b or "error" in a or "error" in b:
        keys = [k for k in ("unsupported", "error") if k in a or k in b]
    else:
        keys = [*a, *(k for k in b if k not in a)]
    rows = []
    for k in keys:
        timing = k == "took_s" or k.endswith("_ms")
        mark = "timing" if timing else "" if a.get(k, "-") == b.get(k, "-") else "DIFF"
        rows.append((k, show(a, k), show(b, k), mark))
    return rows


def run_all(broker: Broker, names: list[str]) -> dict[str, Observed]:
    print(f"broker: {broker.name} ({broker.version()})", flush=True)
    results: dict[str, Observed] = {}
    for name in names:
        results[name] = run_scenario(broker, BY_NAME[name])
        print(f"  {name}: {results[name].get('took_s', '-')} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    from shardmq.loadtest.compare_brokers import print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="mosquitto", choices=("mosquitto", "shardmq", "both"),
                        help="both: each scenario on mosquitto and on shardmq, then side by side")  # fmt: skip
    parser.add_argument("--only", default="", help=f"comma-separated scenarios of: {', '.join(BY_NAME)}")
    parser.add_argument("--json", type=Path, help="write every scenario's observations here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(BY_NAME)}")
    brokers = [make_broker(n) for n in (("mosquitto", "shardmq") if args.broker == "both" else (args.broker,))]
    results: dict[str, dict[str, Observed]] = {}
    versions: dict[str, str] = {}
    try:
        for broker in brokers:
            versions[broker.name] = broker.version()
            if isinstance(broker, ShardmqBroker):
                broker.start()  # once for all scenarios, outside their timings
            results[broker.name] = run_all(broker, names)
    finally:
        for broker in brokers:
            if isinstance(broker, ShardmqBroker):
                broker.stop()
    rows = [("scenario", *(b.name for b in brokers))]
    rows += [(n, *(summarize(BY_NAME[n], results[b.name][n]) for b in brokers)) for n in names]
    print_table(rows)
    if len(brokers) == 2:
        first, second = (b.name for b in brokers)
        for n in names:
            diff = compare(results[first][n], results[second][n])
            marked = sum(1 for row in diff if row[3] == "DIFF")
            print(f"\n{n}: {marked} difference(s)")
            print_table([("observation", first, second, ""), *diff])
    if args.json:
        doc = {"versions": versions, "results": results}
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    if any("error" in r for per_broker in results.values() for r in per_broker.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
