"""A faithful local simulator of the LuxSci REST API, for tests, the demo and offline work.

server = await start_sandbox(SandboxConfig(), port=0)
... talk to server.url, inspect or script server.sandbox ...
await server.close()
"""

from proxy.sandbox.config import SandboxConfig, SandboxWindow
from proxy.sandbox.faults import FaultRule
from proxy.sandbox.server import SandboxServer, start_sandbox
from proxy.sandbox.state import Sandbox, SandboxStats

__all__ = [
    "FaultRule",
    "Sandbox",
    "SandboxConfig",
    "SandboxServer",
    "SandboxStats",
    "SandboxWindow",
    "start_sandbox",
]
