"""Build every family's rewards from trajectories, validate them, and combine the ones that pass.

For each family, judged trajectories up to the environment build's ``split_time`` fit the learned
rewards (answer memory, reward model, references); judged trajectories after it are the held-out
human feedback every candidate (fitted or proposed) is validated on. A candidate that cannot be
fitted (too little feedback) is recorded as ``insufficient`` with the reason -- never dropped
silently. Of the learned reward models (cheap features; with embeddings when enabled) only the one
that validates better carries weight; the other is ``logged``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from learner.environments.build import EnvironmentSet
from learner.rewards.base import Reward, RewardError
from learner.rewards.combiner import CombinedReward, Component, weights_from_reports
from learner.rewards.judge import JudgeSettings, LLMJudge
from learner.rewards.memory import AnswerMemory
from learner.rewards.model import LearnedRewardModel
from learner.rewards.preferences import (ThumbNoise, combine_evidence, estimate_thumb_noise, preference_pairs,
                                         validate_pairs)
from learner.rewards.reference import ReferenceReward
from learner.rewards.registry import RewardRegistry, RewardRow
from learner.rewards.validation import ValidationSettings, validate, validate_scores
from learner.rewards.verifiers import propose_verifiers
from learner.types import Trajectory, ValidationReport

log = logging.getLogger(__name__)

EMBEDDING_MARGIN = 0.01


@dataclass(frozen=True)
class RewardSettings:
    """``rm_embeddings``: also fit a reward model with sentence embeddings and keep the better one
    (costs ~9 ms per unique answer on 2 cores). ``judge``: an optional LLM judge."""

    validation: ValidationSettings = field(default_factory=ValidationSettings)
    rm_C: float = 1.0
    rm_embeddings: bool = False
    rm_max_embedded: int = 5000
    include_length_control: bool = True
    policy_head_model: str | None = None  # a causal LM directory: also fit a scalar head on the policy
    policy_head_max_pairs: int = 4000
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    judge_max_heldout: int = 200


@dataclass(frozen=True)
class FamilyEvidence:
    """The human signal a family's rewards were validated on, in numbers: what a skipped round shows
    the operator (``describe``)."""

    heldout_approved: int
    heldout_rejected: int
    heldout_pairs: int
    fit_corrections: int
    noise: ThumbNoise

    def describe(self, reports: dict[str, ValidationReport], bar: float, min_pos: int, min_pairs: int) -> str:
        best = max((r for r in reports.values() if r.auc is not None), key=lambda r: r.ci_low or 0.0, default=None)
        best_s = (f"best reward {best.reward} AUC {best.auc:.2f} [{best.ci_low:.2f}, {best.ci_high:.2f}] "
                  f"(bar {bar:.2f})") if best is not None else "no reward could be scored on enough held-out signal"
        return (f"{self.heldout_approved} approved / {self.heldout_rejected} rejected held-out answers (needs "
                f"{min_pos} / {min_pos}); {self.heldout_pairs} held-out correction pairs (needs {min_pairs}); "
                f"{self.fit_corrections} corrections to fit from; {best_s}; {self.noise.describe()}")


@dataclass
class FamilyRewards:
    family_id: str
    tenant: str
    env_version: str
    rows: list[RewardRow]
    reports: dict[str, ValidationReport]
    combined: CombinedReward
    combined_report: ValidationReport | None = None
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (name, kind, why it was not fitted)
    evidence: FamilyEvidence | None = None
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    @property
    def trainable(self) -> bool:
        return self.combined.trainable

    def why_not_trainable(self) -> str:
        """One line, in numbers, for a family without a validated reward (what a skipped round shows)."""
        if self.evidence is None:
            return "no validated reward"
        v = self.validation
        return "no validated reward: " + self.evidence.describe(self.reports, v.bar, v.min_pos, v.min_pairs)


def _split(trajs: Sequence[Trajectory], split_time: dt.datetime) -> tuple[list[Trajectory], list[Trajectory]]:
    judged = [t for t in trajs if t.label() is not None]
    return [t for t in judged if t.ts <= split_time], [t for t in judged if t.ts > split_time]


def build_family_rewards(family, env_version: str, trajectories: Sequence[Trajectory], split_time: dt.datetime,
                         settings: RewardSettings | None = None, encoder=None,
                         now: dt.datetime | None = None) -> FamilyRewards:
    s = settings or RewardSettings()
    now = now or split_time
    fid = family.family_id
    fit, heldout = _split(trajectories, split_time)
    candidates: list[Reward] = []
    failures: list[tuple[str, str, str]] = []  # (name, kind, reason)

    candidates.append(AnswerMemory.fit(fid, fit))
    candidates.append(AnswerMemory.fit(fid, fit, closed_world=True))
    try:
        candidates.append(LearnedRewardModel.fit(fid, fit, C=s.rm_C))
    except RewardError as exc:
        failures.append(("learned_rm", "learned_rm", f"insufficient: {exc}"))
    if s.rm_embeddings and encoder is not None:
        if len({t.response_text for t in fit}) <= s.rm_max_embedded:
            try:
                candidates.append(LearnedRewardModel.fit(fid, fit, C=s.rm_C, encoder=encoder))
            except RewardError as exc:
                failures.append(("learned_rm_emb", "learned_rm", f"insufficient: {exc}"))
    if s.policy_head_model:
        from learner.rewards.policy_head import PolicyHeadRewardModel

        try:
            candidates.append(PolicyHeadRewardModel.fit(fid, fit, s.policy_head_model,
                                                        max_pairs=s.policy_head_max_pairs))
        except RewardError as exc:
            failures.append(("policy_head", "policy_head", f"insufficient: {exc}"))
    ref = ReferenceReward.fit(fid, fit)
    if ref is not None:
        candidates.append(ref)
    else:
        failures.append(("reference", "reference", "insufficient: no corrections before the split"))
    candidates += propose_verifiers(family, trajectories, include_length_control=s.include_length_control)
    if s.judge.base_url:
        candidates.append(LLMJudge(fid, s.judge))

    # Two sources of held-out human signal: thumbs/outcomes (AUC on labels) and corrections
    # (preference pairs: the person's answer beats the one served). learner/rewards/preferences.py.
    pairs = preference_pairs(heldout)
    reports: dict[str, ValidationReport] = {}
    for r in candidates:
        sample = heldout[: s.judge_max_heldout] if r.kind == "llm_judge" else heldout
        pair_sample = pairs[: s.judge_max_heldout] if r.kind == "llm_judge" else pairs
        reports[r.name] = combine_evidence(validate(r, sample, s.validation, now),
                                           validate_pairs(r, pair_sample, s.validation, now))
    weights = weights_from_reports(reports)
    # keep the better-validating of the learned reward models (cheap features, + embeddings, policy head)
    rms = [r for r in candidates if r.kind in ("learned_rm", "policy_head") and reports[r.name].passed]
    superseded = {}
    if len(rms) > 1:
        # Embedding features and the policy head cost a model forward per scored answer: they must
        # beat the cheap model's lower bound by EMBEDDING_MARGIN to be worth it.
        def merit(r):
            bonus = EMBEDDING_MARGIN if r.name == "learned_rm" else 0.0
            return (reports[r.name].ci_low + bonus, r.name == "learned_rm")

        best = max(rms, key=merit)
        for r in rms:
            if r is not best:
                weights[r.name] = 0.0
                superseded[r.name] = f"logged: validated, but {best.name} validated better ({reports[best.name].reason})"

    rows = []
    for r in candidates:
        rep = reports[r.name]
        if r.name in superseded:
            rows.append(RewardRow(r, "logged", 0.0, superseded[r.name]))
        elif rep.passed:
            rows.append(RewardRow(r, "active", weights[r.name], rep.reason))
        elif rep.auc is None:
            rows.append(RewardRow(r, "insufficient", 0.0, rep.reason))
        else:
            rows.append(RewardRow(r, "rejected", 0.0, rep.reason))
    combined = CombinedReward(fid, [Component(r, weights[r.name]) for r in candidates])
    combined_report = None
    if combined.trainable:
        results = combined.score_many(heldout, [_completion(t) for t in heldout])
        combined_report = validate_scores("combined", combined.version, fid, [x.score for x in results],
                                          [t.label() for t in heldout], s.validation, now)
    labels = [t.label() for t in heldout]
    evidence = FamilyEvidence(sum(1 for x in labels if x is not None and x > 0.5),
                              sum(1 for x in labels if x is not None and x < 0.5), len(pairs),
                              sum(len(t.corrections()) for t in fit), estimate_thumb_noise(trajectories))
    return FamilyRewards(fid, family.tenant, env_version, rows, reports, combined, combined_report, failures,
                         evidence, s.validation)


def _completion(t: Trajectory):
    from learner.rewards.base import Completion

    return Completion.of(t)


def build_rewards(envset: EnvironmentSet, trajectories: Sequence[Trajectory], settings: RewardSettings | None = None,
                  encoder=None, timings: dict[str, float] | None = None) -> dict[str, FamilyRewards]:
    """Rewards for every family of an environment build."""
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    by_family = envset.family_trajectories(trajectories)
    out = {}
    for fid, env in sorted(envset.environments.items()):
        out[fid] = build_family_rewards(env.family, env.version, by_family.get(fid, []), envset.split_time,
                                        settings, encoder)
    timings["rewards"] = time.perf_counter() - t0
    return out


def save_rewards(warehouse, family_rewards: dict[str, FamilyRewards], now: dt.datetime | None = None) -> None:
    """Validation figures first, then the reward rows that cite them (see registry)."""
    reg = RewardRegistry(warehouse)
    now = now or dt.datetime.now(dt.timezone.utc)
    for fr in family_rewards.values():
        reports = list(fr.reports.values())
        reg.save_validations(reports)
        rows = list(fr.rows)
        for name, kind, reason in fr.failures:
            rows.append(RewardRow(_Unfitted(fr.family_id, name, kind), "insufficient", 0.0, reason))
        reg.save_rewards(fr.family_id, fr.tenant, fr.env_version, rows, now)


class _Unfitted(Reward):
    """Placeholder row for a candidate that could not be fitted, so the table says why it is missing."""

    def __init__(self, family_id: str, name: str, kind: str):
        super().__init__(family_id, name)
        self.kind = kind

    def score(self, prompt, completion):
        raise RewardError(f"{self.name} was never fitted")

    def params(self):
        return {"unfitted": True}


@dataclass
class Rebuild:
    """Everything one rebuild produced, with the seconds each stage took."""

    trajectories: object
    environments: EnvironmentSet
    rewards: dict[str, FamilyRewards]
    timings: dict[str, float]


def rebuild_from_warehouse(warehouse, query=None, env_settings=None, reward_settings: RewardSettings | None = None,
                           encoder=None, save: bool = True) -> Rebuild:
    """Load trajectories, build environments and rewards, validate, and (``save``) store them all.

    Stage order is also the durability order: environments are written before the rewards that
    name their versions.
    """
    from learner.environments import build_environments
    from learner.environments.embedding import default_encoder
    from learner.environments.store import save_environments
    from learner.trajectories import load_trajectories

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tset = load_trajectories(warehouse, query)
    timings["load_trajectories"] = time.perf_counter() - t0
    encoder = encoder or default_encoder()
    envset = build_environments(tset.trajectories, env_settings, encoder, timings)
    rewards = build_rewards(envset, tset.trajectories, reward_settings, encoder, timings)
    if save:
        t0 = time.perf_counter()
        save_environments(warehouse, envset)
        save_rewards(warehouse, rewards)
        timings["store"] = time.perf_counter() - t0
    return Rebuild(tset, envset, rewards, timings)
