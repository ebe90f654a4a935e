"""The soak's leak check counts what chdb keeps as bounded caches apart from real leaks
(tests/chaos/stack.py ``process_stats``): a CI run failed on the caches alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from tests.chaos.stack import REPO, fd_kinds, fd_kinds_diff, process_stats

# In a fresh process: this one may have sent a stack trace through chdb's symbolizer already.
_CHDB_ERROR = """
import json, os
import chdb
from tests.chaos.stack import fd_kinds, fd_kinds_diff, process_stats
chdb.query("SELECT 1")
before, kinds = process_stats(os.getpid()), fd_kinds(os.getpid())
try:
    chdb.query("SELECT throwIf(1)")
except Exception:
    pass
print(json.dumps([before, process_stats(os.getpid()), fd_kinds_diff(kinds, fd_kinds(os.getpid()))]))
"""


def _own(stats: dict[str, float]) -> float:
    return stats["fds"] - stats["cached_files"]


def test_a_chdb_stack_trace_opens_only_cached_descriptors():
    pytest.importorskip("chdb")
    out = subprocess.run([sys.executable, "-c", _CHDB_ERROR], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, opened = json.loads(out.stdout.strip().splitlines()[-1])
    # the symbolizer opened the loaded libraries, and the thread that ran the query its procfs files
    assert after["fds"] > before["fds"] + 10, ("chdb opened nothing: this test no longer shows the cache", opened)
    assert _own(after) <= _own(before) + 2, (before, after, opened)


def test_a_leaked_file_and_a_dead_threads_procfs_file_still_count(tmp_path):
    pid = os.getpid()
    before, kinds = process_stats(pid), fd_kinds(pid)
    leaked = open(tmp_path / "leak", "w")  # noqa: SIM115 - the leak under test
    held: list[int] = []
    t = threading.Thread(target=lambda: held.append(
        os.open(f"/proc/{pid}/task/{threading.get_native_id()}/stat", os.O_RDONLY)))
    t.start()
    t.join()
    try:
        after = process_stats(pid)
        opened = fd_kinds_diff(kinds, fd_kinds(pid))
        assert _own(after) == _own(before) + 2, (before, after, opened)
        assert opened.get(re.sub(r"\d+", "N", str(tmp_path / "leak"))) == 1, opened
        assert opened.get("/proc/N/task/N/stat") == 1, opened
    finally:
        leaked.close()
        for fd in held:
            os.close(fd)
