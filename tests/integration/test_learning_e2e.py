"""End-to-end learning on the tiny model, from simulated feedback alone, through the learning loop.

What it runs: the tiny base model serves 3,000 demo requests (sampled at temperature 1, as vLLM
serves by default); simulated users with a hidden truth judge them (noisy thumbs, outcomes,
corrections); the loop builds environments and rewards, validates them against held-out feedback,
trains one round of GRPO on the validated rewards only, registers the adapter and gates it against
the base. The true success rate of the served policy is measured on held-out prompts: arithmetic
pairs that never appeared in traffic, and format requests drawn with another seed.

What it does not run: the broker, the proxy and vLLM. Traffic and feedback are simulated at the
trajectory level and the adapter is not published here (the publisher has its own tests against the
real vLLM); see the learner report for why (CI budget on 2 cores).
"""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from learner.demo_tasks import ArithmeticTask, FormatTask
from learner.gate import ForgettingTask, GateSettings, make_loop_gate
from learner.loop import LearningLoop, ListSignalLog, LoopSettings, simulated_trajectories
from learner.registry import AdapterRegistry
from learner.trainer import LoraPolicy, TrainerSettings, evaluate_success, mean

pytestmark = pytest.mark.slow

STEPS = 160


def _success(policy, ev) -> dict[str, float]:
    ar, fm = ArithmeticTask(), FormatTask()
    a = 100 * mean(evaluate_success(policy, ev["arith"] * 4, ar.score, greedy=False, seed=11))
    f = 100 * mean(evaluate_success(policy, ev["format"] * 4, fm.score, greedy=False, seed=12))
    return {"arithmetic": a, "format": f, "mean": (a + f) / 2}


def test_true_success_rises_20_points(warehouse, tmp_path, tiny_model):
    t0 = time.monotonic()
    settings = TrainerSettings(threads=1, lr=1e-3, beta=0.05)
    base = LoraPolicy(tiny_model.path, settings)
    tasks = [ArithmeticTask(), FormatTask()]
    rng = random.Random(0)
    reqs = [(t, r) for t in tasks for r in t.requests(rng, 1500) if t.name != "arithmetic" or not t.heldout(r)]
    rng.shuffle(reqs)
    texts: list[str] = []
    for i in range(0, len(reqs), 256):
        texts += base.sample([r["messages"] for _, r in reqs[i:i + 256]], 1, seed=i).texts
    frng, start = random.Random(1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    log = ListSignalLog([simulated_trajectories(t, [r], [x], frng, start + dt.timedelta(seconds=k), id_prefix=f"i{k}-")[0]
                         for k, ((t, r), x) in enumerate(zip(reqs, texts))])
    erng = random.Random(99)
    ev = {"arith": [r for r in tasks[0].requests(erng, 300) if tasks[0].heldout(r)][:60], "format": tasks[1].requests(erng, 60)}
    before = _success(base, ev)

    nocarry = tuple({"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]}
                    for a in range(10) for b in range(10) if a + b < 10)
    suite = [ForgettingTask("sums_without_carry", nocarry, tasks[0].score)]
    reg = AdapterRegistry(warehouse, tmp_path / "adapters")
    curve = []
    loop = LearningLoop(tiny_model.path, log, reg, tmp_path / "ckpt", settings,
                        LoopSettings(min_new_feedback=1000, steps_per_round=STEPS, checkpoint_every=40),
                        gate=make_loop_gate(tiny_model.path, settings, suite, GateSettings()),
                        on_step=lambda rec: curve.append((round(time.monotonic() - t0), rec["step"], rec["reward"])))
    result = loop.run_round()
    trained = LoraPolicy(tiny_model.path, settings, adapter_dir=reg.get(result.adapter).path)
    after = _success(trained, ev)
    elapsed = time.monotonic() - t0
    print(f"\ntrue success on held-out prompts (sampled, %): before {before}, after {after}; {elapsed:.0f} s")
    print(f"gate: {result.gate}")
    print(f"gate evidence: {reg.evaluations(result.adapter)[-1]['evidence']}")
    print("training reward (s, step, reward):", curve[::20])
    assert after["mean"] - before["mean"] >= 20, (before, after)
    assert reg.get(result.adapter).status == "gated", result.gate
    assert elapsed < 15 * 60
