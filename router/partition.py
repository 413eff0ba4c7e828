"""The partition function: which key places a filter, which keys a topic must look up.

The router cannot import the ring, so it speaks in *keys*; the ring hashes a key to a shard.

Rules:

* An exact filter is placed by the filter itself: only the identical topic can match it.
* A wildcard filter whose first level is literal is placed by that first level: every topic it
  matches has the same first level (``#`` matching zero levels, as in ``"a/#"`` matching
  ``"a"``, keeps the first level too).
* A filter whose first level is ``+`` or ``#`` has no key (``None``): it goes into the root set
  that every node keeps.
* A topic is looked up under its own name and under its first level, which is one key when
  the topic has a single level.

Together: if a filter F matches a topic T, then ``placement_key(F)`` is ``None`` or one of
``lookup_keys(T)``; so a publish consults at most two shards plus the local root set.
"""

from __future__ import annotations

from .topics import first_level

__all__ = ["lookup_keys", "placement_key"]


def placement_key(filt: str) -> str | None:
    """The key whose shard stores ``filt``, or None for the root set (``filt`` is validated)."""
    if "+" not in filt and "#" not in filt:
        return filt
    head = first_level(filt)
    if head == "+" or head == "#":
        return None
    return head


def lookup_keys(topic: str) -> tuple[str, ...]:
    """The keys whose shards may hold a filter matching the topic name ``topic``."""
    head = first_level(topic)
    if head == topic:
        return (topic,)
    return (topic, head)
