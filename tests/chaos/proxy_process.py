"""A real proxy process (``onpolicy proxy``, as deployed) on a real socket, a STAND-IN upstream
(bench/standin_upstream.py: vLLM's wire format, instant answers -- not vLLM), raw-socket HTTP for
requests no well-behaved client can send, and a background OpenAI SDK load that counts what it was
served while an attack runs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from proxy.testing import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ONPOLICY = str(Path(sys.executable).with_name("onpolicy"))


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {port} within {timeout_s:.0f}s")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Standin:
    """bench/standin_upstream.py in its own process: a STAND-IN for vLLM, for checks where the
    upstream's answers do not matter."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([PYTHON, str(REPO / "bench" / "standin_upstream.py"), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=REPO)
        _wait_port(self.port, self.proc, "the stand-in upstream")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        _stop(self.proc)


class ProxyProcess:
    """``onpolicy proxy`` with settings from ``ONPOLICY_PROXY_*`` env vars; stdout and stderr (the capture
    worker's too: it inherits them) go to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, *, log_level: str = "INFO"):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        full_env = {**os.environ, **env, "ONPOLICY_PROXY_PORT": str(self.port)}
        self.proc = subprocess.Popen([ONPOLICY, "--log-level", log_level, "proxy"], env=full_env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "the proxy")

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def stop(self) -> None:
        _stop(self.proc, 30)
        self._log.close()


# -- raw HTTP -----------------------------------------------------------------------------------
@dataclass
class Reply:
    """What came back on one connection: every response parsed from the bytes, whether the server
    closed the connection, and how long it took."""

    raw: bytes
    responses: list[tuple[int, dict[str, list[str]], bytes]] = field(default_factory=list)
    closed: bool = False
    elapsed_s: float = 0.0
    send_error: str | None = None

    @property
    def status(self) -> int | None:
        return self.responses[0][0] if self.responses else None

    @property
    def headers(self) -> dict[str, list[str]]:
        return self.responses[0][1] if self.responses else {}

    @property
    def body(self) -> bytes:
        return self.responses[0][2] if self.responses else b""


def parse_responses(raw: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    out = []
    rest = raw
    while rest:
        head, sep, tail = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
        if not m:
            break
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.decode("latin-1").strip().lower(), []).append(value.decode("latin-1").strip())
        n = int(headers.get("content-length", ["0"])[0])
        out.append((int(m.group(1)), headers, tail[:n]))
        rest = tail[n:]
    return out


def raw_exchange(port: int, data: bytes | list[bytes], *, delay_s: float = 0.0, timeout_s: float = 10.0,
                 linger_s: float = 1.0) -> Reply:
    """Send ``data`` (a list: pieces sent ``delay_s`` apart), then read until the server closes the
    connection, or -- once a whole response arrived -- until ``linger_s`` passes with nothing more
    (so a second, smuggled response would be seen), or ``timeout_s``."""
    pieces = data if isinstance(data, list) else [data]
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    reply = Reply(raw=b"")
    try:
        for i, piece in enumerate(pieces):
            try:
                s.sendall(piece)
            except OSError as exc:  # the server closed on us mid-send: read what it answered
                reply.send_error = type(exc).__name__
                break
            if delay_s and i < len(pieces) - 1:
                time.sleep(delay_s)
        deadline = t0 + timeout_s
        buf = b""
        while True:
            complete = parse_responses(buf)
            wait = deadline - time.monotonic()
            if complete and complete[-1][2] is not None and _whole(buf):
                wait = min(wait, linger_s)
            if wait <= 0:
                break
            s.settimeout(wait)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                reply.closed = True
                break
            if not chunk:
                reply.closed = True
                break
            buf += chunk
        reply.raw = buf
        reply.responses = parse_responses(buf)
    finally:
        s.close()
    reply.elapsed_s = time.monotonic() - t0
    return reply


def _whole(buf: bytes) -> bool:
    """True when ``buf`` ends exactly at the end of its last response."""
    rest = buf
    while rest:
        head, sep, tail = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", b"\r\n" + head)
        n = int(m.group(1)) if m else 0
        if len(tail) < n:
            return False
        rest = tail[n:]
    return True


def request_bytes(path: str = "/v1/chat/completions", body: bytes | None = None, headers: list[bytes] | None = None,
                  method: str = "POST", content_length: bool = True, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Content-Type: application/json"]
    lines += headers or []
    if close:
        lines.append(b"Connection: close")
    if body is not None and content_length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


CHAT = json.dumps({"model": "standin-model", "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


# -- background load ---------------------------------------------------------------------------
class SdkLoad:
    """The unmodified OpenAI SDK sending chat completions in a loop, counting what it was served."""

    def __init__(self, base_url: str, *, api_key: str = "sk-client-load", model: str = "standin-model",
                 pause_s: float = 0.01, headers: dict[str, str] | None = None):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30,
                             default_headers=headers or {})
        self.model = model
        self.pause_s = pause_s
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdk-load", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.client.chat.completions.create(model=self.model, max_tokens=4,
                                                        messages=[{"role": "user", "content": "hi"}])
                assert r.choices[0].message.content
                self.ok += 1
            except Exception as exc:  # counted, asserted on by the test
                self.failed.append(f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(self.pause_s)

    def start(self) -> "SdkLoad":
        self._thread.start()
        return self

    def snapshot(self) -> tuple[int, int]:
        return self.ok, len(self.failed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
