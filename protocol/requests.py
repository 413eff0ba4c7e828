"""One registry of the requests a node has waiting on peers: route changes, lookups, QoS 1 forwards,
invalidations.

Rules of this file:
- Every request sent to a peer and waiting for its answer is registered here under the id its frame carries;
  the answer (or the peer's ERROR naming that id) finds it here, whatever its kind.
- A peer that refuses a request or leaves the cluster fails what waits on it now, not at its timeout: the
  registry finds those requests (``waits_on``) and hands each back to the side that opened it
  (``Requester``), which decides what failing means for it.
- Ids are unique per node process and never reused, so a late answer to a finished request finds nothing.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol


class Request(Protocol):
    def waits_on(self, node: str) -> bool: ...


class Requester(Protocol):
    def request_refused(self, rid: int, request: Any, sender: str, code: str, reason: str) -> None: ...

    def request_peer_lost(self, rid: int, request: Any, node: str) -> None: ...


class PendingRequests:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._open: dict[int, tuple[Any, Requester]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, rid: object) -> bool:
        return rid in self._open

    def open(self, request: Any, requester: Requester, rid: int | None = None) -> int:
        rid = next(self._ids) if rid is None else rid
        self._open[rid] = (request, requester)
        return rid

    def get(self, rid: Any) -> Any:
        found = self._open.get(rid)
        return None if found is None else found[0]

    def close(self, rid: Any) -> Any:
        """Forget a request (answered, failed, timed out); returns it, or None if it was already closed."""
        found = self._open.pop(rid, None)
        return None if found is None else found[0]

    def count(self, kind: type) -> int:
        return sum(1 for request, _ in self._open.values() if type(request) is kind)

    def refused(self, rid: Any, sender: str, code: str, reason: str) -> bool:
        """A peer's ERROR names request ``rid``; False when no such request waits on that peer."""
        found = self._open.get(rid)
        if found is None:
            return False
        request, requester = found
        if not request.waits_on(sender):  # only the peer a request went to may refuse it
            return False
        requester.request_refused(rid, request, sender, code, reason)
        return True

    def peer_lost(self, node: str) -> None:
        for rid, (request, requester) in list(self._open.items()):
            if rid in self._open and request.waits_on(node):
                requester.request_peer_lost(rid, request, node)
