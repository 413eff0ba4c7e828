"""The wire codec: valid frames round-trip, and any other input is refused with a ProtocolError and a stable code."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.router import codec
from shardmq.router.codec import FRAME_FIELDS, FRAME_TYPES, Frame, ProtocolError

ERROR_CODES = frozenset(
    value for name, value in vars(codec).items() if name.startswith("E_") and isinstance(value, str)
)
DECODE_SETTINGS = settings(max_examples=300, deadline=None)

# JSON values orjson can write and read back unchanged (ints within 64 bits, finite floats, no surrogates).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_VALUES: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
    str: st.text(max_size=40),
    list: st.lists(json_values, max_size=5),
    dict: st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    bool: st.booleans(),
}
# A value of the wrong type for each field type; bool is the interesting one for int fields.
WRONG_VALUES: dict[type, list[Any]] = {
    int: [True, False, "1", 1.0, None, [1], {"a": 1}],
    str: [1, True, None, ["a"], {"a": "b"}],
    list: ["a", 1, None, {"a": 1}, True],
    dict: [[], "a", 1, None, True],
    bool: [1, 0, "true", None, []],
}


def valid_header(frame_type: bytes, **overrides: Any) -> dict[str, Any]:
    """A minimal header that passes validation for ``frame_type``."""
    sample = {int: 7, str: "x", list: [], dict: {}, bool: False}
    header: dict[str, Any] = {"v": codec.PROTOCOL_VERSION}
    header.update({name: sample[kind] for name, kind in FRAME_FIELDS[frame_type].items()})
    header.update(overrides)
    return header


def raw(frame_type: bytes, header: Any, payload: bytes = b"") -> list[bytes]:
    return [frame_type, orjson.dumps(header), payload]


def rejected(parts: list[bytes], **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(parts, **kwargs)
    assert info.value.code in ERROR_CODES
    assert str(info.value) == info.value.reason
    return info.value


# List fields whose items the codec checks, with a strategy for valid items.
_ROUTE_ITEMS = st.lists(
    st.tuples(st.integers(-1, 4095), st.integers(0, 2**40), st.text(max_size=20)).map(list), max_size=5
)
_NODE_IDS = st.lists(st.text(max_size=10), max_size=5)
ITEM_VALUES: dict[tuple[bytes, str], st.SearchStrategy[Any]] = {
    (codec.ROUTE_ADD, "routes"): _ROUTE_ITEMS,
    (codec.ROUTE_DEL, "routes"): _ROUTE_ITEMS,
    (codec.DACK, "mids"): st.lists(st.integers(0, 2**40), max_size=5),
    (codec.FWD_ACK, "ids"): st.lists(st.integers(0, 2**40), max_size=5),
    (codec.SHARED_DONE, "ids"): st.lists(st.integers(0, 2**40), max_size=5),
    (codec.SHARED_RELEASE, "ids"): st.lists(st.integers(0, 2**40), max_size=5),
    (codec.LOOKUP_REPLY, "nodes"): _NODE_IDS,
    (codec.HANDOFF, "targets"): _NODE_IDS,
    (codec.SNAPSHOT, "routes"): st.lists(st.tuples(st.text(max_size=20), _NODE_IDS).map(list), max_size=5),
    (codec.FWDS, "items"): st.lists(
        st.tuples(st.integers(0, 2**40), st.text(max_size=20), st.sampled_from([0, 1])).map(list), max_size=5
    ),
    (codec.FWDS, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.MSGS, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.PUBS, "items"): st.lists(
        st.tuples(st.text(max_size=20), st.sampled_from([0, 1]), st.none() | st.integers(0, 2**40)).map(list)
        | st.tuples(
            st.text(max_size=20), st.sampled_from([0, 1]), st.none() | st.integers(0, 2**40), st.booleans()
        ).map(list),
        max_size=5,
    ),
    (codec.RETAINS, "items"): st.lists(st.tuples(st.text(max_size=20), st.sampled_from([0, 1])).map(list), max_size=5),
    (codec.RETAINS, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.RETAINM, "parts"): st.lists(
        st.tuples(st.integers(0, 4095), st.integers(0, 2**40), st.integers(1, 5000)).map(list)
        | st.tuples(*[st.integers(0, 2**40)] * 2, st.integers(1, 5000), *[st.integers(0, 2**40)] * 2).map(list),
        max_size=5,
    ),
    (codec.RETAINM, "items"): st.lists(st.tuples(st.text(max_size=20), st.sampled_from([0, 1])).map(list), max_size=5),
    (codec.RETAINM, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.RETAINM_ACK, "stale"): st.lists(
        st.tuples(st.integers(0, 4095), st.integers(0, 2**40)).map(list), max_size=5
    ),
    (codec.RETAINM_ACK, "failed"): st.lists(
        st.tuples(st.integers(0, 4095), st.text(max_size=10), st.text(max_size=20)).map(list), max_size=5
    ),
    (codec.RETAINED_GET, "filters"): st.lists(st.text(max_size=20), max_size=5),
    (codec.RETAINED_REPLY, "items"): st.lists(
        st.tuples(
            st.text(max_size=20), st.sampled_from([0, 1]), st.integers(0, 4095), st.integers(0, 2**40),
            st.integers(0, 2**40),
        ).map(list),
        max_size=5,
    ),
    (codec.RETAINED_REPLY, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.SESSION_STATE, "filters"): st.lists(
        st.tuples(st.text(max_size=20), st.sampled_from([0, 1])).map(list), max_size=5
    ),
    (codec.SESSION_STATE, "items"): st.lists(
        st.tuples(
            st.text(max_size=20), st.booleans(), st.booleans(),
            st.none() | st.tuples(st.text(max_size=8), st.integers(0, 2**40)).map(list),
        ).map(list),
        max_size=5,
    ),
    (codec.SESSION_STATE, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.PUBS, "sizes"): st.lists(st.integers(0, 2**20), max_size=5),
    (codec.INVALIDATE, "shards"): st.lists(st.integers(0, 4095), max_size=5),
    (codec.LOOKUPS, "items"): st.lists(
        st.tuples(
            st.integers(0, 2**40),
            st.integers(0, 4095),
            st.integers(0, 2**40),
            st.text(max_size=20),
            st.sampled_from([0, 1]),
        ).map(list),
        max_size=5,
    ),
    (codec.LOOKUPS_REPLY, "items"): st.lists(
        st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), _NODE_IDS, st.sampled_from([0, 1])).map(list),
        max_size=5,
    ),
}


@st.composite
def valid_frames(draw: st.DrawFn, frame_type: bytes) -> tuple[dict[str, Any], bytes]:
    header = {
        name: draw(ITEM_VALUES.get((frame_type, name), FIELD_VALUES[kind]))
        for name, kind in FRAME_FIELDS[frame_type].items()
    }
    extras = draw(st.dictionaries(st.sampled_from(["mid", "dup", "ref", "epoch", "x-extra"]), json_values, max_size=3))
    for key, value in extras.items():
        header.setdefault(key, value)
    payload = draw(st.binary(max_size=256))
    return header, payload


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("frame_type", sorted(FRAME_TYPES), ids=lambda t: t.decode())
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_every_frame_type(frame_type: bytes, data: st.DataObject) -> None:
    header, payload = data.draw(valid_frames(frame_type))
    parts = codec.encode(frame_type, header, payload)
    assert len(parts) == 3 and parts[0] == frame_type and parts[2] == payload
    frame = codec.decode(parts)
    assert frame == Frame(frame_type, {"v": codec.PROTOCOL_VERSION, **header}, payload)
    assert isinstance(frame.payload, bytes)
    assert codec.decode(frame.parts()) == frame


def test_encode_fills_in_version_and_keeps_an_explicit_one() -> None:
    assert orjson.loads(codec.encode(codec.PING, {})[1]) == {"v": codec.PROTOCOL_VERSION}
    assert orjson.loads(codec.encode(codec.PING, {"v": 9})[1]) == {"v": 9}
    assert codec.encode(codec.PING, {})[2] == b""


def test_every_frame_type_has_a_field_table_and_channels_are_subsets() -> None:
    assert frozenset(FRAME_FIELDS) == FRAME_TYPES
    assert codec.CLIENT_REQUESTS <= FRAME_TYPES
    assert codec.PEER_REQUESTS <= FRAME_TYPES
    for frame_type, fields in FRAME_FIELDS.items():
        assert frame_type.isascii() and frame_type.isupper()
        assert "v" not in fields


# ---------------------------------------------------------------------------------------------- fuzz


@DECODE_SETTINGS
@given(parts=st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_decode_arbitrary_parts_raises_only_protocol_error(parts: list[bytes]) -> None:
    try:
        frame = codec.decode(parts)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert exc.ref is None or (isinstance(exc.ref, int) and not isinstance(exc.ref, bool))
    else:
        assert frame.type in FRAME_TYPES


@st.composite
def plausible_parts(draw: st.DrawFn) -> list[bytes]:
    """Three parts that get past the JSON parser: known or unknown types, headers near or far from valid."""
    frame_type = draw(st.sampled_from(sorted(FRAME_TYPES)) | st.binary(max_size=12))
    header: Any
    if draw(st.integers(0, 4)) == 0:
        header = draw(json_values)
    else:
        fields = FRAME_FIELDS.get(frame_type, {})
        header = {name: draw(FIELD_VALUES[kind] | json_values) for name, kind in fields.items()}
        header.update(draw(st.dictionaries(st.sampled_from(["id", "mid", "ref", "x"]), json_values, max_size=2)))
        header["v"] = draw(st.sampled_from([codec.PROTOCOL_VERSION] * 5 + [0, 2, True, None, "1"]))
    return [frame_type, orjson.dumps(header), draw(st.binary(max_size=64))]


@DECODE_SETTINGS
@given(parts=plausible_parts(), max_payload=st.integers(0, 80), allowed=st.sampled_from(["all", "client", "peer"]))
def test_decode_parseable_garbage_raises_only_protocol_error(
    parts: list[bytes], max_payload: int, allowed: str
) -> None:
    channel = {"all": FRAME_TYPES, "client": codec.CLIENT_REQUESTS, "peer": codec.PEER_REQUESTS}[allowed]
    try:
        frame = codec.decode(parts, max_payload=max_payload, allowed=channel)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        header = orjson.loads(parts[1])
        if exc.ref is not None:
            assert isinstance(header, dict) and header["id"] == exc.ref
    else:
        assert frame.type in channel
        assert len(frame.payload) <= max_payload
        for name, kind in FRAME_FIELDS[frame.type].items():
            assert isinstance(frame.header[name], kind)
            if kind is not bool:  # an int field never takes true/false (SNAPSHOT.last is the one bool field)
                assert not isinstance(frame.header[name], bool)


# ---------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_wrong_part_count_is_bad_frame(count: int) -> None:
    parts = raw(codec.PING, {"v": codec.PROTOCOL_VERSION}) + [b""] * 2
    exc = rejected(parts[:count])
    assert exc.code == codec.E_BAD_FRAME
    assert str(count) in exc.reason
    assert exc.ref is None


@pytest.mark.parametrize("header", [b"", b"{", b"not json", b"{'v': 2}", b'{"v": 2,}', b"\x00"])
def test_non_json_header_is_bad_header(header: bytes) -> None:
    exc = rejected([codec.PING, header, b""])
    assert exc.code == codec.E_BAD_HEADER
    assert "JSON" in exc.reason


@pytest.mark.parametrize("header", [b'{"v": 2, "x": "\xff"}', b"\xc3\x28", b'{"v": 2, "x": "\xed\xa0\x80"}'])
def test_invalid_utf8_header_is_invalid_utf8(header: bytes) -> None:
    exc = rejected([codec.PING, header, b""])
    assert exc.code == codec.E_INVALID_UTF8


@pytest.mark.parametrize("header", [[], [{"v": 2}], 1, "PING", None, True])
def test_header_that_is_not_an_object_is_bad_header(header: Any) -> None:
    exc = rejected(raw(codec.PING, header))
    assert exc.code == codec.E_BAD_HEADER
    assert "object" in exc.reason


@pytest.mark.parametrize(
    ("frame_type", "name"),
    [(t, name) for t, fields in sorted(FRAME_FIELDS.items()) for name in fields],
    ids=lambda x: x.decode() if isinstance(x, bytes) else x,
)
def test_missing_field_is_bad_header_naming_the_field(frame_type: bytes, name: str) -> None:
    header = valid_header(frame_type)
    del header[name]
    exc = rejected(raw(frame_type, header))
    assert exc.code == codec.E_BAD_HEADER
    assert repr(name) in exc.reason
    assert frame_type.decode() in exc.reason


@pytest.mark.parametrize(
    ("frame_type", "name", "value"),
    [
        (t, name, value)
        for t, fields in sorted(FRAME_FIELDS.items())
        for name, kind in fields.items()
        for value in WRONG_VALUES[kind]
    ],
)
def test_mistyped_field_is_bad_header_naming_the_field(frame_type: bytes, name: str, value: Any) -> None:
    exc = rejected(raw(frame_type, valid_header(frame_type, **{name: value})))
    assert exc.code == codec.E_BAD_HEADER
    assert repr(name) in exc.reason
    assert FRAME_FIELDS[frame_type][name].__name__ in exc.reason


@pytest.mark.parametrize("flag", [True, False])
def test_bool_is_not_an_int(flag: bool) -> None:
    exc = rejected(raw(codec.PUB, {"v": codec.PROTOCOL_VERSION, "topic": "a", "qos": flag}))
    assert exc.code == codec.E_BAD_HEADER
    assert "'qos'" in exc.reason and "int" in exc.reason


@pytest.mark.parametrize("version", [1, 2, 3, 5, 0, -1, None, "4", [4]])
def test_foreign_version_is_unsupported_version(version: Any) -> None:
    exc = rejected(raw(codec.SUB, valid_header(codec.SUB, v=version, id=41)))
    assert exc.code == codec.E_VERSION
    assert exc.ref == 41
    assert f"v={codec.PROTOCOL_VERSION}" in exc.reason


def test_missing_version_is_unsupported_version() -> None:
    header = valid_header(codec.PING)
    del header["v"]
    assert rejected(raw(codec.PING, header)).code == codec.E_VERSION


def test_version_is_checked_before_type_and_fields() -> None:
    assert rejected(raw(b"NOPE", {"v": codec.PROTOCOL_VERSION + 1})).code == codec.E_VERSION


@pytest.mark.parametrize("frame_type", [b"", b"NOPE", b"ping", b"PING ", b"\xff\xfe", b"X" * 200])
def test_unknown_type_is_unknown_type(frame_type: bytes) -> None:
    exc = rejected(raw(frame_type, {"v": codec.PROTOCOL_VERSION, "id": 5}))
    assert exc.code == codec.E_UNKNOWN_TYPE
    assert exc.ref == 5
    assert len(exc.reason) < 120  # a long type is shown cut short


@pytest.mark.parametrize(
    ("frame_type", "allowed"),
    [
        (codec.ROUTE_ADD, codec.CLIENT_REQUESTS),
        (codec.FWD, codec.CLIENT_REQUESTS),
        (codec.ERROR, codec.CLIENT_REQUESTS),
        (codec.SUB, codec.PEER_REQUESTS),
        (codec.HELLO, codec.PEER_REQUESTS),
        (codec.PING, frozenset()),
    ],
    ids=lambda x: x.decode() if isinstance(x, bytes) else str(len(x)),
)
def test_type_not_allowed_on_channel_is_unknown_type(frame_type: bytes, allowed: frozenset[bytes]) -> None:
    parts = raw(frame_type, valid_header(frame_type, id=3))
    codec.decode(parts)  # valid in itself
    exc = rejected(parts, allowed=allowed)
    assert exc.code == codec.E_UNKNOWN_TYPE
    assert exc.ref == 3


def test_client_and_peer_channels_accept_their_own_types() -> None:
    for channel in (codec.CLIENT_REQUESTS, codec.PEER_REQUESTS):
        for frame_type in channel:
            assert codec.decode(raw(frame_type, valid_header(frame_type)), allowed=channel).type == frame_type


def test_payload_limit() -> None:
    header = valid_header(codec.PUB, id=9)
    assert codec.decode(raw(codec.PUB, header, b"x" * 10), max_payload=10).payload == b"x" * 10
    exc = rejected(raw(codec.PUB, header, b"x" * 11), max_payload=10)
    assert exc.code == codec.E_TOO_LARGE
    assert exc.ref == 9
    assert "11" in exc.reason and "10" in exc.reason


def test_default_payload_limit_is_one_mebibyte() -> None:
    assert codec.DEFAULT_MAX_PAYLOAD == 1024 * 1024
    header = valid_header(codec.PUB)
    assert codec.decode(raw(codec.PUB, header, bytes(codec.DEFAULT_MAX_PAYLOAD))).type == codec.PUB
    assert rejected(raw(codec.PUB, header, bytes(codec.DEFAULT_MAX_PAYLOAD + 1))).code == codec.E_TOO_LARGE


def test_header_limit() -> None:
    parts = raw(codec.PING, {"v": codec.PROTOCOL_VERSION, "id": 4, "pad": "x" * 100})
    size = len(parts[1])
    assert codec.decode(parts, max_header=size).type == codec.PING
    exc = rejected(parts, max_header=size - 1)
    assert exc.code == codec.E_TOO_LARGE
    assert exc.ref is None  # checked before the header is parsed
    assert str(size) in exc.reason


def test_header_limit_applies_before_json_parsing() -> None:
    assert rejected([codec.PING, b"\xff" * 50, b""], max_header=10).code == codec.E_TOO_LARGE


# ---------------------------------------------------------------------------------------------- ref


@pytest.mark.parametrize(
    ("header_id", "ref"),
    [(17, 17), (0, 0), (-3, -3), (2**63 - 1, 2**63 - 1), (True, None), ("17", None), (1.0, None), (None, None)],
)
def test_ref_is_the_header_id_when_it_is_an_int(header_id: Any, ref: int | None) -> None:
    exc = rejected(raw(codec.SUB, {"v": codec.PROTOCOL_VERSION, "id": header_id, "filters": "not a list", "qos": 0}))
    assert exc.code == codec.E_BAD_HEADER
    assert exc.ref == ref


def test_no_ref_without_an_id_or_a_parseable_header() -> None:
    assert rejected(raw(codec.SUB, {"v": codec.PROTOCOL_VERSION, "filters": [], "qos": 0})).ref is None
    assert rejected([codec.SUB, b'{"id": 5', b""]).ref is None
    assert rejected(raw(codec.SUB, [{"id": 5}])).ref is None


def test_protocol_error_defaults() -> None:
    exc = ProtocolError(codec.E_TIMEOUT, "too slow")
    assert (exc.code, exc.reason, exc.ref, str(exc)) == (codec.E_TIMEOUT, "too slow", None, "too slow")


# ---------------------------------------------------------------------------------------------- error_parts


def test_error_parts_shape() -> None:
    parts = codec.error_parts(codec.E_INVALID_QOS, "qos must be 0 or 1, got 2", 12)
    assert len(parts) == 3
    assert parts[0] == codec.ERROR
    assert parts[2] == b""
    assert orjson.loads(parts[1]) == {
        "v": codec.PROTOCOL_VERSION,
        "code": codec.E_INVALID_QOS,
        "reason": "qos must be 0 or 1, got 2",
        "ref": 12,
    }
    frame = codec.decode(parts)
    assert frame.type == codec.ERROR and frame.header["ref"] == 12


def test_error_parts_without_ref_omits_it_and_keeps_extra_fields() -> None:
    header = orjson.loads(codec.error_parts(codec.E_UNAVAILABLE, "later", shard=3, epoch=5)[1])
    assert header == {
        "v": codec.PROTOCOL_VERSION,
        "code": codec.E_UNAVAILABLE,
        "reason": "later",
        "shard": 3,
        "epoch": 5,
    }
    assert "ref" not in orjson.loads(codec.error_parts(codec.E_TIMEOUT, "slow", None)[1])
    assert orjson.loads(codec.error_parts(codec.E_TIMEOUT, "slow", 0)[1])["ref"] == 0


@given(code=st.sampled_from(sorted(ERROR_CODES)), reason=st.text(max_size=50), ref=st.none() | st.integers(0, 2**62))
def test_error_parts_always_decode(code: str, reason: str, ref: int | None) -> None:
    frame = codec.decode(codec.error_parts(code, reason, ref), allowed=codec.PEER_REQUESTS)
    assert (frame.header["code"], frame.header["reason"], frame.header.get("ref")) == (code, reason, ref)


def test_error_codes_are_the_documented_set() -> None:
    assert {
        "bad_frame",
        "bad_header",
        "invalid_utf8",
        "unknown_type",
        "unsupported_version",
        "payload_too_large",
        "invalid_topic",
        "invalid_filter",
        "invalid_qos",
        "unavailable",
        "timeout",
        "not_allowed",
        "stale_epoch",
        "fenced",
        "overloaded",
        "interrupted",
        "shutdown",
        "not_authorized",
        "taken_over",
    } == ERROR_CODES


@pytest.mark.parametrize(
    ("frame_type", "field", "bad"),
    [
        (codec.ROUTE_ADD, "routes", [[1]]),
        (codec.ROUTE_ADD, "routes", [[1, "a"]]),
        (codec.ROUTE_ADD, "routes", [["1", 1, "a"]]),
        (codec.ROUTE_DEL, "routes", [[True, 1, "a"]]),
        (codec.ROUTE_ADD, "routes", [[1, 1, 2]]),
        (codec.SNAPSHOT, "routes", [["a", "n1"]]),
        (codec.HANDOFF, "targets", [None]),
        (codec.DACK, "mids", ["3"]),
        (codec.FWD_ACK, "ids", [None]),
        (codec.LOOKUP_REPLY, "nodes", [1]),
    ],
)
def test_malformed_batch_items_are_rejected_before_any_is_applied(frame_type: bytes, field: str, bad: Any) -> None:
    err = rejected(raw(frame_type, valid_header(frame_type, **{field: bad, "id": 4})))
    assert err.code == codec.E_BAD_HEADER and field in err.reason and err.ref == 4


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_version_must_be_the_integer_one(version: Any) -> None:
    assert rejected(raw(codec.PING, {"v": version})).code == codec.E_VERSION


@given(
    items=st.lists(st.tuples(st.integers(0, 2**40), st.text(max_size=10), st.sampled_from([0, 1])), max_size=8),
    data=st.data(),
)
def test_batches_round_trip_and_refuse_wrong_sizes(items: list[tuple[int, str, int]], data: st.DataObject) -> None:
    payloads = [data.draw(st.binary(max_size=30)) for _ in items]
    fields = [list(i) for i in items]
    runs = [(f, None, p) for f, p in zip(fields, payloads, strict=True)]
    frame = codec.decode(codec.encode_runs(codec.FWDS, {"epoch": 3}, runs))
    assert "counts" not in frame.header  # single-message items look exactly as before runs existed
    assert codec.split_batch(frame) == list(zip(fields, payloads, strict=True))
    if payloads:
        frame.header["sizes"][0] += 1
        with pytest.raises(ProtocolError) as info:
            codec.split_batch(frame)
        assert info.value.code == codec.E_BAD_FRAME


# ---------------------------------------------------------------------------------------------- runs
def _item(frame_type: bytes, topic: str, qos: int) -> list[Any]:
    """A valid item of each batch type with this topic and qos (ids only where QoS 1 needs them)."""
    if frame_type == codec.PUBS:
        return [topic, qos, 7 if qos else None]
    if frame_type == codec.FWDS:
        return [9 if qos else 0, topic, qos]
    return [topic, qos, 5 if qos else None, False]


_runs = st.lists(
    st.tuples(
        st.sampled_from(["a/b", "c", "a/b/c"]),
        st.sampled_from([0, 1]),
        st.lists(st.binary(max_size=12), min_size=1, max_size=5),
    ),
    max_size=8,
)


@pytest.mark.parametrize("frame_type", [codec.PUBS, codec.FWDS, codec.MSGS])
@given(runs=_runs)
def test_runs_round_trip_and_split_into_the_messages_they_stand_for(
    frame_type: bytes, runs: list[tuple[str, int, list[bytes]]]
) -> None:
    runs = [(topic, qos, payloads[:1] if qos else payloads) for topic, qos, payloads in runs]  # QoS 1: one each
    header = {"epoch": 3} if frame_type == codec.FWDS else {}
    wire = [
        (_item(frame_type, t, q), [len(p) for p in ps] if len(ps) > 1 else None, b"".join(ps)) for t, q, ps in runs
    ]
    frame = codec.decode(codec.encode_runs(frame_type, header, wire))
    assert ("counts" in frame.header) == any(len(ps) > 1 for _, _, ps in runs)
    back = codec.split_runs(frame)
    assert [(item, codec.cut(blob, sizes)) for item, sizes, blob in back] == [
        (_item(frame_type, t, q), ps) for t, q, ps in runs
    ]
    # The reference: one (item, payload) pair per message, in order.
    assert codec.split_batch(frame) == [(_item(frame_type, t, q), p) for t, q, ps in runs for p in ps]


def _run_frame(counts: Any, items: list[Any], sizes: list[int], payload: bytes) -> codec.Frame:
    header = {"v": codec.PROTOCOL_VERSION, "id": 4, "items": items, "sizes": sizes, "counts": counts}
    return codec.Frame(codec.PUBS, header, payload)


@pytest.mark.parametrize(
    ("counts", "code", "words"),
    [
        ("2", codec.E_BAD_HEADER, "positive integers"),
        ([0, 2], codec.E_BAD_HEADER, "positive integers"),
        ([-1, 3], codec.E_BAD_HEADER, "positive integers"),
        ([True, 1], codec.E_BAD_HEADER, "positive integers"),
        ([1.0, 1], codec.E_BAD_HEADER, "positive integers"),
        ([2], codec.E_BAD_FRAME, "one entry per item"),
        ([1, 1], codec.E_BAD_FRAME, "add up to the number of sizes"),
        ([1, 3], codec.E_BAD_FRAME, "add up to the number of sizes"),
    ],
)
def test_runs_with_counts_that_do_not_fit_are_refused(counts: Any, code: str, words: str) -> None:
    items = [["a", 0, None], ["b", 0, None]]
    with pytest.raises(ProtocolError) as info:
        codec.split_runs(_run_frame(counts, items, [1, 1, 1], b"xyz"))
    assert info.value.code == code and words in info.value.reason and info.value.ref == 4


def test_a_qos1_item_cannot_stand_for_more_than_one_payload() -> None:
    with pytest.raises(ProtocolError) as info:
        codec.split_runs(_run_frame([1, 2], [["a", 0, None], ["b", 1, 8]], [1, 1, 1], b"xyz"))
    assert info.value.code == codec.E_BAD_FRAME
    assert "item 1 stands for 2 payloads at qos 1" in info.value.reason and "acks are per message" in info.value.reason


@pytest.mark.parametrize("item", ["a", [], ["a"], None])
def test_a_run_whose_item_has_no_qos_is_refused(item: Any) -> None:
    """MSGS items are not shape-checked by decode (they come from a node); a run still needs a readable qos."""
    frame = codec.Frame(codec.MSGS, {"v": 1, "items": [item], "sizes": [1, 1], "counts": [2]}, b"xy")
    with pytest.raises(ProtocolError) as info:
        codec.split_runs(frame)
    assert info.value.code == codec.E_BAD_FRAME and "only a QoS 0 item" in info.value.reason


# ---------------------------------------------------------------------------------------------- retained (v3)


def test_retained_frames_round_trip() -> None:
    frames = [
        (codec.RETAIN, {"id": 3, "shard": 5, "shard_epoch": 2, "topic": "a/b", "qos": 1, "replica": False}, b"x"),
        (codec.RETAIN, {"id": 4, "shard": 5, "shard_epoch": 2, "topic": "a/b", "qos": 0, "replica": True,
                        "stamp": [2, 9]}, b""),  # fmt: skip
        (codec.RETAIN_ACK, {"id": 3}, b""),
        (codec.RETAIN_ACK, {"id": 3, "stale": 7}, b""),
        (codec.RETAINED_GET, {"id": 8, "filters": ["a/+/c", "a/b"]}, b""),
        (codec.RETAINED_REPLY, {"id": 8, "items": [["a/b", 1, 5, 2, 9], ["a/c", 0, 6, 1, 1]], "sizes": [2, 1],
                                "more": False}, b"xyz"),  # fmt: skip
        (codec.PUB, {"topic": "a", "qos": 1, "id": 2, "retain": True}, b"p"),
        (codec.MSG, {"topic": "a", "qos": 0, "retain": True}, b"p"),
        (codec.PUBS, {"items": [["a", 0, None, True], ["b", 1, 4]], "sizes": [1, 1]}, b"pq"),
        (codec.RETAINS, {"id": 5, "shard": 5, "shard_epoch": 2, "replica": False, "items": [["a/b", 1], ["a/c", 1]],
                         "sizes": [1, 0]}, b"x"),  # fmt: skip
        (codec.RETAINS, {"id": 6, "shard": 5, "shard_epoch": 2, "replica": True, "stamp": [2, 10],
                         "items": [["a/b", 1], ["a/c", 0]], "sizes": [2, 1]}, b"xyz"),  # fmt: skip
        (codec.RETAINM, {"id": 7, "replica": True, "parts": [[5, 2, 1, 2, 10], [6, 3, 1, 3, 4]],
                         "items": [["a/b", 1], ["a/c", 0]], "sizes": [2, 1]}, b"xyz"),  # fmt: skip
        (codec.RETAINM_ACK, {"id": 7, "stale": [[5, 3]], "failed": [[6, "unavailable", "replica timed out"]]}, b""),
    ]
    for frame_type, header, payload in frames:
        frame = codec.decode(codec.encode(frame_type, header, payload))
        assert frame == Frame(frame_type, {"v": codec.PROTOCOL_VERSION, **header}, payload)
    reply = codec.decode(codec.encode(*frames[5]))
    assert codec.split_batch(reply) == [(["a/b", 1, 5, 2, 9], b"xy"), (["a/c", 0, 6, 1, 1], b"z")]
    batch = codec.decode(codec.encode(*frames[-3]))
    assert codec.split_batch(batch) == [(["a/b", 1], b"xy"), (["a/c", 0], b"z")]


def test_snapshot_retained_round_trip_and_checks() -> None:
    header = {"id": 1, "shard": 2, "shard_epoch": 3, "routes": [], "last": True, "coordinator": "n1",
              "retained": [["a/b", 1, 3, 4], ["a/c", 0, 3, 5]], "retained_sizes": [3, 0]}  # fmt: skip
    frame = codec.decode(codec.encode(codec.SNAPSHOT, header, b"abc"))
    assert codec.split_retained(frame) == [("a/b", 1, 3, 4, b"abc"), ("a/c", 0, 3, 5, b"")]
    plain = codec.decode(codec.encode(codec.SNAPSHOT, {**header, "retained": None, "retained_sizes": None}))
    assert codec.split_retained(plain) == []
    for bad, code in [
        ({"retained_sizes": [2, 0]}, codec.E_BAD_FRAME),  # sizes do not add up to the payload
        ({"retained_sizes": [3]}, codec.E_BAD_FRAME),  # one size for two messages
        ({"retained": [["a/b", 2, 3, 4], ["a/c", 0, 3, 5]]}, codec.E_BAD_HEADER),  # qos 2
        ({"retained": [["a/b", True, 3, 4], ["a/c", 0, 3, 5]]}, codec.E_BAD_HEADER),
        ({"retained": "a/b"}, codec.E_BAD_HEADER),
    ]:
        with pytest.raises(ProtocolError) as info:
            codec.split_retained(codec.decode(codec.encode(codec.SNAPSHOT, {**header, **bad}, b"abc")))
        assert info.value.code == code and info.value.ref == 1


@pytest.mark.parametrize(
    ("frame_type", "header", "field"),
    [
        (codec.PUB, {"topic": "a", "qos": 1, "id": 5, "retain": 1}, "retain"),
        (codec.PUB, {"topic": "a", "qos": 1, "id": 5, "retain": "true"}, "retain"),
        (codec.MSG, {"topic": "a", "qos": 1, "id": 5, "retain": None}, "retain"),
        (codec.PUBS, {"id": 5, "items": [["a", 0, None, 1]], "sizes": [0]}, "items"),
        (codec.RETAIN, {"id": 5, "shard": 1, "shard_epoch": 1, "topic": "a", "qos": 0, "replica": 0}, "replica"),
        (codec.RETAINED_GET, {"id": 5, "filters": [1]}, "filters"),
        (codec.RETAINED_REPLY, {"id": 5, "items": [["a", 1, 2, 3]], "sizes": [0], "more": False}, "items"),
        (codec.RETAINED_REPLY, {"id": 5, "items": [["a", 2, 2, 3, 4]], "sizes": [0], "more": False}, "items"),
        (codec.RETAINED_REPLY, {"id": 5, "items": [], "sizes": [-1], "more": False}, "sizes"),
    ],
)
def test_bad_retain_fields_are_bad_header(frame_type: bytes, header: dict[str, Any], field: str) -> None:
    err = rejected(raw(frame_type, {"v": codec.PROTOCOL_VERSION, **header}))
    assert err.code == codec.E_BAD_HEADER and field in err.reason and err.ref == 5


def test_retained_reply_sizes_must_match_the_payload() -> None:
    frame = codec.decode(codec.encode(codec.RETAINED_REPLY, {"id": 2, "items": [["a", 0, 1, 1, 1]], "sizes": [5],
                                                             "more": False}, b"abc"))  # fmt: skip
    with pytest.raises(ProtocolError) as info:
        codec.split_batch(frame)
    assert info.value.code == codec.E_BAD_FRAME


# ---------------------------------------------------------------------------------------------- persistent sessions
def test_session_frames_round_trip() -> None:
    frames = [
        (codec.SESSION_TAKE, {"id": 3, "client_id": "dev-42"}, b""),
        (codec.SESSION_TAKE, {"id": 0, "client_id": "dev-42", "discard": True}, b""),
        (codec.SESSION_STATE, {"id": 3, "client_id": "dev-42", "filters": [["a/#", 1], ["b", 0]],
                               "items": [["a/b", True, False, ["n1", 7]], ["a/c", False, True, None]],
                               "sizes": [2, 1], "last": False}, b"xyz"),
        (codec.SESSION_STATE, {"id": 3, "client_id": "dev-42", "filters": [], "items": [], "sizes": [],
                               "last": True}, b""),
        (codec.SESSION_TAKEN, {"id": 3, "client_id": "dev-42"}, b""),
        (codec.HELLO, {"client": "dev-42", "clean": False, "expiry": 60}, b""),
        (codec.FWD, {"id": 1, "topic": "a", "qos": 1, "pid": 9}, b"p"),
        (codec.FWDS, {"items": [[1, "a", 1, 9], [2, "a", 0]], "sizes": [1, 1]}, b"pq"),
        (codec.SESSION_END, {"code": codec.E_TAKEN_OVER, "reason": "taken over on n2"}, b""),
    ]
    for frame_type, header, payload in frames:
        frame = codec.decode(codec.encode(frame_type, header, payload))
        assert frame.type == frame_type and frame.payload == payload
        assert {k: v for k, v in frame.header.items() if k != "v"} == header
    state = codec.decode(codec.encode(*frames[2]))
    assert codec.split_batch(state) == [(["a/b", True, False, ["n1", 7]], b"xy"), (["a/c", False, True, None], b"z")]


@pytest.mark.parametrize(
    ("frame_type", "header", "code"),
    [
        (codec.SESSION_TAKE, {"id": 1}, codec.E_BAD_HEADER),
        (codec.SESSION_TAKE, {"id": "1", "client_id": "c"}, codec.E_BAD_HEADER),
        (codec.SESSION_TAKEN, {"id": 1, "client_id": 5}, codec.E_BAD_HEADER),
        (codec.SESSION_STATE, {"id": 1, "client_id": "c", "filters": [["a", 2]], "items": [], "sizes": [],
                               "last": True}, codec.E_BAD_HEADER),
        (codec.SESSION_STATE, {"id": 1, "client_id": "c", "filters": [], "items": [["a", 1, False, None]],
                               "sizes": [0], "last": True}, codec.E_BAD_HEADER),
        (codec.SESSION_STATE, {"id": 1, "client_id": "c", "filters": [], "items": [["a", True, False, ["n"]]],
                               "sizes": [0], "last": True}, codec.E_BAD_HEADER),
        (codec.SESSION_STATE, {"id": 1, "client_id": "c", "filters": [], "items": [], "sizes": [-1],
                               "last": True}, codec.E_BAD_HEADER),
        (codec.SESSION_STATE, {"id": 1, "client_id": "c", "filters": [], "items": [], "sizes": [],
                               "last": 1}, codec.E_BAD_HEADER),
        (codec.HELLO, {"clean": 0}, codec.E_BAD_HEADER),
        (codec.FWD, {"id": 1, "topic": "a", "qos": 1, "pid": "9"}, codec.E_BAD_HEADER),
        (codec.FWDS, {"items": [[1, "a", 1, "9"]], "sizes": [1]}, codec.E_BAD_HEADER),
    ],
)
def test_session_frames_bad_fields(frame_type: bytes, header: dict[str, Any], code: str) -> None:
    err = rejected(raw(frame_type, {"v": codec.PROTOCOL_VERSION, **header}, b"p" if frame_type == codec.FWDS else b""))
    assert err.code == code


def test_session_state_sizes_must_match_payload() -> None:
    header = {"id": 1, "client_id": "c", "filters": [], "items": [["a", False, False, None]], "sizes": [5],
              "last": True}
    frame = codec.decode(codec.encode(codec.SESSION_STATE, header, b"ab"))
    with pytest.raises(ProtocolError) as info:
        codec.split_batch(frame)
    assert info.value.code == codec.E_BAD_FRAME
