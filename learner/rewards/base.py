"""The reward contract.

A reward is a small object with a ``name`` (unique within its family), a ``kind``, a content
``version`` and ``score(prompt, completion) -> float | None``:

- a float in [0, 1] when it applies (1 = what people approve of),
- ``None`` when it does not apply to this prompt or answer ("no opinion": the combiner skips it,
  validation counts it against coverage),
- an exception (``RewardError`` or anything else) when it failed. A failure is never turned into
  0.0: a trainer that sees 0.0 learns "this answer is bad", which a crashed verifier does not know.

``spec()`` returns everything needed to rebuild the reward (``load_reward`` in ``registry``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from learner.types import Message, RewardResult, stable_hash


class RewardError(RuntimeError):
    """A reward could not compute a score (bad parameters, an endpoint down, ...)."""


class PromptLike(Protocol):
    messages: Sequence[Message]
    request_kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class Completion:
    """What the policy answered: its text and any tool calls."""

    text: str
    tool_calls: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, trajectory) -> "Completion":
        return cls(trajectory.response_text, tuple(trajectory.tool_calls))


class Reward(ABC):
    """Base class; subclasses set ``kind`` and implement ``score`` and ``params``."""

    kind: str = "reward"

    def __init__(self, family_id: str, name: str | None = None):
        self.family_id = family_id
        self.name = name or self.kind

    @abstractmethod
    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        """A score in [0, 1], None when not applicable; raises on failure."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters that, with ``kind``, rebuild this reward."""

    @property
    def version(self) -> str:
        return "r" + stable_hash(self.kind, self.params(), length=12)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "family_id": self.family_id, "params": self.params()}

    def __call__(self, prompt: PromptLike, completion: Completion) -> RewardResult:
        s = self.score(prompt, completion)
        if s is not None and not (0.0 <= s <= 1.0):
            raise RewardError(f"reward {self.name} returned {s}, outside [0, 1]")
        return RewardResult(self.name, s)

    def score_many(self, prompts: Sequence[PromptLike], completions: Sequence[Completion]) -> list[float | None]:
        """Batch scoring; rewards with a cheaper batched path override this."""
        return [self.score(p, c) for p, c in zip(prompts, completions)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family_id}/{self.name} {self.version}>"
