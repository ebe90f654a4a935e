"""Demo task families: simulated users with a hidden truth, following the task-family plugin contract.

A task family is a class with a no-argument constructor and:
- ``name: str``
- ``requests(rng, n) -> list[dict]``: keyword arguments for ``client.chat.completions.create(...)``
  without ``model`` (messages, max_tokens, ...);
- ``score(request, response_text) -> float``: the hidden truth in [0, 1];
- ``feedback(request, response_text, rng) -> list[dict]``: bodies a person would POST to
  ``/v1/feedback`` (without the interaction id): thumbs with a noise rate, sometimes an outcome,
  sometimes a correction, often nothing;
- optionally ``heldout(request) -> bool``: prompts the simulated users never send, kept for
  ``onpolicy eval`` so that a gain measured there is not a memorised answer.

The demo families also define ``synthetic_answer(request, rng) -> str``: the behaviour of a model
that is *partly* competent at the task. The tiny model (``learner/models/tiny.py``) is pretrained on
exactly these answers, so the served base gets some requests right and has room to learn the rest:
- arithmetic: sums without a carry are answered right; with a carry, most answers forget it, so
  greedy decoding is wrong there while sampling is sometimes right;
- format: the right one-word / JSON answer is only the most likely *whole* answer in a minority
  of samples, and wordy answers dominate the first token, so greedy decoding is mostly wordy.
Everything here is pure Python and deterministic given the ``random.Random`` passed in.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from typing import Any

THUMBS_NOISE = 0.1  # a person clicks the wrong thumb this often


def _last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request["messages"]):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def _human_feedback(truth: float, correct_answer: str, rng: random.Random) -> list[dict[str, Any]]:
    """What a simulated person sends: often nothing, else a (noisy) thumb, sometimes more."""
    good = truth >= 0.5
    bodies: list[dict[str, Any]] = []
    if rng.random() < 0.6:
        up = good if rng.random() >= THUMBS_NOISE else not good
        bodies.append({"kind": "thumbs", "value": 1 if up else -1})
    if rng.random() < 0.15:
        bodies.append({"kind": "outcome", "value": 1 if good else 0})
    if not good and rng.random() < 0.2:
        bodies.append({"kind": "correction", "correction": [{"role": "assistant", "content": correct_answer}]})
    return bodies


class ArithmeticTask:
    """Short answers with a checkable truth: the sum of two one-digit numbers, number only."""

    name = "arithmetic"
    _pattern = re.compile(r"What is (\d+) \+ (\d+)\?")

    def requests(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            out.append({
                "messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
                "max_tokens": 8,
            })
        return out

    def answer(self, request: dict[str, Any]) -> int:
        match = self._pattern.search(_last_user_text(request))
        if not match:
            raise ValueError(f"not an arithmetic request: {_last_user_text(request)!r}")
        return int(match.group(1)) + int(match.group(2))

    def score(self, request: dict[str, Any], response_text: str) -> float:
        return 1.0 if response_text.strip().rstrip(".") == str(self.answer(request)) else 0.0

    def feedback(self, request: dict[str, Any], response_text: str, rng: random.Random) -> list[dict[str, Any]]:
        return _human_feedback(self.score(request, response_text), str(self.answer(request)), rng)

    def heldout(self, request: dict[str, Any]) -> bool:
        """About a fifth of the 100 pairs (22), fixed by a hash of the prompt: never in simulated
        traffic, so the learner never sees them; ``onpolicy eval`` asks only these."""
        return zlib.crc32(_last_user_text(request).encode()) % 5 == 0

    def synthetic_answer(self, request: dict[str, Any], rng: random.Random) -> str:
        total = self.answer(request)
        if total < 10:
            return str(total) if rng.random() < 0.9 else str(total + rng.choice((-1, 1)))
        # With a carry: usually the carry is forgotten (7 + 5 -> "2"), sometimes a wordy answer.
        r = rng.random()
        if r < 0.3:
            return str(total)
        if r < 0.85:
            return str(total - 10)
        return f"The answer is {total}."


_CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "black", "white", "orange", "purple"),
    "animal": ("cat", "dog", "horse", "cow", "bird", "fish", "lion", "spider"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum"),
}
_LEGS = {"cat": 4, "dog": 4, "horse": 4, "cow": 4, "bird": 2, "fish": 0, "lion": 4, "spider": 8}


class FormatTask:
    """Format following: "reply with one word" and "reply as JSON with keys name and legs"."""

    name = "format"
    _one_word = re.compile(r"Name an? (\w+)\. Reply with one word\.")
    _json = re.compile(r'Describe an? (\w+) as JSON with keys "name" and "legs"\.')

    def requests(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            if rng.random() < 0.5:
                category = rng.choice(sorted(_CATEGORIES))
                article = "an" if category[0] in "aeiou" else "a"
                text = f"Name {article} {category}. Reply with one word."
                max_tokens = 12
            else:
                animal = rng.choice(sorted(_LEGS))
                text = f'Describe a {animal} as JSON with keys "name" and "legs".'
                max_tokens = 24
            out.append({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
        return out

    def _parse(self, request: dict[str, Any]) -> tuple[str, str]:
        text = _last_user_text(request)
        if m := self._one_word.search(text):
            return "one_word", m.group(1)
        if m := self._json.search(text):
            return "json", m.group(1)
        raise ValueError(f"not a format request: {text!r}")

    def reference(self, request: dict[str, Any], rng: random.Random | None = None) -> str:
        kind, subject = self._parse(request)
        if kind == "one_word":
            return (rng or random.Random(0)).choice(_CATEGORIES[subject])
        return json.dumps({"name": subject, "legs": _LEGS[subject]})

    def score(self, request: dict[str, Any], response_text: str) -> float:
        kind, subject = self._parse(request)
        text = response_text.strip()
        if kind == "one_word":
            word = text.rstrip(".").lower()
            return 1.0 if re.fullmatch(r"[a-z]+", word) and word in _CATEGORIES[subject] else 0.0
        try:
            obj = json.loads(text)
        except ValueError:
            return 0.0
        ok = isinstance(obj, dict) and set(obj) == {"name", "legs"} and obj["name"] == subject and obj["legs"] == _LEGS[subject]
        return 1.0 if ok else 0.0

    def feedback(self, request: dict[str, Any], response_text: str, rng: random.Random) -> list[dict[str, Any]]:
        return _human_feedback(self.score(request, response_text), self.reference(request, rng), rng)

    def synthetic_answer(self, request: dict[str, Any], rng: random.Random) -> str:
        kind, subject = self._parse(request)
        r = rng.random()
        if kind == "one_word":
            word = rng.choice(_CATEGORIES[subject])
            if r < 0.35:
                return word
            if r < 0.7:
                return f"I like {word}."
            return f"A good {subject} is {word}."
        legs = _LEGS[subject]
        # A JSON start dominates, but the most likely continuation drops the "legs" key.
        if r < 0.3:
            return json.dumps({"name": subject, "legs": legs})
        if r < 0.55:
            return f"The {subject} has {legs} legs."
        return json.dumps({"name": subject})


DEMO_FAMILIES: tuple[type, ...] = (ArithmeticTask, FormatTask)
