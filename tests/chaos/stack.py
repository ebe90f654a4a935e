"""The chaos suite's own stack: real broker (tansu on s3rver), real sink + chdb warehouse, real proxy
(process capture mode, as ``onpolicy proxy`` runs it), each a separate process that a fault can
stop, SIGKILL and restart on the same ports and data.

The upstream for load faults is ``bench/standin_upstream.py`` -- a STAND-IN for vLLM's wire format,
not vLLM: vLLM on 2 CPU cores answers a few requests per second, and these faults need hundreds.

The warehouse lives on a small tmpfs of its own when this process may mount one (root), so the
"disk full" fault is a real ENOSPC under chdb and the "read-only" fault a real EROFS (a read-only bind
mount); elsewhere those faults fail, saying to run as root.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.stack import ManagedProcess, http_ok
from streams.embedded import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "chaos-suite-interaction-id-key-0123456789"


def _wait_tcp(port: int, timeout_s: float, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not listen on {port} within {timeout_s:.0f}s")
            time.sleep(0.05)


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (the simple way: enough for tests)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def process_stats(pid: int, data_dir: Path | None = None) -> dict[str, float]:
    """RSS (bytes), threads, open file descriptors other than sockets, and sockets of one process, from /proc.

    Also ``cached_files``: those of the descriptors that chdb keeps as caches bounded by something the
    caller checks separately, not leaks:
    - each live thread's /proc/<pid>/task/<tid>/{stat,schedstat,io}, opened at the thread's first query and
      kept while it lives (bounded by the thread count; a dead thread's would count as a leak);
    - the shared objects and the executable the process has mapped (and their /usr/lib/debug files), opened
      by its symbolizer the first time a stack trace passes through them, as the disk-fault tests' errors do
      (bounded by what is loaded; a mapped data file is not counted).
    With ``data_dir``, also ``data_files``: the descriptors open on files under it (a database's parts)."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps") as f:
        mapped = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    sockets = files = data_files = cached_files = 0
    prefix = f"{data_dir}/" if data_dir is not None else None
    own_task = f"/proc/{pid}/task/"
    for target in _fd_targets(pid):
        if target.startswith("socket:"):
            sockets += 1
            continue
        files += 1
        if prefix is not None and target.startswith(prefix):
            data_files += 1
        elif target.startswith(own_task):
            cached_files += os.path.isdir(own_task + target[len(own_task):].split("/", 1)[0])
        elif (target in mapped and (".so" in os.path.basename(target) or target == exe)) \
                or target.startswith("/usr/lib/debug/"):
            cached_files += 1
    # Sockets come and go with client connections; a leak shows in files (and in sockets at rest).
    return {"rss": float(rss), "threads": float(threads), "fds": float(files), "sockets": float(sockets),
            "data_files": float(data_files), "cached_files": float(cached_files)}


def fd_kinds(pid: int) -> Counter[str]:
    """The non-socket descriptors of one process by what they point at: a file's path (with digit runs
    shown as ``N``, so /proc/123/task/456/stat and its siblings count together), or the kind of a pipe
    or anonymous inode. What a leak-check prints when descriptors are left open."""
    return Counter(re.sub(r"\[\d+\]$", "", t) if t.startswith(("pipe:", "anon_inode:")) else re.sub(r"\d+", "N", t)
                   for t in _fd_targets(pid) if not t.startswith("socket:"))


def fd_kinds_diff(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """What changed between two ``fd_kinds`` snapshots: kind -> count after minus before (non-zero only)."""
    return {k: after[k] - before[k] for k in sorted(before.keys() | after.keys()) if after[k] != before[k]}


def _fd_targets(pid: int) -> Iterator[str]:
    """What each open descriptor of one process points at (``socket:[...]``, ``pipe:[...]``, a path); a
    descriptor closed while it is read is left out."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            yield os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue


def child_pid(parent: int, needle: str, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[1]) == parent and needle in cmd:
                return int(entry)
        time.sleep(0.05)
    raise AssertionError(f"no child {needle} of {parent}")


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


@dataclass
class ChaosStack:
    home: Path
    warehouse_mb: int = 1024
    ports: dict[str, int] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    sink: ManagedProcess | None = None
    proxy: ManagedProcess | None = None
    standin: subprocess.Popen | None = None
    tmpfs: bool = False
    api_key: str = ""

    # -- paths and environment ----------------------------------------------------------------
    @property
    def warehouse_dir(self) -> Path:
        return self.home / "warehouse"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}/v1"

    @property
    def standin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['standin']}/v1"

    @property
    def sink_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sink_metrics']}/metrics"

    @property
    def proxy_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}/metrics"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ONPOLICY_HOME=str(self.home),
            ONPOLICY_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{self.ports['broker']}",
            ONPOLICY_WAREHOUSE_URL=f"chdb://{self.warehouse_dir}",
            # Reconciliation judged quickly, over the whole session (the suite asserts on it).
            ONPOLICY_SINK_RECONCILE_INTERVAL_S="1",
            ONPOLICY_SINK_RECONCILE_LOOKBACK_S="7200",
            ONPOLICY_SINK_RECONCILE_SETTLE_S="3",
            ONPOLICY_SINK_IMPLICIT_INTERVAL_S="0",
            ONPOLICY_PROXY_INTERACTION_ID_KEY=KEY,
            ONPOLICY_PROXY_RECONCILE_TALLY_INTERVAL_S="1",
            ONPOLICY_PROXY_API_KEYS_FILE=str(self.home / "secrets" / "api_keys.json"),
            ONPOLICY_PROXY_PRODUCER__SPOOL_DIR=str(self.home / "spool" / "proxy"),
            PYTHONPATH=str(REPO),
        )
        return env

    # -- lifecycle ----------------------------------------------------------------------------
    def up(self) -> "ChaosStack":
        from proxy.api_keys import ensure_key_file
        from streams.kafka_admin import ensure_topics
        from streams.settings import KafkaSettings

        self.home.mkdir(parents=True, exist_ok=True)
        for name in ("broker", "broker_store", "sink_metrics", "warehouse", "proxy", "standin"):
            self.ports[name] = free_port()
        self.warehouse_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.warehouse_mb}m", "tmpfs", str(self.warehouse_dir)],
                               capture_output=True, text=True)
            self.tmpfs = r.returncode == 0
        secrets = self.home / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        entry = ensure_key_file(secrets / "chaos_api_key", tenant="", name="chaos")
        (secrets / "api_keys.json").write_text(json.dumps([entry]))
        self.api_key = (secrets / "chaos_api_key").read_text().strip()
        self.standin = subprocess.Popen([sys.executable, str(REPO / "bench" / "standin_upstream.py"), "--port",
                                         str(self.ports["standin"])], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_tcp(self.ports["standin"], 15, "stand-in upstream")
        self.broker = EmbeddedBroker(data_dir=self.home / "broker", durable=True, port=self.ports["broker"],
                                     s3_port=self.ports["broker_store"]).start()
        ensure_topics(KafkaSettings(bootstrap_servers=self.broker.bootstrap_servers))
        self.sink = ManagedProcess(
            "sink", [sys.executable, "-m", "deploy.cli", "sink", "--metrics-port", str(self.ports["sink_metrics"]),
                     "--warehouse-port", str(self.ports["warehouse"])],
            self.env(), self.home / "logs" / "sink.log", ready=http_ok(self.sink_metrics_url))
        self.sink.start(timeout_s=90)
        self.proxy = ManagedProcess(
            "proxy", [sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port",
                      str(self.ports["proxy"]), "--upstream-url", self.standin_url, "--no-follow-control"],
            self.env(), self.home / "logs" / "proxy.log",
            ready=http_ok(f"http://127.0.0.1:{self.ports['proxy']}/healthz"))
        self.proxy.start(timeout_s=60)
        return self

    def down(self) -> None:
        for p in (self.proxy, self.sink):
            if p is not None:
                try:
                    p.stop(timeout_s=20)
                except Exception:  # noqa: BLE001 - teardown goes on
                    pass
        # Capture workers run in their own sessions; they exit on EOF once the proxy is gone.
        if self.broker is not None:
            self.broker.stop()
        if self.standin is not None and self.standin.poll() is None:
            self.standin.terminate()
            self.standin.wait(5)
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.warehouse_dir)], capture_output=True)

    # -- faults -------------------------------------------------------------------------------
    def kill(self, proc: ManagedProcess) -> None:
        """SIGKILL the process itself (not its group: the proxy's capture worker must outlive it)."""
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)

    def restart(self, proc: ManagedProcess, timeout_s: float = 90) -> float:
        t0 = time.monotonic()
        proc.start(timeout_s=timeout_s)
        return time.monotonic() - t0

    def fill_warehouse_disk(self) -> int:
        """Take every free byte of the warehouse's tmpfs (a real ENOSPC for chdb). Returns bytes taken."""
        st = os.statvfs(self.warehouse_dir)
        free = st.f_bavail * st.f_frsize
        ballast = self.warehouse_dir / "chaos-ballast"
        with open(ballast, "wb") as f:
            chunk = b"\0" * (1 << 20)
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass
        try:  # and the last partial MiB
            with open(self.warehouse_dir / "chaos-ballast-tail", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        return free

    def clear_warehouse_disk(self) -> None:
        for name in ("chaos-ballast", "chaos-ballast-tail"):
            (self.warehouse_dir / name).unlink(missing_ok=True)

    def make_warehouse_read_only(self) -> None:
        """Mount the warehouse's directory over itself, read-only (needs root). From then on every
        file the engine creates, renames or opens for writing fails with EROFS, as after the kernel
        remounts a failing disk read-only. Descriptors chdb already holds open stay writable (a plain
        ``remount,ro`` is refused while they exist); new parts, renames and metadata files are not."""
        d = str(self.warehouse_dir)
        for cmd in (["mount", "--bind", d, d], ["mount", "-o", "remount,bind,ro", d]):
            # The read-only remount is refused (EBUSY, "mount point is busy") while a file is open for
            # writing through the new bind mount: the sink writing a part in the moment between the two
            # commands (a CI run at acdf422). Parts are written in milliseconds; try again for up to 5 s.
            deadline = time.monotonic() + 5.0
            while (r := subprocess.run(cmd, capture_output=True, text=True)).returncode:
                if "busy" not in r.stderr or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({r.stderr.strip()}): the read-only fault needs root")
                time.sleep(0.05)

    def clear_warehouse_read_only(self) -> None:
        r = subprocess.run(["umount", str(self.warehouse_dir)], capture_output=True, text=True)  # the top (bind) mount
        if r.returncode:
            raise RuntimeError(f"umount of the read-only bind mount failed: {r.stderr.strip()}")

    # -- observation --------------------------------------------------------------------------
    def warehouse(self):
        from streams.warehouse_server import RemoteWarehouse

        token = (self.home / "secrets" / "warehouse_token").read_text().strip()
        return RemoteWarehouse(f"onpolicy+http://127.0.0.1:{self.ports['warehouse']}", "onpolicy", token=token,
                               timeout_s=30)

    def landed(self, since_s: float) -> dict[str, tuple[int, int]]:
        """interaction_id -> (rows after FINAL, distinct event ids), for events with ts >= since (unix s)."""
        rows = self.warehouse().query(
            "SELECT interaction_id, count(), uniqExact(event_id) FROM {db}.interactions FINAL "
            f"WHERE ts >= toDateTime64({since_s:.3f}, 3, 'UTC') GROUP BY interaction_id")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def feedback_landed(self, since_s: float) -> dict[str, tuple[int, int]]:
        rows = self.warehouse().query(
            "SELECT idempotency_key, count(), uniqExact(event_id) FROM {db}.feedback FINAL "
            f"WHERE ts >= toDateTime64({since_s:.3f}, 3, 'UTC') AND source = 'explicit' GROUP BY idempotency_key")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def sink_metrics(self) -> dict[str, float]:
        return scrape(self.sink_metrics_url)

    def spool_bytes(self) -> int:
        return dir_bytes(self.home / "spool")

    def capture_worker_pid(self) -> int:
        return child_pid(self.proxy.proc.pid, "proxy.capture_worker")

    def sink_log_tail(self, n: int = 3000) -> str:
        return re.sub(r"\n+", "\n", (self.home / "logs" / "sink.log").read_text(errors="replace")[-n:])
