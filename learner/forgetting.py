"""A forgetting suite for SmolLM2-135M-Instruct: base skills it has, checked by a hidden truth.

The gate (:mod:`learner.gate`) lets a candidate adapter lose at most a few points on each
:class:`~learner.gate.ForgettingTask`. These tasks are the real model's own competences, chosen
because the base answers them right greedily (measured below), never drawn from traffic, so a
round that learns a correction by overwriting what the model already knew shows up here:

- ``capitals``: "What is the capital of France? Answer with one word." -- the capital is named;
- ``addition``: "What is 3 + 4? Reply with the number only." (both terms 1-9) -- the first number
  after the model's own echo of the sum ("3 + 4 = 7") is the sum;
- ``repeat_word``: "Repeat the word: castle" -- the word comes back;
- ``opposites``: "What is the opposite of hot?" -- the antonym (or a listed variant) is named.

The checks accept a right answer in a sentence ("The capital of France is Paris."): the base is
chatty, and the suite measures knowledge kept, not the terse format that corrections may teach.

Base success, greedy, SmolLM2-135M-Instruct fp32, 50 requests each; measured on 2026-12-07 on
this machine (at 24 new tokens, what the gate answers with; at 12: 84 / 78 / 94 / 84):
capitals 84%, addition 78%, repeat_word 96%, opposites 86%.
Each task is ``n`` requests (default 50) with ``max_tokens`` 12, so the gate's forgetting check
costs about 200 short greedy answers per policy.
"""

from __future__ import annotations

import random
import re
from typing import Any

from learner.gate import ForgettingTask

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Canada": "Ottawa", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok", "Kenya": "Nairobi",
    "Hungary": "Budapest", "Finland": "Helsinki", "Poland": "Warsaw", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Argentina": "Buenos Aires", "South Korea": "Seoul", "Iran": "Tehran",
    "Iraq": "Baghdad", "Denmark": "Copenhagen", "Czech Republic": "Prague", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Chile": "Santiago", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Scotland": "Edinburgh", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Switzerland": "Bern",
    "Australia": "Canberra", "New Zealand": "Wellington", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "India": "New Delhi", "Turkey": "Ankara",
}
# Alternative spellings a right answer may use.
_CAPITAL_VARIANTS = {"Bogota": ("bogotá",), "Kyiv": ("kiev",), "Brasilia": ("brasília",), "New Delhi": ("delhi",)}

OPPOSITES: dict[str, tuple[str, ...]] = {
    "hot": ("cold",), "big": ("small", "little"), "up": ("down",), "fast": ("slow",), "happy": ("sad", "unhappy"),
    "light": ("dark", "darkness", "heavy"), "old": ("new", "young"), "open": ("closed", "shut"),
    "day": ("night",), "good": ("bad", "evil"), "high": ("low",), "left": ("right",), "wet": ("dry",),
    "hard": ("soft", "easy"), "early": ("late",), "full": ("empty",), "rich": ("poor",), "long": ("short",),
    "strong": ("weak",), "true": ("false",), "win": ("lose", "loss"), "love": ("hate",), "black": ("white",),
    "inside": ("outside",), "push": ("pull",), "buy": ("sell",), "begin": ("end", "finish"), "above": ("below",),
    "thick": ("thin",), "clean": ("dirty",), "loud": ("quiet", "soft", "silent"), "north": ("south",),
    "east": ("west",), "alive": ("dead",), "friend": ("enemy", "foe"), "heavy": ("light",), "wide": ("narrow",),
    "sweet": ("sour", "bitter"), "cheap": ("expensive",), "first": ("last",), "in": ("out",), "on": ("off",),
    "yes": ("no",), "before": ("after",), "question": ("answer",), "front": ("back", "behind"),
    "summer": ("winter",), "tall": ("short",), "young": ("old",), "more": ("less", "fewer"),
}

