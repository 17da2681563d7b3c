"""The latest answers the proxy made itself, for the admin port's status page.

The forwarder appends one entry per refused request (never per served one); the
status page (status.py, imported only when the page is first asked for) reads them.
Kept apart from the page's module so that serving requests never loads it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

# How many refused requests the page shows (the newest; older ones drop off).
ERRORS_KEPT = 20
# A path longer than this is cut (with "…"): a row of the page, not a copy of the request.
PATH_SHOWN = 160


@dataclass(frozen=True, slots=True)
class RefusedRequest:
    """One answer the proxy made itself (an X-Proxy-Error), as the page shows it."""

    time: float  # Unix time
    status: int
    reason: str  # the X-Proxy-Error reason: a fixed word (proxy/errors.py)
    method: str
    path: str  # masked by the caller: no user login, no query string
    client: str | None  # the configured client's name, once it was admitted
    request_id: str


class RecentErrors:
    """The latest refused requests: a bounded ring, appended to once per refusal.

    The caller hands over a path already masked (see the forwarder); the ring keeps
    nothing else of the request.
    """

    def __init__(self, size: int = ERRORS_KEPT) -> None:
        self._ring: deque[RefusedRequest] = deque(maxlen=size)
        self.size = size
        # All refusals since start, of which the ring holds the last `size`.
        self.total = 0

    def record(
        self,
        status: int,
        reason: str,
        method: str,
        path: str,
        client: str | None,
        request_id: str,
    ) -> None:
        self.total += 1
        if len(path) > PATH_SHOWN:
            path = path[: PATH_SHOWN - 1] + "…"
        self._ring.append(
            RefusedRequest(time.time(), status, reason, method[:24], path, client, request_id)
        )

    def latest(self) -> list[RefusedRequest]:
        """Newest first."""
        return list(reversed(self._ring))
