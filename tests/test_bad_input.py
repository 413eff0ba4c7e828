"""Bad input against a running node: every malformed client frame gets an ERROR frame (code + reason), is counted
under ``errors.<code>`` in the node's metrics, and the node keeps serving everyone else.

The tests speak raw zmq (a DEALER with its own routing id) so they can send what the SDK never would. Every read
has a poll timeout and every raw socket is closed with linger=0 by the fixture that made it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import zmq

from shardmq.client import Client, ShardMQError
from shardmq.client.client import use_curve
from shardmq.client.credentials import CREDENTIALS_ENV, Credentials
from shardmq.client.credentials import resolve as resolve_credentials
from shardmq.router import codec
from shardmq.testing import LocalCluster

MIB = 1024 * 1024
REPLY_TIMEOUT = 3.0


def unique() -> str:
    return uuid.uuid4().hex[:8]


def hdr(**fields: Any) -> bytes:
    """A JSON header; ``v`` defaults to the protocol's version unless given (pass v=None to leave it out)."""
    fields.setdefault("v", codec.PROTOCOL_VERSION)
    if fields["v"] is None:
        del fields["v"]
    return orjson.dumps(fields)


class Raw:
    """A raw DEALER on one node endpoint; ``reply`` skips the node's idle-probe PINGs (and answers them)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, routing_id: bytes, credentials: Credentials | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        use_curve(self.sock, credentials)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def recv(self, timeout: float = REPLY_TIMEOUT) -> list[bytes] | None:
        """The next frame within ``timeout`` seconds, or None."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()

    def reply(self, timeout: float = REPLY_TIMEOUT, skip: tuple[bytes, ...] = (b"PING",)) -> list[bytes] | None:
        """The next frame whose type is not in ``skip``, within ``timeout`` seconds; None if there is none."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            parts = self.recv(left)
            if parts is None:
                return None
            if parts[0] == b"PING":
                self.send([b"PONG", hdr(), b""])
            if parts[0] not in skip:
                return parts
        return None

    def exchange(self, parts: list[bytes], timeout: float = REPLY_TIMEOUT) -> list[bytes] | None:
        self.send(parts)
        return self.reply(timeout)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw() -> Iterator[Callable[..., Raw]]:
    """raw(endpoint, routing_id=None, secure=True) -> a connected Raw DEALER (with the suite's operator
    credentials when ``secure``: a client port's CURVE); all closed (linger=0) after the test."""
    made: list[Raw] = []
    ctx = zmq.Context.instance()

    def make(endpoint: str, routing_id: bytes | None = None, secure: bool = True) -> Raw:
        creds = resolve_credentials(None) if secure else None
        sock = Raw(ctx, endpoint, routing_id or f"raw-{unique()}".encode(), creds)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


@pytest.fixture
def plain_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's SDK clients connect without credentials (an insecure cluster's)."""
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)


@pytest.fixture(scope="module")
def insecure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster without peer security, for the peer-frame tests only: on the secure default a process that is
    no member cannot complete a handshake with the peer port (``tests/test_peer_security.py``), so its frames
    never reach the handlers whose robustness these tests check."""
    lc = LocalCluster(tmp_path_factory.mktemp("insecure"), nodes=3, log_level="warning", insecure=True)
    lc.up(timeout=90)
    try:
        yield lc
    finally:
        lc.down()


def node(cluster: LocalCluster, index: int) -> tuple[str, str]:
    """(client endpoint, peer endpoint) of node ``index``."""
    assert cluster.state is not None
    proc = cluster.state.nodes[index]
    return proc.client_endpoint, proc.peer_endpoint


def status(endpoint: str) -> dict[str, Any]:
    with Client([endpoint], timeout=5.0) as c:
        return c.status()


def metrics(endpoint: str) -> Counter[str]:
    return Counter(status(endpoint)["metrics"])


