"""Access control lists: which topics a principal may publish to and which filters it may subscribe to.

Rules (inputs are validated by :mod:`.topics` first; matching is :mod:`.matching`'s, MQTT 3.1.1 section 4.7):

* An ACL is two lists of topic filters, ``publish`` and ``subscribe``, plus ``admin`` (may ask for what only an
  operator may: ``LEAVE``, detailed status). Nothing is allowed that the lists do not allow: an empty list
  allows nothing.
* A publish to topic ``t`` is allowed when some ``publish`` filter matches ``t`` (``FilterIndex``: one lookup,
  however many filters).
* A subscription to filter ``f`` is allowed when a single ``subscribe`` filter covers it: every topic that
  ``f`` matches, that filter matches too (``filter_covers``). A subscription is never allowed because several
  filters together happen to cover it: the check stays one pass over the list, and an operator reads each
  grant on its own. So ``sensors/#`` covers ``sensors/+/temp``, ``sensors`` and ``sensors/#``; ``sensors/+``
  does not cover ``sensors/#``; ``#`` covers every filter except those that spell out a ``$`` first level,
  since ``#`` never matches ``$SYS/...`` topics and a grant of ``#`` is not a grant of ``$SYS/#``.
* Pure: no I/O, no clock; ``tests/test_acl.py`` proves ``filter_covers`` against a bounded brute force (every
  topic up to one level deeper than the longer filter, over an alphabet that includes ``$`` levels and the
  empty level; a counterexample to coverage can always be shortened to one of those).
* ``may_publish`` remembers its answers for up to ``PUBLISH_MEMO`` topics (then starts over): a node checks
  every publish, and a publisher's topics repeat. An ``Acl`` never changes, so a memo is never stale; a new
  grant is a new ``Acl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .matching import FilterIndex
from .topics import TopicError, validate_topic_filter

__all__ = ["Acl", "filter_covers"]

PUBLISH_MEMO = 100_000


def filter_covers(allowed: str, requested: str) -> bool:
    """True when every topic that filter ``requested`` matches is matched by filter ``allowed``."""
    a_levels = allowed.split("/")
    r_levels = requested.split("/")
    # A wildcard first level never matches a topic starting with "$": it cannot cover a filter whose topics do.
    if a_levels[0] in ("+", "#") and r_levels[0][:1] == "$":
        return False
    for i, level in enumerate(a_levels):
        if level == "#":
            return True  # the rest of every requested topic, including none (``a/#`` matches ``a``)
        if i >= len(r_levels):
            return False  # ``requested`` matches topics with fewer levels than ``allowed`` demands
        wanted = r_levels[i]
        if wanted == "#":
            # ``requested`` matches any number of levels from here, none included, except at the first level
            # (a topic has at least one): ``#`` covers that, and so does ``+/#`` in first place.
            return i == 0 and level == "+" and a_levels[1:] == ["#"]
        if level != "+" and level != wanted:
            return False  # a literal covers only itself (``+`` in ``requested`` means any level)
    return len(a_levels) == len(r_levels)


@dataclass(slots=True)
class Acl:
    """What one principal may do."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    _publish_index: FilterIndex[bool] = field(init=False, repr=False, compare=False)
    _publish_memo: dict[str, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.publish = tuple(self.publish)
        self.subscribe = tuple(self.subscribe)
        self._publish_index = FilterIndex()
        self._publish_memo = {}
        for filt in self.publish:
            self._publish_index.add(filt, True)

    @classmethod
    def everything(cls) -> Acl:
        """The operator's: publish and subscribe anywhere (``$`` topics included), and administer."""
        return cls(("#", "$SYS/#"), ("#", "$SYS/#"), admin=True)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Acl:
        """An ACL as a principal's record stores it (``to_dict``); ValueError when it is not one."""
        publish, subscribe, admin = data.get("publish", []), data.get("subscribe", []), data.get("admin", False)
        for name, filters in (("publish", publish), ("subscribe", subscribe)):
            if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
                raise ValueError(f"{name} must be a list of topic filters")
            for filt in filters:
                try:
                    validate_topic_filter(filt)
                except TopicError as exc:
                    raise ValueError(f"{name} filter {filt!r}: {exc.reason}") from None
        if not isinstance(admin, bool):
            raise ValueError("admin must be true or false")
        return cls(tuple(publish), tuple(subscribe), admin)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {"publish": list(self.publish), "subscribe": list(self.subscribe), "admin": self.admin}

    def may_publish(self, topic: str) -> bool:
        memo = self._publish_memo
        allowed = memo.get(topic)
        if allowed is None:
            if len(memo) >= PUBLISH_MEMO:
                memo.clear()
            allowed = memo[topic] = bool(self._publish_index.match(topic))
        return allowed

    def may_subscribe(self, filt: str) -> bool:
        return any(filter_covers(allowed, filt) for allowed in self.subscribe)

    def refused_filters(self, filters: Iterable[str]) -> list[str]:
        """The filters of a SUB that this ACL does not allow, in order."""
        return [f for f in filters if not self.may_subscribe(f)]
