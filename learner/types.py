"""Small typed records the learner passes between its parts.

Data flows: warehouse rows -> ``Trajectory`` (one served answer with the human judgements on it)
-> ``TaskFamily`` + ``PromptRecord`` pools (``Environment``) -> rewards score fresh samples into
``RewardResult`` -> validation produces ``ValidationReport``. Records are frozen dataclasses: the
trainer, the pools and the reward registry can share them without defensive copies.

No heavy imports here (no numpy, no torch): the proxy-side tools may import these types.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import orjson

Message = dict[str, Any]
Split = Literal["train", "heldout"]
Origin = Literal["replay", "slot_fill", "paraphrase"]


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short hex digest of JSON-serialised parts, identical across processes and machines."""
    data = orjson.dumps(list(parts), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=16).hexdigest()[:length]


@dataclass(frozen=True)
class FeedbackSignal:
    """One current judgement (latest revision per user, target and kind) joined onto a trajectory.

    ``level`` is "interaction" when it named this interaction, "episode" when it judged the whole
    multi-turn episode the interaction belongs to.
    """

    kind: str
    value: float | None
    ts: dt.datetime
    level: Literal["interaction", "episode"] = "interaction"
    user_id: str = ""
    weight: float = 1.0
    source: str = "explicit"
    correction: tuple[Message, ...] | None = None
    comment: str = ""

    def label(self) -> float | None:
        """This judgement as a probability that the answer was good, or None if it says nothing.

        thumbs +1/-1 -> 1/0; outcome 1/0 -> 1/0; score in [0, 1] taken as is (other ranges are
        clipped: the feedback API documents scores in [0, 1]); a correction means the answer served
        was not what the user wanted -> 0; comments carry no label.
        """
        if self.kind == "thumbs" and self.value is not None:
            return 1.0 if self.value > 0 else 0.0
        if self.kind == "outcome" and self.value is not None:
            return 1.0 if self.value > 0.5 else 0.0
        if self.kind == "score" and self.value is not None:
            return min(1.0, max(0.0, float(self.value)))
        if self.kind == "correction" and self.correction:
            return 0.0
        return None

    def correction_text(self) -> str | None:
        """The text of the last assistant message in the correction, if any."""
        if not self.correction:
            return None
        for msg in reversed(self.correction):
            content = msg.get("content")
            if isinstance(content, str) and msg.get("role", "assistant") == "assistant":
                return content
        return None


@dataclass(frozen=True)
class Trajectory:
    """One served answer (choice 0 of one interaction) with the feedback that judged it.

    ``messages`` is the prompt as sent (for multi-turn traffic: the conversation prefix up to the
    assistant turn being answered), so replaying it to a new policy is re-sending ``request_kwargs``
    with ``messages``.
    """

    interaction_id: str
    event_id: str
    ts: dt.datetime
    tenant: str
    user_id: str
    episode_id: str
    public_model: str
    adapter_version: str
    endpoint: str
    messages: tuple[Message, ...]
    request_kwargs: Mapping[str, Any]
    response_text: str
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    finish_reason: str = ""
    logprobs: Any = None
    feedback: tuple[FeedbackSignal, ...] = ()
    feedback_final: bool = True

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.request_kwargs.get("tools")

    @property
    def response_format(self) -> dict[str, Any] | None:
        return self.request_kwargs.get("response_format")

    @property
    def system_prompt(self) -> str:
        return "\n".join(m.get("content") or "" for m in self.messages
                         if m.get("role") in ("system", "developer") and isinstance(m.get("content"), str))

    @property
    def last_user_text(self) -> str:
        for m in reversed(self.messages):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, str):
                    return c
                if isinstance(c, list):  # content parts: keep the text ones
                    return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        return ""

    def label(self) -> float | None:
        """Weighted mean of the labelled judgements, or None when nobody judged this answer."""
        total = weight = 0.0
        for f in self.feedback:
            lab = f.label()
            if lab is None:
                continue
            total += lab * f.weight
            weight += f.weight
        return None if weight == 0 else total / weight

    def corrections(self) -> list[str]:
        return [t for f in self.feedback if (t := f.correction_text())]


