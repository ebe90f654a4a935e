"""What a cold start has to validate rewards with: corrections as preference pairs, and the noise of thumbs.

A model that is mostly wrong earns few thumbs up, and with a tenth of clicks flipped most of those
few are wrong answers: thumbs alone cannot validate a reward there (``validate_scores`` needs 15
approved held-out answers; a family at 5% true success has a handful). What such users do send is
thumbs down and, sometimes, the right answer typed in. A correction on an interaction is a
*labelled preference*: the corrected answer beats the answer that was served. So:

- :func:`preference_pairs` turns held-out corrections into (prompt, chosen, rejected) pairs;
- :func:`validate_pairs` asks of a reward what AUC asks of thumbs, on those pairs: does it rank
  the person's answer above the served one? The statistic is the pairwise win rate (ties count a
  half: a reward that cannot tell the two apart sits at 0.5, like chance), with a percentile
  bootstrap interval over pairs; the bar is on its lower bound, as for thumbs;
- :func:`combine_evidence` decides from both sources: a reward passes when one source's lower bound
  clears the bar and *no* source with enough data says it disagrees with people (its upper bound
  below 0.5). A format-only reward gives a one-word wrong answer and the one-word correction the same
  score, so it ties on every pair and is refused here too (tests/unit/test_rewards_preferences.py);
- :func:`estimate_thumb_noise` measures how often a thumb contradicts the same person's stronger
  evidence on the same answer (a thumbs-up on an answer they corrected or reported failed, a
  thumbs-down on one they reported succeeded), instead of assuming clicks are clean. It is shown
  with every skipped round, and it tells the operator how much the thumbs AUC is attenuated: with
  a symmetric flip rate e, an observed AUC is about ``0.5 + (1 - 2e) (true AUC - 0.5)``.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from learner.rewards.base import Completion, Reward
from learner.rewards.memory import normalize_answer
from learner.rewards.validation import ValidationSettings
from learner.types import Message, Trajectory, ValidationReport


@dataclass(frozen=True)
class PreferencePair:
    """``chosen`` (a person's correction) beats ``rejected`` (the answer served) for this prompt."""

    messages: tuple[Message, ...]
    request_kwargs: dict
    chosen: str
    rejected: str
    user_id: str
    interaction_id: str


def preference_pairs(trajectories: Sequence[Trajectory]) -> list[PreferencePair]:
    """One pair per correction whose text differs (after normalisation) from the served answer."""
    out = []
    for t in trajectories:
        for fb in t.feedback:
            text = fb.correction_text()
            if not text or normalize_answer(text) == normalize_answer(t.response_text):
                continue
            out.append(PreferencePair(t.messages, dict(t.request_kwargs), text, t.response_text,
                                      fb.user_id or t.user_id, t.interaction_id))
    return out


def pair_wins(chosen: Sequence[float | None], rejected: Sequence[float | None]) -> list[float]:
    """Per scored pair: 1 when the chosen answer scores higher, 0.5 on a tie, 0 when lower. Pairs
    where either side is not applicable (None) are left out."""
    return [1.0 if c > r else 0.5 if c == r else 0.0
            for c, r in zip(chosen, rejected) if c is not None and r is not None]


def bootstrap_mean(values: Sequence[float], n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of a mean."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def validate_pairs(reward: Reward, pairs: Sequence[PreferencePair], settings: ValidationSettings | None = None,
                   now: dt.datetime | None = None) -> ValidationReport:
    """The reward held against held-out preference pairs: its win rate (pairwise AUC) with a bootstrap
    lower bound. ``n_pos``/``n_neg`` count the pairs it ranked right / wrong (ties split)."""
    s = settings or ValidationSettings()
    now = now or dt.datetime.now(dt.timezone.utc)
    if not pairs:
        return ValidationReport(reward.name, reward.version, reward.family_id, 0, 0, 0, 0.0, None, None, None, None,
                                s.bar, False, "not validated: no held-out correction pairs", now)
    chosen = reward.score_many(pairs, [Completion(p.chosen) for p in pairs])
    rejected = reward.score_many(pairs, [Completion(p.rejected) for p in pairs])
    wins = pair_wins(chosen, rejected)
    n = len(wins)
    coverage = n / len(pairs)
    right = sum(1 for w in wins if w == 1.0)
    wrong = sum(1 for w in wins if w == 0.0)

    def report(auc=None, lo=None, hi=None, passed=False, reason=""):
        return ValidationReport(reward.name, reward.version, reward.family_id, n, right, wrong, coverage, auc, lo, hi,
                                auc, s.bar, passed, reason, now)

    if n < s.min_pairs:
        return report(reason=f"not validated: {n} held-out correction pairs scored (needs {s.min_pairs})")
    point, lo, hi = bootstrap_mean(wins, s.n_boot, s.alpha, s.seed)
    figures = (f"pair AUC {point:.3f} [{lo:.3f}, {hi:.3f}] on {n} held-out correction pairs "
               f"({right} right, {wrong} wrong, {n - right - wrong} ties; coverage {coverage:.0%})")
    if lo >= s.bar:
        return report(point, lo, hi, True, f"passed: {figures}, lower bound >= {s.bar}")
    why = ("disagrees with people (scores the served answer above their correction)" if point < 0.5
           else f"lower bound {lo:.3f} < bar {s.bar}")
    return report(point, lo, hi, False, f"rejected: {why}; {figures}")


def combine_evidence(thumbs: ValidationReport, pairs: ValidationReport) -> ValidationReport:
    """One verdict from the thumbs report and the pairs report of the same reward.

    Passes when either source passes and neither source with enough data to judge (an interval)
    puts its upper bound below 0.5. The figures of the deciding source are kept (the passing one, or
    else the one that refused with an interval, or else thumbs); the reason names both."""
    def disagrees(r: ValidationReport) -> bool:
        return r.ci_high is not None and r.ci_high < 0.5

    passed = (thumbs.passed or pairs.passed) and not (disagrees(thumbs) or disagrees(pairs))
    if passed:
        lead = thumbs if thumbs.passed else pairs
    elif disagrees(pairs) or (pairs.auc is not None and thumbs.auc is None):
        lead = pairs
    else:
        lead = thumbs
    other = pairs if lead is thumbs else thumbs
    if passed:
        reason = f"{lead.reason} | also: {other.reason}"
    elif lead.passed:  # passed one source, but the other says it disagrees with people
        reason = f"rejected: {other.reason} | {lead.reason}"
    else:
        reason = f"{lead.reason} | {other.reason}"
    return ValidationReport(lead.reward, lead.reward_version, lead.family_id, lead.n, lead.n_pos, lead.n_neg,
                            lead.coverage, lead.auc, lead.ci_low, lead.ci_high, lead.agreement, lead.bar, passed,
                            reason, lead.validated_at)


@dataclass(frozen=True)
class ThumbNoise:
    """How often a thumb contradicts the same person's stronger evidence on the same answer.

    ``checked``: thumbs that sit beside a correction or an outcome from the same user on the same
    interaction; ``contradicting``: of those, the ones pointing the other way. ``rate`` with a 95%
    Wilson interval; None when nothing could be checked."""

    checked: int
    contradicting: int

    @property
    def rate(self) -> float | None:
        return self.contradicting / self.checked if self.checked else None

    def interval(self) -> tuple[float, float] | None:
        if not self.checked:
            return None
        n, p, z = self.checked, self.contradicting / self.checked, 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def describe(self) -> str:
        if not self.checked:
            return "thumb noise: not estimable yet (no thumb beside a correction or outcome)"
        lo, hi = self.interval()
        return (f"thumb noise {self.rate:.0%} [{lo:.0%}, {hi:.0%}] ({self.contradicting} of {self.checked} thumbs "
                "contradict the same person's correction or outcome)")


def estimate_thumb_noise(trajectories: Sequence[Trajectory]) -> ThumbNoise:
    """See :class:`ThumbNoise`. A correction means the served answer was wrong; an outcome says
    whether the task succeeded. Only judgements by the same user on the same interaction are
    compared (two people may honestly disagree)."""
    checked = contradicting = 0
    for t in trajectories:
        by_user: dict[str, dict[str, list]] = {}
        for fb in t.feedback:
            if fb.level != "interaction":
                continue
            by_user.setdefault(fb.user_id, {}).setdefault(fb.kind, []).append(fb)
        for kinds in by_user.values():
            truth = None
            if kinds.get("correction") and any(f.correction_text() for f in kinds["correction"]):
                truth = False
            elif kinds.get("outcome") and kinds["outcome"][-1].value is not None:
                truth = kinds["outcome"][-1].value > 0.5
            if truth is None:
                continue
            for thumb in kinds.get("thumbs", []):
                if thumb.value is None:
                    continue
                checked += 1
                contradicting += (thumb.value > 0) != truth
    return ThumbNoise(checked, contradicting)


def estimated_success(trajectories: Sequence[Trajectory], noise: ThumbNoise) -> tuple[float, int] | None:
    """The served policy's success rate on these trajectories, from thumbs corrected for their noise:
    with a symmetric flip rate e, the observed up-rate is ``u = s (1 - e) + (1 - s) e``, so
    ``s = (u - e) / (1 - 2e)`` (clipped to [0, 1]; e = 0 when it could not be estimated). Returns
    (s, thumbs counted), or None without thumbs."""
    ups = downs = 0
    for t in trajectories:
        for fb in t.feedback:
            if fb.kind == "thumbs" and fb.value is not None:
                ups += fb.value > 0
                downs += fb.value <= 0
    if not ups + downs:
        return None
    u = ups / (ups + downs)
    e = min(noise.rate or 0.0, 0.45)
    return min(1.0, max(0.0, (u - e) / (1 - 2 * e))), ups + downs
