"""The per-family combination of rewards that the trainer optimises.

Each component has a weight; the combined score is the weighted mean of the components that apply
(not None) with weight > 0. Weight 0 = logged only: its score is still computed and reported in the
metrics, so a reward can be watched before it is trusted. If no weighted component applies the
combined score is None (the sample is not scored), never 0.0. A component that raises makes the
combined call raise.

Weights from validation (``weights_from_reports``): a reward that passed gets ``ci_low - 0.5`` (how
surely it beats chance), everything else 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from learner.rewards.base import Completion, PromptLike, Reward
from learner.types import RewardResult, ValidationReport, stable_hash


@dataclass(frozen=True)
class Component:
    reward: Reward
    weight: float


class CombinedReward:
    """Weighted rewards of one family. ``version`` names the components, versions and weights."""

    def __init__(self, family_id: str, components: Sequence[Component]):
        self.family_id = family_id
        self.components = list(components)
        self.name = "combined"

    @property
    def version(self) -> str:
        return "c" + stable_hash([(c.reward.name, c.reward.version, round(c.weight, 6)) for c in self.components], length=12)

    @property
    def trainable(self) -> bool:
        """True when at least one validated reward carries weight: otherwise the family gets no trained reward."""
        return any(c.weight > 0 for c in self.components)

    def __call__(self, prompt: PromptLike, completion: Completion) -> RewardResult:
        metrics: dict[str, float] = {}
        total = weight = 0.0
        for c in self.components:
            s = c.reward.score(prompt, completion)
            if s is None:
                continue
            metrics[c.reward.name] = s
            if c.weight > 0:
                total += c.weight * s
                weight += c.weight
        if weight == 0:
            return RewardResult(self.name, None, metrics, "no weighted reward applies")
        return RewardResult(self.name, total / weight, metrics)

    def score_many(self, prompts, completions) -> list[RewardResult]:
        cols = {c.reward.name: c.reward.score_many(prompts, completions) for c in self.components}
        out = []
        for i in range(len(prompts)):
            metrics = {n: v[i] for n, v in cols.items() if v[i] is not None}
            num = sum(c.weight * metrics[c.reward.name] for c in self.components if c.weight > 0 and c.reward.name in metrics)
            den = sum(c.weight for c in self.components if c.weight > 0 and c.reward.name in metrics)
            out.append(RewardResult(self.name, num / den if den else None, metrics,
                                    "" if den else "no weighted reward applies"))
        return out

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": c.reward.name, "kind": c.reward.kind, "version": c.reward.version, "weight": c.weight}
                for c in self.components]


def weights_from_reports(reports: dict[str, ValidationReport]) -> dict[str, float]:
    return {name: (max(0.0, r.ci_low - 0.5) if r.passed and r.ci_low is not None else 0.0)
            for name, r in reports.items()}
