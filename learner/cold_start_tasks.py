"""Cold-start task families for a real chat model: app-like requests SmolLM2-135M-Instruct mostly gets wrong.

The demo families (``learner/demo_tasks.py``) are built for the tiny model, which was pretrained to
be half right on them: they prove the plumbing. These are what an application built on a small
chat model actually asks of it, where the base model starts out bad (PRODUCT.md's quality bar):
short answers in a format the app parses, which a person's correction can teach and which carry
over to prompts nobody corrected:

- ``ticket_label``: route a customer message to one of a fixed set of snake_case queue labels,
  reply with the label only;
- ``extract_json``: pull a person's name and age out of a sentence into ``{"name": .., "age": ..}``;
- ``iso_date``: rewrite a date written out in words as ``YYYY-MM-DD``.

Each family follows the task-family plugin contract (``deploy/simulated_users.py``) and adds
``answer(request) -> str``: the one right answer, which is what a correcting user types in (also as
``reference(request, rng)``, ``FormatTask``'s name for it). Prompts
are templates x slot values (thousands per family); ``heldout`` keeps a fixed fifth of them, by a
hash of the prompt, out of the simulated traffic, so ``onpolicy eval`` measures prompts the learner
never saw. Scoring is strict about what the app parses and lenient about what a person would wave
through (surrounding whitespace, a trailing period, case where case carries no meaning, quotes or a
code fence around the answer). Feedback is the demo's ``_human_feedback``: often nothing, a thumb
(a tenth of them flipped) on 60%, a correction on a fifth of the wrong answers.

``bench/cold_start_base.py`` measures the base model's true success on the held-out prompts.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import zlib
from typing import Any

from learner.demo_tasks import _human_feedback, _last_user_text


class _OneAnswerFamily:
    """What the families share: one right answer per prompt, the demo's simulated people, a hash split."""

    name: str

    def answer(self, request: dict[str, Any]) -> str:
        raise NotImplementedError

    def score(self, request: dict[str, Any], response_text: str) -> float:
        raise NotImplementedError

    def reference(self, request: dict[str, Any], rng: random.Random | None = None) -> str:
        """The answer a correcting person types in (``FormatTask.reference``'s signature; here
        there is only one right answer, so ``rng`` is unused)."""
        return self.answer(request)

    def feedback(self, request: dict[str, Any], response_text: str, rng: random.Random) -> list[dict[str, Any]]:
        return _human_feedback(self.score(request, response_text), self.answer(request), rng)

    def heldout(self, request: dict[str, Any]) -> bool:
        """A fixed fifth of the prompts, by a hash of the prompt text (as ``ArithmeticTask.heldout``)."""
        return zlib.crc32(_last_user_text(request).encode()) % 5 == 0


def _strip_wrapping(text: str) -> str:
    """The answer without what a reader looks through: whitespace, one code fence, quotes or
    backticks around it, a trailing period."""
    text = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", text, flags=re.S)
    if fence:
        text = fence.group(1).strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


# -- ticket_label ---------------------------------------------------------------------------------

_PRODUCTS = ("blender", "desk lamp", "phone case", "backpack", "coffee grinder", "yoga mat", "monitor", "kettle",
             "rain jacket", "keyboard", "air fryer", "office chair", "water bottle", "headphones", "toaster",
             "bike helmet")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "last week", "yesterday")
_AMOUNTS = ("$12.99", "$24.50", "$39.00", "$59.99", "$7.45", "$89.00", "$129.99", "$15.20")
_DEVICES = ("phone", "laptop", "tablet", "work computer", "iPad", "Android phone")

