"""Whether debug events are wanted, as one attribute read where they would cost something.

`logging.level: debug` makes the proxy explain its decisions (why a request waited,
which code signed it, why it was retried). Those events sit on the hot path, where
even a dropped event costs a call, a dict of its fields and the level check behind
it. So the components that emit them hold this flag and test `flag.on` first: one
attribute read per request when debug is off. The service's Logs owns the flag and
sets it whenever its level changes (start-up, SIGHUP), so every holder follows a
reload without being told.

At the top of the package, like proxy.throttle: limits and schemes may not import
proxy.observe, yet they hold the flag.
"""

from __future__ import annotations

__all__ = ["DebugFlag"]


class DebugFlag:
    __slots__ = ("on",)

    def __init__(self, on: bool = False) -> None:
        self.on = on

    def __repr__(self) -> str:
        return f"DebugFlag(on={self.on})"
