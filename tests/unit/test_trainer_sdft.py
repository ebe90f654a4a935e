"""SDFT vs SFT on user corrections, measured on the tiny model: what is learned, what is forgotten.

Corrections: 30 arithmetic prompts *with a carry* (the tiny base forgets the carry) and the right
sum as the demonstration. Both methods start from the same base, same seed, same 40 steps of 8
examples, lr 1e-3. Measured (sampled answers at temperature 1, i.e. what users of the demo get):

    skill (true success %)         base    SFT     SDFT
    carry sums, corrected prompts  25.8    86.7    10.0
    carry sums, unseen prompts     36.7    75.0     1.7
    sums without carry (forgetting) 95.5   40.0    39.1
    format family (forgetting)     30.5    26.3    22.5

So on this model the paper's claim does not hold: SDFT learns nothing and forgets as much as SFT.
The reason is the teacher: SDFT needs the model *with the correction in context* to answer better
than without it, and a 2-layer model pretrained only on single-turn templates cannot use an
in-context demonstration (with either teacher wording: the demonstration as an instruction, or as
an earlier turn). A model that can (SmolLM2 and up) is where SDFT can pay off; on the tiny model
the learner should prefer GRPO on validated rewards (answer memory and reference rewards already
turn corrections into reward). The test pins these numbers so a regression in either path fails it.
"""

from __future__ import annotations

import random

import pytest

from learner.demo_tasks import ArithmeticTask, FormatTask
from learner.trainer import DistillTrainer, LoraPolicy, TrainerSettings, evaluate_success, mean

STEPS = 40


def _prompt(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}], "max_tokens": 8}


@pytest.fixture(scope="module")
def suites():
    carry = [_prompt(a, b) for a in range(10) for b in range(10) if a + b >= 10]
    random.Random(0).shuffle(carry)
    return {"train": carry[:30], "held": carry[30:],
            "nocarry": [_prompt(a, b) for a in range(10) for b in range(10) if a + b < 10],
            "format": FormatTask().requests(random.Random(7), 100)}


def _measure(pol, s) -> dict[str, float]:
    ar, fm = ArithmeticTask(), FormatTask()
    return {"train_carry": 100 * mean(evaluate_success(pol, s["train"] * 4, ar.score, greedy=False, seed=1)),
            "held_carry": 100 * mean(evaluate_success(pol, s["held"] * 4, ar.score, greedy=False, seed=2)),
            "nocarry": 100 * mean(evaluate_success(pol, s["nocarry"] * 2, ar.score, greedy=False, seed=3)),
            "format": 100 * mean(evaluate_success(pol, s["format"] * 4, fm.score, greedy=False, seed=4))}


def _train(tiny_model, s, method: str) -> dict[str, float]:
    pol = LoraPolicy(tiny_model.path, TrainerSettings(lr=1e-3, max_new_tokens=8, threads=1))
    tr = DistillTrainer(pol)
    ex = [(c["messages"], str(ArithmeticTask().answer(c))) for c in s["train"]]
    for step in range(STEPS):
        batch = [ex[(step * 8 + i) % len(ex)] for i in range(8)]
        tr.sft_step(batch) if method == "sft" else tr.sdft_step(batch, 4)
    return _measure(pol, s)


def test_sft_vs_sdft_forgetting_on_the_tiny_model(tiny_model, suites):
    base = _measure(LoraPolicy(tiny_model.path, TrainerSettings(threads=1)), suites)
    sft = _train(tiny_model, suites, "sft")
    sdft = _train(tiny_model, suites, "sdft")
    print(f"\nskill: base / SFT / SDFT (true success %, {STEPS} steps)")
    for k in base:
        print(f"  {k:12s} {base[k]:5.1f} {sft[k]:5.1f} {sdft[k]:5.1f}")
    measured = {  # the table in the module docstring
        "base": {"train_carry": 25.8, "held_carry": 36.7, "nocarry": 95.5, "format": 30.5},
        "sft": {"train_carry": 86.7, "held_carry": 75.0, "nocarry": 40.0, "format": 26.3},
        "sdft": {"train_carry": 10.0, "held_carry": 1.7, "nocarry": 39.1, "format": 22.5},
    }
    tol = 8.0  # points: sampling noise of 100-400 answers if kernels differ across machines
    for name, got in (("base", base), ("sft", sft), ("sdft", sdft)):
        for k, v in measured[name].items():
            assert got[k] == pytest.approx(v, abs=tol), (name, k, got[k])
    # the findings, stated directly
    assert sft["held_carry"] - base["held_carry"] > 25  # SFT learns the corrections and generalises
    assert base["nocarry"] - sft["nocarry"] > 40  # ... and forgets sums without a carry
    assert sdft["train_carry"] <= base["train_carry"]  # SDFT with this teacher learns nothing
    assert base["nocarry"] - sdft["nocarry"] > 40  # ... and forgets as much
