"""Traffic shaping: rate windows, the wait queue, and where permits are counted."""

from proxy.limits.backend import Backend, MemoryBackend, Verdict
from proxy.limits.lanes import Client, Lane
from proxy.limits.limiter import SCOPES, RateLimiter
from proxy.limits.windows import Windows

__all__ = [
    "SCOPES",
    "Backend",
    "Client",
    "Lane",
    "MemoryBackend",
    "RateLimiter",
    "Verdict",
    "Windows",
]
