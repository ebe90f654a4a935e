"""Learning from corrections (``DistillTrainer.step``) on the tiny model: what must hold on any machine.

Corrections: arithmetic prompts *with a carry* (the tiny base forgets the carry: greedy, it answers
"7 + 5" with "2") and the right sum as the demonstration. Asserted, over three seeds and with wide
margins: SFT learns the carry on sums it was never corrected on; demonstrations of weight 0 change
nothing (and the same demonstrations at weight 1 do); only relative weights matter; the metrics of
each method are what they say; SDFT's frozen teacher stays frozen and never leaks into the saved
adapter; the earlier ``sft_step`` / ``sdft_step`` interface still trains.

Measured on 2026-12-07, this machine (2 shared cores, 1 thread), greedy true success on the 15
held-out carry sums, 20 steps of 8 corrections, lr 1e-3 -- figures, not assertions (kernels and
thread counts change them by a few points):

    seed            0      1      2
    base         13.3   13.3   13.3
    SFT          93.3   93.3   93.3

The whole file took 8 s here; the test it replaced (one SFT and one SDFT run of 40 steps with
pinned success rates) took 13 s.

SDFT alone learns nothing on this model: its in-context teacher (the same 2-layer model with the
correction shown as an earlier turn) cannot use a demonstration -- the tiny model was pretrained on
single-turn templates only. SDFT+SFT learns through its SFT anchor. On SmolLM2-135M-Instruct, which
can, ``python bench/distill.py`` compares the three methods (learner/trainer.py's DistillTrainer
docstring carries its table).
"""

from __future__ import annotations

import random

import pytest
import torch

from learner.demo_tasks import ArithmeticTask
from learner.trainer import (Demonstration, DistillMethod, DistillMetrics, DistillTrainer, LoraPolicy, TrainerSettings,
                             evaluate_success, looks_degenerate, mean, teacher_messages)

STEPS = 20
SEEDS = (0, 1, 2)


def _prompt(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}], "max_tokens": 8}


def _demo(request: dict, text: str | None = None, weight: float = 1.0) -> Demonstration:
    return Demonstration(tuple(request["messages"]), text if text is not None else str(ArithmeticTask().answer(request)),
                         weight)


@pytest.fixture(scope="module")
def carry() -> dict[str, list[dict]]:
    sums = [_prompt(a, b) for a in range(10) for b in range(10) if a + b >= 10]
    random.Random(0).shuffle(sums)
    return {"train": sums[:30], "held": sums[30:]}


def _policy(tiny_model, seed: int = 0, **settings) -> LoraPolicy:
    return LoraPolicy(tiny_model.path, TrainerSettings(seed=seed, lr=1e-3, max_new_tokens=8, threads=1, **settings))


def _held_success(policy: LoraPolicy, held: list[dict]) -> float:
    return 100 * mean(evaluate_success(policy, held, ArithmeticTask().score, max_new_tokens=8))


def _adapter(policy: LoraPolicy) -> dict[str, torch.Tensor]:
    return policy.adapter_state()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def base_held(tiny_model, carry) -> float:
    return _held_success(_policy(tiny_model), carry["held"])


@pytest.mark.parametrize("seed", SEEDS)
def test_sft_learns_the_carry_on_sums_it_was_never_corrected_on(tiny_model, carry, base_held, seed):
    policy = _policy(tiny_model, seed)
    trainer = DistillTrainer(policy)
    demos = [_demo(r) for r in carry["train"]]
    random.Random(seed).shuffle(demos)
    for step in range(STEPS):
        m = trainer.step([demos[(step * 8 + i) % len(demos)] for i in range(8)], DistillMethod.SFT, seed=step)
        assert not m.skipped
    after = _held_success(policy, carry["held"])
    print(f"\nseed {seed}: held-out carry sums, greedy: base {base_held:.1f}% -> SFT {after:.1f}%")
    assert after - base_held > 20, (seed, base_held, after)


def _train(tiny_model, batches: list[list[Demonstration]], method: DistillMethod) -> dict[str, torch.Tensor]:
    policy = _policy(tiny_model)
    trainer = DistillTrainer(policy)
    for step, batch in enumerate(batches):
        trainer.step(batch, method, seed=100 + step)
    return _adapter(policy)


