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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .matching import FilterIndex

__all__ = ["Acl", "filter_covers"]


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

    def __post_init__(self) -> None:
        self.publish = tuple(self.publish)
        self.subscribe = tuple(self.subscribe)
        self._publish_index = FilterIndex()
        for filt in self.publish:
            self._publish_index.add(filt, True)

    @classmethod
    def everything(cls) -> Acl:
        """The operator's: publish and subscribe anywhere (``$`` topics included), and administer."""
        return cls(("#", "$SYS/#"), ("#", "$SYS/#"), admin=True)

    def may_publish(self, topic: str) -> bool:
        return bool(self._publish_index.match(topic))

    def may_subscribe(self, filt: str) -> bool:
        return any(filter_covers(allowed, filt) for allowed in self.subscribe)

    def refused_filters(self, filters: Iterable[str]) -> list[str]:
        """The filters of a SUB that this ACL does not allow, in order."""
        return [f for f in filters if not self.may_subscribe(f)]
