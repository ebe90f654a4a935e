"""An LLM-judge rubric through any OpenAI-compatible endpoint (the proxy itself, vLLM, or a hosted
model through a litellm-compatible gateway). Optional: built only when a ``base_url`` is set.

The judge is asked for one integer from 1 to 10; the score is ``(n - 1) / 9``. A transport error or
an answer without a number raises ``RewardError``: a judge that could not judge has no opinion, and
saying 0.0 would teach the policy something false.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from learner.rewards.base import Completion, PromptLike, Reward, RewardError

DEFAULT_RUBRIC = ("You grade an assistant's answer. Consider correctness, whether it follows every instruction "
                  "(format, length, language), and helpfulness. Reply with a single integer from 1 (useless) "
                  "to 10 (perfect) and nothing else.")


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str | None = None
    model: str = "default"
    api_key: str = "onpolicy"
    rubric: str = DEFAULT_RUBRIC
    timeout_s: float = 30.0


def _conversation(prompt: PromptLike) -> str:
    lines = []
    for m in prompt.messages:
        content = m.get("content")
        if isinstance(content, str):
            lines.append(f"{m.get('role', 'user').upper()}: {content}")
    return "\n".join(lines)


class LLMJudge(Reward):
    kind = "llm_judge"

    def __init__(self, family_id: str, settings: JudgeSettings, name: str | None = None):
        super().__init__(family_id, name)
        if not settings.base_url:
            raise RewardError("an LLM judge needs a base_url (an OpenAI-compatible endpoint)")
        self.settings = settings
        self._client = None

    def _chat(self):
        if self._client is None:
            from openai import OpenAI  # lazy: only when a judge is configured

            self._client = OpenAI(base_url=self.settings.base_url, api_key=self.settings.api_key,
                                  timeout=self.settings.timeout_s, max_retries=1)
        return self._client

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        try:
            resp = self._chat().chat.completions.create(
                model=self.settings.model, temperature=0.0, max_tokens=4,
                messages=[{"role": "system", "content": self.settings.rubric},
                          {"role": "user", "content": f"{_conversation(prompt)}\n\nANSWER TO GRADE:\n{completion.text}"}])
        except Exception as exc:
            raise RewardError(f"LLM judge at {self.settings.base_url} failed: {type(exc).__name__}: {exc}") from exc
        text = resp.choices[0].message.content or ""
        m = re.search(r"\b(10|[1-9])\b", text)
        if not m:
            raise RewardError(f"LLM judge answered {text[:80]!r}, not an integer from 1 to 10")
        return (int(m.group(1)) - 1) / 9

    def params(self) -> dict[str, Any]:
        return {"base_url": self.settings.base_url, "model": self.settings.model, "rubric": self.settings.rubric}
