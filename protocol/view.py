"""The node's view of the cluster: members, the shard assignment, the leader, and whether its lease is in doubt.

Rules of this file:
- Everything here comes from etcd through the shell (the session thread reads, the core is told): the core
  never decides membership or ownership, it only reads this view.
- Two epochs, two names. The *membership epoch* (``membership_epoch``) is the highest etcd create_revision among
  the member keys: every node that sees the same members computes the same one, and it only goes to clients and
  logs. A *shard epoch* (``Assignment.epoch(shard)``, ``shard_epoch`` on the wire) counts the ownership changes
  of one shard: fencing compares shard epochs, never the membership epoch.
- Fenced: from two thirds of the lease TTL without a keep-alive (``fenced_from``, told by the shell), and between
  registering again and seeing the view that goes with that registration, a node neither answers for its
  shards nor takes subscriptions.
- Filled from nobody (``filled_from_nobody``): one rule says which shards of a new assignment got owners that
  could not copy their routes from anyone. The subscribers' nodes add their routes again by it, and the new owners
  wait for them by it (``subscriptions``, ``owner``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shardmq.ring import Assignment, shard_for_key
from shardmq.router.acl import Acl
from shardmq.router.partition import placement_key
from shardmq.router.routes import RouteTable
from shardmq.router.shared import route_filter_of

ROOT = RouteTable.ROOT


def filled_from_nobody(
    old: Assignment,
    new: Assignment,
    changed: list[int],
    old_members: Mapping[str, MemberInfo],
    members: Mapping[str, MemberInfo],
) -> frozenset[int]:
    """The shards of ``changed`` whose owners in ``new`` were filled from nobody: every owner in ``old`` is gone
    (its member key is, or it registered again since ``old_members``, the view we had when ``old`` arrived: a
    restarted process holds nothing of its predecessor's). A shard is given owners from nobody only from an
    ownerless state, one epoch after it; a view that skipped epochs cannot tell what happened in between (and its
    member list may lag a restart), so such a shard counts as filled from nobody too."""

    inputs = (old, new, changed, old_members, members)
    found = _FILLED.get(key := tuple(map(id, inputs)))
    if found is not None and all(a is b for a, b in zip(found[0], inputs, strict=True)):
        return found[1]  # computed once per input (see below), not once per node

    def alive(node: str) -> bool:
        now, then = members.get(node), old_members.get(node)
        return now is not None and then is not None and now.revision == then.revision

    filled = frozenset(
        s for s in changed
        if new.owners(s) and (new.epoch(s) > old.epoch(s) + 1 or not any(alive(o) for o in old.owners(s)))
    )  # fmt: skip
    _FILLED.pop(key, None)
    while len(_FILLED) >= _FILLED_MAX:
        del _FILLED[next(iter(_FILLED))]
    _FILLED[key] = (inputs, filled)
    return filled


# The nodes of a simulated cluster share their documents, change lists (``owner.epochs_changed``) and member
# mappings, none of which is ever changed in place: ``filled_from_nobody`` answers each input once, as
# ``epochs_changed`` does (a walk over the changed shards per node per commit dominated a 1,000-node run).
_FILLED: dict[tuple[int, ...], tuple[tuple[Any, ...], frozenset[int]]] = {}
_FILLED_MAX = 16


@dataclass(frozen=True, slots=True)
class MemberInfo:
    node_id: str
    client_endpoint: str
    peer_endpoint: str
    weight: int = 1
    leaving: bool = False  # set by a graceful leave: the rebalancer moves every shard away, then the node exits
    incarnation: str = ""  # new for every process start: a restart under the same id is another member to peers
    # etcd create_revision of the member key (read from etcd, never written): rises with every registration, so a
    # node that registered again after losing its lease is a new member to peers even in the same process.
    revision: int = 0
    # The process's CURVE public key (z85) and its proof under the cluster key; the shell checks and uses them
    # (``shard.security``), the core never reads them. Empty in an insecure cluster.
    curve_key: str = ""
    key_proof: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "client_endpoint": self.client_endpoint,
            "peer_endpoint": self.peer_endpoint,
            "weight": self.weight,
            "leaving": self.leaving,
            "incarnation": self.incarnation,
            "revision": self.revision,
            "curve_key": self.curve_key,
            "key_proof": self.key_proof,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemberInfo:
        return cls(
            data["node"],
            data["client_endpoint"],
            data["peer_endpoint"],
            int(data.get("weight", 1)),
            bool(data.get("leaving", False)),
            str(data.get("incarnation", "")),
            int(data.get("revision", 0)),
            str(data.get("curve_key", "")),
            str(data.get("key_proof", "")),
        )

    def same_process(self, other: MemberInfo) -> bool:
        """True when ``other`` is this member's same registration of the same process at the same address (only
        ``leaving`` may differ)."""
        return (self.incarnation, self.revision, self.peer_endpoint, self.client_endpoint) == (
            other.incarnation, other.revision, other.peer_endpoint, other.client_endpoint,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SessionView:
    """One view from the etcd session, as it hands it to the core (the core never changes its parts, so one
    ``members`` mapping and one ``document`` may be shared by many nodes' views, as the simulation does)."""

    members: Mapping[str, MemberInfo]
    membership_epoch: int
    leader: str | None
    assignment_revision: int
    registration: int  # registrations the session has made so far (more than one: the lease was lost once)
    document: bytes = b""  # the assignment document at ``assignment_revision`` (b"": none yet)
    # The principals and their ACLs (only records proven with the cluster key); None: the session reads none.
    principals: Mapping[str, Acl] | None = None

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], document: bytes) -> SessionView:
        """The session thread's snapshot (``shard.membership.EtcdSession``)."""
        return cls(
            {m["node"]: MemberInfo.from_dict(m) for m in snapshot["members"]},
            int(snapshot["epoch"]),
            snapshot.get("leader"),
            int(snapshot["assignment_revision"]),
            int(snapshot.get("registration", 1)),
            document,
            None if (listed := snapshot.get("principals")) is None else {p["name"]: Acl.from_dict(p) for p in listed},
        )


