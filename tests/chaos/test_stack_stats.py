"""The soak's leak check counts what chdb keeps as bounded caches apart from real leaks
(tests/chaos/stack.py ``process_stats``): a CI run failed on the caches alone.

Each case runs in a fresh process: this one may have sent a stack trace through chdb's symbolizer
already, and its other tests' threads open and close descriptors of their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.chaos.stack import REPO

_CHDB_ERROR = """
import chdb
chdb.query("SELECT 1")
before, kinds = process_stats(os.getpid()), fd_kinds(os.getpid())
try:
    chdb.query("SELECT throwIf(1)")
except Exception:
    pass
"""

_LEAKS = """
import threading, time
before, kinds = process_stats(os.getpid()), fd_kinds(os.getpid())
leaked = open(sys.argv[1], "w")
held = []
t = threading.Thread(target=lambda: held.append(
    (threading.get_native_id(), os.open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/stat", os.O_RDONLY))))
t.start()
t.join()
deadline = time.monotonic() + 10  # join() returns before the OS thread is gone
while os.path.isdir(f"/proc/{os.getpid()}/task/{held[0][0]}") and time.monotonic() < deadline:
    time.sleep(0.01)
"""

_REPORT = """
print(json.dumps([before, process_stats(os.getpid()), fd_kinds_diff(kinds, fd_kinds(os.getpid()))]))
"""


def _run(body: str, *args: str) -> tuple[dict, dict, dict]:
    head = "import json, os, sys\nfrom tests.chaos.stack import fd_kinds, fd_kinds_diff, process_stats\n"
    out = subprocess.run([sys.executable, "-c", head + body + _REPORT, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, opened = json.loads(out.stdout.strip().splitlines()[-1])
    return before, after, opened


def _own(stats: dict[str, float]) -> float:
    return stats["fds"] - stats["cached_files"]


def test_a_chdb_stack_trace_opens_only_cached_descriptors():
    pytest.importorskip("chdb")
    before, after, opened = _run(_CHDB_ERROR)
    # the symbolizer opened the loaded libraries, and the thread that ran the query its procfs files
    assert after["fds"] > before["fds"] + 10, ("chdb opened nothing: this test no longer shows the cache", opened)
    assert _own(after) <= _own(before) + 2, (before, after, opened)


def test_a_leaked_file_and_a_dead_threads_procfs_file_still_count(tmp_path):
    before, after, opened = _run(_LEAKS, str(tmp_path / "leak"))
    assert _own(after) == _own(before) + 2, (before, after, opened)
    assert sum(n for k, n in opened.items() if k.endswith("/leak")) == 1, opened
    assert opened.get("/proc/N/task/N/stat") == 1, opened