@pytest.mark.parametrize("method", [DistillMethod.SFT, DistillMethod.SDFT_SFT])
def test_a_demonstration_of_weight_zero_changes_nothing(tiny_model, carry, method):
    clean = [[_demo(r) for r in carry["train"][k * 4:(k + 1) * 4]] for k in range(3)]
    # wrong answers from someone whose corrections are capped to nothing, interleaved with the good ones
    poison = [[_demo(r, "7") for r in carry["held"][k * 4:(k + 1) * 4]] for k in range(3)]

    def mixed(weight: float) -> list[list[Demonstration]]:
        return [[d for pair in zip(c, p) for d in (pair[0], Demonstration(pair[1].messages, pair[1].text, weight))]
                for c, p in zip(clean, poison)]

    alone = _train(tiny_model, clean, method)
    with_zero = _train(tiny_model, mixed(0.0), method)
    with_one = _train(tiny_model, mixed(1.0), method)
    assert _max_diff(alone, with_zero) == 0.0
    moved = _max_diff(alone, _adapter(_policy(tiny_model)))
    assert _max_diff(alone, with_one) > 0.1 * moved  # the same poison at weight 1 does change the adapter


def test_only_relative_weights_matter(tiny_model, carry):
    demos = [_demo(r) for r in carry["train"][:8]]
    ones = _train(tiny_model, [demos], DistillMethod.SFT)
    twos = _train(tiny_model, [[Demonstration(d.messages, d.text, 2.0) for d in demos]], DistillMethod.SFT)
    skewed = _train(tiny_model, [[Demonstration(d.messages, d.text, 1.0 if i < 4 else 0.25)
                                  for i, d in enumerate(demos)]], DistillMethod.SFT)
    assert _max_diff(ones, twos) < 1e-6
    assert _max_diff(ones, skewed) > 1e-4


def test_the_metrics_of_each_method_are_what_they_say(tiny_model, carry):
    demos = [_demo(r) for r in carry["train"][:8]]
    policy = _policy(tiny_model)
    trainer = DistillTrainer(policy)
    tok = policy.tokenizer
    demo_tokens = sum(len(tok(d.text + tok.eos_token, add_special_tokens=False)["input_ids"]) for d in demos)

    sft = trainer.step(demos, DistillMethod.SFT, seed=1)
    assert isinstance(sft, DistillMetrics) and not sft.skipped
    assert sft.kl is None and sft.sft_loss is not None and sft.sft_loss > 0
    assert sft.loss == pytest.approx(sft.sft_loss)
    assert sft.answer_tokens == demo_tokens
    assert sft.degenerate == 0.0 and sft.seconds > 0

    sdft = trainer.step(demos, DistillMethod.SDFT, seed=2, samples_per_prompt=3)
    assert sdft.sft_loss is None and sdft.kl is not None and sdft.kl >= 0
    assert sdft.loss == pytest.approx(sdft.kl)
    assert 0 < sdft.answer_tokens <= 8 * 3 * policy.settings.max_new_tokens
    assert 0.0 <= sdft.degenerate <= 1.0

    both = trainer.step(demos, DistillMethod.SDFT_SFT, seed=3)
    assert both.kl is not None and both.sft_loss is not None
    assert both.loss == pytest.approx(both.kl + policy.settings.sdft_sft_weight * both.sft_loss, rel=1e-5)

    with pytest.raises(ValueError, match="weight"):
        trainer.step([Demonstration(demos[0].messages, "1", -1.0)], DistillMethod.SFT, seed=0)
    before = _adapter(policy)
    nothing = trainer.step([Demonstration(d.messages, d.text, 0.0) for d in demos], DistillMethod.SDFT_SFT, seed=4)
    assert nothing.skipped and nothing.answer_tokens == 0
    assert _max_diff(before, _adapter(policy)) == 0.0


def test_the_same_seed_draws_the_same_student_samples(tiny_model, carry):
    demos = [_demo(r) for r in carry["train"][:8]]
    runs = [DistillTrainer(_policy(tiny_model)).step(demos, DistillMethod.SDFT, seed=7) for _ in range(2)]
    assert (runs[0].loss, runs[0].answer_tokens) == (runs[1].loss, runs[1].answer_tokens)


