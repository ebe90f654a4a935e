"""The trainer's losses against cases computed by hand (numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.trainer import group_advantages, grpo_loss, masked_mean_per_sequence, reverse_kl_per_token


def _case():
    # two answers: 2 tokens and 1 token (+1 padding)
    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.8), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.4), math.log(0.25)], [math.log(0.8), -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -0.5])
    return logp, ref, mask, adv


def test_grpo_loss_matches_hand_computation():
    logp, ref, mask, adv = _case()
    loss, metrics = grpo_loss(logp, ref, adv, mask, beta=0.1)
    # on-policy: ratio = 1, policy term per token = -A  -> row 0: -1, -1; row 1: +0.5
    # k3 KL, row 0 token 0: d = ln(0.4/0.5) = ln 0.8; kl = 0.8 - ln 0.8 - 1 = 0.0231435513; other tokens 0
    # row 0: (-1 + 0.1 * 0.0231435513 - 1) / 2 = -0.99884282; row 1: 0.5; loss = mean = -0.24942141
    kl00 = 0.8 - math.log(0.8) - 1
    expected = ((-1 + 0.1 * kl00 - 1) / 2 + 0.5) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx(-0.24942141, abs=1e-7)
    assert metrics["kl"] == pytest.approx((kl00 / 2 + 0) / 2, abs=1e-7)
    loss.backward()
    # d/dlogp: policy term -A / len / B; KL term beta * (1 - exp(ref - logp)) / len / B; padding 0
    expected_grad = torch.tensor([[-0.25 + 0.1 * (1 - 0.8) / 4, -0.25], [0.5 / 2, 0.0]])
    assert torch.allclose(logp.grad, expected_grad, atol=1e-7)


def test_grpo_loss_without_guard_ignores_reference():
    logp, ref, mask, adv = _case()
    loss, metrics = grpo_loss(logp, ref, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx((-1 + 0.5) / 2)
    assert metrics["kl"] == 0.0


def test_grpo_clip_stops_gradient_only_where_the_ratio_left_the_trust_region_in_the_advantage_direction():
    logp = torch.tensor([[0.0], [0.0]], requires_grad=True)
    old = torch.tensor([[math.log(1 / 1.5)], [math.log(1 / 1.5)]])  # ratio 1.5 for both answers
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logp, None, adv, torch.ones(2, 1), beta=0.0, old_logp=old, clip_eps=0.2)
    # A=+1: min(1.5, 1.2) = 1.2 (clipped, constant); A=-1: min(-1.5, -1.2) = -1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    loss.backward()
    # d/dlogp of ratio * -A for the unclipped row = ratio * 1 / B = 1.5 / 2
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[1, 0].item() == pytest.approx(0.75)


def test_group_advantages():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    # group 1: mean 0.5, std 0.5 -> +-1; group 2: every answer the same -> nothing to learn
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))


def test_reverse_kl_matches_hand_computation():
    student = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # p_s = (0.25, 0.75)
    teacher = torch.tensor([[0.0, 0.0]], requires_grad=True)  # p_t = (0.5, 0.5)
    kl = reverse_kl_per_token(student, teacher)
    # 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.1732868 + 0.3040988 = 0.1308120
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert kl.item() == pytest.approx(0.1308120, abs=1e-6)
    kl.sum().backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)  # the teacher is a target
    # identical distributions: 0
    assert reverse_kl_per_token(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])).item() == pytest.approx(0.0, abs=1e-7)


def test_masked_mean_per_sequence():
    v = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean_per_sequence(v, m).item() == pytest.approx((2.0 + 2.0) / 2)
