"""The learner refuses rewards that were not validated against held-out human feedback.

The simulated users know the truth of the demo arithmetic family ("What is 7 + 5? Reply with the
number only."). The logged policy answers like the tiny base model: usually a bare number, often with
the carry forgotten. A *format-only* verifier ("the reply is a number") is exactly the hackable
reward a by-hand GRPO run on SmolLM2 drove to 0.9 while answers went wrong: it agrees with people barely better than
chance here, so validation rejects it, and the trainer refuses to optimise it in any form.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from learner.demo_tasks import ArithmeticTask
from learner.environments.build import build_environments
from learner.loop import simulated_trajectories
from learner.rewards.build import build_rewards, save_rewards
from learner.rewards.combiner import CombinedReward, Component
from learner.rewards.registry import RewardRegistry
from learner.trainer import GRPOTrainer, UnvalidatedReward, ValidatedObjective


@pytest.fixture(scope="module")
def arithmetic_rewards():
    task = ArithmeticTask()
    rng = random.Random(0)
    reqs = task.requests(rng, 1500)
    texts = [task.synthetic_answer(r, rng) for r in reqs]
    trajs = simulated_trajectories(task, reqs, texts, random.Random(1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    envs = build_environments(trajs)
    rewards = build_rewards(envs, trajs)
    (fid, fam), = rewards.items()
    return envs, rewards, fam


def test_format_only_reward_is_rejected_and_cannot_be_trained_on(arithmetic_rewards):
    _, _, fam = arithmetic_rewards
    fmt = fam.reports["format"]
    assert not fmt.passed, fmt.reason
    assert fmt.auc is not None and fmt.auc < 0.65, fmt.reason
    length = fam.reports["length"]
    assert not length.passed
    # what people approved is still learnable: a validated reward carries weight
    assert fam.reports["answer_memory"].passed
    objective = ValidatedObjective(fam.combined, fam.reports)
    weighted = {c.reward.name for c in fam.combined.components if c.weight > 0}
    assert "format" not in weighted and "length" not in weighted

    # Forcing weight onto the hackable reward is refused, with the reason validation gave.
    by_name = {c.reward.name: c.reward for c in fam.combined.components}
    hacked = CombinedReward(fam.family_id, [Component(by_name["format"], 1.0)])
    with pytest.raises(UnvalidatedReward, match="did not pass validation"):
        ValidatedObjective(hacked, fam.reports)
    # ... as is a reward with no validation report at all, or a report of another version
    with pytest.raises(UnvalidatedReward, match="no validation report"):
        ValidatedObjective(hacked, {})
    stale = {"format": fam.reports["answer_memory"].__class__(**{**fam.reports["format"].__dict__,
                                                                 "reward_version": "r0", "passed": True})}
    with pytest.raises(UnvalidatedReward, match="re-validate"):
        ValidatedObjective(hacked, stale)
    # ... and the trainer takes nothing but a ValidatedObjective (checked before any model work).
    with pytest.raises(UnvalidatedReward):
        GRPOTrainer(policy=None, objectives={fam.family_id: fam.combined})  # type: ignore[arg-type]
    assert objective.family_id == fam.family_id


def test_retired_rewards_stop_training_through_the_registry(arithmetic_rewards, warehouse):
    _, rewards, fam = arithmetic_rewards
    save_rewards(warehouse, rewards)
    objective = ValidatedObjective.from_registry(warehouse, fam.family_id)
    # the same rewards carry weight as when they were built (the stored combiner orders them by name)
    assert ({c.reward.name: c.reward.version for c in objective.combined.components if c.weight > 0}
            == {c.reward.name: c.reward.version for c in fam.combined.components if c.weight > 0})
    # A reward that disagrees with fresher feedback is retired (environments engineer's revalidate);
    # once no validated reward is left the learner refuses to train the family.
    reg = RewardRegistry(warehouse)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    for c in fam.combined.components:
        if c.weight > 0:
            reg.set_status(fam.family_id, c.reward.name, c.reward.version, "retired", "disagreed with fresh feedback",
                           0.0, later)
    with pytest.raises(UnvalidatedReward, match="no validated reward carries weight"):
        ValidatedObjective.from_registry(warehouse, fam.family_id)


def test_answers_only_a_learned_model_scores_are_not_applicable(arithmetic_rewards):
    """The validated reward model likes "11" for every sum (measured; see ValidatedObjective.score):
    the trainer lets a learned model rank an answer only where a grounded reward also applies."""
    envs, _, fam = arithmetic_rewards
    env = envs.environments[fam.family_id]
    objective = ValidatedObjective(fam.combined, fam.reports)
    loose = ValidatedObjective(fam.combined, fam.reports, grounded_only=False)
    unknown = []
    for p in env.train:
        a, b = (int(x) for x in p.messages[-1]["content"].split("?")[0].split("is ")[1].split(" + "))
        if a + b != 11:
            unknown.append(p)
    grounded = objective.score(unknown, ["11"] * len(unknown))
    learned_only = [x for x, y in zip(loose.score(unknown, ["11"] * len(unknown)), grounded) if y is None]
    assert learned_only, "expected prompts where only the learned model scores '11'"
    assert sum(learned_only) / len(learned_only) > 0.5  # the hack the learned model would pay for
    # where a grounded reward does apply, "11" for a sum that is not 11 scores low
    assert all(x < 0.5 for x in grounded if x is not None)