@dataclass(frozen=True)
class Demonstration:
    """A prompt and the answer a person said it should have had (a correction): what SFT and SDFT
    learn from. ``weight`` scales its loss (``learner.corrections`` caps each user's share)."""

    messages: tuple[Message, ...]
    text: str
    weight: float = 1.0
    user_id: str = ""
    interaction_id: str = ""

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and self.weight != float("inf")):  # also refuses NaN
            raise ValueError(f"a demonstration's weight must be finite and >= 0, got {self.weight!r}")
        if not any(m.get("role") == "user" for m in self.messages):
            raise ValueError("a demonstration needs a user message to answer; got roles "
                             f"{[m.get('role') for m in self.messages]}")


@dataclass(frozen=True)
class TrajectoryGroup:
    """The trajectories that answered the same prompt (same ``prompt_id``): GRPO's group."""

    prompt_id: str
    family_id: str
    trajectories: tuple[Trajectory, ...]


@dataclass(frozen=True)
class TaskFamily:
    """A kind of task seen in traffic. ``family_id`` is stable across rebuilds of the same log and
    under appends (it hashes the structural signature and, for embedding clusters, the earliest
    prompt template of the cluster); ``label`` is for people."""

    family_id: str
    label: str
    tenant: str
    signature: Mapping[str, Any]
    n_trajectories: int = 0


@dataclass(frozen=True)
class PromptRecord:
    """One replayable prompt in a pool. Synthetic prompts (slot-filled or paraphrased) name the real
    prompt they came from in ``parent_id`` and are never placed in a held-out pool."""

    prompt_id: str
    family_id: str
    messages: tuple[Message, ...]
    request_kwargs: Mapping[str, Any]
    first_seen: dt.datetime
    split: Split
    origin: Origin = "replay"
    synthetic: bool = False
    parent_id: str = ""
    near_dup_group: str = ""
    n_seen: int = 1
    source_interactions: tuple[str, ...] = ()

    def to_request(self) -> dict[str, Any]:
        """Keyword arguments for ``chat.completions.create`` (without ``model``)."""
        return {**self.request_kwargs, "messages": [dict(m) for m in self.messages]}


@dataclass(frozen=True)
class Environment:
    """A family with its train and held-out prompt pools, at one immutable ``version``."""

    family: TaskFamily
    train: tuple[PromptRecord, ...]
    heldout: tuple[PromptRecord, ...]
    version: str
    manifest: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """What a reward said about one response: ``score`` in [0, 1] or None when the reward does not
    apply (never 0.0 for "could not tell"), plus metrics for logging."""

    reward: str
    score: float | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class ValidationReport:
    """A reward held against held-out human feedback of one family.

    ``auc`` and its bootstrap interval ``[ci_low, ci_high]`` rank the reward's scores against the
    binary human labels; ``coverage`` is the share of labelled held-out answers it scored (the rest
    it called not applicable). ``passed`` is ``ci_low >= bar``; ``reason`` says why not.
    """

    reward: str
    reward_version: str
    family_id: str
    n: int
    n_pos: int
    n_neg: int
    coverage: float
    auc: float | None
    ci_low: float | None
    ci_high: float | None
    agreement: float | None
    bar: float
    passed: bool
    reason: str
    validated_at: dt.datetime


def messages_key(messages: Sequence[Message]) -> str:
    """Canonical JSON of the role/content (and tool calls) of a message list: the identity of a prompt."""
    slim = [{k: m.get(k) for k in ("role", "content", "tool_calls", "name", "tool_call_id") if m.get(k) is not None}
            for m in messages]
    return orjson.dumps(slim, option=orjson.OPT_SORT_KEYS).decode()
