"""Throw-away Redis processes on local ports, for tests that need real Redis: a
redis-server, a redis-sentinel, and a three-node Redis Cluster.

Synchronous on purpose (a subprocess and a raw-socket PING), so it works from
plain fixtures and from inside async tests alike.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import IO

INSTALL_HINT = "redis-server is not installed: apt-get install redis-server (CI installs it)"
SENTINEL_HINT = "redis-sentinel is not installed: apt-get install redis-sentinel (CI installs it)"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def redis_sentinel_binary() -> str | None:
    return shutil.which("redis-sentinel")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> None:
        command = self.command()
        # A file, not a pipe: nobody reads the output until something goes wrong.
        # It lives as long as the server; stop() closes it.
        self._output = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            # Any reply means it listens; with --requirepass PING answers -NOAUTH.
            if self._answers():
                return
            time.sleep(0.02)
        output = self._read_output()
        self.stop()
        raise RuntimeError(
            f"redis-server on port {self.port} did not come up in {timeout} s:\n{output}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output, self._output = self._output, None
        if output is not None:
            output.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """kill -9: no shutdown, nothing flushed; stop() then only cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def _read_output(self) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")


class RedisSentinel(RedisServer):
    """A redis-sentinel watching one master as `service`. Its config file is its own
    (a sentinel rewrites it as it learns the replicas and the other sentinels)."""

    def __init__(
        self,
        master_port: int,
        directory: str,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        super().__init__()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.conf = os.path.join(directory, f"sentinel-{self.port}.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f"dir {directory}\n"
                f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {service} 1\n"
            )

    def command(self) -> list[str]:
        binary = redis_sentinel_binary()
        if binary is None:
            raise RuntimeError(SENTINEL_HINT)
        return [binary, self.conf]


def cluster_node(directory: str) -> RedisServer:
    """A redis-server ready to join a Cluster (its nodes file in `directory`)."""
    port = free_port()
    return RedisServer(
        port,
        [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "2000",
            # Its own free port: the default (port + 10000) may be taken or over 65535.
            "--cluster-port",
            str(free_port()),
            "--dir",
            directory,
        ],
    )


def create_cluster(nodes: Sequence[RedisServer], timeout: float = 20.0) -> None:
    """Join started nodes into one Cluster, masters only, every slot covered; returns
    once every node says the cluster is ok."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError(INSTALL_HINT)
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        [cli, "--cluster", "create", *addresses, "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [
            subprocess.run(
                [cli, "-p", str(n.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            for n in nodes
        ]
        if all("cluster_state:ok" in state for state in states):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the cluster never became ok: {states}")
