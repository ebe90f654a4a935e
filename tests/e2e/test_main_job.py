"""README command 1, end to end, as a user runs it: ``bash deploy/local/main.sh`` in a short demo mode.

What it runs: the README's main-job command with a short ``--duration`` bound and a small
``--min-new-feedback``, under a fresh ``$ONPOLICY_HOME`` whose build caches (venvs, models, the npm
store, downloads) are symlinks to the real ones, so nothing is rebuilt and nothing of the user's
own state is touched. Everything else -- the broker and its S3 store, the sink and warehouse, vLLM
(CPU build), the proxy, the status page, the learner and the simulated users -- is real and starts
from nothing.

What it checks, in the order a user meets it:
1. the stack comes up and prints where everything is;
2. the loop reaches "learning": an adapter is trained, gated, and then routed to (published and the
   public model moved to it), promoted or rolled back -- seen in the demo's ``[learning]`` lines, in
   the registry (``onpolicy learner status``) and in the control events in the warehouse;
3. the live status page's ``/status.json`` has series for the versions, and headless Chromium
   renders ``/status`` with data points in its charts (screenshot: artifacts/main-job-status.png);
4. Ctrl-C (SIGINT to the foreground process group) stops every process of the stack, exit code 0;
5. running the command again resumes on the same data: the warehouse still holds every earlier
   interaction and the registry its versions.
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
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).parents[2]
ARTIFACTS = REPO / "artifacts"
# Build caches shared with the real $ONPOLICY_HOME (symlinked): everything else starts empty.
CACHES = ("venvs", "models", "node", "cache")
# Short demo mode: a small learning threshold and brisk traffic, so round 1 starts within a minute.
DEMO_ARGS = ["--duration", "1200", "--rate", "6", "--concurrency", "4", "--min-new-feedback", "80"]
UP_TIMEOUT_S = 420  # set-up check + broker + sink + vLLM start, on 2 loaded cores
# From "up" to the first adapter past the gate and decided. Rounds that fail the gate (too little
# data yet, or forgetting) come first; with the canary, its decision adds up to its time budget.
LEARN_TIMEOUT_S = 1500
# The decision lines the demo prints (deploy/demo_cli.py LearningWatcher): a version routed by the
# learner once it passed the gate (no canary), or the canary's promotion or rollback. A canary's
# own routing_changed (actor "canary") is not a decision yet: the test waits for its outcome.
DECIDED = re.compile(r"^\[learning\] (?:routing_changed \S+ -> (\S+) \(learner\)|"
                     r"adapter_promoted \S+ -> (\S+) |adapter_rolled_back \S+ -> (\S+) )", re.M)


def _real_home() -> Path:
    return Path(os.environ.get("ONPOLICY_HOME") or Path.home() / ".onpolicy").expanduser()


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    for name in CACHES:
        if (_real_home() / name).exists():
            (h / name).symlink_to((_real_home() / name).resolve())
    return h


class MainJob:
    """``bash deploy/local/main.sh ARGS`` in its own process group, output to a file we can poll."""

    def __init__(self, home: Path, args: list[str], out: Path):
        self.home, self.out = home, out
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONPOLICY_")}
        env.update(ONPOLICY_HOME=str(home), PYTHONUNBUFFERED="1")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["bash", "deploy/local/main.sh", *args], cwd=REPO, env=env,
                                     stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace").replace("\r", "\n")

    def wait_for(self, pattern: re.Pattern | str, timeout_s: float) -> re.Match:
        pattern = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = pattern.search(self.text())
            if m:
                return m
            assert self.proc.poll() is None, f"main.sh exited ({self.proc.returncode}):\n{self.text()[-4000:]}"
            time.sleep(2)
        raise AssertionError(f"no {pattern.pattern!r} within {timeout_s:.0f}s:\n{self.text()[-4000:]}\n"
                             f"learner log tail:\n{_tail(self.home / 'logs' / 'learner.log')}")

    def where(self, key: str) -> str:
        return re.search(rf"^  {re.escape(key)}\s+(\S+)", self.text(), re.M).group(1)

    def ctrl_c(self, timeout_s: float = 180) -> int:
        """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(none)"


