"""Simulated users: drive any task family through the proxy and the feedback API, like an app would.

A task family (the plugin contract) is a class with a no-argument constructor and:
- ``name: str``
- ``requests(rng: random.Random, n: int) -> list[dict]``: kwargs for ``client.chat.completions.create``
  without ``model``;
- ``score(request: dict, response_text: str) -> float``: the hidden truth in [0, 1] (never sent);
- ``feedback(request: dict, response_text: str, rng: random.Random) -> list[dict]``: bodies for
  ``POST /v1/feedback`` without the interaction id;
- optionally ``regenerate(request, response_text, rng) -> bool``: re-send the same prompt;
- optionally ``heldout(request) -> bool``: prompts the users never send; :func:`evaluate` asks only
  those, so the learner is measured on prompts it never saw.

``onpolicy demo --task package.module:Class`` loads one from the Python path; without ``--task`` the
demo drives the families meant for the model it serves (:func:`default_tasks`). Traffic goes through
the unmodified OpenAI SDK to the proxy, feedback through plain HTTP to ``/v1/feedback``: the same
doors a real application uses, nothing behind the product's back.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from learner.models import SMOLLM2
from streams.errors import OnpolicyUserError

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("learner.demo_tasks:ArithmeticTask", "learner.demo_tasks:FormatTask")
# The real chat model gets families it mostly fails on (learner/cold_start_tasks.py); the demo
# families above were built for the tiny model, which was pretrained to be half right on them.
COLD_START_TASKS = ("learner.cold_start_tasks:TicketLabelTask", "learner.cold_start_tasks:ExtractJsonTask",
                    "learner.cold_start_tasks:IsoDateTask")
MODEL_TASKS: dict[str, tuple[str, ...]] = {SMOLLM2: COLD_START_TASKS}
REQUIRED = ("name", "requests", "score", "feedback")


class TaskLoadError(OnpolicyUserError):
    pass


def default_tasks(model: str | None) -> tuple[str, ...]:
    """The task families ``onpolicy demo`` drives when it is given no ``--task``, for the model it
    serves (``None``: the tiny demo model)."""
    return MODEL_TASKS.get(model or "", DEFAULT_TASKS)


def load_task(spec: str):
    """Instantiate ``package.module:Class``; a clear error when it does not fit the contract."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise TaskLoadError(f"--task must look like package.module:Class, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskLoadError(f"cannot import {module_name!r} for --task {spec}: {exc}; is it on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskLoadError(f"{module_name} has no {class_name!r} (--task {spec})")
    try:
        task = cls()
    except TypeError as exc:
        raise TaskLoadError(f"{spec} needs a no-argument constructor: {exc}") from None
    missing = [m for m in REQUIRED if not hasattr(task, m)]
    if missing:
        raise TaskLoadError(f"{spec} is missing {', '.join(missing)} (a task family needs {', '.join(REQUIRED)})")
    return task


def _text(response) -> str:
    choice = response.choices[0]
    return choice.message.content or ""


@dataclass
class Stats:
    requests: int = 0
    failed: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    truth: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_truth(self, value: float) -> None:
        with self.lock:
            self.truth.append(value)


def post_feedback(base_url: str, body: dict[str, Any], api_key: str | None, timeout_s: float = 10.0) -> int:
    """POST one feedback body to the proxy; returns the HTTP status."""
    url = base_url.rstrip("/") + "/feedback"
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class SimulatedUsers:
    """Sends ``rate`` requests/s (with ``concurrency`` users) and their feedback until stopped."""

    def __init__(self, tasks: list, base_url: str, model: str, *, api_key: str | None = None, rate: float = 2.0,
                 concurrency: int = 4, seed: int = 0, max_tokens: int | None = None, truth_log: str | None = None):
        from openai import OpenAI

        self.tasks = tasks
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.rate = rate
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0, timeout=120)
        self.stats = Stats()
        self.stop = threading.Event()
        # The hidden truth of each answer, for the status page's demo-only chart. Never sent to onpolicy.
        self.truth_log = open(truth_log, "a", buffering=1) if truth_log else None
        self._truth_lock = threading.Lock()

    def one(self, task, request: dict[str, Any], rng: random.Random) -> None:
        kwargs = dict(request)
        if self.max_tokens and "max_tokens" not in kwargs:
            kwargs["max_tokens"] = self.max_tokens
        episode = f"sim-{rng.getrandbits(48):012x}"
        try:
            response = self.client.chat.completions.with_raw_response.create(
                model=self.model, extra_headers={"x-onpolicy-episode-id": episode}, **kwargs)
            parsed = response.parse()
        except Exception as exc:
            with self.stats.lock:
                self.stats.failed += 1
            log.warning("request failed: %s", exc)
            return
        text = _text(parsed)
        interaction_id = response.headers.get("x-onpolicy-interaction-id") or parsed.id
        truth = float(task.score(request, text))
        self.stats.add_truth(truth)
        if self.truth_log is not None:
            line = json.dumps({"ts": time.time(), "task": task.name, "truth": truth, "interaction_id": interaction_id,
                               "adapter_version": response.headers.get("x-onpolicy-adapter-version")})
            with self._truth_lock:
                self.truth_log.write(line + "\n")
        with self.stats.lock:
            self.stats.requests += 1
        for body in task.feedback(request, text, rng):
            body = {**body, "interaction_id": interaction_id, "source": body.get("source", "explicit")}
            status = post_feedback(self.base_url, body, self.api_key)
            with self.stats.lock:
                if 200 <= status < 300:
                    self.stats.feedback_sent += 1
                else:
                    self.stats.feedback_failed += 1
        regenerate = getattr(task, "regenerate", None)
        if regenerate is not None and regenerate(request, text, rng):
            self.one(task, request, rng)

    def run(self, duration_s: float | None = None) -> Stats:
        deadline = time.monotonic() + duration_s if duration_s else None
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        with ThreadPoolExecutor(self.concurrency) as pool:
            in_flight: set = set()
            while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
                task = self.rng.choice(self.tasks)
                request = _draw(task, self.rng, heldout=False)
                rng = random.Random(self.rng.getrandbits(64))
                while len(in_flight) >= self.concurrency:
                    done = {f for f in in_flight if f.done()}
                    in_flight -= done
                    if not done:
                        time.sleep(0.01)
                in_flight.add(pool.submit(self.one, task, request, rng))
                if interval:
                    self.stop.wait(interval)
        return self.stats


