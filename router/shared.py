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
* A persistent session's route (``protocol.sessions``: item 2 of docs/DESIGN-SESSIONS.md) is spelled the same way:
  on the wire ``filter + NUL + NUL + client_id`` (:func:`session_route`; a slot is never empty, so ``NUL NUL``
  marks it), stored under the filter with the member ``node + NUL + NUL + client_id``. When its node leaves the
  view, the route owners move it to the node that adopts the session (``RouteTable.remove_node``'s
  ``retarget``), which adds ``+ NUL + origin`` (the node that held it): :func:`member_session` reads (client id,
  origin or None) back. Client ids hold no NUL (a session's key is a valid topic name).
* Pure: no I/O, no clock.
"""

from __future__ import annotations

from .topics import TopicError, validate_topic_filter

__all__ = [
    "SEP",
    "SHARE_PREFIX",
    "is_shared",
    "member_node",
    "member_session",
    "member_share",
    "parse_share",
    "route_filter_of",
    "session_route",
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


SESSION_MARK = SEP + SEP  # in a wire route: a persistent session's route; in a member: a session member


def session_route(filt: str, client_id: str, origin: str | None = None) -> str:
    """The wire filter of persistent session ``client_id``'s route for ``filt`` (``origin``: the node that held it,
    for a route its owners moved to the adopting node)."""
    return f"{filt}{SESSION_MARK}{client_id}" if origin is None else f"{filt}{SESSION_MARK}{client_id}{SEP}{origin}"


def route_filter_of(route: str) -> str:
    """The filter a route is matched by: FILTER for a slot route, the filter of a session route, the route itself
    for a plain one."""
    if SEP not in route:
        return route
    if SESSION_MARK in route:
        return route.partition(SEP)[0]
    share = route.rpartition(SEP)[0]
    return share[len(SHARE_PREFIX) :].partition("/")[2]


def slot_member(node: str, route: str) -> str:
    """The route table member of a slot route (or of a session route) held for ``node``."""
    at = route.find(SESSION_MARK)
    return f"{node}{route[at:]}" if at >= 0 else f"{node}{SEP}{route}"


def member_node(member: str) -> str:
    """The node id of a route table member (a bare node id, or a slot member)."""
    return member.partition(SEP)[0] if SEP in member else member


def member_share(member: str) -> str | None:
    """The share of a slot member, None for a plain (node id) member or a session member."""
    if SEP not in member or SESSION_MARK in member:
        return None
    return member.split(SEP, 2)[1]


def member_session(member: str) -> tuple[str, str | None] | None:
    """(client id, origin node or None) of a session member, None for any other member."""
    at = member.find(SESSION_MARK)
    if at < 0:
        return None
    client_id, _, origin = member[at + 2 :].partition(SEP)
    return client_id, origin or None
