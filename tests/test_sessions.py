"""Persistent sessions on a real 3-node cluster (R=2): a client with ``clean_session=False`` subscribes on n1 and
goes away; QoS 1 messages queue at n1; it comes back through n2 (a takeover) or n1, gets each queued message once
and in order with ``session_present``; a client that vanishes without BYE; a clean connect ends the session; the
asyncio flavour.

The module starts its own cluster and stops it by pid at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.client.aio import AsyncClient
from shardmq.client.core import NOW, ClientCore, Send
from shardmq.client.green import GreenClient
from shardmq.router import codec
from shardmq.testing import LocalCluster
from tests.test_retained import drain, endpoints_of

EXPIRY = 60


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("sessions"), nodes=3, lease_ttl=2, log_level="warning")
    cluster.up(timeout=60)
    try:
        yield cluster
    finally:
        cluster.down()


def publish(endpoint: str, topic: str, count: int, prefix: str = "m") -> list[bytes]:
    payloads = [f"{prefix}{i}".encode() for i in range(count)]
    with Client([endpoint]) as pub:
        for data in payloads:
            pub.publish(topic, data, qos=1)
    return payloads


def test_persistent_needs_client_id_and_expiry() -> None:
    with pytest.raises(ValueError, match="client_id"):
        Client(["tcp://127.0.0.1:1"], clean_session=False, session_expiry=5, connect=False)
    with pytest.raises(ValueError, match="session_expiry"):
        Client(["tcp://127.0.0.1:1"], client_id="x", clean_session=False, connect=False)
    with pytest.raises(ValueError, match="session_expiry"):
        AsyncClient(["tcp://127.0.0.1:1"], client_id="x", clean_session=False, session_expiry=0)
    with pytest.raises(ValueError, match="client_id"):
        Client(["tcp://127.0.0.1:1"], client_id="a/+", clean_session=False, session_expiry=5, connect=False)
    green = GreenClient(["tcp://127.0.0.1:1"], client_id="g", clean_session=False, session_expiry=5, connect=False)
    assert green.session_present is False and green._core.clean_session is False
    green.close()


@pytest.mark.timeout(60)
def test_session_moves_to_another_node_then_vanish_and_clean(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    cid = f"dev-{p}"
    topic = f"{p}/t"
    c = Client([eps["n1"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    assert c.node == "n1" and c.session_present is False
    c.subscribe(f"{p}/#", qos=1)
    c.close()  # a DISCONNECT keeps a persistent session
    queued = publish(eps["n3"], topic, 50)
    # Through n2: the session is taken over from n1.
    c = Client([eps["n2"], eps["n1"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    assert c.node == "n2" and c.session_present is True
    got = drain(c)
    assert [m.payload for m in got] == queued  # each once, in order
    live = publish(eps["n1"], topic, 5, prefix="live")
    assert [m.payload for m in drain(c)] == live
    # The client vanishes (its socket closed without BYE, as a killed process's is): the session stays at n2.
    c._close_socket(linger=0)
    queued2 = publish(eps["n3"], topic, 10, prefix="q2-")
    c = Client([eps["n2"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    assert c.session_present is True
    assert [m.payload for m in drain(c)] == queued2  # those n2 tried to send to the gone socket again, with dup
    c.close()
    publish(eps["n3"], topic, 5, prefix="gone")
    # A clean connect ends the session wherever it is held: nothing queued comes, nothing more is routed.
    with Client([eps["n1"]], client_id=cid) as clean:
        assert clean.session_present is False
        assert drain(clean) == []
    publish(eps["n3"], topic, 3, prefix="after")
    with Client([eps["n3"]], client_id=cid, clean_session=False, session_expiry=EXPIRY) as again:
        assert again.session_present is False
        assert drain(again) == []
        again.close()
    with Client([eps["n3"]], client_id=cid):  # end it for good
        pass


@pytest.mark.timeout(60)
def test_async_client_session_moves(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    cid = f"aio-{p}"

    async def run() -> None:
        c = AsyncClient([eps["n1"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
        await c.connect()
        assert c.session_present is False
        await c.subscribe(f"{p}/#", qos=1)
        await c.close()
        queued = publish(eps["n3"], f"{p}/a", 20)
        c = AsyncClient([eps["n2"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
        await c.connect()
        assert c.node == "n2" and c.session_present is True
        got: list[bytes] = []
        while (m := await c.receive(timeout=0.5)) is not None:
            got.append(m.payload)
        assert got == queued
        await c.close()
        async with AsyncClient([eps["n2"]], client_id=cid):  # end the session
            pass

    asyncio.run(run())


def test_core_welcome_of_a_taken_over_session() -> None:
    core = ClientCore(["tcp://a", "tcp://b"], "dev-1", 5.0, 1, 0.0, None, False, 30)
    core.subscriptions = {"s/#": 1}
    core.node = core.subscribed_node = "n1"
    core.had_session = True
    core.dacks = [4, 5]
    core.inbox.append(("s/x", b"p", 1, False, 7, False))
    # Present on another node: the session moved there with its subscriptions; n1's message ids mean nothing.
    assert core.welcome({"node": "n2", "session_present": True}, "tcp://b", 0.0) is None
    assert core.session_present and core.subscribed_node == "n2" and core.interruptions == 0
    assert core.dacks == [] and core.inbox[0][4] is None
    # Not present (the holder died): subscribe again, and the gap is reported.
    plan = core.welcome({"node": "n3", "session_present": False}, "tcp://a", 0.0)
    assert plan == [{"filters": ["s/#"], "qos": 1}] and core.interruptions == 1
    # A clean client that finds a session on another node still subscribes again there (as before).
    clean = ClientCore(["tcp://a"], "c", 5.0, 1, 0.0)
    clean.subscriptions = {"s/#": 0}
    clean.subscribed_node = "n1"
    assert clean.welcome({"node": "n2", "session_present": True}, "tcp://a", 0.0) == [{"filters": ["s/#"], "qos": 0}]


def test_core_hello_header_and_taken_over() -> None:
    core = ClientCore(["tcp://a"], "dev-1", 5.0, 1, 0.0, None, False, 30)
    core.connected = True
    steps = core.hello()
    sent = steps.send(None)
    assert isinstance(sent, Send)
    header = codec.decode(sent.parts).header
    assert header["clean"] is False and header["expiry"] == 30 and header["client"] == "dev-1"
    assert steps.send(None) is NOW
    assert steps.send(100.0) is NOW
    recv = steps.send(100.0)
    assert recv.timeout == pytest.approx(5.0 + 6.0)  # a takeover may make the WELCOME wait
    end = codec.decode(codec.encode(codec.SESSION_END, {"code": codec.E_TAKEN_OVER, "reason": "on n2"}))
    assert core.handle_unsolicited(end) is None
    assert core.recovery is None  # it does not reconnect (that would take the session back)
    assert core.errors[-1].code == codec.E_TAKEN_OVER
    with pytest.raises(ShardMQError) as info:  # a client that only receives is told too, once
        core.take_message()
    assert info.value.code == codec.E_TAKEN_OVER
    assert not core.errors and core.take_message() == (None, None)


@pytest.mark.timeout(60)
def test_connected_client_is_taken_over(lc: LocalCluster) -> None:
    eps = endpoints_of(lc)
    p = uuid.uuid4().hex[:8]
    cid = f"two-{p}"
    old = Client([eps["n1"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    old.subscribe(f"{p}/#", qos=1)
    sent = publish(eps["n3"], f"{p}/t", 3)
    assert [m.payload for m in drain(old)] == sent
    new = Client([eps["n2"]], client_id=cid, clean_session=False, session_expiry=EXPIRY)
    assert new.session_present is True
    with pytest.raises(ShardMQError) as info:
        while old.receive(timeout=2.0) is not None:
            pass
    assert info.value.code == codec.E_TAKEN_OVER
    old._close_socket(linger=0)
    live = publish(eps["n3"], f"{p}/t", 3, prefix="live")
    assert [m.payload for m in drain(new)] == live
    new.close()
    with Client([eps["n2"]], client_id=cid):  # end the session
        pass
