"""SIGKILL the learner mid-round: it resumes with nothing lost and nothing trained twice.

The learner runs in a subprocess (its own embedded warehouse, registry and checkpoints) over a
deterministic simulated signal log. One run is killed with SIGKILL once a mid-round checkpoint
exists and restarted; another runs uninterrupted. Both must register the same adapter bytes (the
resumed run applied each step exactly once, from the same state), record the same window, and the
killed run's registry holds one version, not two. Then the log grows and the next round's window
starts exactly where the first ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

STEPS = 6


def _log(n: int):
    import datetime as dt
    import random

    from learner.demo_tasks import ArithmeticTask, FormatTask
    from learner.loop import ListSignalLog, simulated_trajectories

    rng = random.Random(0)
    tasks = [ArithmeticTask(), FormatTask()]
    reqs = [(tasks[i % 2], r) for i in range(n) for r in tasks[i % 2].requests(rng, 1)]
    texts = [t.synthetic_answer(r, rng) for t, r in reqs]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    trajs = []
    frng = random.Random(1)
    for k, ((t, r), x) in enumerate(zip(reqs, texts)):
        trajs += simulated_trajectories(t, [r], [x], frng, start + dt.timedelta(seconds=k), id_prefix=f"i{k}-")
    return ListSignalLog(trajs)


def worker(root: str, visible: int, step_delay: float) -> None:
    """Run rounds until the visible log is consumed; print the registry and state as JSON."""
    from learner.loop import LearningLoop, LoopSettings
    from learner.models import TINY, ensure_model
    from learner.registry import AdapterRegistry
    from learner.trainer import TrainerSettings
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    wh = Warehouse(WarehouseSettings(url=f"chdb://{root}/warehouse", database="learner"))
    wh.migrate()
    log = _log(2100)
    log.items = log.items[:visible]
    reg = AdapterRegistry(wh, Path(root) / "adapters")
    loop = LearningLoop(ensure_model(TINY).path, log, reg, Path(root) / "ckpt",
                        TrainerSettings(threads=1, group_size=4, prompts_per_step=4, max_new_tokens=8),
                        LoopSettings(min_new_feedback=500, steps_per_round=STEPS, checkpoint_every=2),
                        on_step=lambda rec: time.sleep(step_delay))
    while loop.ready():
        loop.run_round()
    print("RESULT " + json.dumps({
        "committed": loop.state["committed"],
        "versions": [{"name": v.name, "sha256": v.sha256, "window": v.data_window} for v in reg.versions()]}))


def _run(root: Path, visible: int, delay: float = 0.0, kill_after_step: int | None = None) -> dict | None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-c", f"from tests.integration.test_learning_resume import worker; "
                                 f"worker({str(root)!r}, {visible}, {delay})"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    if kill_after_step is not None:
        deadline = time.monotonic() + 300
        cur = root / "ckpt" / "CURRENT"
        while time.monotonic() < deadline:
            if cur.exists():
                state = json.loads((root / "ckpt" / cur.read_text().strip() / "state.json").read_text())
                if state.get("step", 0) >= kill_after_step:
                    break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the learner never checkpointed mid-round")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_sigkill_mid_round_resumes_without_loss_or_double_training(tmp_path):
    clean = _run(tmp_path / "clean", 1500)
    # killed after the step-2 checkpoint (steps take >= 1 s so the kill lands mid-round), then resumed
    _run(tmp_path / "killed", 1500, delay=1.0, kill_after_step=2)
    state = json.loads((tmp_path / "killed" / "ckpt" / (tmp_path / "killed" / "ckpt" / "CURRENT").read_text().strip()
                        / "state.json").read_text())
    assert 2 <= state["step"] < STEPS and state["window"] == [0, 1500]  # it really died mid-round
    resumed = _run(tmp_path / "killed", 1500)
    assert clean["committed"] == resumed["committed"] == 1500
    assert len(resumed["versions"]) == 1
    assert resumed["versions"] == clean["versions"]  # same bytes: every step applied exactly once
    assert resumed["versions"][0]["window"] == {"start": 0, "end": 1500, "round": 1}
    # more signal arrives: the next round starts exactly where the last one ended
    grown = _run(tmp_path / "killed", 2100)
    assert grown["committed"] == 2100
    windows = [v["window"] for v in grown["versions"]]
    assert windows == [{"start": 0, "end": 1500, "round": 1}, {"start": 1500, "end": 2100, "round": 2}]


def test_pause_is_obeyed_within_one_step(warehouse, tmp_path, tiny_model):
    from learner.loop import ControlState, LearningLoop, LoopSettings
    from learner.registry import AdapterRegistry
    from learner.trainer import TrainerSettings
    from streams.events import ControlEvent

    control = ControlState()
    steps: list[int] = []

    def on_step(rec):
        steps.append(rec["step"])
        if rec["step"] == 2:  # the admin pauses while step 2 is finishing
            control.apply(ControlEvent(action="learning_paused", actor="admin:test"))

    loop = LearningLoop(tiny_model.path, _log(1000), AdapterRegistry(warehouse, tmp_path / "a"), tmp_path / "ckpt",
                        TrainerSettings(threads=1, group_size=4, prompts_per_step=4, max_new_tokens=8),
                        LoopSettings(min_new_feedback=500, steps_per_round=4, checkpoint_every=2, poll_s=0.05),
                        control=lambda: control, on_step=on_step)
    t = threading.Thread(target=loop.run_round, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while len(steps) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    assert steps == [1, 2]  # no step started after the pause
    control.apply(ControlEvent(action="learning_resumed", actor="admin:test"))
    t.join(120)
    assert steps == [1, 2, 3, 4] and not t.is_alive()
