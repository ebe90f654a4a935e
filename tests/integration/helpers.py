"""Helpers for integration tests: counting rows in a warehouse owned by another process, waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).parents[2]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def query_other_warehouse(path: Path, database: str, sql: str) -> list:
    """Run one query against an embedded warehouse in a fresh process (chdb: one path per process)."""
    code = (
        "import json, sys\n"
        "from streams.settings import WarehouseSettings\n"
        "from streams.warehouse import Warehouse\n"
        f"w = Warehouse(WarehouseSettings(url='chdb://{path}', database='{database}'))\n"
        f"print(json.dumps([list(r) for r in w.query({sql!r})], default=str))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def onpolicy_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
