"""What the fuzzers share: one valid frame per type (the seeds), and the oracles that judge what a frame did.

Used by tests/test_fuzz_core.py (hypothesis) and by ``shardmq.loadtest.fuzz`` (atheris or a random loop), so the
suite and the long runs check the same properties:

- the codec: ``decode`` returns a ``Frame`` or raises ``ProtocolError``, and a decoded frame encodes back to the
  same frame (``check_codec``);
- the core: a frame fed to a node of a settled simulated cluster raises nothing out of the core, every ERROR it
  makes the node send is counted (``errors.*``, ``fencing.refused.*``, ``qos1.refused*``), a frame the codec
  refuses or a stranger sends is counted, and afterwards the cluster still settles and a new QoS 1
  subscriber still gets a publish (``CoreTarget``). With ``access`` the nodes check client frames against
  ACLs and each fed client frame names a principal (allowed everything, part, nothing, or unknown).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from shardmq.router import codec
from shardmq.router.acl import Acl
from shardmq.router.codec import Frame, ProtocolError

from .simulation import Sim, SimConfig, SimNode

# Small on purpose: out-of-range shard numbers are easy to hit, and a settle takes milliseconds.
CORE_CONFIG = SimConfig(shard_count=16, replication=2)
# Principals of a fuzzed cluster with access control on: the operator (the simulated clients), one allowed part
# of the topic space, one allowed nothing. A fuzzed frame may also name a principal that is none of them.
ACCESS_PRINCIPALS = {
    "operator": Acl.everything(),
    "narrow": Acl(("fuzz/+/x", "a/#"), ("fuzz/#", "+/b")),
    "nothing": Acl(),
}
FUZZED = "n0"  # the node frames are fed to by default: the first to join, so the leader (coordinator paths too)
MEMBERS = ("n0", "n1", "n2")

# One valid header (and payload) per frame type, for the settled 3-node simulated cluster: mutating these reaches
# the handlers, where random bytes would stop at the JSON parser.
SEEDS: dict[bytes, tuple[dict[str, Any], bytes]] = {
    codec.HELLO: ({"id": 1, "client": "c1", "clean": False, "expiry": 30}, b""),
    codec.WELCOME: ({"node": "n0", "session_present": False}, b""),
    codec.SUB: ({"id": 1, "filters": ["a/b", "a/+"], "qos": 1}, b""),
    codec.SUBACK: ({"id": 1, "results": [1]}, b""),
    codec.UNSUB: ({"id": 1, "filters": ["a/b"]}, b""),
    codec.UNSUBACK: ({"id": 1}, b""),
    codec.PUB: ({"id": 1, "topic": "a/b", "qos": 1, "retain": True}, b"p"),
    codec.PUBS: ({"items": [["a/b", 0, None], ["a/b", 1, 2, True]], "sizes": [1, 1]}, b"pq"),
    codec.PUBACK: ({"ids": [1]}, b""),
    codec.MSG: ({"topic": "a/b", "qos": 1, "mid": 1}, b"m"),
    codec.MSGS: ({"items": [["a/b", 1, 1]], "sizes": [1]}, b"m"),
    codec.DACK: ({"mids": [1]}, b""),
    codec.PING: ({}, b""),
    codec.PONG: ({}, b""),
    codec.STATUS: ({"id": 1, "detail": True}, b""),
    codec.STATUS_REPLY: ({"id": 1, "status": {}}, b""),
    codec.BYE: ({}, b""),
    codec.LEAVE: ({"id": 1}, b""),
    codec.LEAVING: ({"id": 1}, b""),
    codec.SESSION_END: ({"code": "shutdown", "reason": "r"}, b""),
    codec.DROPPED: ({"count": 1}, b""),
    codec.ERROR: ({"code": "stale_epoch", "reason": "r", "ref": 1, "move_id": 1}, b""),
    codec.ROUTE_ADD: ({"id": 1, "node": "n1", "routes": [[3, 1, "a/b"]], "member_rev": 1}, b""),
    codec.ROUTE_DEL: ({"id": 1, "node": "n1", "routes": [[3, 1, "a/b"]], "member_rev": 1}, b""),
    codec.ROUTE_ACK: ({"id": 1, "stale": [[3, 1]]}, b""),
    codec.LOOKUP: ({"id": 1, "shard": 3, "shard_epoch": 1, "topic": "a/b"}, b""),
    codec.LOOKUP_REPLY: ({"id": 1, "shard": 3, "shard_epoch": 1, "nodes": ["n1"]}, b""),
    codec.LOOKUPS: ({"items": [[1, 3, 1, "a/b", 0], [2, 5, 1, "a", 1]]}, b""),
    codec.LOOKUPS_REPLY: ({"items": [[1, 1, ["n1"], 0], [2, 1, [], 1]]}, b""),
    codec.FWD: ({"id": 1, "topic": "a/b", "qos": 1, "pid": 1}, b"f"),
    codec.FWD_ACK: ({"ids": [1]}, b""),
    codec.FWDS: ({"items": [[1, "a/b", 1, 2], [0, "a/b", 0]], "sizes": [1, 2], "counts": [1, 2]}, b"fgh"),
    codec.HANDOFF: ({"id": 1, "shard": 3, "shard_epoch": 1, "targets": ["n1"], "coordinator": "n0"}, b""),
    codec.SNAPSHOT: (
        {"id": 1, "shard": 3, "shard_epoch": 1, "routes": [["a/b", ["n1"]]], "last": True, "coordinator": "n0",
         "member_revs": {"n1": 1}},
        b"",
    ),  # fmt: skip
    codec.HANDOFF_READY: ({"id": 1, "shard": 3, "shard_epoch": 1, "node": "n1"}, b""),
    codec.INVALIDATE: ({"id": 1, "shards": [3]}, b""),
    codec.INVALIDATE_ACK: ({"id": 1}, b""),
    codec.RETAIN: ({"id": 1, "shard": 4, "shard_epoch": 1, "topic": "a/b", "qos": 1, "replica": False}, b"r"),
    codec.RETAINS: ({"id": 1, "shard": 4, "shard_epoch": 1, "replica": True, "stamp": [1, 1],
                     "items": [["a/b", 1], ["a/b", 0]], "sizes": [1, 0]}, b"r"),  # fmt: skip
    codec.RETAINM: ({"id": 1, "replica": True, "parts": [[4, 1, 2, 1, 1]],
                     "items": [["a/b", 1], ["a/b", 0]], "sizes": [1, 0]}, b"r"),  # fmt: skip
    codec.RETAINM_ACK: ({"id": 1, "stale": [[4, 2]], "failed": [[5, "unavailable", "r"]]}, b""),
    codec.RETAIN_ACK: ({"id": 1, "stale": 1}, b""),
    codec.RETAINED_GET: ({"id": 1, "filters": ["a/b", "a/+"]}, b""),
    codec.RETAINED_REPLY: ({"id": 1, "items": [["a/b", 1, 4, 1, 1]], "sizes": [1], "more": False}, b"r"),
    codec.SESSION_TAKE: ({"id": 1, "client_id": "c1"}, b""),
    codec.SESSION_STATE: (
        {"id": 1, "client_id": "c1", "filters": [["a/#", 1]], "items": [["a/b", True, False, ["n1", 1]]],
         "sizes": [1], "last": True},
        b"s",
    ),  # fmt: skip
    codec.SESSION_TAKEN: ({"id": 1, "client_id": "c1"}, b""),
    codec.SHARED_FWD: ({"id": 1, "topic": "a/b", "qos": 1, "share": "$share/g/a/+", "pid": 1, "dup": True}, b"s"),
    codec.SHARED_DONE: ({"ids": [1]}, b""),
    codec.SHARED_COPY: ({"id": 1, "topic": "a/b", "share": "$share/g/a/+"}, b"s"),
    codec.SHARED_RELEASE: ({"ids": [1]}, b""),
}
assert set(SEEDS) == codec.FRAME_TYPES, "a frame type without a seed is never fuzzed past the codec"

# Counters a refusal increments: the codec's and handlers' ERRORs (errors.<code>), the peer refusals
# (fencing.refused.<code>), and a QoS 1 forward refused for a full subscriber backlog.
REFUSAL_PREFIXES = ("errors.", "fencing.refused.", "qos1.refused")


class FuzzFailure(AssertionError):
    """A property the fuzzers check does not hold; the message says which and for what input."""


def header_bytes(header: Any) -> bytes:
    """JSON for any fuzzed header: the stdlib encoder takes what orjson refuses (ints past 64 bits)."""
    return json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")


def seed_parts(frame_type: bytes) -> list[bytes]:
    header, payload = SEEDS[frame_type]
    return codec.encode(frame_type, header, payload)


def refusals(metrics: Mapping[str, int]) -> int:
    return sum(v for k, v in metrics.items() if k.startswith(REFUSAL_PREFIXES))


def check_codec(parts: list[bytes]) -> Frame | None:
    """``decode`` returns a Frame or raises ProtocolError; what decodes encodes back to the same frame."""
    try:
        frame = codec.decode(parts)
    except ProtocolError as exc:
        if not isinstance(exc.code, str) or not isinstance(exc.reason, str):
            raise FuzzFailure(f"ProtocolError without a code and reason: {exc!r}") from None
        if exc.ref is not None and type(exc.ref) is not int:
            raise FuzzFailure(f"ProtocolError ref is not an int: {exc.ref!r}") from None
        return None
    except Exception as exc:
        raise FuzzFailure(f"decode raised {type(exc).__name__}: {exc} for {parts!r:.300}") from exc
    if not isinstance(frame, Frame):
        raise FuzzFailure(f"decode returned {type(frame).__name__}")
    try:
        again = codec.decode(codec.encode(frame.type, frame.header, frame.payload))
    except TypeError:
        return frame  # orjson cannot write an int past 64 bits that json could read: not a frame we send
    if again != frame:
        raise FuzzFailure(f"round trip changed the frame: {frame!r:.300} -> {again!r:.300}")
    return frame


class CoreTarget:
    """A settled simulated cluster whose node ``fuzzed`` is fed frames; each ``feed`` checks the per-frame
    properties, ``afterwards`` the cluster-wide ones (see the module docstring). Exceptions from the core are
    not caught: they are the crashes the fuzzers look for."""

    def __init__(self, fuzzed: str = FUZZED, nodes: int = 3, config: SimConfig = CORE_CONFIG,
                 rebalancing: int | None = None, fenced: bool = False, access: bool = False) -> None:  # fmt: skip
        """``rebalancing``: None for a quiet cluster; else subscribers hold routes, a node joins and only that many
        frames are delivered after the leader starts moving shards to it, so frames meet hand-offs half done.
        ``fenced``: the fuzzed node's lease is in doubt (its keep-alives seem late) until its next renewal.
        ``access``: every node checks client frames against ACLs (``ACCESS_PRINCIPALS``; the simulated clients
        are the operator), and ``feed`` takes the principal of each client frame."""
        sim = self.sim = Sim(replace(config, access_control=access))
        if access:
            sim.client_principal = "operator"
        for _ in range(nodes):
            sim.join()
        if not sim.settle():
            raise FuzzFailure("the cluster did not settle before fuzzing")
        if rebalancing is not None:
            # Letters no fuzzed topic has: the simulated clients read every payload they get as a publish id.
            for i, filt in enumerate(["q/1", "q/+", "+/z", "z/1", "z/#"]):
                sim.subscribe(MEMBERS[i % len(MEMBERS)], filt)
            if not sim.settle():
                raise FuzzFailure("the cluster did not settle with subscribers")
            sim.join()
            for node_id in sorted(sim.nodes):
                sim.session_poll(node_id, read=True)
            leader = sim.leader_node()
            if leader is not None:
                sim.lead(leader.node_id)
            for _ in range(rebalancing):
                ready = sim.deliverable()
                if not ready:
                    break
                sim.deliver(*ready[0])
        self.node = sim.nodes[fuzzed]
        if access:
            for node in sim.nodes.values():
                node.core.access.set_principals(ACCESS_PRINCIPALS)
        if fenced:
            self.node.lease_valid_until = sim.now  # what the core sees of the lease (SimNode.enter)
        self.errors_sent = 0
        self._count_errors(self.node)
        self.fed = 0

    def _count_errors(self, node: SimNode) -> None:
        # The core acts through its SimNode: instance attributes shadow the methods it calls.
        send_peer, send_client = node.send_peer, node.send_client

        def peer(dest: str, parts: list[bytes]) -> bool:
            self.errors_sent += parts[0] == codec.ERROR
            return send_peer(dest, parts)

        def client(rid: bytes, parts: list[bytes]) -> bool:
            self.errors_sent += parts[0] == codec.ERROR
            return send_client(rid, parts)

        node.send_peer = peer  # type: ignore[method-assign]
        node.send_client = client  # type: ignore[method-assign]

    def _record_replies(self, node: SimNode) -> list[tuple[str, bytes, bytes]]:
        """(peer or client, destination, frame type) of every frame the node sends until the list is dropped."""
        sent: list[tuple[str, bytes, bytes]] = []
        send_peer, send_client = node.send_peer, node.send_client

        def peer(dest: str, parts: list[bytes]) -> bool:
            sent.append(("peer", dest.encode("utf-8", "surrogateescape"), parts[0]))
            return send_peer(dest, parts)

        def client(rid: bytes, parts: list[bytes]) -> bool:
            sent.append(("client", rid, parts[0]))
            return send_client(rid, parts)

        node.send_peer, node.send_client = peer, client  # type: ignore[method-assign]
        self._unrecord = (send_peer, send_client)
        return sent

    def feed(self, peer: bool, ident: bytes, parts: list[bytes], principal: str | None = None) -> None:
        """One frame from client ``ident`` (or from peer routing id ``ident``) to the fuzzed node; ``principal``:
        who the shell says sent a client frame (with ``access``)."""
        n = self.node
        if not n.up:
            return  # it left (a fuzzed LEAVE): nothing to feed
        self.fed += 1
        core = n.enter()
        members = set(core.view.members)
        before, errors_before = refusals(core.metrics), self.errors_sent
        sent = self._record_replies(n)
        try:
            if peer:
                core.on_peer_parts([ident, *parts])
            else:
                core.on_client_parts([ident, *parts], principal)
            core.flush()
        finally:
            n.send_peer, n.send_client = self._unrecord  # type: ignore[method-assign]
        counted = refusals(core.metrics) - before
        errors = self.errors_sent - errors_before
        what = f"{'peer' if peer else 'client'} {ident!r} {parts!r:.400}"
        if errors > counted:
            raise FuzzFailure(f"{errors} ERROR frame(s) sent but {counted} refusal(s) counted for {what}")
        allowed = codec.PEER_REQUESTS if peer else codec.CLIENT_REQUESTS
        try:
            codec.decode(parts, max_payload=core.cfg.max_payload, allowed=allowed)
            undecodable = False
        except ProtocolError:
            undecodable = True
        stranger = peer and ident.decode("utf-8", "replace") not in members
        if (undecodable or stranger) and not counted:
            raise FuzzFailure(f"refused frame not counted: {what}")
        sender = ident.decode("utf-8", "replace")
        answered = any(kind == ("peer" if peer else "client") and dest == (sender.encode() if peer else ident)
                       and ftype == codec.ERROR for kind, dest, ftype in sent)  # fmt: skip
        # The protocol's rule: a frame the codec refuses is answered with an ERROR when the sender can be addressed
        # (a client, a member); a stranger on the peer port gets nothing, not even an answer to a valid frame.
        if undecodable and not stranger and not answered:
            raise FuzzFailure(f"undecodable frame not answered with an ERROR: {what}")
        if stranger and any(kind == "peer" and dest == sender.encode() for kind, dest, _ in sent):
            raise FuzzFailure(f"a stranger was answered: {what}")
        self.sim.pump_clients()

    def afterwards(self, tag: str = "after") -> None:
        """The cluster settles, and a new QoS 1 subscriber gets a publish sent through another node."""
        sim = self.sim
        self.node.next_refresh = min(self.node.next_refresh, sim.now)  # a fenced node's keep-alive gets through
        if not sim.settle():
            raise FuzzFailure("the cluster did not settle after fuzzing")
        live = sorted(n for n in sim.live_members() if sim.nodes[n].up)
        if len(live) < 2:
            raise FuzzFailure(f"only {live} left running")
        subscriber, publisher = live[-1], live[0]
        topic = f"fuzz/{tag}/{len(sim.publishes)}"
        if not sim.subscribe(subscriber, topic) or not sim.settle():
            raise FuzzFailure(f"SUB {topic} on {subscriber} failed after fuzzing")
        reached = sim.check_publish(publisher, topic)
        if reached is None or subscriber not in reached:
            raise FuzzFailure(f"publish to {topic} via {publisher} did not reach {subscriber}: {reached}")
