"""Shared subscriptions on a real 3-node cluster (R=2): members of ``$share/g/FILTER`` on two nodes, QoS 1 messages
published through the third: each delivered exactly once across the group, with its real topic, and every member
gets some; a member that disconnects holding unacknowledged messages has them delivered to the other member; the
SDK refuses a malformed group before sending anything.

The tests run on the suite's shared cluster (``cluster`` in conftest.py), each on topics of its own.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from shardmq.client import Client, ShardMQError
from shardmq.client.core import check_filter
from shardmq.router import codec
from shardmq.testing import LocalCluster
from tests.test_retained import drain, endpoints_of


def publish(endpoint: str, topics: list[str]) -> list[bytes]:
    payloads = [f"m{i}".encode() for i in range(len(topics))]
    with Client([endpoint]) as pub:
        for topic, payload in zip(topics, payloads, strict=True):
            pub.publish(topic, payload, qos=1)
    return payloads


@pytest.mark.timeout(90)
def test_each_message_to_exactly_one_member(cluster: LocalCluster) -> None:
    eps = endpoints_of(cluster)
    p = uuid.uuid4().hex[:8]
    share = f"$share/g/{p}/+"
    with Client([eps["n1"]]) as a, Client([eps["n2"]]) as b, Client([eps["n2"]]) as plain:
        a.subscribe(share, qos=1)
        b.subscribe(share, qos=1)
        plain.subscribe(f"{p}/#", qos=1)  # not in the group: gets every message
        topics = [f"{p}/{'xy'[i % 2]}" for i in range(40)]
        sent = publish(eps["n3"], topics)
        got_a, got_b = drain(a), drain(b)
        counts = Counter(m.payload for m in got_a + got_b)
        assert set(counts) == set(sent) and set(counts.values()) == {1}, counts
        assert got_a and got_b, (len(got_a), len(got_b))
        assert {m.topic for m in got_a + got_b} == set(topics)  # the real topic, not the share
        assert sorted(m.payload for m in drain(plain)) == sorted(sent)


@pytest.mark.timeout(90)
def test_member_that_disconnects_holding_unacked_hands_them_over(cluster: LocalCluster) -> None:
    eps = endpoints_of(cluster)
    p = uuid.uuid4().hex[:8]
    share = f"$share/work/{p}/jobs"
    with Client([eps["n2"]]) as other:
        holder = Client([eps["n1"]])
        holder.subscribe(share, qos=1)
        other.subscribe(share, qos=1)
        sent = publish(eps["n3"], [f"{p}/jobs"] * 20)
        # The holder never reads: what it was given stays unacknowledged. It disconnects (BYE): its session ends.
        holder.close()
        got = drain(other)
        payloads = [m.payload for m in got]
        assert sorted(set(payloads)) == sorted(sent), payloads
        assert len(payloads) == len(set(payloads))  # the other member got each message once
        assert any(m.dup for m in got), "nothing was handed over: the holder got no share"


def test_sdk_refuses_a_malformed_share() -> None:
    for bad in ("$share//t", "$share/g+/t", "$share/g", "$share/g/a/#/b"):
        with pytest.raises(ShardMQError) as info:
            check_filter(bad)
        assert info.value.code == codec.E_INVALID_FILTER, bad
    check_filter("$share/g/a/+")