def wait_metric(endpoint: str, key: str, at_least: int, timeout: float = 5.0) -> int:
    """Poll the node until ``metrics[key] >= at_least`` (for effects of frames that get no reply)."""
    deadline = time.monotonic() + timeout
    while True:
        value = metrics(endpoint)[key]
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def assert_error(parts: list[bytes] | None, code: str, fragment: str, ref: int | None = None) -> dict[str, Any]:
    assert parts is not None, f"no reply within {REPLY_TIMEOUT}s; expected ERROR {code}"
    assert len(parts) == 3 and parts[0] == b"ERROR", f"expected an ERROR frame, got {parts!r}"
    header = orjson.loads(parts[1])
    assert header["v"] == codec.PROTOCOL_VERSION
    assert header["code"] == code, header
    assert isinstance(header["reason"], str) and fragment in header["reason"], header
    assert header.get("ref") == ref, header
    return header


def assert_node_serves(endpoint: str) -> None:
    """A normal SDK client on this node can still subscribe and receive a QoS 1 publish."""
    p = unique()
    with Client([endpoint], timeout=5.0) as sub, Client([endpoint], timeout=5.0) as pub:
        sub.subscribe(f"alive/{p}/+", qos=1)
        pub.publish(f"alive/{p}/check", b"still serving", qos=1)
        msg = sub.receive(timeout=5.0)
        assert msg is not None and (msg.topic, msg.payload) == (f"alive/{p}/check", b"still serving")