def _draw(task, rng: random.Random, *, heldout: bool) -> dict[str, Any]:
    """One request of ``task``: of its held-out prompts or of the rest (a task without ``heldout``
    has no held-out prompts, so every request is drawn from all of them)."""
    is_heldout = getattr(task, "heldout", None)
    for _ in range(10_000):
        request = task.requests(rng, 1)[0]
        if is_heldout is None or bool(is_heldout(request)) == heldout:
            return request
    raise OnpolicyUserError(f"task {task.name!r}: no {'held-out' if heldout else 'non-held-out'} prompt in "
                            "10,000 draws; its heldout() must keep some prompts on each side")


def evaluate(task, base_url: str, model: str, n: int, *, seed: int = 1_000_003, api_key: str | None = None,
             concurrency: int = 4, temperature: float | None = 0.0) -> tuple[float, float, float, int]:
    """True success of what the proxy serves for ``model`` on ``n`` fresh prompts.

    The prompts are the task's held-out ones (``heldout``; simulated users never send them) where it
    has them, drawn from a seed the simulated users never use; the requests carry
    ``x-onpolicy-train: false``: evaluation traffic is served and captured but never trained on.
    ``temperature=None`` sends none, so answers are sampled as the upstream serves users by default.
    Returns (mean, low, high, failed) with a 95% normal-approximation interval.
    """
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=1, timeout=120)
    rng = random.Random(seed)
    requests = [_draw(task, rng, heldout=True) for _ in range(n)]
    sampling = {} if temperature is None else {"temperature": temperature}
    scores: list[float] = []
    failed = 0

    def run(request: dict[str, Any]) -> float | None:
        try:
            response = client.chat.completions.create(model=model, extra_headers={"x-onpolicy-train": "false"},
                                                      **sampling, **request)
        except Exception as exc:
            log.warning("eval request failed: %s", exc)
            return None
        return float(task.score(request, _text(response)))

    with ThreadPoolExecutor(concurrency) as pool:
        for value in pool.map(run, requests):
            if value is None:
                failed += 1
            else:
                scores.append(value)
    if not scores:
        return math.nan, math.nan, math.nan, failed
    mean = sum(scores) / len(scores)
    var = sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1)
    half = 1.96 * math.sqrt(var / len(scores))
    return mean, max(0.0, mean - half), min(1.0, mean + half), failed
