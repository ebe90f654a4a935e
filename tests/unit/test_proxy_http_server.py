"""The connection layer (proxy/http_server.py) in-process: malformed HTTP is a JSON 400 that quotes
nothing, a slow head is cut with a 408, and a normal keep-alive client is not disturbed. The full
attack set against a proxy process is tests/chaos/test_hostile_input.py."""

from __future__ import annotations

import json
import socket
import time

import pytest

from proxy.settings import ProxySettings
from proxy.testing import RunningProxy


@pytest.fixture(scope="module")
def proxy():
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key="unit-http-server-key-0123456789", request_header_timeout_s=0.5,
                      shutdown_grace_s=0)
    running = RunningProxy(s).start()
    yield running
    running.stop()


def _exchange(port: int, data: bytes, pause_s: float = 0.0) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if data:
            sock.sendall(data)
        time.sleep(pause_s)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out, time.monotonic() - t0
            out += chunk


def test_malformed_http_is_a_json_400_that_quotes_nothing(proxy):
    secret = b"op-this-must-not-come-back-0123456789"
    raw, _ = _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\x01\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert json.loads(body)["error"]["code"] == "invalid_http"
    assert secret not in raw


def test_a_head_that_does_not_arrive_in_time_gets_408_and_is_closed(proxy):
    raw, elapsed = _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert elapsed < 3


def test_a_kept_alive_connection_serves_request_after_request(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += sock.recv(4096)
            assert data.startswith(b"HTTP/1.1 200 ")
            time.sleep(0.7)  # idle longer than the head deadline between requests: not a slow head
