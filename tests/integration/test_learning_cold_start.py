"""Learning from a cold start, through the learning loop: a family the base gets almost always wrong,
users who thumb it down and sometimes type the right answer.

The family ("Add 3 and 4. Give just the total.") is a wording the tiny model never saw in
pretraining (it was pretrained on "What is 3 + 4? Reply with the number only."): its sampled
answers are right ~1-8% of the time. Simulated users (learner/demo_tasks.py's ``_human_feedback``:
60% thumbs with a tenth flipped, corrections under a fifth of wrong answers, often nothing) judge
what it served. The loop finds no validated reward in the thumbs, or finds one but sees the family
served mostly wrong, and distils the family's corrections (learner/loop.py); the gate checks the
adapter on held-out corrections and on the forgetting suite (sums in the pretrained wording, and
the format family); the app's other traffic (those two families, served about half right) is
rehearsed as the starting weights answered it. True success is measured on held-out pairs the users never sent, sampled as
the demo serves (temperature 1).

What it does not run: the broker, the proxy and vLLM (as tests/integration/test_learning_e2e.py).
The tiny model reuses a skill it has in a new wording, so this test shows the plumbing of a cold
start, not that a real model learns: the SmolLM2 figures in docs/learning-curve.md do that.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
import zlib

import pytest

from learner.demo_tasks import ArithmeticTask, FormatTask, _human_feedback
from learner.gate import ForgettingTask, GateSettings, make_loop_gate
from learner.loop import LearningLoop, ListSignalLog, LoopSettings, simulated_trajectories
from learner.registry import AdapterRegistry
from learner.round_log import ListRoundLog, Method, RoundStatus
from learner.trainer import LoraPolicy, TrainerSettings, evaluate_success, mean

pytestmark = pytest.mark.slow


class AddWordsTask:
    """Sums of two one-digit numbers in a wording the tiny model was not pretrained on."""

    name = "add_words"
    _pattern = re.compile(r"Add (\d+) and (\d+)\.")

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": f"Add {rng.randrange(10)} and {rng.randrange(10)}. "
                                                          "Give just the total."}], "max_tokens": 8}
                for _ in range(n)]

    def answer(self, request: dict) -> int:
        a, b = self._pattern.search(request["messages"][-1]["content"]).groups()
        return int(a) + int(b)

    def score(self, request: dict, text: str) -> float:
        return 1.0 if text.strip().rstrip(".") == str(self.answer(request)) else 0.0

    def feedback(self, request: dict, text: str, rng: random.Random) -> list[dict]:
        return _human_feedback(self.score(request, text), str(self.answer(request)), rng)

    def heldout(self, request: dict) -> bool:
        return zlib.crc32(request["messages"][-1]["content"].encode()) % 5 == 0


def test_cold_start_family_gains_20_points_from_thumbs_and_corrections(warehouse, tmp_path, tiny_model):
    t0 = time.monotonic()
    settings = TrainerSettings(threads=1, lr=3e-3, beta=0.05, max_new_tokens=8)
    base = LoraPolicy(tiny_model.path, settings)
    task = AddWordsTask()
    ar, fmt = ArithmeticTask(), FormatTask()
    rng = random.Random(0)
    # the app's traffic: the new feature, beside features the model already serves half right
    traffic = [(task, [r for r in task.requests(rng, 1500) if not task.heldout(r)][:1100]),
               (ar, [r for r in ar.requests(rng, 500) if not ar.heldout(r)][:300]), (fmt, fmt.requests(rng, 300))]
    frng, start = random.Random(1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    trajs = []
    for k, (t, reqs) in enumerate(traffic):
        texts: list[str] = []
        for i in range(0, len(reqs), 256):
            texts += base.sample([r["messages"] for r in reqs[i:i + 256]], 1, seed=1000 * k + i).texts
        step = 1100 / len(reqs)  # spread every family over the same time span
        trajs += simulated_trajectories(t, reqs, texts, frng, start + dt.timedelta(seconds=k / 3), step_s=step,
                                        id_prefix=f"{t.name}-")
    log = ListSignalLog(sorted(trajs, key=lambda t: (t.ts, t.event_id)))
    erng = random.Random(99)
    held = [r for r in task.requests(erng, 400) if task.heldout(r)][:60]
    before = 100 * mean(evaluate_success(base, held * 4, task.score, greedy=False, seed=11))
    assert before <= 10, f"the family must start cold (base {before:.1f}% on held-out prompts)"

    nocarry = tuple({"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]}
                    for a in range(10) for b in range(10) if a + b < 10)
    suite = [ForgettingTask("sums_pretrained_wording", nocarry, ar.score),
             ForgettingTask("format", tuple(fmt.requests(random.Random(7), 60)), fmt.score)]
    reg = AdapterRegistry(warehouse, tmp_path / "adapters")
    rounds = ListRoundLog()
    loop = LearningLoop(tiny_model.path, log, reg, tmp_path / "ckpt", settings,
                        LoopSettings(min_new_feedback=300, steps_per_round=100, checkpoint_every=50,
                                     distill_epochs=8.0),
                        gate=make_loop_gate(tiny_model.path, settings, suite, GateSettings()), round_log=rounds)
    result = loop.run_round()
    elapsed = time.monotonic() - t0
    print(f"\nround: {result.status.value}: {result.reason}")
    for line in rounds.records[-1].lines():
        print(line)
    assert result.status is not RoundStatus.SKIPPED, result.reason
    (plan,) = [p for p in result.plans if "add" in p.label]
    assert Method.SFT in plan.methods, plan  # the corrections were trained on
    trained = LoraPolicy(tiny_model.path, settings, adapter_dir=reg.get(result.adapter).path)
    after = 100 * mean(evaluate_success(trained, held * 4, task.score, greedy=False, seed=11))
    print(f"true success on held-out prompts (sampled, %): before {before:.1f}, after {after:.1f}; {elapsed:.0f} s")
    print(f"gate: {result.gate}")
    assert after - before >= 20, (before, after)
    assert result.status is RoundStatus.GATED, result.gate  # held-out corrections gained, nothing forgotten
    assert rounds.records[-1].adapter == result.adapter
