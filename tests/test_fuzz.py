"""Property: whatever malformed request arrives, the running proxy answers it cleanly.

Generated requests each carry at least one fault (a bad method, target, header,
escape, body or framing) and go over a raw socket to a real `luxsci-proxy run`
process in front of a real sandbox process. For every one: the answer is a 4xx
in the proxy's error shape with no secret in it, nothing reached the API, and
the process keeps serving. At the end its whole log holds no secret either.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import SECRET, TOKEN, curl, free_port, wait_until

API = "/perl/api/v2/account/7/things"


class Running:
    def __init__(self, port: int, sandbox: str, proc: subprocess.Popen[str]) -> None:
        self.port, self.sandbox, self.proc = port, sandbox, proc

    def api_requests(self) -> int:
        return int(json.loads(curl(f"{self.sandbox}/_sandbox/stats")[1])["requests"])


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    sandbox_port, port, admin = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUXSCI_")}
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "sandbox",
            "--port",
            str(sandbox_port),
            "--token",
            TOKEN,
            "--secret",
            SECRET,
            "--user-per-window",
            "100000",
            "--account-per-window",
            "100000",
            "--per-day",
            "10000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert sandbox.stdout is not None and "listening" in sandbox.stdout.readline()
    config = tmp_path_factory.mktemp("fuzz") / "proxy.yaml"
    config.write_text(f"""
listen: {{port: {port}, client_timeout: 0.5, max_header_bytes: 4096}}
admin: {{port: {admin}}}
upstream: {{url: "http://127.0.0.1:{sandbox_port}", allow_insecure: true}}
auth: {{token: "${{T}}", secret: "${{S}}"}}
limits: {{state_file: "", account_per_minute: 100000, user_per_minute: 100000, per_day: 10000000}}
logging: {{level: debug}}
""")
    # The log goes to a file: a pipe nobody reads until the end fills up (64 KiB) and
    # then blocks the proxy's writes, as it would block any process.
    log_path = config.with_suffix(".log")
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        text=True,
        env={**env, "T": TOKEN, "S": SECRET},
    )
    wait_until(lambda: _ok(f"http://127.0.0.1:{admin}/readyz"))
    yield Running(port, f"http://127.0.0.1:{sandbox_port}", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    log_file.close()
    log = log_path.read_text()
    sandbox.send_signal(signal.SIGTERM)
    sandbox.communicate(timeout=10)
    assert proc.returncode == 0
    assert log.strip(), "the proxy wrote its log"
    assert SECRET not in log and TOKEN not in log


def _ok(url: str) -> bool:
    try:
        return curl(url)[0] == 200
    except subprocess.CalledProcessError:
        return False


def exchange(port: int, data: bytes) -> bytes:
    # No half-close after sending: like nginx, the proxy takes a client's FIN for a
    # disconnect (it cannot tell the two apart) and stops working on its request.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


# -- what a malformed request is made of -------------------------------------------------------

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8)
segment = token | st.sampled_from(["joe%40example.com", "a+b", "x~y"])
good_path = st.lists(segment, min_size=0, max_size=3).map(
    lambda s: API + "".join("/" + x for x in s)
)

bad_targets = st.one_of(
    st.sampled_from(
        [
            "http://evil.example/x",
            "https://rest.luxsci.com/perl/api/v2/auth",
            "*",
            "evil:443",
            "//evil/x",
            "x",
            "",
        ]
    ),
    good_path.map(lambda p: p + "/../secret"),
    good_path.map(lambda p: p + "/%2e%2E/x"),
    good_path.map(lambda p: p + "/a%2f..%2fb"),  # a dot-segment behind encoded slashes
    good_path.map(lambda p: p + "/a%5C..%5Cb"),
    good_path.map(lambda p: p + "//x"),
    good_path.map(lambda p: p + "/%zz"),
    good_path.map(lambda p: p + "/%"),
    good_path.map(lambda p: p + "/%00"),
    good_path.map(lambda p: p + "/%ff%fe"),
    good_path.map(lambda p: p + "?q=%G0"),
)
bad_methods = st.sampled_from(["BREW", "G ET", "GET\x00", "", "get", "PÖST", "CONNECT"])
bad_header_lines = st.sampled_from(
    [
        "Bad Name: x",
        "NoColon",
        ": empty",
        "X-A: b\rc",
        "Content-Length: abc",
        "Content-Length: -5",
        "Transfer-Encoding: bogus",
        "X-Long: " + "v" * 5000,
        "Content-Length: 1\r\nContent-Length: 2",
    ]
)
bad_json = st.sampled_from(
    [b"{", b'{"a": }', b"[1,]", b'{"a": "\xff"}', b"\xef\xbb\xbf{}x", b"nul"]
)


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    fault = draw(
        st.sampled_from(["target", "method", "header", "json", "multipart", "wait", "version"])
    )
    method, target = "GET", draw(good_path)
    headers = ["Host: x", "Connection: close"]
    body = b""
    if fault == "target":
        target = draw(bad_targets)
    elif fault == "method":
        method = draw(bad_methods)
    elif fault == "header":
        headers.append(draw(bad_header_lines))
    elif fault == "json":
        method, body = "POST", draw(bad_json)
        headers.append("Content-Type: application/json")
    elif fault == "multipart":
        method = "POST"
        boundary = draw(st.sampled_from(["B", "x" * 80, ""]))
        headers.append(f"Content-Type: multipart/form-data; boundary={boundary}")
        body = draw(
            st.sampled_from(
                [
                    b'--B\r\nContent-Disposition: form-data; name="json"\r\n\r\n{}',  # never closed
                    b"garbage",
                    b"--B\r\nno-separator--B--\r\n",
                    b'--B\r\nContent-Disposition: form-data; name="files"\r\n\r\nx\r\n--B--\r\n',
                ]
            )
        )
    elif fault == "wait":
        headers.append("X-Proxy-Max-Wait: " + draw(st.sampled_from(["soon", "-1", "nan", "inf"])))
    elif fault == "version":
        return f"{method} {target} HTTP/9.9\r\nHost: x\r\n\r\n".encode()
    if body:
        headers.append(f"Content-Length: {len(body)}")
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=malformed())
def test_every_malformed_request_gets_a_clean_4xx_and_nothing_reaches_the_api(
    running: Running, request: bytes
) -> None:
    before = running.api_requests()
    answer = exchange(running.port, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line.startswith("HTTP/1."), answer[:200]
    status = int(status_line.split()[1])
    if request.split(b"\r\n", 1)[0].endswith(b" HTTP/9.9"):
        # A version other than 1.x: 505, not a 4xx (RFC 9110 15.6.6; issue 12).
        assert status == 505, (request[:200], answer[:300])
    else:
        assert 400 <= status < 500, (request[:200], answer[:300])
    headers = {
        k.strip().lower(): v.strip()
        for k, v in (line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    }
    assert headers.get("x-proxy-error"), answer[:300]
    doc = json.loads(body)
    assert doc["success"] == 0 and isinstance(doc["error_message"], str) and doc["error_message"]
    assert SECRET.encode() not in answer and TOKEN.encode() not in answer
    assert running.api_requests() == before  # nothing malformed reached the API
    assert running.proc.poll() is None  # still running


def test_the_proxy_still_serves_after_the_storm(running: Running) -> None:
    status, body = curl(f"http://127.0.0.1:{running.port}{API}")
    assert status == 200 and json.loads(body)["success"] == 1
