"""Wills: the message a node publishes for a client that went away without saying BYE.

Rules of this file:
- Where. A client's will comes in its HELLO (``will`` {"topic", "qos", "retain"} in the header, the will's payload
  in the payload part), checked there (topic, qos, the principal's ACL may publish to it; a bad one refuses the
  HELLO with a code that says what to fix), and is kept in the client's session directory record
  ``$session/<client_id>`` (``sessions``) under the key ``will`` ({"id", "topic", "qos", "retain", "payload" in
  base64}), for every client with a will, persistent or not: the record lives at the owners of its shard, so the
  will survives its holder. A clean session's record says ``"persistent": false`` (no session to take over).
  ``id`` names one will of one connection: "<node>:<member revision>:<counter>".
- Exactly once. Every write of a record that may displace a pending will is conditional (RETAIN ``if_will``: the
  stored record's pending will has this id, "" for none) and decided by the shard's primary, the one writer
  (``retained``), which answers ``conflict`` with the stored record when it does not match. So the pending will
  of a record goes away by exactly one accepted write, and what that write does decides its fate:
  * published: the holder finds the client gone (no BYE) and claims it (``clear_will``: the primary drops it from
    the stored record itself); the session shard's primary claims the wills of records whose holder left the
    view (``scan``); a new connection of that client id replaces the record and publishes the will it displaced
    (a takeover, MQTT 5: the old connection ended without DISCONNECT, will delay 0);
  * dropped: the client's BYE (a clean close clears the will first), or the same connection changing its will.
  The claim is written (and replicated) before the will is published: a node that dies between the two loses
  the will (at most once in that window, never twice).
- When. The holder probes a quiet client every ``client_idle_check`` seconds (``destination.idle_tick``); a probe
  that finds the connection gone detaches the session, and the will goes ``client_idle_check`` later if the
  client did not come back (a connection zmq re-makes says HELLO again within that grace). From the client's last
  frame that is at most 3 x ``client_idle_check`` when its process dies (the kernel closes its TCP connection);
  a silent network adds TCP keep-alive's 20 s. A node that ends a session itself (fenced, its principal revoked)
  publishes at once; a node that stops does not (its clients fail over, and a takeover or the primary publishes).
  A holder that dies: the primary publishes once the holder's lease expired (``lease_ttl``) and, when the primary
  died too, once the leader promoted a replica.
- A published will is a normal publish from this node (``entry``): routed, QoS 1 acknowledged by its destinations,
  retain honoured; its ACL was checked at connect. Its outcome is counted (``wills.published``,
  ``wills.delivered``, ``wills.failed``): nobody is left to tell.
- Pure: no I/O, no clock; the scan walks records in topic order.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.router.topics import TopicError, validate_topic_name

from .records import SESSION_PREFIX, Publish, Session, is_reserved

if TYPE_CHECKING:
    from .node import NodeCore

WRITE_ATTEMPTS = 4  # a replacing write retried on conflict (each conflict shows the stored record)
CLAIM_ATTEMPTS = 3  # a claim the primary did not confirm (unreachable, timeout) is tried again, request_timeout apart
CONFLICT = "conflict"  # ``then``'s code when a conditional write did not apply
WILL_KEY = b'"will"'  # records holding a will contain this (orjson writes no spaces): the scan parses only those


class WillRefused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def pending_will(payload: bytes | None) -> dict[str, Any] | None:
    """The will block of a stored session record, if it holds one."""
    if not payload or WILL_KEY not in payload:
        return None
    try:
        will = orjson.loads(payload).get("will")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return will if isinstance(will, dict) and isinstance(will.get("id"), str) else None


def will_id(payload: bytes | None) -> str:
    """The id of the stored record's pending will; "" when it holds none (what RETAIN ``if_will`` compares)."""
    will = pending_will(payload)
    return will["id"] if will is not None else ""


def is_clean_record(payload: bytes | None) -> bool:
    """A clean session's record (only there for its will): no persistent session to take over or discard."""
    if not payload or b'"persistent":false' not in payload:
        return False
    try:
        return orjson.loads(payload).get("persistent") is False
    except (orjson.JSONDecodeError, AttributeError):
        return False


def without_will(payload: bytes) -> bytes:
    """The stored record once its will is claimed or cleared: a clean session's record goes altogether (it was only
    there for the will), a persistent session's record stays without its will."""
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return b""
    if not isinstance(record, dict) or record.get("persistent") is False:
        return b""
    record.pop("will", None)
    return orjson.dumps(record)


