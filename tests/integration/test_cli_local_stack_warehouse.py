"""`onpolicy rewards` and `onpolicy learner status` read the running local stack with nothing but
ONPOLICY_HOME set (issue 17).

The stack's sink owns ``$ONPOLICY_HOME/warehouse`` (chdb opens a data path in one process) and serves
it on loopback; ``stack.json`` names the port. Here a real owner process holds a real chdb path and
serves it with ``WarehouseServer``, so the lock the CLIs must avoid is the real one.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.warehouse_server import RemoteWarehouse, stack_warehouse_url, token_path
from tests.integration.helpers import REPO, wait_until

# The sink's part of the stack: hold the embedded warehouse, serve it, until stdin closes.
_OWNER = r"""
import sys
from streams.settings import WarehouseSettings, default_home
from streams.warehouse import Warehouse
from streams.warehouse_server import WarehouseServer

wh = Warehouse(WarehouseSettings(url=f"chdb://{default_home() / 'warehouse'}"))
wh.migrate()
server = WarehouseServer(wh, port=0).start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""


def _env(home: Path) -> dict[str, str]:
    """This environment without any onpolicy setting, then ONPOLICY_HOME: what a user's shell has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPOLICY_")}
    env["ONPOLICY_HOME"] = str(home)
    return env


def _cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=REPO, env={**_env(home), **env},
                          capture_output=True, text=True, timeout=60)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"the warehouse owner did not start (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


@pytest.fixture
def stack_home(tmp_path):
    """A home like `onpolicy up` leaves it: an owner serving the warehouse, its port in stack.json."""
    home = tmp_path / "home"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], cwd=REPO, env=_env(home), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(_read_line(owner, 60))
        (home / "stack.json").write_text(json.dumps({"ports": {"warehouse": port}}))
        wait_until(lambda: stack_warehouse_url(home) is not None, 10, "the owner to answer the probe")
        yield home
    finally:
        owner.stdin.close()
        try:
            owner.wait(10)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait()


def _save_a_reward(home: Path) -> None:
    from learner.rewards.registry import RewardRegistry, RewardRow
    from learner.rewards.verifiers import RefusalReward

    url = stack_warehouse_url(home)
    wh = RemoteWarehouse(url, "onpolicy", token=token_path(home).read_text().strip())
    RewardRegistry(wh).save_rewards("fam-issue17", "", "env-v1", [
        RewardRow(RefusalReward("fam-issue17", "no-refusal"), "active", 1.0, "validated")])


def test_cli_reads_the_running_stack_with_only_onpolicy_home(stack_home):
    _save_a_reward(stack_home)

    rewards = _cli(stack_home, "rewards")
    assert rewards.returncode == 0, rewards.stderr[-3000:]
    header, row = rewards.stdout.splitlines()[:2]
    assert header.split()[:3] == ["family", "label", "reward"]
    assert row.split()[:4] == ["fam-issue17", "no-refusal", "refusal", "active"]

    # what the stack prints for clients works too (it used to be opened as a ClickHouse server URL)
    printed = _cli(stack_home, "rewards", "--json", ONPOLICY_WAREHOUSE_URL=stack_warehouse_url(stack_home))
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert json.loads(printed.stdout.splitlines()[0])["name"] == "no-refusal"

    # build and revalidate go through the owner as well (no traffic yet: nothing to build from)
    for action, said in (("build", "built 0 environments from 0 trajectories"),
                         ("revalidate", "nothing to re-validate: no environments built yet")):
        done = _cli(stack_home, "rewards", action, "--encoder", "hashing")
        assert done.returncode == 0 and said in done.stderr, done.stderr[-3000:]

    status = _cli(stack_home, "learner", "status")
    assert status.returncode == 0, status.stderr[-3000:]
    assert status.stdout.splitlines()[0].split()[:3] == ["name", "status", "parent"]
    assert "checkpoint:" in status.stdout

    # An explicit URL wins, even the default path: and that path really is locked by the owner.
    locked = _cli(stack_home, "rewards", ONPOLICY_WAREHOUSE_URL=f"chdb://{stack_home / 'warehouse'}")
    assert locked.returncode != 0
    assert "Cannot lock file" in locked.stderr  # chdb's own words, printed by the engine


_WHICH = ("from streams.warehouse_server import open_warehouse; w = open_warehouse(); "
          "print(type(w).__name__, w.settings.url)")


def test_without_a_running_stack_the_default_is_the_embedded_path(tmp_path):
    fresh = tmp_path / "fresh"
    down = tmp_path / "down"  # a stack.json whose warehouse port nobody serves: the stack is down
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    down.mkdir()
    (down / "stack.json").write_text(json.dumps({"ports": {"warehouse": dead_port}}))
    for home in (fresh, down):
        out = subprocess.run([sys.executable, "-c", _WHICH], cwd=REPO, env=_env(home), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == ["Warehouse", f"chdb://{home / 'warehouse'}"]


def test_a_refused_token_is_read_again_and_only_a_wrong_one_fails(stack_home, tmp_path, monkeypatch):
    """The token comes from $ONPOLICY_HOME when a request is made; a refusal re-reads it once, so a
    client that read an old token (a stack restarted over a fresh home) recovers, and a 401 that
    reaches the caller means the token really is wrong."""
    from streams.warehouse_server import RemoteWarehouseError

    other = tmp_path / "other"
    (other / "secrets").mkdir(parents=True)
    (other / "secrets" / "warehouse_token").write_text("not-the-owners")
    monkeypatch.setenv("ONPOLICY_HOME", str(other))
    wh = RemoteWarehouse(stack_warehouse_url(stack_home), "onpolicy")
    with pytest.raises(RemoteWarehouseError, match="wrong warehouse token.*refused the token in .*other"):
        wh.query("SELECT 1")

    monkeypatch.setenv("ONPOLICY_HOME", str(stack_home))
    assert wh.query("SELECT 1") == [(1,)]