WORDS: tuple[str, ...] = (
    "apple", "river", "planet", "garden", "window", "yellow", "castle", "pencil", "forest", "silver", "monkey",
    "orange", "button", "dragon", "kettle", "lemon", "jungle", "violin", "zebra", "hammer", "island", "needle",
    "rocket", "tiger", "umbrella", "wagon", "engine", "bridge", "candle", "desert", "feather", "guitar", "helmet",
    "jacket", "ladder", "mirror", "blanket", "cookie", "dolphin", "marble", "pillow", "rabbit", "saddle", "tunnel",
    "basket", "carrot", "ocean", "puzzle", "spoon", "thunder",
)

_CAPITAL_PROMPT = "What is the capital of {country}? Answer with one word."
_ADDITION_PROMPT = "What is {a} + {b}? Reply with the number only."
_REPEAT_PROMPT = "Repeat the word: {word}"
_OPPOSITE_PROMPT = "What is the opposite of {word}?"
_MAX_TOKENS = 12


def _user_text(request: dict[str, Any]) -> str:
    return next(str(m.get("content") or "") for m in reversed(request["messages"]) if m.get("role") == "user")


def _names(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word.lower())}(?![A-Za-z])", text.lower()) is not None


def _request(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": _MAX_TOKENS}


def score_capital(request: dict[str, Any], text: str) -> float:
    country = re.fullmatch(r"What is the capital of (.+)\? Answer with one word\.", _user_text(request)).group(1)
    capital = CAPITALS[country]
    return 1.0 if any(_names(text, c) for c in (capital, *_CAPITAL_VARIANTS.get(capital, ()))) else 0.0


def score_addition(request: dict[str, Any], text: str) -> float:
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", _user_text(request)).groups())
    # the model often echoes the question ("3 + 4 = 7"): the answer is the first number after the echo
    rest = re.sub(rf"\b{a}\s*(?:\+|plus)\s*{b}\b", " ", text, count=1)
    numbers = re.findall(r"-?\d+", rest)
    return 1.0 if numbers and int(numbers[0]) == a + b else 0.0


def score_repeat(request: dict[str, Any], text: str) -> float:
    word = _user_text(request).removeprefix("Repeat the word: ").strip()
    return 1.0 if _names(text, word) else 0.0


def score_opposite(request: dict[str, Any], text: str) -> float:
    word = re.fullmatch(r"What is the opposite of (.+)\?", _user_text(request)).group(1)
    return 1.0 if any(_names(text, w) for w in OPPOSITES[word]) else 0.0


def _draw(items: list, n: int, seed: int) -> list:
    """``n`` items in a fixed shuffled order, cycling when ``n`` exceeds the distinct ones."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def smollm2_forgetting_suite(n: int = 50, seed: int = 0) -> list[ForgettingTask]:
    """Four fixed base skills of SmolLM2-135M-Instruct, ``n`` requests each (distinct prompts up to
    50 per task; beyond that they repeat), scored by their hidden truth. Pass it to
    :func:`learner.gate.make_loop_gate` as ``forgetting_suite``."""
    if n < 1:
        raise ValueError(f"n is requests per task and must be >= 1, got {n}")
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    return [
        ForgettingTask("capitals", tuple(_request(_CAPITAL_PROMPT.format(country=c))
                                         for c in _draw(sorted(CAPITALS), n, seed)), score_capital),
        ForgettingTask("addition", tuple(_request(_ADDITION_PROMPT.format(a=a, b=b))
                                         for a, b in _draw(pairs, n, seed)), score_addition),
        ForgettingTask("repeat_word", tuple(_request(_REPEAT_PROMPT.format(word=w))
                                            for w in _draw(list(WORDS), n, seed)), score_repeat),
        ForgettingTask("opposites", tuple(_request(_OPPOSITE_PROMPT.format(word=w))
                                          for w in _draw(sorted(OPPOSITES), n, seed)), score_opposite),
    ]
