"""Validation of a reward against held-out human feedback: AUC with a bootstrap interval.

The question validation answers: *when people judged two answers differently, does the reward rank
the approved one higher?* That is the AUC of the reward's scores against the binary human labels
(label >= 0.5 = approved), computed on labelled trajectories the reward was not fitted on. Answers
the reward calls not applicable (None) are left out, and the share it did score is reported as
``coverage``.

The bar is on the lower end of a 95% stratified bootstrap interval (positives and negatives
resampled separately, so every resample has both classes): by default ``ci_low >= 0.65``. A reward
under the bar is never trained on; the report says why in one sentence.

Bootstrap AUCs are computed all at once: sort the scores once, draw multinomial weights per
resample, and count weighted (positive, negative) orderings with cumulative sums, grouping tied
scores (ties count one half). That is O(resamples x n) with no per-resample sort.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from learner.rewards.base import Completion, Reward
from learner.types import Trajectory, ValidationReport


@dataclass(frozen=True)
class ValidationSettings:
    """``bar``: the AUC the interval's lower bound must clear. ``min_pos``/``min_neg``: fewer
    held-out judgements of a class than this and the reward is not validated at all. ``min_pairs``:
    the same floor for held-out correction pairs (``learner.rewards.preferences``)."""

    bar: float = 0.65
    n_boot: int = 1000
    alpha: float = 0.05
    min_pos: int = 15
    min_neg: int = 15
    seed: int = 0
    min_pairs: int = 15  # held-out correction pairs a reward must score (learner.rewards.preferences)


def _weighted_auc(scores_sorted: np.ndarray, is_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` (resamples x n) over scores sorted ascending."""
    # group boundaries of tied scores
    uniq, start = np.unique(scores_sorted, return_index=True)
    wpos = weights * is_pos[None, :]
    wneg = weights * (~is_pos)[None, :]
    # per tie-group sums
    gpos = np.add.reduceat(wpos, start, axis=1)
    gneg = np.add.reduceat(wneg, start, axis=1)
    neg_below = np.cumsum(gneg, axis=1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(axis=1)
    den = gpos.sum(axis=1) * gneg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(s, kind="stable")
    return float(_weighted_auc(s[order], y[order], np.ones((1, len(s))))[0])


def bootstrap_auc(scores: Sequence[float], labels: Sequence[bool], n_boot: int = 1000, alpha: float = 0.05,
                  seed: int = 0) -> tuple[float, float, float]:
    """(auc, low, high): point estimate and the stratified percentile bootstrap interval."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    point = float(_weighted_auc(s, y, np.ones((1, len(s))))[0])
    rng = np.random.default_rng(seed)
    pos_idx, neg_idx = np.flatnonzero(y), np.flatnonzero(~y)
    w = np.zeros((n_boot, len(s)))
    w[:, pos_idx] = rng.multinomial(len(pos_idx), np.full(len(pos_idx), 1 / len(pos_idx)), size=n_boot)
    w[:, neg_idx] = rng.multinomial(len(neg_idx), np.full(len(neg_idx), 1 / len(neg_idx)), size=n_boot)
    boots = _weighted_auc(s, y, w)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def validate_scores(reward_name: str, reward_version: str, family_id: str, scores: Sequence[float | None],
                    labels: Sequence[float], settings: ValidationSettings | None = None,
                    now: dt.datetime | None = None) -> ValidationReport:
    """Validation of precomputed scores (None = not applicable) against labels in [0, 1]."""
    s = settings or ValidationSettings()
    now = now or dt.datetime.now(dt.timezone.utc)
    pairs = [(float(sc), lab >= 0.5) for sc, lab in zip(scores, labels) if sc is not None and lab != 0.5]
    n_total = sum(1 for lab in labels if lab != 0.5)
    n = len(pairs)
    coverage = n / n_total if n_total else 0.0
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = n - n_pos

    def report(auc_=None, lo=None, hi=None, agreement=None, passed=False, reason=""):
        return ValidationReport(reward_name, reward_version, family_id, n, n_pos, n_neg, coverage, auc_, lo, hi,
                                agreement, s.bar, passed, reason, now)

    if n == 0:
        return report(reason=f"not validated: applies to none of the {n_total} held-out judged answers")
    if n_pos < s.min_pos or n_neg < s.min_neg:
        return report(reason=f"not validated: {n_pos} approved / {n_neg} rejected held-out answers scored "
                             f"(needs {s.min_pos} / {s.min_neg})")
    sc = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    point, lo, hi = bootstrap_auc(sc, y, s.n_boot, s.alpha, s.seed)
    agreement = float(np.mean((sc >= 0.5) == y))
    figures = f"AUC {point:.3f} [{lo:.3f}, {hi:.3f}] on {n} held-out judgements ({n_pos}+/{n_neg}-, coverage {coverage:.0%})"
    if np.ptp(sc) == 0:
        return report(point, lo, hi, agreement, False, f"rejected: gives every answer the same score ({sc[0]:g}); {figures}")
    if lo >= s.bar:
        return report(point, lo, hi, agreement, True, f"passed: {figures}, lower bound >= {s.bar}")
    if point < 0.5:
        why = "disagrees with people (ranks rejected answers above approved ones)"
    else:
        why = f"lower bound {lo:.3f} < bar {s.bar}"
    return report(point, lo, hi, agreement, False, f"rejected: {why}; {figures}")


def validate(reward: Reward, heldout: Sequence[Trajectory], settings: ValidationSettings | None = None,
             now: dt.datetime | None = None) -> ValidationReport:
    """Score each labelled held-out trajectory with ``reward`` and validate. Errors propagate."""
    judged = [t for t in heldout if t.label() is not None]
    scores = reward.score_many(judged, [Completion.of(t) for t in judged])
    return validate_scores(reward.name, reward.version, reward.family_id, scores, [t.label() for t in judged],
                           settings, now)