def _stack_pids(home: Path) -> list[int]:
    """Every process whose environment names this $ONPOLICY_HOME: the demo and all it started."""
    needle = f"ONPOLICY_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_leftovers(home: Path) -> None:
    for pid in _stack_pids(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _learner_status(home: Path) -> str:
    """``onpolicy learner status`` against the running stack's warehouse (through the sink)."""
    ports = json.loads((home / "stack.json").read_text())["ports"]
    env = {**os.environ, "ONPOLICY_HOME": str(home),
           "ONPOLICY_WAREHOUSE_URL": f"onpolicy+http://127.0.0.1:{ports['warehouse']}"}
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "learner", "status"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _chromium(*args: str) -> subprocess.CompletedProcess:
    from tests.integration.test_status_page import _chromium as run

    return run(*args, timeout=180)


def test_main_job_learns_shows_it_stops_on_ctrl_c_and_resumes(home, tmp_path):
    timings: dict[str, float] = {}
    job = MainJob(home, DEMO_ARGS, tmp_path / "run1.log")
    try:
        # 1. up, with the summary a user reads
        job.wait_for(r"^onpolicy demo is up:", UP_TIMEOUT_S)
        timings["up"] = time.monotonic() - job.started
        status_url, base_url = job.where("status page"), job.where("OpenAI base_url")
        assert base_url.endswith("/v1") and status_url.endswith("/status")
        assert (home / "secrets" / "admin_token").exists()

        # 2. learning: trained, gated, routed / promoted / rolled back
        decided = job.wait_for(DECIDED, LEARN_TIMEOUT_S)
        timings["learned"] = time.monotonic() - job.started
        version = next(g for g in decided.groups() if g)
        registry = _learner_status(home)
        row = re.search(rf"^{re.escape(version)}\s+(\S+)", registry, re.M)
        assert row, registry
        assert row.group(1) in {"gated", "canary", "production", "rolled_back", "retired"}, registry

        # 3. the status page: the decision among the control events, traffic served by the new version
        status_json = status_url + ".json"
        deadline = time.monotonic() + 180
        while True:
            data = _get_json(status_json)
            decisions = {(c["action"], c["adapter_version"]) for c in data["control"]}
            served = set(data["requests_per_minute"])
            rolled_back = ("adapter_rolled_back", version) in decisions
            if (version in served or rolled_back) and data["true_success_demo"]:
                break
            assert time.monotonic() < deadline, f"status.json never showed {version}: {json.dumps(data)[:3000]}"
            time.sleep(5)
        assert {"routing_changed", "adapter_published"} & {a for a, _ in decisions}, data["control"]
        assert data["counts"]["interactions"]["final"] > 0 and data["counts"]["feedback"]["final"] > 0
        assert data["thumbs_up_rate"], "no live feedback series"
        assert version in {v["name"] for v in data["versions"]}, data["versions"]
        ARTIFACTS.mkdir(exist_ok=True)
        dom = _chromium("--window-size=1280,2400", "--virtual-time-budget=8000", "--dump-dom", status_url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        charts = [int(n) for n in re.findall(r'<figure class="chart" data-points="(\d+)"', dom.stdout)]
        assert len(charts) >= 4 and charts[0] > 0 and charts[1] > 0, charts  # requests, thumbs-up rate
        assert "True success (demo only" in dom.stdout
        assert f'data-version="{version}"' in dom.stdout or rolled_back, "the new version has no series on the page"
        shot = _chromium("--window-size=1280,2400", "--virtual-time-budget=8000",
                         f"--screenshot={ARTIFACTS / 'main-job-status.png'}", status_url)
        assert shot.returncode == 0 and (ARTIFACTS / "main-job-status.png").stat().st_size > 10_000, shot.stderr[-2000:]
        interactions_before = data["counts"]["interactions"]["final"]
        timings["status page"] = time.monotonic() - job.started

        # 4. Ctrl-C stops everything, in order, exit code 0
        assert len(_stack_pids(home)) >= 6, "expected the demo, broker, S3 store, sink, vLLM, proxy, status page, learner"
        t = time.monotonic()
        assert job.ctrl_c() == 0, job.text()[-3000:]
        deadline = time.monotonic() + 30
        while _stack_pids(home) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _stack_pids(home), f"left running after Ctrl-C: {_stack_pids(home)}"
        assert "stopping..." in job.text()
        timings["ctrl-c"] = time.monotonic() - t
    finally:
        job.kill()
        _kill_leftovers(home)

    # 5. again: resumes with the data intact
    again = MainJob(home, ["--duration", "20", "--rate", "2", "--min-new-feedback", "100000"], tmp_path / "run2.log")
    try:
        again.wait_for(r"^onpolicy demo is up:", UP_TIMEOUT_S)
        timings["up again"] = time.monotonic() - again.started
        data = _get_json(again.where("status page") + ".json")
        assert data["counts"]["interactions"]["final"] >= interactions_before, (data["counts"], interactions_before)
        assert version in _learner_status(home)
        assert again.proc.wait(240) == 0, again.text()[-3000:]
        assert f"[learning] {version} " in again.text()  # the demo lists the versions it found
    finally:
        again.kill()
        _kill_leftovers(home)
    print(f"\nmain job timings (s since start): {json.dumps({k: round(v) for k, v in timings.items()})}")
    (ARTIFACTS / "main-job-timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}))
