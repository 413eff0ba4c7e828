"""The MQTT semantics scenarios (``shardmq.loadtest.mqtt_semantics``) against mosquitto, checked against MQTT's rules,
and against shardmq, checked against shardmq's documented behaviour (docs/MQTT_SEMANTICS.md, docs/SDK.md).

Each mosquitto test starts its own mosquitto (free 127.0.0.1 port, temp dir, stopped by pid); they skip without
paho-mqtt or a mosquitto binary. Where mosquitto 2.0 departs from the MQTT 5 text (no DISCONNECT 0x8E on takeover, no
will on a takeover that keeps the session), the test asserts nothing about it: docs/MQTT_SEMANTICS.md records those as
observed, not as rules to copy.

The shardmq tests need neither: they run the same scenarios through the SDK on the suite's shared 3-node cluster
(``cluster`` in conftest.py), each scenario's clients spread over the nodes, and assert shardmq's documented
behaviour: the MQTT rule where shardmq keeps it, and the deliberate differences (docs/MQTT_SEMANTICS.md) where not.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from shardmq.loadtest.compare_brokers import find_binary
from shardmq.loadtest.mqtt_semantics import BY_NAME, MosquittoBroker, ShardmqBroker, run_scenario
from shardmq.testing import LocalCluster

MOSQUITTO = find_binary("mosquitto")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None or importlib.util.find_spec("paho") is None,
    reason="needs a mosquitto binary (Debian: apt-get install mosquitto) and paho-mqtt (pip install -e '.[loadtest]')",
)


def observe(name: str) -> dict[str, Any]:
    assert MOSQUITTO is not None
    obs = run_scenario(MosquittoBroker(MOSQUITTO), BY_NAME[name])
    assert "error" not in obs, obs.get("traceback", obs.get("error"))
    return obs


@needs_mosquitto
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["persistent_session_v5", "persistent_session_v311"])
def test_persistent_session(name: str) -> None:
    o = observe(name)
    assert o["session_present_first_connect"] is False
    assert o["session_present_on_reconnect"] is True
    qos1 = [p for p in o["published_in_order"] if p.startswith("q1-")]
    # Every QoS 1 message published while offline arrives once, in publish order, at QoS 1.
    assert [p for p in o["received"] if p.startswith("q1-")] == qos1
    assert o["received_qos"] == [1] and o["received_dup"] == [False]
    # Delivered but unacknowledged when the connection died: sent again on reconnect, in order, marked DUP.
    assert o["held_unacked_before_vanish"] == [f"u-{i}" for i in range(5)]
    assert o["session_present_after_vanish"] is True
    assert o["redelivered_after_vanish"] == o["held_unacked_before_vanish"]
    assert all(o["redelivered_dup"])


@needs_mosquitto
@pytest.mark.timeout(30)
def test_takeover() -> None:
    o = observe("takeover")
    assert o["first_closed_by_broker"] is not None, "the first connection must be closed"
    assert o["second_session_present"] is True
    # The session (with the first connection's unacknowledged messages) moves to the second connection.
    assert o["second_received_on_connect"] == o["first_held_unacked"] == ["t-0", "t-1", "t-2"]
    assert all(o["second_received_dup"])
    assert o["second_received_after"] == ["t2-0", "t2-1"]
    assert o["first_received_after_takeover"] == []
    # Clean start takes over too and starts empty; it ends the old session, so that connection's will goes out.
    assert o["second_closed_by_clean_takeover"] is not None
    assert o["clean_takeover_session_present"] is False
    assert o["clean_takeover_received"] == []
    assert o["second_will_published_on_clean_takeover"] == "will-of-second"


@needs_mosquitto
@pytest.mark.timeout(30)
def test_clean_session_discards() -> None:
    o = observe("clean_session_discards")
    assert o["clean_reconnect_session_present"] is False
    assert o["clean_reconnect_received"] == []
    assert o["old_subscription_live_received"] == []
    assert o["persistent_reconnect_session_present"] is False
    assert o["persistent_reconnect_received"] == []


@needs_mosquitto
@pytest.mark.timeout(30)
def test_retained() -> None:
    o = observe("retained")

    def seen(msgs: list[dict[str, Any]]) -> set[tuple[str, str, int, bool]]:
        return {(m["topic"], m["payload"], m["qos"], m["retain"]) for m in msgs}

    # A new subscription gets the matching retained messages, retain flag set, at min(publish QoS, granted QoS).
    assert seen(o["new_sub_exact_qos1"]) == {("a/b/c", "r-abc", 1, True)}
    assert seen(o["new_sub_plus_qos1"]) == {("a/b/c", "r-abc", 1, True), ("a/x/c", "r-axc", 0, True)}
    assert seen(o["new_sub_hash_qos0"]) == {
        ("a/b/c", "r-abc", 0, True), ("a/x/c", "r-axc", 0, True), ("a/b/d", "r-abd", 0, True),
    }  # fmt: skip
    # To an existing subscription, retained or not, the retain flag is clear (MQTT 5 Retain As Published = 0).
    assert seen(o["live_to_existing_sub"]) == {("a/b/c", "live-plain", 1, False), ("a/b/c", "live-retained", 1, False)}
    # An empty retained payload is delivered as an ordinary message and deletes the stored one.
    assert ("a/x/c", "", 1, False) in seen(o["empty_retained_seen_by_live_sub"])
    assert seen(o["new_sub_plus_after_delete"]) == {("a/b/c", "live-retained", 1, True)}


@needs_mosquitto
@pytest.mark.timeout(30)
def test_will() -> None:
    o = observe("will")
    assert o["vanish_will"] == {"topic": "will/vanish", "payload": "will-vanish", "qos": 1, "retain": False,
                                "dup": False}  # fmt: skip
    assert o["vanish_to_will_ms"] < 2000
    assert o["clean_disconnect_will"] is None
    # A silent client is cut off after 1.5 x keepalive (MQTT 3.1.2.10). mosquitto 2.0.11 looks at keepalives only
    # every ~6 s (cut off 5.3-5.9 s or 11.3-11.9 s after its start, measured): allow that and some load.
    ka_ms = o["keepalive_s"] * 1000
    assert o["silent_will"] is not None and o["silent_will"]["payload"] == "will-silent"
    assert ka_ms <= o["silent_to_will_ms"] <= 1.5 * ka_ms + 6500


@needs_mosquitto
@pytest.mark.timeout(40)
def test_shared_subscription() -> None:
    o = observe("shared_subscription")
    assert o["granted"] == [1, 1]
    assert o["member_a"] + o["member_b"] == o["published"] == 100
    assert o["to_both"] == [] and o["to_neither"] == []
    assert o["member_a"] > 0 and o["member_b"] > 0
    assert o["after_b_left_to_a"] == o["after_b_left_published"]
    # A member whose session ends with its connection: nothing it held is delivered twice to the group.
    assert o["unacked_redelivered_to_c"] <= o["unacked_d_held"]
    # A member whose session outlives its connection: everything reaches some member exactly once or as a DUP
    # redelivery of what that member held.
    assert o["persistent_member_never_delivered"] == []
    assert o["persistent_member_session_present"] is True


@needs_mosquitto
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name,limit", [("queue_limit_100", 100), ("queue_limit_default", 1000)])
def test_queue_limit(name: str, limit: int) -> None:
    o = observe(name)
    assert o["session_present"] is True
    assert o["in_order"]
    assert o["received"] == limit
    assert o["dropped"] == o["published"] - limit


# ---------------------------------------------------------------------------------------------- shardmq
@pytest.fixture(scope="module")
def shardmq(cluster: LocalCluster) -> Iterator[ShardmqBroker]:
    yield ShardmqBroker(cluster=cluster)  # the caller's cluster: the broker starts and stops nothing


def on_shardmq(broker: ShardmqBroker, name: str) -> dict[str, Any]:
    obs = run_scenario(broker, BY_NAME[name])
    assert "error" not in obs, obs.get("traceback", obs.get("error"))
    return obs


@pytest.mark.timeout(30)
def test_shardmq_persistent_session(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "persistent_session_v5")
    assert o["session_present_first_connect"] is False
    assert o["session_present_on_reconnect"] is True
    # QoS 1 published while offline: each once, in publish order; QoS 0 for an offline session is dropped (and
    # counted), as mosquitto does by default.
    assert o["received"] == [p for p in o["published_in_order"] if p.startswith("q1-")]
    # DUP is not asserted: a reconnect that rebuilds the session from its replica (the takeover fell back to the
    # session shard's primary) flags every message DUP, which MQTT allows (docs/MQTT_SEMANTICS.md).
    assert o["qos0_received"] == [] and o["received_qos"] == [1]
    # Delivered, not acknowledged, then the client vanished: sent again on the next connect (another node), DUP.
    assert o["held_unacked_before_vanish"] == [f"u-{i}" for i in range(5)]
    assert o["session_present_after_vanish"] is True
    assert o["redelivered_after_vanish"] == o["held_unacked_before_vanish"]
    assert all(o["redelivered_dup"])


@pytest.mark.timeout(30)
def test_shardmq_takeover(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "takeover")
    # The old connection (on another node) is told: SESSION_END taken_over, shardmq's DISCONNECT 0x8E.
    assert o["first_closed_by_broker"]["disconnect_packet"] is True
    assert "taken_over" in o["first_closed_by_broker"]["reason"]
    assert o["second_session_present"] is True
    assert o["second_received_on_connect"] == o["first_held_unacked"] == ["t-0", "t-1", "t-2"]
    assert all(o["second_received_dup"])
    assert o["second_received_after"] == ["t2-0", "t2-1"]
    assert o["first_received_after_takeover"] == []
    assert o["second_closed_by_clean_takeover"] is not None
    assert o["clean_takeover_session_present"] is False and o["clean_takeover_received"] == []
    # MQTT 5 3.1.4 (will delay 0): a takeover ends the old connection without DISCONNECT, so its will goes out,
    # whether the new connection continues the session or starts clean. mosquitto 2.0.11 skips the first.
    assert o["first_will_published"] == "will-of-first"
    assert o["second_will_published_on_clean_takeover"] == "will-of-second"


@pytest.mark.timeout(30)
def test_shardmq_clean_session_discards(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "clean_session_discards")
    assert o["clean_reconnect_session_present"] is False
    assert o["clean_reconnect_received"] == [] and o["old_subscription_live_received"] == []
    assert o["persistent_reconnect_session_present"] is False and o["persistent_reconnect_received"] == []


@pytest.mark.timeout(30)
def test_shardmq_retained_same_as_mosquitto(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "retained")

    def seen(msgs: list[dict[str, Any]]) -> set[tuple[str, str, int, bool]]:
        return {(m["topic"], m["payload"], m["qos"], m["retain"]) for m in msgs}

    assert seen(o["new_sub_exact_qos1"]) == {("a/b/c", "r-abc", 1, True)}
    assert seen(o["new_sub_plus_qos1"]) == {("a/b/c", "r-abc", 1, True), ("a/x/c", "r-axc", 0, True)}
    assert seen(o["new_sub_hash_qos0"]) == {
        ("a/b/c", "r-abc", 0, True), ("a/x/c", "r-axc", 0, True), ("a/b/d", "r-abd", 0, True),
    }  # fmt: skip
    assert seen(o["live_to_existing_sub"]) == {("a/b/c", "live-plain", 1, False), ("a/b/c", "live-retained", 1, False)}
    assert ("a/x/c", "", 1, False) in seen(o["empty_retained_seen_by_live_sub"])
    assert seen(o["new_sub_plus_after_delete"]) == {("a/b/c", "live-retained", 1, True)}


@pytest.mark.timeout(30)
def test_shardmq_queue_beyond_mosquittos_limit(shardmq: ShardmqBroker) -> None:
    """1,100 queued while offline: mosquitto's default keeps 1,000 and drops the newest 100; shardmq's bound
    (--max-queued 10,000) is not reached, and at the bound it refuses the publish rather than drop it."""
    o = on_shardmq(shardmq, "queue_limit_default")
    assert o["session_present"] is True and o["refused_at"] is None
    assert o["received"] == o["published"] == 1100 and o["dropped"] == 0 and o["in_order"]


@pytest.mark.timeout(40)
def test_shardmq_will(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "will")
    assert o["vanish_will"] == {"topic": "will/vanish", "payload": "will-vanish", "qos": 1, "retain": False,
                                "dup": False}  # fmt: skip
    assert o["clean_disconnect_will"] is None
    # No keepalive: a client whose connection stays open but that stopped reading is not found gone (the node's
    # idle probe is a PING that zmq queues, nothing expects its PONG), so its will is not published.
    assert o["silent_will"] is None


@pytest.mark.timeout(40)
def test_shardmq_shared_subscription(shardmq: ShardmqBroker) -> None:
    o = on_shardmq(shardmq, "shared_subscription")
    assert o["granted"] == [1, 1]
    # Each message to exactly one member, alternating; all to the one left after the other disconnected.
    assert o["to_both"] == [] and o["to_neither"] == []
    assert o["member_a"] + o["member_b"] == o["published"] and o["member_a"] > 0 and o["member_b"] > 0
    assert o["after_b_left_to_a"] == o["after_b_left_published"]
    # A member that vanishes holding unacknowledged messages: they go to another member (MQTT 5 4.8.2 SHOULD;
    # mosquitto loses them).
    assert o["unacked_d_held"] > 0 and o["unacked_redelivered_to_c"] == o["unacked_d_held"]
    assert o["unacked_never_acked_by_anyone"] == []
    # A member whose persistent session went offline hands what it held to the others and is skipped while away
    # (mosquitto keeps queueing its share for it): everything reached the online member, nothing waits for it.
    assert o["persistent_member_held"] != []
    assert o["persistent_member_held_redelivered_to_other"] == o["persistent_member_held"]
    assert set(o["persistent_member_offline_published"]) <= set(o["other_member_got_while_offline"])
    assert o["persistent_member_session_present"] is True and o["persistent_member_got_on_return"] == []
    assert o["persistent_member_never_delivered"] == []
