"""Shared subscriptions (``$share/GROUP/FILTER``, MQTT 5 4.8.2): names, validation and how their routes are spelled.

Rules:

* A shared subscription is named by the whole string the client subscribed, ``$share/GROUP/FILTER`` (its *share*):
  two groups, or one group with two filters, are two shared subscriptions, and each gets its own copy of a message.
* GROUP is non-empty and holds none of ``+ # /``; FILTER is a valid topic filter that is not itself shared.
* A node with ``k`` local members of a share holds ``k`` routes for it at the owners of FILTER's shard, one per
  member *slot* (``0 .. k-1``): an entry node that picks uniformly among a share's routes picks a node in
  proportion to its members, and every slot is added and removed like any other route (idempotent, confirmed,
  handed off, announced again).
* On the wire (ROUTE_ADD/ROUTE_DEL items, a node's own list of route filters) a slot route's filter is
  ``share + NUL + slot`` (:func:`slot_route`); NUL is never in a valid filter, so nothing else can look like one.
  In the route table it is stored under FILTER (so matching finds it) with the member ``node + NUL + share + NUL +
  slot`` (:func:`slot_member`); a plain route's member stays the bare node id. :func:`member_node` and
  :func:`member_share` read such a member back.
* Pure: no I/O, no clock.
"""

from __future__ import annotations

from .topics import TopicError, validate_topic_filter

__all__ = [
    "SEP",
    "SHARE_PREFIX",
    "is_shared",
    "member_node",
    "member_share",
    "parse_share",
    "route_filter_of",
    "slot_member",
    "slot_route",
    "validate_share",
]

SHARE_PREFIX = "$share/"
SEP = "\x00"


def is_shared(filt: str) -> bool:
    return filt.startswith(SHARE_PREFIX)


def parse_share(share: str) -> tuple[str, str]:
    """(GROUP, FILTER) of ``$share/GROUP/FILTER``; raises TopicError (``invalid_filter``) saying what to fix."""
    rest = share[len(SHARE_PREFIX) :]
    group, slash, filt = rest.partition("/")
    if not slash or not filt:
        raise TopicError(
            "invalid_filter",
            f"a shared subscription is '$share/GROUP/FILTER' with a non-empty group and filter, got {share!r}",
        )
    if not group:
        raise TopicError("invalid_filter", f"the group of a shared subscription must not be empty: {share!r}")
    for ch in "+#":
        if ch in group:
            raise TopicError(
                "invalid_filter",
                f"the group of a shared subscription must not contain {ch!r} (group {group!r} in {share!r})",
            )
    if is_shared(filt):
        raise TopicError("invalid_filter", f"the filter of a shared subscription cannot be shared again: {share!r}")
    return group, filt


def validate_share(share: str) -> tuple[str, str]:
    """Validate a whole ``$share/GROUP/FILTER`` (the group's rules and FILTER as a topic filter); (GROUP, FILTER)."""
    group, filt = parse_share(share)
    try:
        validate_topic_filter(filt)
    except TopicError as exc:
        raise TopicError(exc.code, f"the filter of shared subscription {share!r} is invalid: {exc.reason}") from None
    if SEP in group:
        raise TopicError("invalid_filter", f"the group of a shared subscription must not contain U+0000: {share!r}")
    return group, filt


def slot_route(share: str, slot: int) -> str:
    """The wire filter of one member slot's route for ``share``."""
    return f"{share}{SEP}{slot}"


def route_filter_of(route: str) -> str:
    """The filter a route is matched by: FILTER for a slot route, the route itself for a plain one."""
    if SEP not in route:
        return route
    share = route.rpartition(SEP)[0]
    return share[len(SHARE_PREFIX) :].partition("/")[2]


def slot_member(node: str, route: str) -> str:
    """The route table member of a slot route held for ``node``."""
    return f"{node}{SEP}{route}"


def member_node(member: str) -> str:
    """The node id of a route table member (a bare node id, or a slot member)."""
    return member.partition(SEP)[0] if SEP in member else member


def member_share(member: str) -> str | None:
    """The share of a slot member, None for a plain (node id) member."""
    if SEP not in member:
        return None
    return member.split(SEP, 2)[1]