# (id, parts, code, reason fragment, ref) -- every frame is refused by the node with an ERROR.
CLIENT_CASES = [
    ("one_part", [b"PUB"], "bad_frame", "got 1", None),
    ("five_parts", [b"PUB", hdr(topic="a", qos=0), b"", b"x", b"y"], "bad_frame", "got 5", None),
    ("two_parts", [b"PING", hdr()], "bad_frame", "got 2", None),
    ("header_not_json", [b"PUB", b"{topic: a", b""], "bad_header", "not valid JSON", None),
    ("header_empty", [b"PING", b"", b""], "bad_header", "not valid JSON", None),
    ("header_json_array", [b"PUB", b'[1, "topic", "a"]', b""], "bad_header", "JSON object", None),
    ("header_json_string", [b"PING", b'"v"', b""], "bad_header", "JSON object", None),
    ("pub_without_topic", [b"PUB", hdr(id=5, qos=1), b"x"], "bad_header", "'topic'", 5),
    ("sub_without_filters", [b"SUB", hdr(id=6, qos=0), b""], "bad_header", "'filters'", 6),
    ("pub_topic_not_str", [b"PUB", hdr(id=7, topic=5, qos=1), b""], "bad_header", "'topic' of type str", 7),
    ("pub_qos_bool", [b"PUB", hdr(id=8, topic="a", qos=True), b""], "bad_header", "'qos' of type int", 8),
    ("pub_qos_float", [b"PUB", hdr(id=9, topic="a", qos=1.0), b""], "bad_header", "'qos' of type int", 9),
    ("sub_filters_str", [b"SUB", hdr(id=10, filters="a/b", qos=0), b""], "bad_header", "'filters' of type list", 10),
    ("status_id_str", [b"STATUS", hdr(id="1"), b""], "bad_header", "'id' of type int", None),
    ("dack_mid_str", [b"DACK", hdr(mids=["1"]), b""], "bad_header", "list of integers", None),
    ("dack_mid_list", [b"DACK", hdr(mids=[[1]]), b""], "bad_header", "list of integers", None),
    ("version_missing", [b"PUB", hdr(v=None, id=11, topic="a", qos=1), b""], "unsupported_version", "None", 11),
    ("version_1", [b"PUB", hdr(v=1, id=12, topic="a", qos=1), b""], "unsupported_version", "version 1", 12),
    ("version_str", [b"PING", hdr(v="1", id=13), b""], "unsupported_version", "'1'", 13),
    ("version_float", [b"PING", hdr(v=3.0, id=14), b""], "unsupported_version", "3.0", 14),
    ("version_bool", [b"PING", hdr(v=True, id=15), b""], "unsupported_version", "True", 15),
    ("unknown_type", [b"NOPE", hdr(id=42), b""], "unknown_type", "'NOPE'", 42),
    ("empty_type", [b"", hdr(id=43), b""], "unknown_type", "unknown frame type", 43),
    ("binary_type", [b"\xff\x00\xfe", hdr(id=44), b""], "unknown_type", "unknown frame type", 44),
    (
        "peer_type_fwd_on_client_socket",
        [b"FWD", hdr(id=45, topic="a", qos=0), b"x"],
        "unknown_type",
        "'FWD'",
        45,
    ),
    (
        "peer_type_route_add_on_client_socket",
        [b"ROUTE_ADD", hdr(id=46, node="n1", routes=[[-1, "#"]]), b""],
        "unknown_type",
        "'ROUTE_ADD'",
        46,
    ),
    ("server_type_error_on_client_socket", [b"ERROR", hdr(code="x", reason="y"), b""], "unknown_type", "ERROR", None),
    ("invalid_utf8_header", [b"PUB", b'{"v":2,"topic":"\xff\xfe","qos":1}', b""], "invalid_utf8", "UTF-8", None),
    ("invalid_utf8_bare", [b"PING", b"\xc3\x28\xa0\xa1", b""], "invalid_utf8", "UTF-8", None),
    ("surrogate_utf8", [b"PING", b'{"v":2,"x":"\xed\xa0\x80"}', b""], "invalid_utf8", "UTF-8", None),
    (
        "payload_1mib_plus_1",
        [b"PUB", hdr(id=47, topic="big", qos=1), b"x" * (MIB + 1)],
        "payload_too_large",
        "1048577",
        47,
    ),
    ("topic_wildcard_plus", [b"PUB", hdr(id=48, topic="a/+", qos=1), b""], "invalid_topic", "wildcard '+'", 48),
    ("topic_wildcard_hash", [b"PUB", hdr(id=49, topic="a/#", qos=1), b""], "invalid_topic", "wildcard '#'", 49),
    ("topic_empty", [b"PUB", hdr(id=50, topic="", qos=1), b""], "invalid_topic", "empty", 50),
    ("topic_nul", [b"PUB", hdr(id=51, topic="a\u0000b", qos=1), b""], "invalid_topic", "U+0000", 51),
    ("topic_too_long", [b"PUB", hdr(id=52, topic="t" * 65536, qos=1), b""], "invalid_topic", "65535", 52),
    ("pub_qos_2", [b"PUB", hdr(id=53, topic="a", qos=2), b""], "invalid_qos", "got 2", 53),
    ("pub_qos_negative", [b"PUB", hdr(id=54, topic="a", qos=-1), b""], "invalid_qos", "got -1", 54),
    ("sub_qos_2", [b"SUB", hdr(id=55, filters=["a/b"], qos=2), b""], "invalid_qos", "got 2", 55),
    ("pubs_sizes_short", [b"PUBS", hdr(items=[["a", 0, None]], sizes=[2]), b"x"], "bad_frame", "2 bytes", None),
    ("pubs_sizes_count", [b"PUBS", hdr(items=[["a", 0, None]], sizes=[]), b""], "bad_frame", "0 sizes", None),
    ("pubs_item_shape", [b"PUBS", hdr(items=[["a", 0]], sizes=[0]), b""], "bad_header", "id:int|null", None),
    ("pubs_item_qos_2", [b"PUBS", hdr(items=[["a", 2, 1]], sizes=[0]), b""], "bad_header", "id:int|null", None),
    ("pubs_item_retain_int", [b"PUBS", hdr(items=[["a", 0, None, 1]], sizes=[0]), b""], "bad_header", "retain:bool",
     None),
    ("pub_retain_str", [b"PUB", hdr(id=46, topic="a", qos=1, retain="yes"), b""], "bad_header",
     "'retain' must be true or false", 46),
    ("pubs_bad_topic", [b"PUBS", hdr(items=[["a/#", 1, 56]], sizes=[1]), b"x"], "invalid_topic", "'#'", 56),
    ("pubs_counts_zero", [b"PUBS", hdr(items=[["a", 0, None]], sizes=[1], counts=[0]), b"x"], "bad_header",
     "positive integers", None),
    ("pubs_counts_sum", [b"PUBS", hdr(items=[["a", 0, None]], sizes=[1, 1], counts=[3]), b"xy"], "bad_frame",
     "add up to the number of sizes", None),
    ("pubs_run_qos1", [b"PUBS", hdr(id=57, items=[["a", 1, 57]], sizes=[1, 1], counts=[2]), b"xy"], "bad_frame",
     "acks are per message", 57),
]  # fmt: skip


