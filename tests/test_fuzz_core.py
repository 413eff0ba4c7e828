"""Fuzzing the codec and every node handler through the protocol core (hypothesis; bounded, part of the suite).

The codec gets arbitrary multipart byte frames and structured-but-wrong headers: ``decode`` returns a Frame or
raises ProtocolError, and valid frames round-trip. The core (a node of a settled 3-node ``Sim``) gets frames of
every type, client and peer, built from a valid seed per type (``shardmq.testing.fuzzing.SEEDS``) with fields
replaced by type confusion, out-of-range shards, negative and huge epochs and ids, unknown node names, filters
with wildcards in the wrong places, oversized payloads, missing and extra keys; sent as a client, as a member
peer, as the node itself and as a stranger. The oracles are in ``CoreTarget`` (no exception out of the core,
every ERROR and every refused frame counted, the cluster still settles and delivers afterwards).

Longer runs (atheris when installed): ``python -m shardmq.loadtest.fuzz --target core --seconds 60``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardmq.router import codec
from shardmq.router.codec import Frame
from shardmq.testing.fuzzing import SEEDS, CoreTarget, check_codec, header_bytes

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))  # the suite's bound; raise it for a longer local run
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MISSING = object()  # a field left out
MAX_PAYLOAD = codec.DEFAULT_MAX_PAYLOAD

# ---------------------------------------------------------------------------------------------- values
INTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 15, 16, 17, -1, -2**63, 2**63 - 1, 2**64 - 1, 2**64, 2**80, -2**80]),
    st.integers(min_value=-5, max_value=40),
    st.integers(),
)
NAMES = st.one_of(
    st.sampled_from(["n0", "n1", "n2", "ghost", "", "n1 ", "N1", "n1\x00", "\ud800"]), st.text(max_size=8)
)
FILTERS = st.one_of(
    st.sampled_from(["a/b", "a/+", "#", "+", "a/#", "a/#/b", "#/a", "a+/b", "a/b#", "+a", "", "/", "a//b", "$SYS/#",
                     "a/\x00", "a" * 300, "/".join("+" * 60)]),
    st.text(alphabet="ab/+#$\x00", max_size=12),
)  # fmt: skip
JUNK = st.recursive(
    st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
QOS = st.one_of(st.sampled_from([0, 1]), INTS)


def lists_of(item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(item, max_size=5)


# Values of the right JSON type with the wrong content: they get past the codec to the handler.
WILD: dict[str, st.SearchStrategy[Any]] = {
    "id": INTS, "shard": INTS, "shard_epoch": INTS, "qos": QOS, "count": INTS, "member_rev": INTS, "mid": INTS,
    "topic": FILTERS, "node": NAMES, "coordinator": NAMES, "code": st.text(max_size=12), "reason": st.text(max_size=12),
    "filters": lists_of(st.one_of(FILTERS, JUNK)),
    "nodes": lists_of(NAMES), "targets": lists_of(NAMES),
    "shards": lists_of(st.integers(min_value=0)), "mids": lists_of(INTS), "ids": lists_of(INTS),
    "sizes": lists_of(st.integers(min_value=0, max_value=8)),
    "counts": st.one_of(lists_of(st.integers(min_value=1, max_value=4)), JUNK),
    "last": st.booleans(), "detail": st.one_of(st.booleans(), JUNK), "fwd": st.one_of(st.booleans(), JUNK),
    "stale": st.one_of(lists_of(st.lists(INTS, min_size=2, max_size=2)), JUNK),
    "member_revs": st.one_of(st.dictionaries(NAMES, st.one_of(INTS, JUNK), max_size=3), JUNK),
    "ref": st.one_of(INTS, JUNK), "move_id": st.one_of(INTS, JUNK),
    "session_present": JUNK, "results": lists_of(JUNK), "status": st.dictionaries(st.text(max_size=4), JUNK),
}  # fmt: skip
# List fields whose items the codec checks for shape: right shape, wild content.
WILD_ITEMS: dict[tuple[bytes, str], st.SearchStrategy[Any]] = {
    (codec.ROUTE_ADD, "routes"): lists_of(st.tuples(INTS, INTS, FILTERS).map(list)),
    (codec.ROUTE_DEL, "routes"): lists_of(st.tuples(INTS, INTS, FILTERS).map(list)),
    (codec.SNAPSHOT, "routes"): lists_of(st.tuples(FILTERS, lists_of(NAMES)).map(list)),
    (codec.PUBS, "items"): lists_of(st.tuples(FILTERS, st.sampled_from([0, 1]), st.one_of(st.none(), INTS)).map(list)),
    (codec.FWDS, "items"): lists_of(st.tuples(INTS, FILTERS, st.sampled_from([0, 1])).map(list)),
    (codec.MSGS, "items"): lists_of(st.tuples(FILTERS, st.sampled_from([0, 1]), st.one_of(st.none(), INTS)).map(list)),
}
EXTRA_KEYS = st.dictionaries(st.sampled_from(["id", "v", "fwd", "ref", "move_id", "counts", "member_rev", "detail",
                                              "zz", ""]), JUNK, max_size=2)  # fmt: skip


def field_values(frame_type: bytes, name: str, valid: Any) -> st.SearchStrategy[Any]:
    wild = WILD_ITEMS.get((frame_type, name), WILD.get(name, JUNK))
    if name not in codec.FRAME_FIELDS[frame_type]:  # optional: its absence is a path of its own (ERROR's move_id)
        return st.one_of(st.just(MISSING), st.just(valid), wild, JUNK)
    return st.one_of(st.just(valid), wild, wild, JUNK, st.just(MISSING))


@st.composite
def mutated_header(draw: st.DrawFn, frame_type: bytes) -> dict[str, Any]:
    seed, _ = SEEDS[frame_type]
    header: dict[str, Any] = {}
    for name in sorted({*seed, *codec.FRAME_FIELDS[frame_type]}):
        value = draw(field_values(frame_type, name, seed.get(name, MISSING)))
        if value is not MISSING:
            header[name] = value
    if draw(st.integers(0, 3)) == 0:
        header.update(draw(EXTRA_KEYS))
    header.setdefault("v", codec.PROTOCOL_VERSION)
    return header


ALL_TYPES = sorted(codec.FRAME_TYPES)
CLIENT_TYPES = sorted(codec.CLIENT_REQUESTS)
PEER_TYPES = sorted(codec.PEER_REQUESTS)
class Oversized(bytes):
    """A payload past the limit that a failing example prints as its size, not as a megabyte of x."""

    def __repr__(self) -> str:
        return f"Oversized(b'x' * {len(self)})"


PAYLOADS = st.one_of(st.binary(max_size=16), st.just(Oversized(b"x" * (MAX_PAYLOAD + 1))))


@st.composite
def mutated_frame(draw: st.DrawFn, types: list[bytes]) -> list[bytes]:
    frame_type = draw(st.sampled_from(types))
    # An unknown type carries some known type's header: type confusion past the JSON parser.
    header = draw(mutated_header(frame_type if frame_type in SEEDS else draw(st.sampled_from(ALL_TYPES))))
    raw = header_bytes(header)
    if draw(st.integers(0, 15)) == 0:
        raw = draw(st.sampled_from([raw[:-1], raw + b"\xff", b"\xff" + raw, raw.replace(b":", b":[", 1)]))
    parts = [frame_type, raw, draw(PAYLOADS)]
    if draw(st.integers(0, 31)) == 0:
        parts = draw(st.sampled_from([parts[:2], [*parts, b""], [], [b"PING"]]))
    return parts



# ---------------------------------------------------------------------------------------------- the codec
@FUZZ_SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_decode_arbitrary_parts(parts: list[bytes]) -> None:
    check_codec(parts)


@FUZZ_SETTINGS
@given(mutated_frame(ALL_TYPES + [b"NOPE", b""]))
@example([codec.PUB, b'{"v":2,"topic":"a","qos":18446744073709551616}', b""])  # past 64 bits: orjson reads a float
@example([codec.SUB, b'{"v":2,"id":1,"filters":["\xff"],"qos":1}', b""])
@example([codec.INVALIDATE, b'{"v":2,"id":true,"shards":[-1]}', b""])
def test_decode_structured_junk(parts: list[bytes]) -> None:
    check_codec(parts)


@FUZZ_SETTINGS
@given(st.sampled_from(ALL_TYPES), st.binary(max_size=32))
def test_valid_frames_round_trip(frame_type: bytes, payload: bytes) -> None:
    header, _ = SEEDS[frame_type]
    frame = codec.decode(codec.encode(frame_type, header, payload))
    assert frame == Frame(frame_type, {"v": codec.PROTOCOL_VERSION, **header}, payload)
    assert check_codec(frame.parts()) == frame


# ---------------------------------------------------------------------------------------------- the core
PEERS = st.sampled_from([b"n1", b"n2", b"n0", b"ghost", b"\xff\xfe"])  # members, itself, a stranger, not UTF-8
CLIENTS = st.sampled_from([b"fz1", b"fz2", b"\xff"])


def fed(
    frames: list[tuple[bool, bytes, list[bytes]]], fuzzed: str = "n0", rebalancing: int | None = None,
    fenced: bool = False,
) -> CoreTarget:
    target = CoreTarget(fuzzed, rebalancing=rebalancing, fenced=fenced)
    for peer, ident, parts in frames:
        target.feed(peer, ident, parts)
    target.afterwards()
    return target


def frame_from(frame_type: bytes, header: dict[str, Any], payload: bytes = b"") -> list[bytes]:
    return [frame_type, json.dumps({"v": codec.PROTOCOL_VERSION, **header}).encode(), payload]


PER_TYPE = settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 4))


@pytest.mark.parametrize("frame_type", CLIENT_TYPES, ids=bytes.decode)
@PER_TYPE
@given(data=st.data(), fuzzed=st.sampled_from(["n0", "n1"]))
def test_client_frames(frame_type: bytes, data: st.DataObject, fuzzed: str) -> None:
    """Every client handler, several frames in a row (a later one may meet state an earlier one left)."""
    frames = data.draw(st.lists(st.tuples(st.just(False), CLIENTS, mutated_frame([frame_type])), min_size=1,
                                max_size=4))  # fmt: skip
    fed(frames, fuzzed)


PRINCIPALS = st.sampled_from(["operator", "narrow", "nothing", "ghost", "", None])  # ACCESS_PRINCIPALS and strangers


@PER_TYPE
@given(data=st.data())
def test_client_frames_under_access_control(data: st.DataObject) -> None:
    """Every client handler behind the ACL check, from principals allowed everything, part, nothing, and none at
    all (a frame the shell could not name): refusals are counted and the cluster still routes afterwards."""
    frames = data.draw(st.lists(st.tuples(CLIENTS, mutated_frame(CLIENT_TYPES), PRINCIPALS), min_size=1, max_size=6))
    target = CoreTarget(access=True)
    for ident, parts, principal in frames:
        target.feed(False, ident, parts, principal)
    target.afterwards()


@pytest.mark.parametrize("frame_type", PEER_TYPES, ids=bytes.decode)
@PER_TYPE
@given(data=st.data(), fuzzed=st.sampled_from(["n0", "n1"]))
def test_peer_frames(frame_type: bytes, data: st.DataObject, fuzzed: str) -> None:
    """Every peer handler, from members, the node itself, a stranger and a routing id that is not UTF-8."""
    frames = data.draw(st.lists(st.tuples(st.just(True), PEERS, mutated_frame([frame_type])), min_size=1, max_size=4))
    fed(frames, fuzzed)


@FUZZ_SETTINGS
@given(st.lists(st.one_of(st.tuples(st.just(False), CLIENTS, mutated_frame(CLIENT_TYPES)),
                          st.tuples(st.just(True), PEERS, mutated_frame(PEER_TYPES)),
                          st.tuples(st.booleans(), PEERS | CLIENTS, mutated_frame(ALL_TYPES))),  # the wrong channel
                min_size=2, max_size=8),
       st.one_of(st.none(), st.integers(min_value=0, max_value=40)), st.booleans())
# A peer's ERROR whose ref is a list: the registry lookup raised TypeError (unhashable) out of the core.
@example([(True, b"n1", frame_from(codec.ERROR, {"code": "x", "reason": "y", "ref": [1]})),
          (True, b"n2", frame_from(codec.ERROR, {"code": "x", "reason": "y", "ref": {"a": 1}}))], None, False)
# A refused FWDS echoed its (id-less, so anything) "id" as the ERROR's ref, and the sender crashed on it.
@example([(True, b"n1", frame_from(codec.FWDS, {"items": [[1, "a/b", 1]], "sizes": [2], "id": []}, b"x")),
          (False, b"fz1", frame_from(codec.PING, {}))], 10, False)
# A SHARED_FWD to a fenced node with no member of the share: its refusal (sending it on is refused while fenced)
# was answered with an ERROR but not counted.
@example([(True, b"n1", frame_from(codec.SHARED_FWD, {"id": 7, "topic": "a/b", "qos": 1, "share": "$share/g/a/b",
                                                      "pid": 3}, b"x"))], None, True)
# The root set's shard number (-1) passed the shard check of HANDOFF, SNAPSHOT and LOOKUP, and the assignment
# raised IndexError for it.
@example([(True, b"n1", frame_from(codec.HANDOFF, {"id": 1, "shard": -1, "shard_epoch": 1, "targets": ["n1"],
                                                   "coordinator": "n0"})),
          (True, b"n1", frame_from(codec.SNAPSHOT, {"id": 1, "shard": -1, "shard_epoch": 1, "routes": [["a", ["n1"]]],
                                                    "last": True, "coordinator": "n0"})),
          (True, b"n2", frame_from(codec.LOOKUP, {"id": 1, "shard": -1, "shard_epoch": 1, "topic": "a"}))], None, True)
def test_mixed_frames(frames: list[tuple[bool, bytes, list[bytes]]], rebalancing: int | None, fenced: bool) -> None:
    """Any frames on either channel, to a quiet cluster or to one moving shards to a newcomer, to a node whose
    lease is in doubt or not."""
    fed(frames, rebalancing=rebalancing, fenced=fenced)


def test_every_seed_reaches_its_handler() -> None:
    """The seeds are valid frames: each passes the codec on its channel, so mutations start from a handler."""
    target = CoreTarget()
    for frame_type in CLIENT_TYPES:
        target.feed(False, b"seed", frame_from(frame_type, SEEDS[frame_type][0], SEEDS[frame_type][1]))
    for frame_type in PEER_TYPES:
        target.feed(True, b"n1", frame_from(frame_type, SEEDS[frame_type][0], SEEDS[frame_type][1]))
    assert target.node.core.metrics["errors.bad_header"] == 0
    target.afterwards()
