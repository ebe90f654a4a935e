"""The task-family plugin contract through the real CLI: ``onpolicy demo --task`` with a class that
exists only in this test file drives a running proxy through the same doors an application uses.

What is real: the ``onpolicy`` CLI in a subprocess (``python -m deploy.cli demo``), the proxy (its
app in this process, capture on), the OpenAI SDK the simulated users use, the feedback API with a
key. What is not: the upstream is bench/standin_upstream.py (a stand-in for vLLM that answers at
once), because what is tested is the plugin contract -- the CLI loads the class, sends its requests
and its feedback bodies -- not the model; the main job's test (test_main_job.py) runs it on vLLM.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxy.api_keys import ensure_key_file
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from streams.embedded import free_port

REPO = Path(__file__).parents[2]


class ParrotTask:
    """A task family defined only here: ask for a code word, judge whether the answer contains it."""

    name = "parrot"
    WORDS = ("amber", "basalt", "cobalt", "dune")

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": f"Say the code word: {rng.choice(self.WORDS)}"}],
                 "max_tokens": 8} for _ in range(n)]

    def score(self, request: dict, response_text: str) -> float:
        return float(request["messages"][0]["content"].rsplit(" ", 1)[-1] in response_text)

    def feedback(self, request: dict, response_text: str, rng: random.Random) -> list[dict]:
        word = request["messages"][0]["content"].rsplit(" ", 1)[-1]
        bodies = [{"kind": "thumbs", "value": 1 if self.score(request, response_text) else -1}]
        if rng.random() < 0.5:
            bodies.append({"kind": "correction", "correction": word})
        return bodies


class Collector:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def emit(self, event) -> bool:
        with self.lock:
            self.events.append(event)
        return True

    def of(self, event_type: str):
        # by event_type, not class: capture hands the producer a CapturedEvent (the interaction as
        # its serialized dict, proxy/capture.py), not the pydantic InteractionEvent
        with self.lock:
            return [e for e in self.events if e.event_type == event_type]


@pytest.fixture
def standin():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "standin_upstream.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "stand-in upstream did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(10)


def test_demo_runs_a_task_class_defined_only_in_a_test_file(standin, tmp_path):
    entry = ensure_key_file(tmp_path / "key", tenant="", name="plugin-test")
    key = (tmp_path / "key").read_text().strip()
    collector = Collector()
    proxy = RunningProxy(ProxySettings(upstream_url=standin, follow_control=False, capture_mode="inline",
                                       interaction_id_key="plugin-test-signing-key-0123456789", api_keys=[entry]),
                         producer=collector).start()
    try:
        env = {**os.environ, "ONPOLICY_HOME": str(tmp_path / "home")}
        out = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "demo", "--task", f"{__name__}:ParrotTask",
             "--base-url", proxy.base_url, "--model", "standin-model", "--api-key", key,
             "--duration", "4", "--rate", "5", "--concurrency", "2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    finally:
        proxy.stop()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "(failed 0)" in out.stdout, out.stdout + out.stderr[-2000:]

    # the requests were the class's own, through the proxy's OpenAI door
    interactions = collector.of("interaction")
    prompts = [e.request["messages"][0]["content"] for e in interactions]
    assert len(prompts) >= 5 and all(p.startswith("Say the code word: ") for p in prompts), prompts[:5]
    # its feedback bodies came through the feedback API, on the interaction ids the proxy issued
    feedback = collector.of("feedback")
    ids = {e.interaction_id for e in interactions}
    assert feedback and {f.interaction_id for f in feedback} <= ids
    assert {f.kind for f in feedback} == {"thumbs", "correction"}
    # its hidden truth was scored by the class and kept for the status page, never sent
    truth = [json.loads(line) for line in (tmp_path / "home" / "demo" / "truth.jsonl").read_text().splitlines()]
    assert len(truth) == len(interactions) and {t["task"] for t in truth} == {"parrot"}
    assert {t["interaction_id"] for t in truth} == ids
