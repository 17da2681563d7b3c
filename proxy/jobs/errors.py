"""The job store's own faults: never answered as such (the gateway turns them into
JobsUnavailable, proxy/errors.py), always logged with what failed.
"""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed for a reason of the store's own (I/O, a full disk).

    Raised by the store and turned into JobsUnavailable at the HTTP edge; the message
    names the store's file and the fault, never a record's content."""


class Unconfirmed(StoreError):
    """Redis made the write, but fewer replicas than jobs.redis_min_replicas confirmed it
    in time: it is on the master, and a failover may lose it. `reply`: the script's."""

    def __init__(self, message: str, reply: object = None) -> None:
        super().__init__(message)
        self.reply = reply


class UnreadableRecord(Exception):
    """A stored record that cannot be opened: no key for it, tampered, or corrupt."""
