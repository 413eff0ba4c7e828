"""Wills on a real 3-node cluster (R=2, ``--client-idle-check 1``: the will of a vanished client goes within 3 s):
a client process killed with SIGKILL has its will delivered to a subscriber on another node; a client that closes
(``close()``) has none; an asyncio client whose connection vanishes has its will delivered; kill -9 of the node
holding a client delivers its will exactly once (the session shard's primary publishes it).

The module starts its own cluster and stops it, and the client process it starts, by pid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client, Message, ShardMQError, Will
from shardmq.client.aio import AsyncClient
from shardmq.client.green import GreenClient
from shardmq.testing import LocalCluster
from tests.test_retained import drain, endpoints_of

IDLE = 1.0  # --client-idle-check: a vanished client's will goes within 3 x this of its last frame
WAIT = 3 * IDLE + 5  # what a watcher waits for a will (the bound, and room for a loaded machine)

CLIENT_SCRIPT = """
import sys, time
from shardmq.client import Client
c = Client([sys.argv[1]], client_id=sys.argv[2], will=(sys.argv[3], b"killed", 1))
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("wills"), nodes=3, lease_ttl=2, log_level="warning",
                           node_args=["--client-idle-check", str(IDLE)])  # fmt: skip
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


def test_will_argument_checked_in_every_flavour() -> None:
    c = Client(["tcp://127.0.0.1:1"], connect=False, will=("a/b", "text", 1))
    assert c._core.will == Will("a/b", b"text", 1, False)
    with pytest.raises(ShardMQError, match="invalid_topic"):
        Client(["tcp://127.0.0.1:1"], connect=False, will=("a/+", b"", 0))
    with pytest.raises(ShardMQError, match="invalid_qos"):
        AsyncClient(["tcp://127.0.0.1:1"], will=Will("a/b", b"", 2))
    with pytest.raises(ValueError, match="will must be"):
        GreenClient(["tcp://127.0.0.1:1"], connect=False, will=("a/b",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot hold a will"):
        Client(["tcp://127.0.0.1:1"], client_id="a+b", connect=False, will=("a/b", b"", 0))


def wills_for(watcher: Client, count: int, quiet: float) -> list[Message]:
    """What the watcher hears: the first ``count`` messages within ``WAIT`` s each, then until ``quiet`` s pass."""
    got: list[Message] = []
    while len(got) < count and (msg := watcher.receive(timeout=WAIT)) is not None:
        got.append(msg)
    return got + drain(watcher, quiet=quiet)


@pytest.mark.timeout(40)
def test_killed_process_has_its_will_delivered_and_a_closed_client_none(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    with Client([eps["n2"]]) as watcher:
        watcher.subscribe(f"{p}/will/#", qos=1)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, eps["n1"], f"{p}-killed", f"{p}/will/killed"],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            closed = Client([eps["n1"]], client_id=f"{p}-closed", will=Will(f"{p}/will/closed", b"closed", 1))
            closed.close()  # a clean close: its will is cleared, never published
            os.kill(proc.pid, signal.SIGKILL)  # no BYE; the kernel closes its connection
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        got = wills_for(watcher, 1, quiet=3 * IDLE + 1)  # the closed client's would be due by then too
    assert [(m.topic, m.payload, m.qos) for m in got] == [(f"{p}/will/killed", b"killed", 1)]


@pytest.mark.timeout(40)
def test_async_client_vanishes_its_will_is_delivered(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]

    async def vanish() -> None:
        c = AsyncClient([eps["n3"]], client_id=f"{p}-aio", will=(f"{p}/will/aio", "bye", 0, True))
        await c.connect()
        c._close_socket(linger=0)  # the socket closed without BYE, as a killed process's is

    with Client([eps["n1"]]) as watcher:
        watcher.subscribe(f"{p}/will/#", qos=1)
        asyncio.run(vanish())
        got = wills_for(watcher, 1, quiet=0.5)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [(f"{p}/will/aio", b"bye", 0, False)]
    with Client([eps["n2"]]) as late:  # retain honoured: stored as the topic's retained message
        late.subscribe(f"{p}/will/aio", qos=0)
        assert [(m.payload, m.retain) for m in drain(late)] == [(b"bye", True)]


@pytest.mark.timeout(60)
def test_kill_the_node_holding_the_client_will_delivered_once(lc: LocalCluster) -> None:
    """Last in the module: it kills n3."""
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    with Client([eps["n1"]]) as watcher:
        watcher.subscribe(f"{p}/will/#", qos=1)
        held = Client([eps["n3"]], client_id=f"{p}-held", will=(f"{p}/will/held", b"node died", 1))
        assert held.node == "n3"
        lc.stop_node("n3", sig=signal.SIGKILL)
        got = wills_for(watcher, 1, quiet=3.0)  # the primary publishes once n3's lease expired (2 s)
        held._close_socket(linger=0)
    assert [(m.topic, m.payload) for m in got] == [(f"{p}/will/held", b"node died")]
