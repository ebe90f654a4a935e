"""Reference rewards from corrections: how close an answer is to what a user said it should be.

For each prompt with corrections, the corrected answers are references. Short-answer families (the
median reference is at most ``short_words`` words) score exact match after normalisation (1 or 0);
longer answers score the best token-level F1 against any reference (SQuAD-style overlap). Prompts
without a reference -> None.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from statistics import median
from typing import Any, Iterable

from learner.environments.pools import prompt_key
from learner.rewards.base import Completion, PromptLike, Reward
from learner.rewards.memory import normalize_answer
from learner.types import Trajectory

_TOK = re.compile(r"[a-z0-9]+")


def token_f1(a: str, b: str) -> float:
    ta, tb = _TOK.findall(a.lower()), _TOK.findall(b.lower())
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


class ReferenceReward(Reward):
    kind = "reference"

    def __init__(self, family_id: str, references: dict[str, list[str]], short_answer: bool, name: str | None = None):
        super().__init__(family_id, name)
        self.references = references
        self.short_answer = short_answer

    @classmethod
    def fit(cls, family_id: str, trajectories: Iterable[Trajectory], short_words: int = 3) -> "ReferenceReward | None":
        refs: dict[str, list[str]] = defaultdict(list)
        for t in trajectories:
            for corr in t.corrections():
                key = prompt_key(t.messages, dict(t.request_kwargs))
                if corr not in refs[key]:
                    refs[key].append(corr)
        if not refs:
            return None
        lengths = [len(r.split()) for rs in refs.values() for r in rs]
        return cls(family_id, dict(sorted(refs.items())), median(lengths) <= short_words)

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        refs = self.references.get(prompt_key(prompt.messages, dict(prompt.request_kwargs)))
        if not refs:
            return None
        text = completion.text or ""
        if self.short_answer:
            norm = normalize_answer(text)
            return 1.0 if any(normalize_answer(r) == norm for r in refs) else 0.0
        if normalize_answer(text) in {normalize_answer(r) for r in refs}:
            return 1.0
        return max(token_f1(text, r) for r in refs)

    def params(self) -> dict[str, Any]:
        return {"short_answer": self.short_answer, "references": self.references}

    @classmethod
    def from_params(cls, family_id: str, name: str, params: dict[str, Any]) -> "ReferenceReward":
        return cls(family_id, params["references"], params["short_answer"], name)
