"""Answer memory: for each replayable prompt, the answers people approved and rejected.

Built from judged trajectories (thumbs, outcomes, scores: each adds its label to the answer's
approve count and ``1 - label`` to its reject count) and from corrections (the corrected answer is
an approved answer). A fresh sample is normalised (case, spacing, trailing punctuation; JSON is
compared as parsed JSON with sorted keys) and looked up:

- known answer -> the smoothed approval rate ``(approve + a) / (approve + reject + 2a)``;
- unknown prompt or unknown answer -> ``None`` (the combiner defers to the other rewards).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Iterable

from learner.environments.pools import prompt_key
from learner.rewards.base import Completion, PromptLike, Reward
from learner.types import Trajectory

_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    t = text.strip()
    if t[:1] in "{[":
        try:
            return "json:" + json.dumps(json.loads(t), sort_keys=True, separators=(",", ":"))
        except ValueError:
            pass
    t = _WS.sub(" ", t.lower()).strip()
    return t.rstrip(".!?;: ")


class AnswerMemory(Reward):
    kind = "answer_memory"

    def __init__(self, family_id: str, table: dict[str, dict[str, list[float]]] | None = None,
                 smoothing: float = 0.5, name: str | None = None):
        super().__init__(family_id, name)
        self.table: dict[str, dict[str, list[float]]] = table or {}
        self.smoothing = smoothing

    @classmethod
    def fit(cls, family_id: str, trajectories: Iterable[Trajectory], smoothing: float = 0.5) -> "AnswerMemory":
        table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
        for t in trajectories:
            lab = t.label()
            key = prompt_key(t.messages, dict(t.request_kwargs))
            if lab is not None and not t.tool_calls:
                cell = table[key][normalize_answer(t.response_text)]
                cell[0] += lab
                cell[1] += 1 - lab
            for corr in t.corrections():
                table[key][normalize_answer(corr)][0] += 1.0
        return cls(family_id, {k: {a: list(v) for a, v in answers.items()} for k, answers in table.items()}, smoothing)

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        answers = self.table.get(prompt_key(prompt.messages, dict(prompt.request_kwargs)))
        if not answers:
            return None
        cell = answers.get(normalize_answer(completion.text))
        if cell is None:
            return None
        a = self.smoothing
        return (cell[0] + a) / (cell[0] + cell[1] + 2 * a)

    def params(self) -> dict[str, Any]:
        return {"smoothing": self.smoothing,
                "table": {k: {a: [round(v[0], 4), round(v[1], 4)] for a, v in sorted(ans.items())}
                          for k, ans in sorted(self.table.items())}}

    @classmethod
    def from_params(cls, family_id: str, name: str, params: dict[str, Any]) -> "AnswerMemory":
        return cls(family_id, params["table"], params["smoothing"], name)

    def __len__(self) -> int:
        return sum(len(a) for a in self.table.values())
