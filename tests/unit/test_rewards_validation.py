"""Validation maths: AUC against hand-computed cases, the bootstrap interval, and the bar."""

import numpy as np
import pytest

from learner.rewards.validation import ValidationSettings, auc, bootstrap_auc, validate_scores


def test_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert auc([0.9, 0.4, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert auc([1, 1, 0, 0], [True, True, False, False]) == pytest.approx(1.0)
    assert auc([0, 0, 1, 1], [True, True, False, False]) == pytest.approx(0.0)


def test_auc_matches_pairwise_definition_on_random_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, 200).astype(float)
    y = rng.random(200) < 0.2 + 0.2 * s
    pos, neg = s[y], s[~y]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(s, y) == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_point_and_is_deterministic():
    rng = np.random.default_rng(2)
    s = rng.normal(size=400)
    y = rng.random(400) < 1 / (1 + np.exp(-2 * s))
    point, lo, hi = bootstrap_auc(s, y, n_boot=500, seed=3)
    assert lo < point < hi
    assert 0.05 < hi - lo < 0.2  # n=400: a few points either side, not degenerate
    assert bootstrap_auc(s, y, n_boot=500, seed=3) == (point, lo, hi)


def test_bar_insufficient_and_constant_rewards():
    rng = np.random.default_rng(4)
    labels = (rng.random(300) < 0.5).astype(float)
    good = labels * 0.6 + rng.random(300) * 0.4
    rep = validate_scores("good", "v1", "f", good.tolist(), labels.tolist())
    assert rep.passed and rep.ci_low >= 0.65 and rep.reason.startswith("passed")

    noise = rng.random(300)
    rep = validate_scores("noise", "v1", "f", noise.tolist(), labels.tolist())
    assert not rep.passed and rep.reason.startswith("rejected")

    rep = validate_scores("const", "v1", "f", [1.0] * 300, labels.tolist())
    assert not rep.passed and "same score" in rep.reason

    few = validate_scores("few", "v1", "f", [0.9, 0.1, None, None], [1.0, 0.0, 1.0, 0.0])
    assert not few.passed and few.auc is None and few.coverage == 0.5 and "not validated" in few.reason

    none = validate_scores("na", "v1", "f", [None] * 10, [1.0] * 10)
    assert not none.passed and "applies to none" in none.reason


def test_bar_is_configurable():
    rng = np.random.default_rng(5)
    labels = (rng.random(400) < 0.5).astype(float)
    weak = labels * 0.25 + rng.random(400)
    strict = validate_scores("weak", "v", "f", weak.tolist(), labels.tolist(), ValidationSettings(bar=0.9))
    lax = validate_scores("weak", "v", "f", weak.tolist(), labels.tolist(), ValidationSettings(bar=0.5))
    assert not strict.passed and lax.passed
