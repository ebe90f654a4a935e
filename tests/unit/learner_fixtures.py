"""Simulated users with a known truth, in the shape of the demo-task plugin contract (issue 8).

Each task has ``name``, ``requests(rng, n)``, ``score(request, text)`` (the hidden truth in [0, 1])
and ``feedback(request, text, rng)`` (bodies a person would POST to /v1/feedback), plus
``respond(request, rng)``: a fake policy whose answers are sometimes right, sometimes wrong in the
ways real models are (wrong fact, chatty instead of terse, broken JSON). ``simulate`` turns them into
the InteractionEvent / FeedbackEvent stream the proxy would have produced.

The families are chosen so that each reward kind has something real to find:
- ``capitals``: one-word answers under a system prompt; longer answers are *worse* (the bad
  "longer is better" reward must be rejected here); prompts repeat (answer memory applies).
- ``json_person``: response_format json_schema; correctness is schema-valid JSON with the right
  values (schema verifier and the learned reward model apply; prompts rarely repeat).
- ``arith``: no system prompt, no format: found only by embedding clusters.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from typing import Any, Iterable

from streams.events import FeedbackEvent, InteractionEvent

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Japan": "Tokyo", "China": "Beijing", "India": "Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Canada": "Ottawa", "Mexico": "Mexico",
    "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
}
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
CITIES = ["Paris", "Berlin", "Lagos", "Lima", "Oslo", "Seoul", "Quito", "Porto", "Dakar", "Hanoi"]


def _thumbs_and_more(truth: float, rng: random.Random, noise: float, correct_answer: str | None,
                     p_thumbs: float = 0.7, p_outcome: float = 0.15, p_correction: float = 0.25) -> list[dict]:
    """A person: often thumbs (flipped with probability ``noise``), sometimes an outcome, and when
    the answer was bad, sometimes the answer they wanted."""
    out: list[dict] = []
    good = truth >= 0.5
    if rng.random() < p_thumbs:
        shown = good if rng.random() >= noise else not good
        out.append({"kind": "thumbs", "value": 1 if shown else -1})
    if rng.random() < p_outcome:
        out.append({"kind": "outcome", "value": 1 if good else 0})
    if not good and correct_answer is not None and rng.random() < p_correction:
        out.append({"kind": "correction", "correction": [{"role": "assistant", "content": correct_answer}]})
    return out


class CapitalsTask:
    name = "capitals"
    SYSTEM = "You are a geography quiz bot. Reply with one word: the capital city only."
    TEMPLATES = ["What is the capital of {c}?", "Name the capital city of {c}.", "Capital of {c}?"]
    noise = 0.1

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            country = rng.choice(sorted(CAPITALS))
            user = rng.choice(self.TEMPLATES).format(c=country)
            out.append({"messages": [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": user}],
                        "max_tokens": 16})
        return out

    @staticmethod
    def _country(request: dict) -> str:
        text = request["messages"][-1]["content"]
        return next(c for c in CAPITALS if c in text)

    def score(self, request: dict, text: str) -> float:
        capital = CAPITALS[self._country(request)]
        words = re.findall(r"[A-Za-z]+", text)
        if len(words) == 1:
            return 1.0 if words[0].lower() == capital.lower() else 0.0
        return 0.2 if capital.lower() in text.lower() else 0.0  # right city, wrong format: users dislike it

    def respond(self, request: dict, rng: random.Random) -> str:
        country = self._country(request)
        capital = CAPITALS[country]
        r = rng.random()
        if r < 0.45:
            return capital
        if r < 0.70:
            return rng.choice([v for k, v in sorted(CAPITALS.items()) if k != country])
        if r < 0.90:
            return f"The capital of {country} is {capital}. It is a large city with a long and famous history."
        return f"I believe the capital of {country} might be {rng.choice(sorted(CAPITALS.values()))}, but I am not sure."

    def feedback(self, request: dict, text: str, rng: random.Random) -> list[dict]:
        return _thumbs_and_more(self.score(request, text), rng, self.noise, CAPITALS[self._country(request)])


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


class JsonPersonTask:
    name = "json_person"
    SYSTEM = "Extract the person described by the user."
    noise = 0.1

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
            out.append({
                "messages": [{"role": "system", "content": self.SYSTEM},
                             {"role": "user", "content": f"{name} is {age} years old and lives in {city}."}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}},
                "max_tokens": 64,
            })
        return out

    @staticmethod
    def _facts(request: dict) -> dict:
        m = re.match(r"(\w+) is (\d+) years old and lives in (\w+)\.", request["messages"][-1]["content"])
        return {"name": m.group(1), "age": int(m.group(2)), "city": m.group(3)}

    def score(self, request: dict, text: str) -> float:
        try:
            data = json.loads(text)
        except ValueError:
            return 0.0
        return 1.0 if data == self._facts(request) else 0.0

    def respond(self, request: dict, rng: random.Random) -> str:
        facts = self._facts(request)
        r = rng.random()
        if r < 0.45:
            return json.dumps(facts)
        if r < 0.60:
            return json.dumps({**facts, "age": facts["age"] + rng.choice([-10, -1, 1, 7])})
        if r < 0.75:
            return "Sure! Here is the person: " + json.dumps(facts)
        if r < 0.90:
            return json.dumps({"name": facts["name"], "city": facts["city"]})
        return "{'name': '%s', 'age': %d}" % (facts["name"], facts["age"])

    def feedback(self, request: dict, text: str, rng: random.Random) -> list[dict]:
        return _thumbs_and_more(self.score(request, text), rng, self.noise, json.dumps(self._facts(request)))


class ArithTask:
    name = "arith"
    TEMPLATES = ["What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]
    noise = 0.1

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": rng.choice(self.TEMPLATES).format(
            a=rng.randint(1, 12), b=rng.randint(1, 12))}], "max_tokens": 24} for _ in range(n)]

    @staticmethod
    def _sum(request: dict) -> int:
        a, b = map(int, re.findall(r"\d+", request["messages"][-1]["content"])[:2])
        return a + b

    def score(self, request: dict, text: str) -> float:
        nums = re.findall(r"-?\d+", text)
        return 1.0 if nums and int(nums[-1]) == self._sum(request) else 0.0

    def respond(self, request: dict, rng: random.Random) -> str:
        s = self._sum(request)
        r = rng.random()
        if r < 0.5:
            return str(s)
        if r < 0.8:
            return str(s + rng.choice([-2, -1, 1, 2]))
        return f"Let me think step by step. The answer is {s}."

    def feedback(self, request: dict, text: str, rng: random.Random) -> list[dict]:
        return _thumbs_and_more(self.score(request, text), rng, self.noise, str(self._sum(request)))


TASKS = (CapitalsTask, JsonPersonTask, ArithTask)
START = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def simulate(n: int, seed: int = 0, tasks: Iterable[Any] | None = None, tenants: tuple[str, ...] = ("acme",),
             opt_out_rate: float = 0.0, feedback_rate: float = 1.0, multi_turn_rate: float = 0.0,
             step_s: float = 30.0, start: dt.datetime = START, late_rate: float = 0.0,
             late_after: dt.timedelta = dt.timedelta(days=30)) -> tuple[list[tuple], dict[str, dict]]:
    """``n`` interactions (round-robin over tasks) and their feedback, as (event, origin) pairs for
    ``Warehouse.insert_events``; also returns the truth per interaction id (task, request, text, score).

    ``feedback_rate`` is the chance a user gives any feedback at all; ``late_rate`` the chance that
    it arrives after ``late_after`` (outside the learner's window). Multi-turn episodes ask a second
    capitals question with the first exchange as the prefix and end with an episode outcome.
    """
    rng = random.Random(seed)
    tasks = [t() if isinstance(t, type) else t for t in (tasks or TASKS)]
    events: list[tuple] = []
    truth: dict[str, dict] = {}
    offset = 0

    def origin(topic: str) -> tuple[str, int, int]:
        nonlocal offset
        offset += 1
        return (topic, 0, offset)

    def emit(task, req: dict, ts: dt.datetime, tenant: str, user: str, opt_out: bool, episode: str | None,
             iid: str) -> str:
        # our families call their fake policy respond(); learner.demo_tasks calls it synthetic_answer()
        text = task.respond(req, rng) if hasattr(task, "respond") else task.synthetic_answer(req, rng)
        ev = InteractionEvent(
            interaction_id=iid, ts=ts, endpoint="/v1/chat/completions", public_model="demo",
            upstream_model="demo-base", request={**req, "model": "demo"},
            response={"id": iid, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]},
            finish_reasons=["stop"], tenant=tenant, user_id=user, train_opt_out=opt_out, episode_id=episode)
        events.append((ev, origin("onpolicy.interactions")))
        truth[iid] = {"task": task.name, "request": req, "text": text, "score": task.score(req, text),
                      "opt_out": opt_out, "tenant": tenant}
        if rng.random() < feedback_rate:
            for body in task.feedback(req, text, rng):
                delay = dt.timedelta(seconds=rng.expovariate(1 / 120))
                if rng.random() < late_rate:
                    delay += late_after
                events.append((FeedbackEvent(interaction_id=iid, ts=ts + delay, tenant=tenant, user_id=user, **body),
                               origin("onpolicy.feedback")))
        return text

    per_task = [t.requests(rng, n // len(tasks) + 1) for t in tasks]
    for i in range(n):
        k = i % len(tasks)
        task, req = tasks[k], per_task[k][i // len(tasks)]
        ts = start + dt.timedelta(seconds=i * step_s)
        tenant = tenants[i % len(tenants)]
        user = f"u{rng.randint(0, 199)}"
        opt_out = rng.random() < opt_out_rate
        iid = f"chatcmpl-{seed}-{i}"
        if opt_out:
            # make opted-out prompts recognisable so tests can prove they never reach a pool
            req = {**req, "messages": [*req["messages"][:-1],
                                       {"role": "user", "content": req["messages"][-1]["content"] + f" [private-{i}]"}]}
        if task.name == "capitals" and rng.random() < multi_turn_rate:
            episode = f"ep-{seed}-{i}"
            first = emit(task, req, ts, tenant, user, opt_out, episode, iid)
            follow = task.requests(rng, 1)[0]["messages"][-1]
            req2 = {**req, "messages": [*req["messages"], {"role": "assistant", "content": first}, follow]}
            second = emit(task, req2, ts + dt.timedelta(seconds=5), tenant, user, opt_out, episode, iid + "-t2")
            both = task.score(req, first) >= 0.5 and task.score(req2, second) >= 0.5
            events.append((FeedbackEvent(episode_id=episode, kind="outcome", value=1 if both else 0,
                                         ts=ts + dt.timedelta(seconds=60), tenant=tenant, user_id=user),
                           origin("onpolicy.feedback")))
        else:
            emit(task, req, ts, tenant, user, opt_out, None, iid)
    return events, truth