class ClusterView:
    def __init__(self, me: str, shard_count: int, replication: int) -> None:
        self.me = me
        self.members: Mapping[str, MemberInfo] = {}
        self.membership_epoch = 0
        self.assignment: Assignment | None = None
        self.assignment_revision = 0
        self.assignment_members: Mapping[str, MemberInfo] = {}  # the members as we saw them when it arrived
        self.leader: str | None = None
        self.settings: dict[str, Any] = {"shard_count": shard_count, "replication": replication}
        self.fenced_from = float("inf")  # the session's lease comes into doubt at this time (shell clock)
        self.registrations = 0  # registrations the session made; more than one: the lease was lost once
        self.registration_seen = 0  # the registration whose view we processed
        self.member_revision = 0  # our member key's etcd create_revision, sent as ROUTE_ADD/ROUTE_DEL member_rev
        self.leaving = False

    def fenced(self, now: float) -> bool:
        return now > self.fenced_from or self.registration_seen < self.registrations

    @property
    def shard_count(self) -> int:
        return self.assignment.shard_count if self.assignment else int(self.settings["shard_count"])

    def shards_ok(self, shards: Any) -> bool:
        count = self.shard_count
        return all(s == ROOT or (type(s) is int and 0 <= s < count) for s in shards)

    def shard_epoch(self, shard: int) -> int:
        return self.assignment.epoch(shard) if self.assignment is not None else 0

    def route_item(self, filt: str) -> list[Any]:
        """[shard, shard epoch, filter] for a filter: its shard (ROOT for the root set) and that shard's epoch. A
        shared subscription's slot route lives where its FILTER does (``router.shared``)."""
        assert self.assignment is not None
        key = placement_key(route_filter_of(filt))
        if key is None:
            return [ROOT, 0, filt]
        shard = shard_for_key(key, self.assignment.shard_count)
        return [shard, self.assignment.epoch(shard), filt]

    def targets(self, shard: int) -> tuple[str, ...]:
        """Who must hold a route of ``shard``: its owners, or every member for the root set."""
        assert self.assignment is not None
        return tuple(sorted(self.members)) if shard == ROOT else self.assignment.owners(shard)

    def registration_unseen(self, sender: str, member_rev: Any) -> bool:
        """The sender registered more recently than our view of it shows (see ``owner``: deferred changes). A node
        absent from our view whose registration is newer than every one in it may have joined since our read; one
        not newer was gone when we read (etcd create revisions only rise)."""
        if type(member_rev) is not int:
            return False
        member = self.members.get(sender)
        if member is None:
            return member_rev > self.membership_epoch
        return member_rev > member.revision