# Each label's messages: what people write when they mean it, never the label's own words.
_TICKETS: dict[str, tuple[str, ...]] = {
    "billing_error": (
        "I was charged {amount} twice for the same {product}.",
        "My statement shows {amount} from you that I never authorised.",
        "Why is there an extra {amount} on my invoice for the {product}?",
        "You took {amount} from my card {day} but the {product} was on sale for less.",
        "The {product} cost {amount} at checkout but my bank shows a different amount.",
        "I cancelled my order for the {product} {day} and was still billed {amount}.",
    ),
    "delivery_delay": (
        "My {product} was supposed to arrive {day} and it still isn't here.",
        "The tracking for my {product} hasn't moved since {day}.",
        "Where is my {product}? I ordered it two weeks ago.",
        "The courier said the {product} would come {day}, nothing yet.",
        "I paid {amount} for express shipping and the {product} is still not here.",
        "It's been ten days and my {product} hasn't shipped.",
    ),
    "account_access": (
        "I can't sign in on my {device} since {day}, it keeps saying wrong password.",
        "The verification code never arrives when I log in from my {device}.",
        "My account got locked after I reset my password {day}.",
        "I changed phones and now I can't get into my account on the {device}.",
        "The app on my {device} logs me out every time I open it.",
        "I never got the password reset email I asked for {day}.",
    ),
    "return_request": (
        "The {product} I got {day} doesn't fit what I need, how do I send it back?",
        "I'd like to return the {product}, it's unopened.",
        "The {product} arrived with a crack, I want to send it back.",
        "Can I swap the {product} for a different colour?",
        "I bought two of the {product} by mistake, can I return one?",
        "How do I print a return label for the {product}?",
    ),
}
_GREETINGS = ("", "Hi, ", "Hello, ", "Hey, ", "Good morning, ")
_SIGNOFFS = ("", " Thanks.", " Please help.", " Thank you!", " This is urgent.")
_LABELS = tuple(sorted(_TICKETS))


def _template_pattern(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for slot in ("product", "day", "amount", "device"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), ".+?")
    return re.compile(pattern, re.I)


_TICKET_PATTERNS = [(_template_pattern(t), label) for label, templates in _TICKETS.items() for t in templates]
_TICKET_PROMPT = ("Classify this customer message into one of these labels: {labels}. "
                  "Reply with the label only.\n\nMessage: {message}")
_TICKET_RE = re.compile(r"\n\nMessage: (.*)\Z", re.S)


