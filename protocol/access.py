"""Access control: which principal sent a client frame, and what its ACL lets it do.

Rules of this file:
- The shell names the principal of every client frame: the User-Id the ZAP handler gave the connection, i.e.
  the principal whose credentials the client presented (``shard.security``). The core never sees keys. With
  ``ProtocolConfig.access_control`` off (an ``--insecure`` node, the simulation) frames carry no principal and
  nothing here is checked.
- Fail closed: with access control on, a frame whose principal has no ACL in the current view (revoked, or not
  known yet) is refused with ``not_authorized``, whatever it asks.
- A session belongs to the principal that opened it. A frame from another principal under the same routing id
  (zmq's ``ROUTER_HANDOVER`` lets a new connection take an id over) ends the old session first, so neither its
  subscriptions nor its queued QoS 1 messages pass to someone else.
- ACLs come with the etcd session's views: only principal records proven with the cluster key reach the core.
  When a principal's ACL changes or the principal is removed, its sessions end with ``SESSION_END``
  (``not_authorized``): their clients connect again and subscribe again under the new ACL, and what it no longer
  allows is refused to them, not silently kept.
- What needs what: ``SUB`` a ``subscribe`` filter covering each filter (refused per filter in the SUBACK);
  ``PUB``/``PUBS`` a ``publish`` filter matching each topic (refused per publish, an ERROR with its id: a QoS 1
  publish fails, a QoS 0 one comes back as an asynchronous error; QoS 0 ones without an id are counted into the
  client's report of failed publishes, ``entry``); ``LEAVE`` and ``STATUS`` with ``detail`` ``admin``. ``HELLO``,
  ``PING``, ``PONG``, ``BYE``, ``DACK``, ``UNSUB`` and plain ``STATUS`` need only a valid principal: they act on
  the client's own session. Every refusal is counted (``errors.not_authorized``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from shardmq.router import codec
from shardmq.router.acl import Acl

from .records import Session

if TYPE_CHECKING:
    from .node import NodeCore


class AccessControl:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.enabled = core.cfg.access_control
        self.acls: Mapping[str, Acl] = {}

    def set_principals(self, principals: Mapping[str, Acl] | None) -> None:
        """The principals of a new view (None: the view carries none, as in an insecure cluster)."""
        if principals is None or not self.enabled or principals == self.acls:
            return
        old, self.acls = self.acls, dict(principals)
        changed = {name for name in old if old[name] != self.acls.get(name)}
        if not changed:
            return
        destination = self.core.destination
        ended = [s.rid for s in destination.sessions.values() if s.principal in changed]
        for rid in ended:
            reason = "this principal's permissions changed or were revoked; connect again"
            destination.end_session(rid, codec.E_NOT_AUTHORIZED, reason)
        self.core.log.info("principals_changed", principals=len(self.acls), changed=sorted(changed),
                           sessions_ended=len(ended))  # fmt: skip

    def admit(self, rid: bytes, principal: str | None, ref: int | None) -> Session | None:
        """The session a frame from ``principal`` acts on, or None (refused and counted) when the principal has
        no ACL. A session another principal opened under this routing id is ended first (see the rules)."""
        core = self.core
        acl = self.acls.get(principal) if principal is not None else None
        if acl is None:
            reason = f"principal {principal!r} has no permissions on this cluster (revoked, or unknown here)"
            core.reject_client(rid, codec.E_NOT_AUTHORIZED, reason, ref)
            return None
        destination = core.destination
        session = destination.sessions.get(rid)
        if session is not None and session.principal != principal:
            core.metrics["security.session_taken_by_other_principal"] += 1
            destination.drop_session(rid, reason="another principal took over its routing id")
        session = destination.attach(rid)
        if session.principal is None or session.acl is None:  # new, or restored from the store (``durable``)
            session.principal, session.acl = principal, acl
        return session

    def refuse(self, session: Session, what: str, ref: int | None) -> None:
        self.core.reject_client(session.rid, codec.E_NOT_AUTHORIZED, self.refusal(session, what), ref)

    @staticmethod
    def refusal(session: Session, what: str) -> str:
        return f"principal {session.principal!r} may not {what}"