@pytest.mark.parametrize(
    ("parts", "code", "fragment", "ref", "index"),
    [
        pytest.param(parts, code, frag, ref, i % 3, id=name)
        for i, (name, parts, code, frag, ref) in enumerate(CLIENT_CASES)
    ],
)
def test_bad_client_frame_is_refused_counted_and_node_serves(
    cluster: LocalCluster,
    raw: Callable[..., Raw],
    parts: list[bytes],
    code: str,
    fragment: str,
    ref: int | None,
    index: int,
) -> None:
    endpoint, _ = node(cluster, index)
    key = f"errors.{code}"
    before = metrics(endpoint)
    sock = raw(endpoint)
    assert_error(sock.exchange(parts), code, fragment, ref)
    after = metrics(endpoint)
    assert after[key] - before[key] == 1, f"{key}: {before[key]} -> {after[key]}"
    assert after["errors.internal"] == before["errors.internal"]
    assert sock.reply(timeout=0.3) is None  # exactly one answer
    # the same connection is still usable after its bad frame
    sock.send([b"PING", hdr(id=99), b""])
    pong = sock.reply()
    assert pong is not None and pong[0] == b"PONG" and orjson.loads(pong[1])["id"] == 99
    assert_node_serves(endpoint)


def test_pub_topic_error_for_qos0_is_still_reported(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    endpoint, _ = node(cluster, 0)
    before = metrics(endpoint)["errors.invalid_topic"]
    assert_error(raw(endpoint).exchange([b"PUB", hdr(topic="x/#", qos=0), b""]), "invalid_topic", "wildcard")
    assert metrics(endpoint)["errors.invalid_topic"] == before + 1


def test_payload_limit_is_exactly_one_mib(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    endpoint, _ = node(cluster, 1)
    topic = f"big/{unique()}"
    with Client([endpoint], timeout=5.0) as sub:
        sub.subscribe(topic, qos=1)
        sock = raw(endpoint)
        before = metrics(endpoint)
        # exactly the limit: accepted, acked and delivered intact
        payload = bytes(range(256)) * (MIB // 256)
        ack = sock.exchange([b"PUB", hdr(id=1, topic=topic, qos=1), payload], timeout=10.0)
        assert ack is not None and ack[0] == b"PUBACK" and orjson.loads(ack[1])["ids"] == [1], ack
        msg = sub.receive(timeout=5.0)
        assert msg is not None and msg.topic == topic and msg.payload == payload
        # one byte more: refused with payload_too_large, counted once, nothing delivered
        reply = sock.exchange([b"PUB", hdr(id=2, topic=topic, qos=1), payload + b"!"], timeout=10.0)
        assert_error(reply, "payload_too_large", f"payload is {MIB + 1} bytes, the limit is {MIB}", ref=2)
        after = metrics(endpoint)
        assert after["errors.payload_too_large"] - before["errors.payload_too_large"] == 1
        assert sub.receive(timeout=0.5) is None
    assert_node_serves(endpoint)


def test_sub_mixed_filters_grants_valid_and_refuses_invalid(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    endpoint, _ = node(cluster, 2)
    p = unique()
    filters = [f"ok/{p}", "a/#/b", "a+", f"ok/{p}/+", 7]
    sock = raw(endpoint)
    before = metrics(endpoint)
    reply = sock.exchange([b"SUB", hdr(id=21, filters=filters, qos=1), b""])
    assert reply is not None and reply[0] == b"SUBACK", reply
    header = orjson.loads(reply[1])
    assert header["id"] == 21
    results = header["results"]
    assert len(results) == len(filters)
    assert results[0] == 1 and results[3] == 1
    for i, (filt, fragment) in {1: ("a/#/b", "last level"), 2: ("a+", "whole level"), 4: (None, "string")}.items():
        assert isinstance(results[i], dict), results
        assert results[i]["code"] == "invalid_filter" and results[i]["filter"] == filt
        assert fragment in results[i]["reason"], results[i]
    after = metrics(endpoint)
    assert after["errors.invalid_filter"] - before["errors.invalid_filter"] == 3  # one per refused filter
    assert after["subscriptions"] - before["subscriptions"] == 2
    # the granted filters really route: publishes from another node reach the raw subscriber
    other, _ = node(cluster, 0)
    with Client([other], timeout=5.0) as pub:
        pub.publish(f"ok/{p}", b"one", qos=1)
        pub.publish(f"ok/{p}/x", b"two", qos=1)
    got = []
    for _ in range(2):
        msg = sock.reply(skip=(b"PING",))
        assert msg is not None and msg[0] == b"MSG", msg
        h = orjson.loads(msg[1])
        got.append((h["topic"], msg[2]))
        sock.send([b"DACK", hdr(mids=[h["mid"]]), b""])
    assert sorted(got) == [(f"ok/{p}", b"one"), (f"ok/{p}/x", b"two")]
    unsub = sock.exchange([b"UNSUB", hdr(id=22, filters=[f"ok/{p}", f"ok/{p}/+"]), b""])
    assert unsub is not None and unsub[0] == b"UNSUBACK"
    sock.send([b"BYE", hdr(), b""])
    assert_node_serves(endpoint)


def test_dack_with_unhashable_mid_is_refused(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    """A DACK whose ``mids`` holds a non-integer while a message is in flight: ERROR bad_header, not a crash.

    Regression: before the codec checked list items (``codec.LIST_ITEMS``), ``_on_dack`` called
    ``session.inflight.pop([mid], None)``, raised TypeError (unhashable) once the session had a message in flight,
    and the frame ended as ``errors.internal`` with no ERROR to the client.
    """
    endpoint, _ = node(cluster, 0)
    topic = f"dack/{unique()}"
    sock = raw(endpoint)
    ack = sock.exchange([b"SUB", hdr(id=1, filters=[topic], qos=1), b""])
    assert ack is not None and ack[0] == b"SUBACK"
    with Client([endpoint], timeout=5.0) as pub:
        pub.publish(topic, b"x", qos=1)
    msg = sock.reply(skip=(b"PING",))
    assert msg is not None and msg[0] == b"MSG"
    mid = orjson.loads(msg[1])["mid"]
    before = metrics(endpoint)
    try:
        sock.send([b"DACK", hdr(mids=[[mid]]), b""])
        reply = sock.reply(timeout=2.0, skip=(b"PING", b"MSG"))  # ignore redeliveries of the unacked message
        after = metrics(endpoint)
        internal = after["errors.internal"] - before["errors.internal"]
        assert reply is not None and reply[0] == b"ERROR", (
            f"DACK with mids=[[{mid}]] got no ERROR frame (reply {reply!r}); "
            f"errors.internal went up by {internal} -- the handler crashed on an unhashable mid"
        )
        assert orjson.loads(reply[1])["code"] == "bad_header"
        assert after["errors.bad_header"] - before["errors.bad_header"] == 1
        assert internal == 0
    finally:
        sock.send([b"DACK", hdr(mids=[mid]), b""])
        sock.send([b"UNSUB", hdr(id=2, filters=[topic]), b""])
        sock.reply(skip=(b"PING", b"MSG", b"ERROR"))  # UNSUBACK
        sock.send([b"BYE", hdr(), b""])
    assert_node_serves(endpoint)


def test_vanished_client_is_dropped_and_publishes_still_acked(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    endpoint, _ = node(cluster, 1)
    topic = f"vanish/{unique()}"
    sock = raw(endpoint)
    ack = sock.exchange([b"SUB", hdr(id=1, filters=[topic], qos=1), b""])
    assert ack is not None and ack[0] == b"SUBACK"
    before = metrics(endpoint)
    sock.close()  # vanish: no BYE, no DACK
    with Client([endpoint], timeout=5.0) as pub:
        for i in range(5):
            pub.publish(topic, b"%d" % i, qos=1)  # raises ShardMQError unless acked
    gone = wait_metric(endpoint, "clients.vanished", before["clients.vanished"] + 1, timeout=15.0)
    assert gone >= before["clients.vanished"] + 1
    assert (
        wait_metric(endpoint, "clients.disconnected", before["clients.disconnected"] + 1, timeout=5.0)
        > (before["clients.disconnected"])
    )
    assert_node_serves(endpoint)


# ---------------------------------------------------------------------------------------------- peer channel

PEER_CASES = [
    ("one_part", [b"garbage"], "bad_frame"),
    ("four_parts", [b"FWD", hdr(), b"", b""], "bad_frame"),
    ("header_not_json", [b"FWD", b"not json", b""], "bad_header"),
    ("header_array", [b"LOOKUP", b"[]", b""], "bad_header"),
    ("missing_fields", [b"FWD", hdr(id=1), b"x"], "bad_header"),
    ("wrong_field_type", [b"ROUTE_ADD", hdr(id=1, node="ghost", routes="#"), b""], "bad_header"),
    ("route_items_short", [b"ROUTE_ADD", hdr(id=1, node="ghost", routes=[[-1]]), b""], "bad_header"),
    ("route_items_str", [b"ROUTE_DEL", hdr(id=1, node="ghost", routes=["xy"]), b""], "bad_header"),
    ("invalid_utf8", [b"LOOKUP", b'{"v":2,"topic":"\xff"}', b""], "invalid_utf8"),
    ("version_1", [b"FWD", hdr(v=1, id=1), b""], "unsupported_version"),
    ("unknown_type", [b"NOPE", hdr(id=1), b""], "unknown_type"),
    ("client_type_on_peer_socket", [b"PUB", hdr(id=1, topic="a", qos=1), b""], "unknown_type"),
    ("too_large", [b"FWD", hdr(id=1, topic="a", qos=0), b"x" * (MIB + 1)], "payload_too_large"),
]


@pytest.mark.parametrize(
    ("parts", "code", "index"),
    [pytest.param(parts, code, i % 3, id=name) for i, (name, parts, code) in enumerate(PEER_CASES)],
)
def test_garbage_from_unknown_peer_is_counted_and_node_serves(
    plain_clients: None,
    insecure_cluster: LocalCluster, raw: Callable[..., Raw], parts: list[bytes], code: str, index: int
) -> None:
    endpoint, peer_endpoint = node(insecure_cluster, index)
    key = f"errors.{code}"
    before = metrics(endpoint)[key]
    ghost = raw(peer_endpoint, routing_id=b"ghost", secure=False)
    ghost.send(parts)
    assert wait_metric(endpoint, key, before + 1) == before + 1
    # an unknown peer cannot be addressed (the node answers peers through its own DEALERs): no reply, no crash
    reply = ghost.recv(timeout=0.3)
    assert reply is None or reply[0] == b"ERROR", reply
    after = metrics(endpoint)
    assert after[key] == before + 1
    assert_node_serves(endpoint)


def test_route_add_from_non_member_peer_does_not_break_publishes(
    plain_clients: None,
    insecure_cluster: LocalCluster, raw: Callable[..., Raw]
) -> None:
    """A well-formed ROUTE_ADD from a routing id that is no cluster member must not break other clients' publishes.

    Earlier revisions applied it and then FWDed every matching QoS 1 publish to 'ghost' (held, never acked), so
    the publish failed with ``timeout``. The route table must not change either: any process that can reach the
    peer port could otherwise grow it without bound and make ``status()`` report routes that do not exist.
    The frame uses the current wire shape of route items
    ``[shard, shard_epoch, filter]``; the test checks it was decoded, so a format change cannot make it pass vacuously.
    """
    endpoint, peer_endpoint = node(insecure_cluster, 0)
    p = unique()
    route = [-1, 0, f"+/ghost-{p}"]  # a root-set filter: matched on every publish this node handles
    ghost = raw(peer_endpoint, routing_id=b"ghost", secure=False)
    before = status(endpoint)
    counts = Counter(before["metrics"])
    ghost.send([b"ROUTE_ADD", hdr(id=1, node="ghost", routes=[route]), b""])
    ghost.send([b"sync"])  # refused after the ROUTE_ADD was handled (same socket, in order): wait for it
    assert wait_metric(endpoint, "errors.bad_frame", counts["errors.bad_frame"] + 1) >= counts["errors.bad_frame"] + 1
    try:
        after = status(endpoint)
        refused_as_malformed = Counter(after["metrics"])["errors.bad_header"] - counts["errors.bad_header"]
        assert refused_as_malformed == 0, "test out of date: the node refused the ROUTE_ADD's shape (bad_header)"
        error: Exception | None = None
        started = time.monotonic()
        with Client([endpoint], timeout=8.0) as pub:  # longer than the node's request_timeout (5 s)
            try:
                pub.publish(f"x/ghost-{p}", b"x", qos=1)
            except (ShardMQError, TimeoutError) as exc:
                error = exc
        took = time.monotonic() - started
        assert error is None, f"a good client's QoS 1 publish failed after {took:.1f}s: {error!r}"
        counted = {
            k: v - counts[k]
            for k, v in after["metrics"].items()
            if k.startswith("errors.") and k != "errors.bad_frame" and v != counts[k]
        }
        assert sum(counted.values()) == 1, f"the refused ROUTE_ADD must be counted once under errors.*: {counted}"
        assert after["root_set_size"] == before["root_set_size"] and after["routes"] == before["routes"], (
            "BUG protocol/node.py on_peer_parts -> owner.apply_route_items: a ROUTE_ADD from non-member "
            f"'ghost' was applied (root_set_size {before['root_set_size']} -> {after['root_set_size']}, routes "
            f"{before['routes']} -> {after['routes']}); a non-member must not change the route table"
        )
    finally:  # take a ghost route out again so later tests on this node are not affected
        ghost.send([b"ROUTE_DEL", hdr(id=2, node="ghost", routes=[route]), b""])
        ghost.send([b"sync"])
        wait_metric(endpoint, "errors.bad_frame", counts["errors.bad_frame"] + 2)
    assert_node_serves(endpoint)


# ---------------------------------------------------------------------------------------------- burst

BURST_TEMPLATES: list[tuple[list[bytes], str]] = [
    ([b"PUB"], "bad_frame"),
    ([b"PUB", b"{oops", b""], "bad_header"),
    ([b"NOPE", hdr(), b""], "unknown_type"),
    ([b"PUB", hdr(v=7, topic="a", qos=1), b""], "unsupported_version"),
    ([b"PUB", b"\xff\xff\xff", b""], "invalid_utf8"),
]


def test_burst_of_bad_frames_does_not_disturb_good_client(cluster: LocalCluster, raw: Callable[..., Raw]) -> None:
    endpoint, _ = node(cluster, 2)
    other, _ = node(cluster, 0)
    p = unique()
    before = metrics(endpoint)
    bad = raw(endpoint)
    sent: Counter[str] = Counter()
    started = time.monotonic()
    with Client([other], timeout=5.0) as sub, Client([endpoint], timeout=5.0) as good:
        sub.subscribe(f"burst/{p}/#", qos=1)
        acked = 0
        for i in range(200):
            parts, code = BURST_TEMPLATES[i % len(BURST_TEMPLATES)]
            bad.send(parts)
            sent[code] += 1
            if i % 10 == 0:
                good.publish(f"burst/{p}/{i % 3}", b"%d" % i, qos=1)  # raises unless PUBACKed
                acked += 1
        assert acked == 20
        got = []
        while (msg := sub.receive(timeout=1.0)) is not None:
            got.append(int(msg.payload))
        assert sorted(got) == list(range(0, 200, 10))
    codes: Counter[str] = Counter()
    deadline = time.monotonic() + 10
    while sum(codes.values()) < 200 and time.monotonic() < deadline:
        parts = bad.reply(timeout=max(0.0, deadline - time.monotonic()))
        if parts is None:
            break
        assert parts[0] == b"ERROR"
        codes[orjson.loads(parts[1])["code"]] += 1
    assert codes == sent
    after = metrics(endpoint)
    for code, n in sent.items():
        assert after[f"errors.{code}"] - before[f"errors.{code}"] == n, code
    assert after["errors.internal"] == before["errors.internal"]
    assert time.monotonic() - started < 30
    assert_node_serves(endpoint)
