"""Publish path against other brokers, all measured in one run (a script, not a test).

Workload, the same for every system: 1 publisher and 1 subscriber in separate processes, 100-byte payloads, one
topic, everything on loopback. shardmq runs as a 3-node LocalCluster with the subscriber on n1 and the publisher
on n3 (another node). Peers are run when installed (binary on PATH or in /usr/sbin, and its Python client):
nats-server (nats-py), mosquitto (paho-mqtt), redis-server (redis-py PUBLISH/SUBSCRIBE), each as a child
process on a free 127.0.0.1 port, stopped by pid at the end. ``floor`` (always run) is the same four processes
and hops as shardmq's path with none of its work (``pyzmq_floor``): what this machine gives before any broker
logic, so the distance to it is shardmq's own cost. ``shardmq-insecure`` (only when named in ``--only``) is the
same cluster started with ``--insecure``: without CURVE between the nodes, so the ratio prices peer security.

Figures per system, each repeat running every system in turn (order rotated per repeat), three repeats:
1. QoS 0 max: the publisher sends as fast as it can (``--count`` messages or ``--seconds``, whichever first);
   delivered msg/s = messages the subscriber got / (its last receive - the first send); loss = not delivered.
2. Latency: a paced publisher at half of the max that system reached in the same repeat, send time in the
   payload; p50 / p99 publish -> deliver (first 100 messages dropped as warm-up). Again at shardmq's half max
   (the median of its maxima so far) for every other system, and at one fixed rate for every system
   (``--fixed-rate``, default 1000 msg/s), so the latencies also compare at equal load.
3. QoS 1: stop-and-wait publisher (each publish waits for its ack), subscriber at QoS 1; delivered msg/s.
   shardmq and mosquitto only: core NATS and Redis pub/sub have no per-message publish ack (n/a).

"As fast as it can" is each client's fire-and-forget path, flushed at the end so nothing sent is left in a
client buffer: shardmq ``publish(qos=0)`` (the SDK batches what queues up, as nats-py does) then one request
behind it; nats-py ``publish`` then ``flush()``;
paho ``publish`` until the last one is written; redis-py ``PUBLISH`` pipelined 100 at a time (every PUBLISH
has a reply, so unpipelined it would be a round trip per message).

Medians and the ratio peer / shardmq are printed; this machine is noisy, so read ratios from one run.

Usage: ``python -m shardmq.loadtest.compare_brokers [--repeats 3] [--count 300000] [--seconds 10]
[--only shardmq,nats]``. Everything it starts is stopped by pid at the end, and its temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shardmq.loadtest import pyzmq_floor

PAYLOAD_SIZE = 100
STAMP = struct.Struct("<qq")  # sequence number, send time (time.monotonic_ns: one clock for all processes)
PAD = b"x" * (PAYLOAD_SIZE - STAMP.size)
FLAT = b"x" * PAYLOAD_SIZE
WARMUP = 100  # latency samples dropped at the start of a paced run
IDLE_NS = 2_000_000_000  # the subscriber gives up 2 s after the last message once the publisher is done
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # Debian puts nats-server and mosquitto here
SYSTEMS = ("shardmq", "shardmq-insecure", "floor", "nats", "mosquitto", "redis")
# Run only when named in --only: the same cluster started with --insecure, to price peer security (CURVE).
OPTIONAL_SYSTEMS = ("shardmq-insecure",)
PEERS = {  # system -> (server binary, Python module of its client, pip name)
    "nats": ("nats-server", "nats", "nats-py"),
    "mosquitto": ("mosquitto", "paho.mqtt.client", "paho-mqtt"),
    "redis": ("redis-server", "redis", "redis"),
}
QOS1_SYSTEMS = ("shardmq", "shardmq-insecure", "mosquitto")
NO_QOS1 = {
    "nats": "core NATS has no publish ack",
    "redis": "PUBLISH has no delivery ack",
    "floor": "no acks: it only passes frames on",
}


def stamped(seq: int) -> bytes:
    return STAMP.pack(seq, time.monotonic_ns()) + PAD


def topic_for(system: str, name: str) -> str:
    return name.replace("/", ".") if system == "nats" else name


def topic_names(spec: dict[str, Any]) -> list[str]:
    """The phase's topics: ``spec["topic"]`` itself, or K topics under it (``--topics``): ``<topic>/t<i>`` (NATS:
    ``.`` for ``/``), published to in turn and all subscribed to (exact names, no wildcard)."""
    k = spec.get("topics", 1)
    if k == 1:
        return [spec["topic"]]
    sep = "." if "." in spec["topic"] else "/"
    return [f"{spec['topic']}{sep}t{i}" for i in range(k)]


# ---------------------------------------------------------------------------------------------- subscriber side
class Tally:
    """What the subscriber counts: messages, the last receive time and (paced runs) publish -> deliver times."""

    def __init__(self, spec: dict[str, Any], expected: Any) -> None:
        self.n = 0
        self.last = 0
        self.lat: list[int] | None = [] if spec["mode"] != "max" else None
        self.limit = spec["count"]
        self.expected = expected  # shared int: -1 until the publisher reports how many it sent
        self.expected_seen = 0
        self.deadline = time.monotonic_ns() + int((spec["seconds"] + 30) * 1e9)

    def add(self, payload: bytes) -> None:
        now = time.monotonic_ns()
        self.n += 1
        self.last = now
        if self.lat is not None:
            self.lat.append(now - STAMP.unpack_from(payload)[1])

    def done(self) -> bool:
        now = time.monotonic_ns()
        if self.n >= self.limit or now > self.deadline:
            return True
        expected = self.expected.value
        if expected < 0:
            return False
        if not self.expected_seen:
            self.expected_seen = now
        return self.n >= expected or now - max(self.last, self.expected_seen) > IDLE_NS

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"received": self.n, "last_ns": self.last}
        if self.lat is not None and len(self.lat) > WARMUP:
            lat = sorted(self.lat[WARMUP:])
            out["p50_ms"] = lat[(len(lat) - 1) // 2] / 1e6
            out["p99_ms"] = lat[int((len(lat) - 1) * 0.99)] / 1e6
            out["samples"] = len(lat)
        return out


def pull_loop(get: Callable[[float], bytes | None], tally: Tally) -> None:
    """For clients read by polling: ``get(timeout)`` returns one payload or None."""
    while True:
        payload = get(0.05)
        if payload is None:
            if tally.done():
                return
            continue
        tally.add(payload)
        if tally.n & 255 == 0 and tally.done():
            return


def wait_loop(tally: Tally) -> None:
    """For clients that deliver on their own thread: check every 10 ms."""
    while not tally.done():
        time.sleep(0.01)


def sub_shardmq(info: dict[str, Any], spec: dict[str, Any], ready: Any, tally: Tally) -> None:
    from shardmq.client import Client

    with Client([info["sub_endpoint"]], timeout=10.0, credentials=info["credentials"]) as c:
        c.subscribe_many(topic_names(spec), qos=spec["qos"])
        ready.set()

        def get(timeout: float) -> bytes | None:
            msg = c.receive(timeout=timeout)
            return None if msg is None else msg.payload

        pull_loop(get, tally)


def sub_redis(info: dict[str, Any], spec: dict[str, Any], ready: Any, tally: Tally) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=info["port"])
    p = r.pubsub()
    p.subscribe(spec["topic"])
    confirm = p.get_message(timeout=10)
    if not confirm or confirm["type"] != "subscribe":
        raise RuntimeError(f"no subscribe confirmation from redis: {confirm!r}")
    ready.set()

    def get(timeout: float) -> bytes | None:
        m = p.get_message(timeout=timeout)
        return m["data"] if m and m["type"] == "message" else None

    try:
        pull_loop(get, tally)
    finally:
        p.close()
        r.close()


def sub_mosquitto(info: dict[str, Any], spec: dict[str, Any], ready: Any, tally: Tally) -> None:
    import paho.mqtt.client as mqtt

    connected, subscribed = threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.on_connect = lambda *_: connected.set()
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = lambda _c, _u, msg: tally.add(msg.payload)
    c.connect("127.0.0.1", info["port"])
    c.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("no CONNACK from mosquitto")
        c.subscribe(spec["topic"], qos=spec["qos"])
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK from mosquitto")
        ready.set()
        wait_loop(tally)
    finally:
        c.disconnect()
        c.loop_stop()


def sub_nats(info: dict[str, Any], spec: dict[str, Any], ready: Any, tally: Tally) -> None:
    import nats

    async def run() -> None:
        nc = await nats.connect(info["url"], allow_reconnect=False)
        try:

            async def on_msg(msg: Any) -> None:
                tally.add(msg.data)

            for subject in topic_names(spec):  # one subscription per subject (nats-py has no bulk subscribe)
                await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=spec["count"] + 1000)
            await nc.flush()  # the server has the subscriptions
            ready.set()
            while not tally.done():
                await asyncio.sleep(0.01)
        finally:
            await nc.close()

    asyncio.run(run())


def sub_floor(info: dict[str, Any], spec: dict[str, Any], ready: Any, tally: Tally) -> None:
    get, close = pyzmq_floor.subscribe(info, ready, PAYLOAD_SIZE)
    try:
        pull_loop(get, tally)
    finally:
        close()


SUBSCRIBERS = {
    "shardmq": sub_shardmq,
    "shardmq-insecure": sub_shardmq,
    "floor": sub_floor,
    "nats": sub_nats,
    "mosquitto": sub_mosquitto,
    "redis": sub_redis,
}


def subscriber_main(system: str, info: dict[str, Any], spec: dict[str, Any], ready: Any, expected: Any, out: Any):
    try:
        tally = Tally(spec, expected)
        SUBSCRIBERS[system](info, spec, ready, tally)
        out.put(tally.result())
    except BaseException as exc:  # the parent reports it; the run goes on with the other systems
        out.put({"error": f"subscriber: {exc!r}"})


# ---------------------------------------------------------------------------------------------- publisher side
def drive(
    spec: dict[str, Any],
    send: Callable[[bytes], None],
    send_many: Callable[[range], None],
    send_to: Callable[[str, bytes], None] | None = None,
) -> dict[str, Any]:
    """The publish loop for blocking clients. ``send_many(range)`` sends stamped messages for those numbers;
    ``send_to(topic, payload)``: QoS 0 max over ``--topics`` K > 1, each message to the next topic in turn."""
    n, mode = spec["count"], spec["mode"]
    deadline = time.monotonic() + spec["seconds"]
    i = 0
    topics = topic_names(spec)
    first = time.monotonic_ns()
    if mode == "max" and len(topics) > 1:
        assert send_to is not None
        k = len(topics)
        while i < n:
            send_to(topics[i % k], FLAT)
            i += 1
            if i & 1023 == 0 and time.monotonic() > deadline:
                break
    elif mode == "max":
        while i < n:
            send(FLAT)
            i += 1
            if i & 1023 == 0 and time.monotonic() > deadline:
                break
    elif mode == "paced":
        rate, t0 = spec["rate"], time.monotonic()
        while i < n:
            now = time.monotonic()
            if now > deadline:
                break
            due = min(n, int((now - t0) * rate) + 1)
            if due > i:
                send_many(range(i, due))
                i = due
            else:
                time.sleep(t0 + i / rate - now)
    else:  # qos1: ``send`` returns once the broker acknowledged
        while i < n and time.monotonic() < deadline:
            send(stamped(i))
            i += 1
    return {"sent": i, "first_ns": first, "last_ns": time.monotonic_ns()}


def pub_shardmq(info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from shardmq.client import Client

    topic, qos = spec["topic"], spec["qos"]
    with Client([info["pub_endpoint"]], timeout=60.0, credentials=info["credentials"]) as c:

        def send(payload: bytes) -> None:
            c.publish(topic, payload, qos=qos)

        def send_many(seqs: range) -> None:
            for i in seqs:
                c.publish(topic, stamped(i), qos=qos)

        def send_to(name: str, payload: bytes) -> None:
            c.publish(name, payload, qos=qos)

        result = drive(spec, send, send_many, send_to)
        # QoS 0 frames may still sit in the socket's queue, and close() (linger 0) would discard them. One
        # request behind them on the same connection is answered only after the node has read them all.
        c.status()
        return result


def pub_redis(info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import redis

    topic = spec["topic"]
    r = redis.Redis(host="127.0.0.1", port=info["port"])
    batch: list[bytes] = []

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for payload in batch:
            pipe.publish(topic, payload)
        pipe.execute()
        batch.clear()

    def send(payload: bytes) -> None:  # fire-and-forget for redis is a pipeline: PUBLISH replies in batches of 100
        batch.append(payload)
        if len(batch) >= 100:
            flush()

    def send_many(seqs: range) -> None:
        if len(seqs) == 1:
            r.publish(topic, stamped(seqs[0]))
            return
        pipe = r.pipeline(transaction=False)
        for i in seqs:
            pipe.publish(topic, stamped(i))
        pipe.execute()

    try:
        result = drive(spec, send, send_many)
        if batch:
            flush()
            result["last_ns"] = time.monotonic_ns()
        return result
    finally:
        r.close()


def pub_mosquitto(info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    topic, qos = spec["topic"], spec["qos"]
    connected = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_queued_messages_set(0)
    c.on_connect = lambda *_: connected.set()
    c.connect("127.0.0.1", info["port"])
    c.loop_start()
    last: list[Any] = [None]
    try:
        if not connected.wait(10):
            raise RuntimeError("no CONNACK from mosquitto")

        def send(payload: bytes) -> None:
            last[0] = c.publish(topic, payload, qos=qos)
            if qos:
                last[0].wait_for_publish(10)  # PUBACK
                if not last[0].is_published():
                    raise TimeoutError("no PUBACK within 10 s")

        def send_many(seqs: range) -> None:
            for i in seqs:
                last[0] = c.publish(topic, stamped(i), qos=qos)

        result = drive(spec, send, send_many)
        if last[0] is not None:
            last[0].wait_for_publish(30)  # QoS 0: written to the socket
            result["last_ns"] = time.monotonic_ns()
        return result
    finally:
        c.disconnect()
        c.loop_stop()


def pub_nats(info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import nats

    async def run() -> dict[str, Any]:
        nc = await nats.connect(info["url"], allow_reconnect=False)
        try:
            topic, n, mode = spec["topic"], spec["count"], spec["mode"]
            deadline = time.monotonic() + spec["seconds"]
            i = 0
            topics = topic_names(spec)
            k = len(topics)
            first = time.monotonic_ns()
            if mode == "max" and k > 1:
                while i < n:
                    await nc.publish(topics[i % k], FLAT)
                    i += 1
                    if i & 1023 == 0 and time.monotonic() > deadline:
                        break
            elif mode == "max":
                while i < n:
                    await nc.publish(topic, FLAT)
                    i += 1
                    if i & 1023 == 0 and time.monotonic() > deadline:
                        break
            else:  # paced (no QoS 1 for NATS)
                rate, t0 = spec["rate"], time.monotonic()
                while i < n:
                    now = time.monotonic()
                    if now > deadline:
                        break
                    due = min(n, int((now - t0) * rate) + 1)
                    if due > i:
                        for seq in range(i, due):
                            await nc.publish(topic, stamped(seq))
                        i = due
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))  # the flusher writes
            await nc.flush()
            return {"sent": i, "first_ns": first, "last_ns": time.monotonic_ns()}
        finally:
            await nc.close()

    return asyncio.run(run())


def pub_floor(info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    pub = pyzmq_floor.Publisher(info, spec["rate"] if spec["mode"] == "paced" else None)
    try:

        def send_many(seqs: range) -> None:
            for i in seqs:
                pub.add(stamped(i))

        return drive(spec, pub.add, send_many)
    finally:
        pub.close()


PUBLISHERS = {
    "shardmq": pub_shardmq,
    "shardmq-insecure": pub_shardmq,
    "floor": pub_floor,
    "nats": pub_nats,
    "mosquitto": pub_mosquitto,
    "redis": pub_redis,
}


def publisher_main(system: str, info: dict[str, Any], spec: dict[str, Any], out: Any) -> None:
    try:
        out.put(PUBLISHERS[system](info, spec))
    except BaseException as exc:
        out.put({"error": f"publisher: {exc!r}"})


# ---------------------------------------------------------------------------------------------- one measurement
def run_phase(ctx: Any, system: str, info: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Subscriber process first (subscribed), then the publisher process; both joined (or terminated) on return."""
    ready, expected = ctx.Event(), ctx.Value("q", -1, lock=False)
    sub_q, pub_q = ctx.Queue(), ctx.Queue()
    sub = ctx.Process(target=subscriber_main, args=(system, info, spec, ready, expected, sub_q), daemon=True)
    pub = None
    sub.start()
    try:
        while not ready.wait(0.2):
            if not sub.is_alive() or not sub_q.empty():
                return _get(sub_q, 1.0, "subscriber exited before it was subscribed")
            allowed = 60 + spec.get("topics", 1) / 1000  # subscribing to 100,000 topics takes a while
            if time.monotonic() - spec["started"] > allowed:
                return {"error": f"subscriber not subscribed within {allowed:.0f} s"}
        pub = ctx.Process(target=publisher_main, args=(system, info, spec, pub_q), daemon=True)
        pub.start()
        pub_res = _get(pub_q, spec["seconds"] + 60, "publisher gave no result")
        expected.value = pub_res.get("sent", 0)
        sub_res = _get(sub_q, spec["seconds"] + 60, "subscriber gave no result")
        if "error" in pub_res or "error" in sub_res:
            return {"error": pub_res.get("error") or sub_res.get("error")}
        return {**pub_res, **sub_res}
    finally:
        for proc in (pub, sub):
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)