def same_will(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two will blocks with the same message (their ids aside)."""
    if a is None or b is None:
        return a is b
    return all(a[k] == b[k] for k in ("topic", "qos", "retain", "payload"))


class WillSide:
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.counter = 0  # wills given an id here
        self.claiming: set[str] = set()  # will ids whose claim this node has in flight
        self._scan_due = False

    # ------------------------------------------------------------------ HELLO
    def from_hello(self, session: Session, header: dict[str, Any], payload: bytes) -> dict[str, Any] | None:
        """The will a HELLO carries, as a record block with a new id (None: no will); WillRefused when it is bad."""
        will = header.get("will")
        if will is None:
            if payload:
                raise WillRefused(codec.E_BAD_FRAME, "HELLO has a payload but no will: the payload is the will's")
            return None
        if not isinstance(will, dict):
            raise WillRefused(codec.E_BAD_HEADER, 'HELLO will must be {"topic": str, "qos": 0|1, "retain": bool}')
        topic, qos, retain = will.get("topic"), will.get("qos", 0), will.get("retain", False)
        if not isinstance(topic, str):
            raise WillRefused(codec.E_BAD_HEADER, "HELLO will needs a topic (string)")
        if type(qos) is not int or qos not in (0, 1):
            raise WillRefused(codec.E_INVALID_QOS, f"HELLO will qos must be 0 or 1, got {qos!r}")
        if type(retain) is not bool:
            raise WillRefused(codec.E_BAD_HEADER, f"HELLO will retain must be true or false, got {retain!r}")
        try:
            validate_topic_name(topic)
        except TopicError as exc:
            raise WillRefused(exc.code, f"HELLO will topic: {exc.reason}") from None
        if is_reserved(topic):
            raise WillRefused(codec.E_NOT_AUTHORIZED, f"HELLO will topic {topic!r}: reserved for the session directory")
        if session.acl is not None and not session.acl.may_publish(topic):
            raise WillRefused(codec.E_NOT_AUTHORIZED,
                              f"principal {session.principal!r} may not publish its will to {topic!r}")  # fmt: skip
        client_id = session.rid.decode("utf-8", "replace")
        try:
            validate_topic_name(SESSION_PREFIX + client_id)
        except TopicError:
            raise WillRefused(codec.E_BAD_HEADER,
                              f"client id {client_id!r} cannot hold a will (no '+', '#' or NUL)") from None  # fmt: skip
        self.counter += 1
        return {
            "id": f"{self.core.me}:{self.core.view.member_revision}:{self.counter}", "topic": topic, "qos": qos,
            "retain": retain, "payload": base64.b64encode(payload).decode(),
        }  # fmt: skip

    # ------------------------------------------------------------------ writing records
    def write(
        self, client_id: str, record: dict[str, Any] | None, expect: dict[str, Any] | None, keep: str | None = None,
        attempts: int = WRITE_ATTEMPTS, then: Callable[[str | None, str], None] | None = None,
    ) -> None:
        """Replace client_id's record with ``record`` (None deletes) if the stored pending will is ``expect``;
        a pending will the write displaced is published unless it is ``keep`` (the same connection's old will) or
        the record's own. On a conflict the write is tried again against the stored will (``attempts`` in all),
        so a record that names a will this node did not know of still loses it only by publishing it."""
        core = self.core
        payload = orjson.dumps(record) if record is not None else b""
        own = (record or {}).get("will")
        own_id = own["id"] if isinstance(own, dict) else None

        def done(code: str | None, reason: str) -> None:
            if code is None and expect is not None and expect["id"] not in (own_id, keep):
                self.publish(client_id, expect, "displaced")
            if then is not None:
                then(code, reason)

        def conflict(stored: bytes) -> None:
            if attempts > 1:
                self.write(client_id, record, pending_will(stored), keep, attempts - 1, then)
                return
            if then is not None:
                then(CONFLICT, "the stored record holds another pending will")

        if_will = expect["id"] if expect is not None else ""
        core.retained.write_record(SESSION_PREFIX + client_id, payload, done, if_will=if_will, on_conflict=conflict)

    def clear(self, client_id: str, will: dict[str, Any]) -> None:
        """The client said BYE: its will goes unpublished (if the record still holds it)."""
        core = self.core
        core.metrics["wills.cleared"] += 1

        def done(code: str | None, reason: str) -> None:
            if code is not None:
                core.metrics["wills.clear_failed"] += 1
                core.log.warning("will_clear_failed", client=client_id, code=code, reason=reason)

        core.retained.write_record(SESSION_PREFIX + client_id, b"", done, if_will=will["id"], clear_will=True,
                                   on_conflict=lambda stored: None)  # fmt: skip

    def claim(self, client_id: str, will: dict[str, Any], why: str, attempts: int = CLAIM_ATTEMPTS) -> None:
        """Take the will out of the record (if it still holds it), then publish it: the write comes first, so two
        nodes that both find the client gone publish it once between them."""
        core = self.core
        wid = will["id"]
        if wid in self.claiming:
            return
        self.claiming.add(wid)

        def done(code: str | None, reason: str) -> None:
            self.claiming.discard(wid)
            if code is None:
                self.publish(client_id, will, why)
                return
            core.metrics["wills.claim_failed"] += 1
            core.log.warning("will_claim_failed", client=client_id, why=why, code=code, reason=reason,
                             attempts_left=attempts - 1)  # fmt: skip
            if attempts > 1:
                again = attempts - 1
                core.effects.call_later(core.cfg.request_timeout, lambda: self.claim(client_id, will, why, again))
            else:
                core.metrics["wills.lost"] += 1

        def conflict(stored: bytes) -> None:
            self.claiming.discard(wid)
            core.metrics["wills.claimed_elsewhere"] += 1  # published or replaced by someone else: theirs

        core.retained.write_record(SESSION_PREFIX + client_id, b"", done, if_will=wid, clear_will=True,
                                   on_conflict=conflict)  # fmt: skip

    # ------------------------------------------------------------------ the holder
    def session_dropped(self, session: Session, reason: str) -> None:
        """A session with a will ended here (``destination.drop_session``) other than by BYE: the connection is
        gone, replaced or ended by this node. A node that stops leaves the will in the record: its clients fail
        over (the takeover publishes it) or the primary does once the node left the view."""
        will, session.will = session.will, None
        if will is None or reason == codec.E_SHUTDOWN:
            return
        self.claim(session.rid.decode("utf-8", "replace"), will, reason)

    def vanished(self, session: Session) -> None:
        """A persistent session's connection is gone (it went offline without BYE): its will goes
        ``client_idle_check`` from now unless the client says HELLO here again or another node takes it over."""
        core = self.core
        if session.will is None:
            return
        since = session.detached_at
        destination = core.destination

        def due() -> None:
            rid = session.rid
            still_away = session.detached_at == since and session.moving_to is None and rid in destination.offline
            if destination.sessions.get(rid) is session and still_away and session.will is not None:
                will, session.will = session.will, None
                self.claim(rid.decode("utf-8", "replace"), will, "unreachable")

        core.effects.call_later(core.cfg.client_idle_check, due)

    # ------------------------------------------------------------------ the session shard's primary
    def scan_soon(self) -> None:
        """Members left or the assignment changed: look for wills whose holder is gone (once, after this event)."""
        if not self._scan_due:
            self._scan_due = True
            self.core.effects.call_later(0.0, self.scan)

    def scan(self) -> None:
        """Claim and publish the pending wills of the records of this node's primary shards whose holder is not a
        live member any more (or registered again since: another process). Costs one index query and a parse of
        each record holding a will, at membership and assignment changes only."""
        self._scan_due = False
        core = self.core
        a = core.view.assignment
        if a is None or core.fenced():
            return
        members = core.view.members
        count = a.shard_count
        for topic, message in core.owner.retained.match(SESSION_PREFIX + "#"):
            if WILL_KEY not in message.payload:
                continue
            if a.owners(shard_for_key(topic, count))[:1] != (core.me,):
                continue
            try:
                record = orjson.loads(message.payload)
                will = record["will"]
                member = members.get(record["holder"])
                live = member is not None and member.revision == record["holder_rev"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                core.metrics["wills.bad_records"] += 1
                continue
            if not live and isinstance(will, dict) and isinstance(will.get("id"), str):
                core.metrics["wills.holder_gone"] += 1
                self.claim(topic[len(SESSION_PREFIX) :], will, "holder_gone")

    # ------------------------------------------------------------------ publishing
    def publish(self, client_id: str, will: dict[str, Any], why: str) -> None:
        core = self.core
        try:
            payload = base64.b64decode(will["payload"], validate=True)
            topic, qos, retain = will["topic"], will["qos"], will["retain"] is True
        except (KeyError, TypeError, binascii.Error):
            core.metrics["wills.bad_records"] += 1
            return
        core.metrics["wills.published"] += 1
        core.log.info("will_published", client=client_id, topic=topic, qos=qos, retain=retain, why=why,
                      membership_epoch=core.view.membership_epoch)  # fmt: skip
        core.entry.publish(Publish(None, None, topic, qos, payload, retain=retain, will=True))