def test_the_teacher_is_frozen_or_follows_by_ema_and_is_never_saved(tiny_model, carry, tmp_path):
    demos = [_demo(r) for r in carry["train"][:8]]
    for ema in (0.0, 0.5):
        policy = _policy(tiny_model, sdft_teacher_ema=ema)
        start = _adapter(policy)
        trainer = DistillTrainer(policy)
        for step in range(3):
            trainer.step(demos, DistillMethod.SDFT_SFT, seed=step)
        params = dict(policy.model.named_parameters())
        tag = f".{DistillTrainer.TEACHER_ADAPTER}"
        teacher = {n.replace(tag, ""): p.detach().clone() for n, p in params.items() if tag + "." in n}
        student = {n.replace(".default", ""): p for n, p in params.items() if ".default." in n}
        assert teacher.keys() == student.keys() == start.keys()
        assert all(p.requires_grad for p in student.values())
        assert not any(p.requires_grad for n, p in params.items() if tag + "." in n)
        assert _max_diff(teacher, {k: p.detach() for k, p in student.items()}) > 0  # the student left it behind
        assert (_max_diff(teacher, start) == 0.0) == (ema == 0.0)  # frozen at the start, or moved by EMA
        assert _max_diff(trainer.teacher_state(), teacher) == 0.0
        # a resumed round hands its teacher back: the new trainer's teacher is that one, not the weights now
        resumed = DistillTrainer(policy, teacher_state=trainer.teacher_state())
        assert _max_diff(resumed.teacher_state(), teacher) == 0.0
        assert _max_diff(DistillTrainer(policy).teacher_state(), {k: p.detach() for k, p in student.items()}) == 0.0
        resumed.step(demos, DistillMethod.SDFT_SFT, seed=9)
        assert (_max_diff(resumed.teacher_state(), teacher) == 0.0) == (ema == 0.0)
        saved = policy.save_adapter(tmp_path / f"ema{ema}")
        from safetensors.torch import load_file

        keys = load_file(str(saved / "adapter_model.safetensors")).keys()
        assert keys and not any(DistillTrainer.TEACHER_ADAPTER in k for k in keys)


def test_the_earlier_pair_interface_still_trains(tiny_model, carry):
    policy = _policy(tiny_model)
    trainer = DistillTrainer(policy)
    pairs = [(r["messages"], str(ArithmeticTask().answer(r))) for r in carry["train"][:8]]
    assert trainer.sft_step(pairs)["loss"] > 0
    out = trainer.sdft_step(pairs, 2, teacher_style="instruction")
    assert set(out) >= {"loss", "answer_tokens"} and out["loss"] >= 0
    assert trainer.steps == 2


@pytest.mark.parametrize("text, finished, expected", [
    ("answer answer answer answer", False, True),
    ("the cat sat the cat sat the cat sat", True, True),
    ("12", True, False),
    ("The capital of France is Paris, a city on the Seine", False, False),
    ("yes yes", True, False),
    ("ok ok no ok ok no ok", False, True),
])
def test_looks_degenerate(text, finished, expected):
    assert looks_degenerate(text, finished) is expected


def test_teacher_contexts_show_the_demonstration():
    msgs = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"})
    turn = teacher_messages(msgs, "A", "turn")
    assert [m["role"] for m in turn] == ["system", "user", "assistant", "user"] and turn[2]["content"] == "A"
    twice = teacher_messages(msgs, "A", "turn_twice")
    assert [m["content"] for m in twice] == ["Be brief.", "Q?", "A", "Q?", "A", "Q?"]
    system = teacher_messages(msgs, "A", "system")
    assert len(system) == 2 and "A" in system[0]["content"] and system[0]["content"].startswith("Be brief.")
    assert "A" in teacher_messages(msgs, "A", "instruction")[-1]["content"]
    assert msgs[1]["content"] == "Q?"  # the caller's messages are not modified
    with pytest.raises(ValueError):
        teacher_messages(msgs, "A", "nonsense")