def _get(q: Any, timeout: float, why: str) -> dict[str, Any]:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return {"error": why}


def delivered_rate(res: dict[str, Any]) -> float | None:
    took = (res["last_ns"] - res["first_ns"]) / 1e9
    return res["received"] / took if res.get("received") and took > 0 else None


# ---------------------------------------------------------------------------------------------- the systems
def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"not listening on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def peer(system: str, binary: str, tmp: Path, extra_conf: str = "") -> Iterator[dict[str, Any]]:
    """Start one peer server on a free loopback port; stop it by pid on exit.

    ``extra_conf``: lines appended to mosquitto's config (``mqtt_semantics`` sets queue limits per scenario).
    """
    from shardmq.testing import free_port

    work = tmp / system
    work.mkdir()
    port = free_port()
    if system == "nats":
        cmd = [binary, "-a", "127.0.0.1", "-p", str(port)]
    elif system == "mosquitto":
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}")
        cmd = [binary, "-c", str(conf)]
    else:
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(work), "--daemonize", "no"]  # fmt: skip
    log = work / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
    try:
        wait_port(port, proc, log)
        yield {"port": port, "url": f"nats://127.0.0.1:{port}", "pid": proc.pid}
    finally:
        stop(proc)


def version_of(binary: str) -> str:
    flag = "-h" if Path(binary).name == "mosquitto" else "--version"
    try:
        done = subprocess.run([binary, flag], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


# ---------------------------------------------------------------------------------------------- report
def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}x"


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def measure_system(
    ctx: Any, system: str, info: dict[str, Any], args: Any, out: dict[str, list[float]], same_rate: float | None
):
    """One repeat for one system: QoS 0 max, latency at half that max, at ``same_rate`` (shardmq's half max so
    far: every system at one load) and at the fixed rate, QoS 1."""

    def record(name: str, value: float | None) -> None:
        if value is not None:
            out.setdefault(name, []).append(value)

    def phase(label: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        slug = label.lower().replace(" ", "-")
        spec = {"topic": topic_for(system, f"bench/{slug}"), **spec}  # the same topic (shards) in every repeat
        res = run_phase(ctx, system, info, {**spec, "started": time.monotonic()})
        if "error" in res or not res.get("received"):
            print(f"{system:<10} {label:<16} FAILED: {res.get('error', 'nothing delivered')}", flush=True)
            return None
        return res

    res = phase("QoS 0 max", {"mode": "max", "count": args.count, "seconds": args.seconds, "qos": 0})
    if res is None:
        return
    top = delivered_rate(res)
    loss = 1 - res["received"] / res["sent"]
    record("max", top)
    record("loss", loss)
    print(f"{system:<10} {'QoS 0 max':<16} {fmt_rate(top):>9} msg/s delivered  ({res['received']:,} of "
          f"{res['sent']:,} sent, loss {loss:.1%})", flush=True)  # fmt: skip
    paced = [("half max", "", top / 2)] if top else []
    if system != "shardmq" and same_rate:
        paced.append(("same rate", "s", same_rate))
    if args.fixed_rate > 0:
        paced.append(("fixed rate", "f", args.fixed_rate))
    for label, key, rate in paced:
        spec = {"mode": "paced", "rate": rate, "count": args.count, "seconds": args.latency_seconds, "qos": 0}
        res = phase(f"latency {label}", spec)
        if res is None or "p99_ms" not in res:
            continue
        if not key:
            record("paced", rate)
            record("paced_got", delivered_rate(res))
            if system == "shardmq":  # its half max is the same rate
                record("s50", res["p50_ms"])
                record("s99", res["p99_ms"])
        record(f"{key or 'p'}50", res["p50_ms"])
        record(f"{key or 'p'}99", res["p99_ms"])
        print(f"{system:<10} {'latency ' + label:<16} at {rate:>9,.0f} msg/s: p50 {res['p50_ms']:.3f} ms  p99 "
              f"{res['p99_ms']:.3f} ms  ({res['received']:,} of {res['sent']:,} delivered, at "
              f"{fmt_rate(delivered_rate(res))} msg/s)", flush=True)  # fmt: skip
    if system in QOS1_SYSTEMS:
        res = phase("QoS 1", {"mode": "qos1", "count": args.qos1_count, "seconds": args.qos1_seconds, "qos": 1})
        if res is not None:
            rate = delivered_rate(res)
            record("qos1", rate)
            print(f"{system:<10} {'QoS 1':<16} {fmt_rate(rate):>9} msg/s delivered  ({res['received']:,} of "
                  f"{res['sent']:,} acked)", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- many topics
MANY_TOPIC_SYSTEMS = ("shardmq", "nats")  # the others subscribe to one topic only here
PROBE_EVERY = 0.25  # seconds between liveness probes of each shardmq node during a many-topic run
PROBE_TIMEOUT = 5.0


def probe_node(endpoint: str, credentials: str | bool) -> float:
    """A new client's HELLO then STATUS to one node, as a raw DEALER (no SDK failover): seconds until both were
    answered, PROBE_TIMEOUT when they were not."""
    import zmq

    from shardmq.client.client import use_curve
    from shardmq.client.credentials import resolve as resolve_credentials
    from shardmq.router import codec

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    use_curve(sock, resolve_credentials(credentials))
    sock.connect(endpoint)
    started = time.monotonic()
    try:
        for kind, header, reply in ((codec.HELLO, {"id": 1}, codec.WELCOME), (codec.STATUS, {"id": 2}, None)):
            sock.send_multipart(codec.encode(kind, header))
            while True:
                left = PROBE_TIMEOUT - (time.monotonic() - started)
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    return PROBE_TIMEOUT
                parts = sock.recv_multipart()
                if parts[0] == (reply or codec.STATUS_REPLY):
                    break
        return time.monotonic() - started
    finally:
        sock.close()


class Liveness:
    """Probes every node of the shardmq cluster from a thread of this process while a run goes on: the slowest
    HELLO + STATUS answer per node (the goal: none over a second)."""

    def __init__(self, endpoints: dict[str, str], credentials: str | bool) -> None:
        self.endpoints = endpoints
        self.credentials = credentials
        self.worst: dict[str, float] = {}
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_EVERY):
            for name, endpoint in self.endpoints.items():
                took = probe_node(endpoint, self.credentials)
                self.probes += 1
                self.worst[name] = max(self.worst.get(name, 0.0), took)


def many_topics(ctx: Any, infos: dict[str, dict[str, Any]], args: Any, node_endpoints: dict[str, str]) -> None:
    """QoS 0 max per topic count K (``--topics``): each message to the next of K topics, the subscriber holding
    all K (exact filters) before the publisher starts; every system per K per repeat, interleaved."""
    ks = [int(k) for k in args.topics.split(",")]
    systems = [s for s in SYSTEMS if s in infos and s in MANY_TOPIC_SYSTEMS]
    skipped = [s for s in infos if s not in MANY_TOPIC_SYSTEMS]
    if skipped:
        print(f"many topics: {', '.join(skipped)} not run (only {', '.join(MANY_TOPIC_SYSTEMS)} are)")
    rates: dict[tuple[str, int], list[float]] = {}
    losses: dict[tuple[str, int], list[float]] = {}
    worst: dict[int, dict[str, float]] = {}
    for rep in range(args.repeats):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        print(f"\n-- repeat {rep + 1}/{args.repeats} (order: {', '.join(order)})", flush=True)
        for k in ks:
            for system in order:
                spec = {"topic": topic_for(system, f"bench/k{k}"), "topics": k, "mode": "max", "count": args.count,
                        "seconds": args.seconds, "qos": 0, "started": time.monotonic()}  # fmt: skip
                probe = (
                    Liveness(node_endpoints, infos[system]["credentials"])
                    if system == "shardmq" and k > 1
                    else contextlib.nullcontext()
                )
                with probe:
                    res = run_phase(ctx, system, infos[system], spec)
                if "error" in res or not res.get("received"):
                    print(f"{system:<10} K={k:<7} FAILED: {res.get('error', 'nothing delivered')}", flush=True)
                    continue
                rate = delivered_rate(res)
                loss = 1 - res["received"] / res["sent"]
                if rate is not None:
                    rates.setdefault((system, k), []).append(rate)
                losses.setdefault((system, k), []).append(loss)
                live = ""
                if isinstance(probe, Liveness):
                    for name, took in probe.worst.items():
                        worst.setdefault(k, {})[name] = max(worst.get(k, {}).get(name, 0.0), took)
                    live = "  slowest HELLO+STATUS " + ", ".join(
                        f"{n} {t * 1000:.0f} ms" for n, t in sorted(probe.worst.items())
                    )
                print(f"{system:<10} K={k:<7} {fmt_rate(rate):>9} msg/s delivered  ({res['received']:,} of "
                      f"{res['sent']:,} sent, loss {loss:.1%}){live}", flush=True)  # fmt: skip
    print(f"\nmany topics: QoS 0 max, each message to the next of K topics, subscriber on all K; medians of "
          f"{args.repeats} repeats; ratio = shardmq / nats\n")  # fmt: skip
    header = ["K"]
    for system in systems:
        header += [f"{system} msg/s", f"{system} loss"]
    header += ["ratio", "slowest HELLO+STATUS (shardmq nodes)"]
    rows = [tuple(header)]
    for k in ks:
        row = [f"{k:,}"]
        for system in systems:
            loss = med(losses.get((system, k), []))
            row += [fmt_rate(med(rates.get((system, k), []))), "-" if loss is None else f"{loss:.1%}"]
        row.append(fmt_ratio(med(rates.get(("shardmq", k), [])), med(rates.get(("nats", k), []))))
        w = worst.get(k)
        row.append(", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(w.items())) if w else "-")
        rows.append(tuple(row))
    print_table(rows)
    for k in ks:
        s, n = med(rates.get(("shardmq", k), [])), med(rates.get(("nats", k), []))
        loss = med(losses.get(("shardmq", k), []))
        w = max(worst.get(k, {}).values(), default=None)
        if s and n:
            verdict = "met" if s >= n and loss == 0 and (w is None or w <= 1.0) else "NOT met"
            print(f"goal K={k:,}: shardmq >= nats, 0 loss, every node answers within 1 s: {verdict} "
                  f"(ratio {s / n:.3f}, loss {loss:.1%}"
                  + (f", slowest answer {w * 1000:.0f} ms)" if w is not None else ")"))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    # 300k: at 50k a run lasts a quarter of a second and measures warm-up (connections, first lookups) as much
    # as the steady rate; every system gets the same count.
    parser.add_argument("--count", type=int, default=300_000, help="messages per QoS 0 max / latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit of a QoS 0 max run")
    parser.add_argument("--latency-seconds", type=float, default=4.0, help="time limit of a paced run")
    parser.add_argument("--fixed-rate", type=float, default=1000.0, help="latency at this rate too (0: off)")
    parser.add_argument("--qos1-count", type=int, default=20_000)
    parser.add_argument("--qos1-seconds", type=float, default=4.0)
    parser.add_argument(
        "--only", default=",".join(s for s in SYSTEMS if s not in OPTIONAL_SYSTEMS),
        help="comma-separated subset of " + ",".join(SYSTEMS) + " (shardmq-insecure only when named)",
    )  # fmt: skip
    parser.add_argument(
        "--topics",
        default="",
        help="comma-separated topic counts K (e.g. 1,1000,100000): run only QoS 0 max per K, each message to the "
        "next of K topics, the subscriber on all K (shardmq and nats), with liveness probes of the shardmq nodes",
    )
    args = parser.parse_args(argv)
    wanted = [s for s in SYSTEMS if s in args.only.split(",")]
    started = time.monotonic()
    print(
        f"shardmq broker comparison  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  python {platform.python_version()}"
        f"  {platform.machine()}  {os.cpu_count()} cores"
    )
    print(
        f"workload: 1 publisher, 1 subscriber (separate processes), {PAYLOAD_SIZE}-byte payloads, loopback; "
        f"QoS 0 max: {args.count:,} msgs or {args.seconds:g} s; latency: paced at half the max and at "
        f"{args.fixed_rate:g} msg/s, {args.count:,} msgs or {args.latency_seconds:g} s; "
        f"QoS 1: {args.qos1_count:,} msgs or {args.qos1_seconds:g} s; {args.repeats} repeats, interleaved\n"
    )

    ctx = mp.get_context("spawn")
    node_endpoints: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="shardmq-compare-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        infos: dict[str, dict[str, Any]] = {}
        for system in wanted:
            if system in ("shardmq", "shardmq-insecure"):
                from shardmq.testing import LocalCluster

                insecure = system == "shardmq-insecure"
                lc = LocalCluster(tmp / system, nodes=3, log_level="warning", insecure=insecure)
                print(f"{system}: starting etcd + 3 nodes{' (--insecure)' if insecure else ''} ...", flush=True)
                stack.callback(lc.down)
                lc.up()
                assert lc.state is not None
                eps = {p.name: p.client_endpoint for p in lc.state.nodes}
                if not insecure:
                    node_endpoints = eps
                creds = lc.admin_credentials
                infos[system] = {"sub_endpoint": eps["n1"], "pub_endpoint": eps["n3"],
                                 "credentials": str(creds) if creds else False}  # fmt: skip
                print(f"{system}: 3 nodes up; subscriber on n1 {eps['n1']}, publisher on n3 {eps['n3']}")
                continue
            if system == "floor":
                infos[system] = stack.enter_context(pyzmq_floor.chain(ctx))
                print(f"floor: pyzmq publisher -> 2 forwarders (pid {infos[system]['pid']} first) -> subscriber")
                continue
            binary_name, module, pip_name = PEERS[system]
            binary = find_binary(binary_name)
            if binary is None:
                print(f"{system}: not installed ({binary_name} not found; Debian: apt-get install {binary_name})")
                continue
            if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
                print(f"{system}: not installed (Python client missing: pip install {pip_name})")
                continue
            try:
                infos[system] = stack.enter_context(peer(system, binary, tmp))
            except (RuntimeError, TimeoutError, OSError) as exc:
                print(f"{system}: could not start {binary}: {exc}")
                continue
            print(f"{system}: {version_of(binary)} pid {infos[system]['pid']} on 127.0.0.1:{infos[system]['port']}")
        if "shardmq" not in infos:
            raise SystemExit("shardmq is the baseline: run it (drop --only or include shardmq)")
        systems = [s for s in SYSTEMS if s in infos]
        figures: dict[str, dict[str, list[float]]] = {s: {} for s in systems}
        if args.topics:
            many_topics(ctx, infos, args, node_endpoints)
            print(f"(total {time.monotonic() - started:.0f} s)")
            return

        for rep in range(args.repeats):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            print(f"\n-- repeat {rep + 1}/{args.repeats} (order: {', '.join(order)})", flush=True)
            for system in order:
                shardmq_max = med(figures["shardmq"].get("max", []))
                same_rate = shardmq_max / 2 if shardmq_max else None
                measure_system(ctx, system, infos[system], args, figures[system], same_rate)

    base = {name: med(values) for name, values in figures["shardmq"].items()}
    meds = {system: {name: med(values) for name, values in figures[system].items()} for system in systems}
    print(f"\nmedians of {args.repeats} repeats; ratio = system / shardmq")
    print("\nthroughput (delivered msg/s at the subscriber; higher is better)\n")
    rows = [("system", "QoS 0 max msg/s", "ratio", "loss", "QoS 1 msg/s", "ratio")]
    for system in systems:
        f = meds[system]
        has_qos1 = system in QOS1_SYSTEMS
        rows.append((
            system,
            fmt_rate(f.get("max")),
            fmt_ratio(f.get("max"), base.get("max")),
            "-" if f.get("loss") is None else f"{f['loss']:.1%}",
            fmt_rate(f.get("qos1")) if has_qos1 else f"n/a ({NO_QOS1.get(system, '')})",
            fmt_ratio(f.get("qos1"), base.get("qos1")) if has_qos1 else "-",
        ))  # fmt: skip
    print_table(rows)
    print("\npublish -> deliver latency, ms (lower is better)\n")
    fixed = f"at {args.fixed_rate:,.0f} msg/s"
    rows = [("system", "half max msg/s", "delivered", "p50", "p99", "p99 ratio", f"p50 {fixed}", f"p99 {fixed}",
             "p99 ratio")]  # fmt: skip
    for system in systems:
        f = meds[system]
        rows.append((
            system,
            fmt_rate(f.get("paced")),
            fmt_rate(f.get("paced_got")),
            fmt_ms(f.get("p50")),
            fmt_ms(f.get("p99")),
            fmt_ratio(f.get("p99"), base.get("p99")),
            fmt_ms(f.get("f50")),
            fmt_ms(f.get("f99")),
            fmt_ratio(f.get("f99"), base.get("f99")),
        ))  # fmt: skip
    print_table(rows)
    if base.get("max"):
        print(f"\nat shardmq's half max, about {base['max'] / 2:,.0f} msg/s: every system at the same load, ms\n")
        rows = [("system", "p50", "p99", "p99 ratio")]
        for system in systems:
            f = meds[system]
            rows.append((system, fmt_ms(f.get("s50")), fmt_ms(f.get("s99")), fmt_ratio(f.get("s99"), base.get("s99"))))
        print_table(rows)
    if base.get("p99") is not None:
        verdict = "met" if base["p99"] <= 2.0 else "NOT met"
        floor = meds.get("floor", {}).get("s99")
        print(
            f"\ngoal: shardmq p99 publish -> deliver at half its max <= 2 ms: {verdict} ({base['p99']:.3f} ms"
            + (f"; the pyzmq floor at that rate: {floor:.3f} ms)" if floor is not None else ")")
        )
    if meds.get("nats", {}).get("max") and base.get("max"):
        ratio = base["max"] / meds["nats"]["max"]
        verdict = "met" if ratio >= 1 else "NOT met"
        print(
            f"\ngoal: shardmq QoS 0 delivered msg/s >= NATS (nats-py) in the same run: {verdict} "
            f"(shardmq / nats = {ratio:.3f})"
        )
    print(f"(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
