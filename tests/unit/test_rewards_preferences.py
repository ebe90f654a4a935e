"""Rewards validated from what a cold start has: corrections as preference pairs, noisy thumbs.

The served policy here is mostly wrong (5% right, like SmolLM2 on a task it starts out bad at) but
always answers in the asked format (a bare number). Simulated users thumb most answers down, flip a
tenth of their clicks, and type the right sum under a fifth of wrong answers. So there are too few
approved held-out answers to validate anything by thumbs, while correction pairs are plenty:
- the reference reward (fitted from earlier corrections) validates on held-out pairs;
- the format-only verifier ("the reply is a number") ties on every pair -- the served wrong number
  and the typed right one are both numbers -- and is refused, as it is on thumbs when thumbs suffice
  (tests/unit/test_trainer_rewards.py);
- the thumb noise is estimated from thumbs beside the same person's correction, not assumed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

import pytest

from learner.corrections import CorrectionSettings, family_corrections, user_cap
from learner.demo_tasks import ArithmeticTask
from learner.environments.build import build_environments
from learner.loop import simulated_trajectories
from learner.rewards.build import build_rewards
from learner.rewards.preferences import (combine_evidence, estimate_thumb_noise, preference_pairs, validate_pairs)
from learner.rewards.reference import ReferenceReward
from learner.rewards.validation import validate
from learner.trainer import UnvalidatedReward, ValidatedObjective
from learner.types import FeedbackSignal, Trajectory

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _mostly_wrong(task: ArithmeticTask, request: dict, rng: random.Random) -> str:
    total = task.answer(request)
    return str(total) if rng.random() < 0.05 else str((total + rng.randint(1, 9)) % 19)


@pytest.fixture(scope="module")
def cold_start():
    task = ArithmeticTask()
    rng = random.Random(0)
    reqs = task.requests(rng, 800)
    texts = [_mostly_wrong(task, r, rng) for r in reqs]
    trajs = simulated_trajectories(task, reqs, texts, random.Random(1), START)
    envs = build_environments(trajs)
    rewards = build_rewards(envs, trajs)
    (fid, fam), = rewards.items()
    return envs, trajs, fam


def test_thumbs_cannot_validate_a_mostly_wrong_model_but_correction_pairs_can(cold_start):
    envs, trajs, fam = cold_start
    heldout = [t for t in trajs if t.ts > envs.split_time and t.label() is not None]
    approved = sum(1 for t in heldout if t.label() > 0.5)
    assert approved < 15 < fam.evidence.heldout_pairs, (approved, fam.evidence)
    ref = fam.reports["reference"]
    assert ref.passed, ref.reason
    assert "pair AUC" in ref.reason
    # the format-only verifier ties on every pair: refused in the cold-start setting too
    fmt = fam.reports["format"]
    assert not fmt.passed, fmt.reason
    assert fmt.auc is not None and fmt.auc == pytest.approx(0.5, abs=0.05), fmt.reason
    weighted = {c.reward.name for c in fam.combined.components if c.weight > 0}
    assert "reference" in weighted and "format" not in weighted
    ValidatedObjective(fam.combined, fam.reports)  # trainable from corrections alone


def test_a_reward_that_prefers_the_served_answer_is_refused_even_if_thumbs_pass(cold_start):
    envs, trajs, fam = cold_start
    heldout = [t for t in trajs if t.ts > envs.split_time]
    pairs = preference_pairs(heldout)
    fit = [t for t in trajs if t.ts <= envs.split_time]
    ref = ReferenceReward.fit(fam.family_id, fit)

    class Inverted(ReferenceReward):  # ranks the served (wrong) answer above the person's correction
        def score(self, prompt, completion):
            s = super().score(prompt, completion)
            return None if s is None else 1.0 - s

    inv = Inverted(fam.family_id, ref.references, ref.short_answer, name="inverted")
    by_pairs = validate_pairs(inv, pairs)
    assert by_pairs.ci_high is not None and by_pairs.ci_high < 0.5, by_pairs.reason
    thumbs_pass = dataclasses.replace(validate(inv, heldout), passed=True, reason="passed: (forced for the test)")
    verdict = combine_evidence(thumbs_pass, by_pairs)
    assert not verdict.passed and "disagrees with people" in verdict.reason
    with pytest.raises(UnvalidatedReward):
        from learner.rewards.combiner import CombinedReward, Component

        ValidatedObjective(CombinedReward(fam.family_id, [Component(inv, 1.0)]), {"inverted": verdict})


def test_thumb_noise_is_estimated_not_assumed(cold_start):
    _, trajs, fam = cold_start
    noise = estimate_thumb_noise(trajs)
    lo, hi = noise.interval()
    assert noise.checked > 40
    assert lo <= 0.1 <= hi, noise.describe()  # the simulated users flip 10% of clicks
    assert "thumb noise" in fam.why_not_trainable() or fam.trainable


def _traj(i: int, user: str, tenant: str = "acme", ts: dt.datetime = START, corrected: str = "4") -> Trajectory:
    fb = FeedbackSignal("correction", None, ts, user_id=user, correction=({"role": "assistant", "content": corrected},))
    return Trajectory(f"i{i}", f"e{i}", ts, tenant, user, f"i{i}", "demo", "", "chat.completions",
                      ({"role": "user", "content": f"q{i}"},), {}, "5", feedback=(fb,))


def test_one_user_cannot_dominate_a_familys_corrections():
    trajs = [_traj(i, "keen") for i in range(60)] + [_traj(100 + i, f"u{i % 10}") for i in range(20)]
    fc = family_corrections("f", "acme", trajs, START + dt.timedelta(days=1), CorrectionSettings(max_user_share=0.2))
    total = sum(d.weight for d in fc.train)
    keen = sum(d.weight for d in fc.train if d.user_id == "keen")
    assert keen / total <= 0.2 + 1e-6, (keen, total)
    assert all(d.weight == 1.0 for d in fc.train if d.user_id != "keen")
    assert fc.capped_users == 1 and fc.users == 11
    # too few users for the share: each carries an equal part
    assert user_cap([10, 2], 0.2) == pytest.approx(2.0)


def test_corrections_never_cross_tenants_and_held_out_ones_are_not_trained_on():
    split = START + dt.timedelta(hours=1)
    trajs = [_traj(1, "a"), _traj(2, "b", tenant="other"), _traj(3, "c", ts=split + dt.timedelta(seconds=1))]
    fc = family_corrections("f", "acme", trajs, split)
    assert [d.interaction_id for d in fc.train] == ["i1"]
    assert fc.dropped_other_tenant == 1
    assert [p.interaction_id for p in fc.heldout] == ["i3"]
