"""Answer memory: for each replayable prompt, the answers people approved and rejected.

Built from judged trajectories (thumbs, outcomes, scores: each adds its label to the answer's
approve count and ``1 - label`` to its reject count) and from corrections (the corrected answer is
an approved answer). A fresh sample is normalised (case, spacing, trailing punctuation; JSON is
compared as parsed JSON with sorted keys) and looked up:

- known answer -> the smoothed approval rate ``(approve + a) / (approve + reject + 2a)``;
- unknown prompt or unknown answer -> ``None`` (the combiner defers to the other rewards).

The *closed-world* variant (``closed_world=True``, named ``answer_memory_closed``) differs in one
case: an unknown answer to a prompt that has an approved answer (smoothed approval above 1/2)
scores 0 -- what people approved is taken to be all that is right. Why: GRPO moves shared weights,
and an answer nobody has judged leaves its group (None) instead of being pushed down. Measured in
the demo (2026-11-26, a 120-step round on 1,800 judged interactions): the policy learned to carry
(sums with a carry, greedy 13% -> 78%) and drifted to unjudged wrong answers on sums without one
(greedy 100% -> 75%), which nothing penalised; the gate caught it. The assumption is not taken on
trust: the variant is validated on held-out feedback like every other reward, where its extra
coverage (answers unknown at fit time) counts -- on a family with many right answers that people
approve without anyone having approved them before, it scores approved answers 0 and fails.
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
                 smoothing: float = 0.5, name: str | None = None, closed_world: bool = False):
        super().__init__(family_id, name or ("answer_memory_closed" if closed_world else None))
        self.table: dict[str, dict[str, list[float]]] = table or {}
        self.smoothing = smoothing
        self.closed_world = closed_world
        # closed world: prompts with an approved answer (any other answer to them scores 0)
        self._approved = {k for k, answers in self.table.items()
                          if any(self._rate(cell) > 0.5 for cell in answers.values())} if closed_world else set()

    def _rate(self, cell: list[float]) -> float:
        a = self.smoothing
        return (cell[0] + a) / (cell[0] + cell[1] + 2 * a)

    @classmethod
    def fit(cls, family_id: str, trajectories: Iterable[Trajectory], smoothing: float = 0.5,
            closed_world: bool = False) -> "AnswerMemory":
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
        return cls(family_id, {k: {a: list(v) for a, v in answers.items()} for k, answers in table.items()}, smoothing,
                   closed_world=closed_world)

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        key = prompt_key(prompt.messages, dict(prompt.request_kwargs))
        answers = self.table.get(key)
        if not answers:
            return None
        cell = answers.get(normalize_answer(completion.text))
        if cell is None:
            return 0.0 if self.closed_world and key in self._approved else None
        return self._rate(cell)

    def params(self) -> dict[str, Any]:
        # closed_world only when set: the open memory's parameters, hence its version, stay as they were
        return {"smoothing": self.smoothing, **({"closed_world": True} if self.closed_world else {}),
                "table": {k: {a: [round(v[0], 4), round(v[1], 4)] for a, v in sorted(ans.items())}
                          for k, ans in sorted(self.table.items())}}

    @classmethod
    def from_params(cls, family_id: str, name: str, params: dict[str, Any]) -> "AnswerMemory":
        return cls(family_id, params["table"], params["smoothing"], name, params.get("closed_world", False))

    def __len__(self) -> int:
        return sum(len(a) for a in self.table.values())