class TicketLabelTask(_OneAnswerFamily):
    """Route a customer message to a support queue: the answer is one of four snake_case labels."""

    name = "ticket_label"

    def requests(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            label = rng.choice(_LABELS)
            body = rng.choice(_TICKETS[label]).format(product=rng.choice(_PRODUCTS), day=rng.choice(_DAYS),
                                                      amount=rng.choice(_AMOUNTS), device=rng.choice(_DEVICES))
            greeting = rng.choice(_GREETINGS)
            message = greeting + (body if not greeting or re.match(r"I\b", body) else body[0].lower() + body[1:])
            message += rng.choice(_SIGNOFFS)
            text = _TICKET_PROMPT.format(labels=", ".join(_LABELS), message=message)
            out.append({"messages": [{"role": "user", "content": text}], "max_tokens": 8})
        return out

    def answer(self, request: dict[str, Any]) -> str:
        match = _TICKET_RE.search(_last_user_text(request))
        if not match:
            raise ValueError(f"not a ticket_label request: {_last_user_text(request)!r}")
        message = match.group(1)
        for pattern, label in _TICKET_PATTERNS:
            if pattern.search(message):
                return label
        raise ValueError(f"not one of the ticket messages: {message!r}")

    def score(self, request: dict[str, Any], response_text: str) -> float:
        return 1.0 if _strip_wrapping(response_text).lower() == self.answer(request) else 0.0


# -- extract_json ---------------------------------------------------------------------------------

_NAMES = ("Maria Lopez", "James Carter", "Aiko Tanaka", "Omar Haddad", "Lena Fischer", "Priya Nair", "Tom Becker",
          "Sofia Rossi", "Daniel Kim", "Grace Okafor", "Lucas Silva", "Emma Novak", "Ivan Petrov", "Chloe Martin",
          "Ahmed Saleh", "Nina Berg", "Carlos Ruiz", "Hannah Cole", "Yuki Sato", "Mateo Diaz", "Zoe Walsh",
          "Ravi Gupta", "Elena Popescu", "Sam Turner")
_CITIES = ("Lyon", "Denver", "Osaka", "Porto", "Leeds", "Pune", "Graz", "Austin", "Cork", "Tartu")
_JOBS = ("nurse", "teacher", "carpenter", "pilot", "chef", "designer", "plumber", "lawyer")
_SENTENCES = (
    "{name} is {age} years old and works as a {job} in {city}.",
    "Our new {job}, {name}, turned {age} last month.",
    "{name}, a {age}-year-old {job} from {city}, won the local chess tournament.",
    "At {age}, {name} finally moved to {city}.",
    "The form was signed by {name} (age {age}), a {job}.",
    "{name} from {city} celebrated turning {age} with friends.",
)
_EXTRACT_PROMPT = ('Extract the person\'s full name and age from the text. Reply with JSON only, exactly the keys '
                   '"name" (a string) and "age" (a number).\n\nText: {sentence}')
_EXTRACT_RE = re.compile(r"\n\nText: (.*)\Z", re.S)


class ExtractJsonTask(_OneAnswerFamily):
    """Information extraction for an app that parses the reply: ``{"name": "<full name>", "age": <int>}``."""

    name = "extract_json"

    def requests(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            sentence = rng.choice(_SENTENCES).format(name=rng.choice(_NAMES), age=rng.randint(19, 88),
                                                     job=rng.choice(_JOBS), city=rng.choice(_CITIES))
            out.append({"messages": [{"role": "user", "content": _EXTRACT_PROMPT.format(sentence=sentence)}],
                        "max_tokens": 32})
        return out

    def _truth(self, request: dict[str, Any]) -> tuple[str, int]:
        match = _EXTRACT_RE.search(_last_user_text(request))
        if not match:
            raise ValueError(f"not an extract_json request: {_last_user_text(request)!r}")
        sentence = match.group(1)
        name = next((n for n in _NAMES if n in sentence), None)
        age = re.search(r"\b(\d{2})\b", sentence)
        if name is None or age is None:
            raise ValueError(f"no known name and age in {sentence!r}")
        return name, int(age.group(1))

    def answer(self, request: dict[str, Any]) -> str:
        name, age = self._truth(request)
        return json.dumps({"name": name, "age": age})

    def score(self, request: dict[str, Any], response_text: str) -> float:
        name, age = self._truth(request)
        text = response_text.strip()
        fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", text, flags=re.S)
        try:
            obj = json.loads(fence.group(1) if fence else text)
        except ValueError:
            return 0.0
        if not isinstance(obj, dict) or set(obj) != {"name", "age"} or not isinstance(obj["name"], str):
            return 0.0
        # A number the app can use: 34 or 34.0, not "34" and not true.
        ok_age = isinstance(obj["age"], (int, float)) and not isinstance(obj["age"], bool) and obj["age"] == age
        return 1.0 if ok_age and " ".join(obj["name"].split()) == name else 0.0


# -- iso_date -------------------------------------------------------------------------------------

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Ways people write a date in a message; none of them is ISO.
_DATE_STYLES = (
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.strftime('%A')}, {_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
)
_DATE_CONTEXTS = (
    "The meeting is on {date}.",
    "Please book the flight for {date}.",
    "Invoice due {date}.",
    "She was born on {date}.",
    "The warranty ends {date}.",
    "Deliver the parcel on {date}.",
)
_DATE_PROMPT = "Write the date in this text as YYYY-MM-DD. Reply with the date only.\n\nText: {text}"
_DATE_RE = re.compile(r"\n\nText: (.*)\Z", re.S)
_EPOCH = dt.date(1990, 1, 1)
_SPAN_DAYS = (dt.date(2035, 12, 31) - _EPOCH).days


class IsoDateTask(_OneAnswerFamily):
    """Normalise a date written out in words to ISO 8601 (``2021-03-04``), for a form or a database."""

    name = "iso_date"

    def requests(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            date = _EPOCH + dt.timedelta(days=rng.randrange(_SPAN_DAYS + 1))
            text = rng.choice(_DATE_CONTEXTS).format(date=rng.choice(_DATE_STYLES)(date))
            out.append({"messages": [{"role": "user", "content": _DATE_PROMPT.format(text=text)}], "max_tokens": 16})
        return out

    def answer(self, request: dict[str, Any]) -> str:
        match = _DATE_RE.search(_last_user_text(request))
        if not match:
            raise ValueError(f"not an iso_date request: {_last_user_text(request)!r}")
        text = match.group(1)
        words = "|".join(m[:3] for m in _MONTHS)
        found = re.search(rf"\b({words})[a-z]* (\d{{1,2}})(?:st|nd|rd|th)?,? (\d{{4}})", text)
        if found:
            month, day, year = found.groups()
        else:
            found = re.search(rf"(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?({words})[a-z]* (\d{{4}})", text)
            if not found:
                raise ValueError(f"no date in {text!r}")
            day, month, year = found.groups()
        month_number = [m[:3] for m in _MONTHS].index(month) + 1
        return dt.date(int(year), month_number, int(day)).isoformat()

    def score(self, request: dict[str, Any], response_text: str) -> float:
        return 1.0 if _strip_wrapping(response_text) == self.answer(request) else 0.0


COLD_START_FAMILIES: tuple[type, ...] = (TicketLabelTask, ExtractJsonTask, IsoDateTask)
