"""Rewards built from traffic and feedback, each validated against held-out human feedback before
anything is trained on it. See ``base`` for the contract (a score in [0, 1], None when not
applicable, raise on failure) and ``validation`` for the bar."""

from learner.rewards.base import Completion, Reward, RewardError

__all__ = ["Completion", "Reward", "RewardError"]
