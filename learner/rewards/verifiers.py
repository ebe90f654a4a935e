"""Programmatic verifiers proposed from the traffic itself.

``propose_verifiers(family, trajectories)`` reads what the application asked for and turns it into
checks:
- ``response_format`` json_object / json_schema -> the answer parses as JSON / matches the schema
  (JSON Schema, with the ``jsonschema`` package; the dialect the schema names, else 2020-12);
- declared ``tools`` -> every tool call names a declared function and its arguments parse and match
  that function's parameter schema (``tool_choice: "required"`` also needs a call);
- format constraints mined from system prompts, or from user messages when most of the family's
  prompts carry them: one word, number only, JSON only, yes/no, at most N words / sentences /
  characters, reply in a named language;
- refusal detection (an answer that declines scores 0).

A verifier only *proposes*; like every reward it must pass validation against held-out human
feedback before it is trained on. ``LengthReward`` ("longer is better") is proposed too, as a
control: it should be rejected wherever length is not what people want, and the report shows it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Sequence

from learner.rewards.base import Completion, PromptLike, Reward, RewardError
from learner.types import TaskFamily, Trajectory

REFUSAL = re.compile(
    r"\b(i can(?:'|no)t help|i cannot (?:help|assist|provide|do)|i(?:'m| am) (?:sorry|unable)[, ]+(?:but )?i can|"
    r"i(?:'m| am) not able to|as an ai(?: language model)?|i won't be able to|i must decline)\b", re.I)


def json_schema_of(response_format: dict | None) -> dict | None:
    if not response_format or response_format.get("type") != "json_schema":
        return None
    js = response_format.get("json_schema") or {}
    schema = js.get("schema")
    return schema if isinstance(schema, dict) else None


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (ValueError, TypeError):
        return False, None


class JsonParseVerifier(Reward):
    """1 if the whole answer is JSON (an object when ``object_only``), else 0."""

    kind = "json_parse"

    def __init__(self, family_id: str, object_only: bool = True, name: str | None = None):
        super().__init__(family_id, name)
        self.object_only = object_only

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        if completion.tool_calls and not completion.text:
            return None
        ok, data = _parse_json((completion.text or "").strip())
        return 1.0 if ok and (isinstance(data, dict) or not self.object_only) else 0.0

    def params(self) -> dict[str, Any]:
        return {"object_only": self.object_only}


class JsonSchemaVerifier(Reward):
    """1 if the answer parses and validates against ``schema``; 0 otherwise. An invalid schema
    raises at construction (a verifier that cannot check must not pretend to)."""

    kind = "json_schema"

    def __init__(self, family_id: str, schema: dict, name: str | None = None):
        super().__init__(family_id, name)
        import jsonschema

        self.schema = schema
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise RewardError(f"{family_id}: the response_format schema is not a valid JSON Schema: {exc.message}") from None
        self._validator = cls(schema)

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        if completion.tool_calls and not completion.text:
            return None
        ok, data = _parse_json((completion.text or "").strip())
        return 1.0 if ok and self._validator.is_valid(data) else 0.0

    def params(self) -> dict[str, Any]:
        return {"schema": self.schema}


class ToolCallVerifier(Reward):
    """Tool calls checked against the declared tools of the request (or of the family when the
    request carries none). None when no tools are declared, or when the model answered in text and
    no call was required."""

    kind = "tool_calls"

    def __init__(self, family_id: str, tools: list[dict] | None = None, name: str | None = None):
        super().__init__(family_id, name)
        self.tools = tools or []

    def _validators(self, tools: list[dict]) -> dict[str, Any]:
        import jsonschema

        out = {}
        for t in tools:
            fn = t.get("function") or t
            params = fn.get("parameters") or {"type": "object"}
            cls = jsonschema.validators.validator_for(params, default=jsonschema.Draft202012Validator)
            out[fn.get("name")] = cls(params)
        return out

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        tools = prompt.request_kwargs.get("tools") or self.tools
        if not tools:
            return None
        choice = prompt.request_kwargs.get("tool_choice")
        calls = completion.tool_calls
        if not calls:
            required = choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function")
            return 0.0 if required else None
        validators = self._validators(tools)
        for call in calls:
            fn = call.get("function") or {}
            name = fn.get("name")
            if name not in validators:
                return 0.0
            if isinstance(choice, dict) and (choice.get("function") or {}).get("name") not in (None, name):
                return 0.0
            args = fn.get("arguments")
            if isinstance(args, str):
                ok, args = _parse_json(args)
                if not ok:
                    return 0.0
            if not validators[name].is_valid(args if args is not None else {}):
                return 0.0
        return 1.0

    def params(self) -> dict[str, Any]:
        return {"tools": self.tools}


_LANG_WORDS = {
    "english": "the and is are of to in that it you for with this".split(),
    "french": "le la les et est sont de des un une que vous pour avec".split(),
    "spanish": "el la los las y es son de un una que usted para con".split(),
    "german": "der die das und ist sind von ein eine dass sie für mit".split(),
}

CONSTRAINT_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("one_word", re.compile(r"\b(?:one|single|1)[- ]word\b", re.I)),
    ("number_only", re.compile(r"\b(?:(?:only|just) the number|number only|digits only|only a number)\b", re.I)),
    ("yes_no", re.compile(r"\b(?:yes or no|yes/no)\b", re.I)),
    ("json_only", re.compile(r"\b(?:json only|only (?:valid )?json|(?:reply|respond|answer|output)(?: only)? (?:in|with|as) (?:valid )?json|as (?:valid )?json)\b", re.I)),
    ("json_keys", re.compile(r"\bjson\b[^.\n]{0,40}?\bkeys? ((?:[\"'`][\w -]{1,40}[\"'`](?:,\s*|,? and\s+|\s+)?){1,12})", re.I)),
    ("max_words", re.compile(r"\b(?:at most|no more than|maximum of|max(?:imum)?|under|fewer than|up to|in) (\d+) words?\b", re.I)),
    ("max_sentences", re.compile(r"\b(?:at most|no more than|maximum of|max(?:imum)?|under|fewer than|up to|in) (\d+) sentences?\b", re.I)),
    ("max_chars", re.compile(r"\b(?:at most|no more than|maximum of|max(?:imum)?|under|fewer than|up to|within) (\d+) (?:characters|chars)\b", re.I)),
    ("language", re.compile(r"\b(?:reply|respond|answer|write)(?: only)? in (english|french|spanish|german)\b", re.I)),
]


def _prompt_instructions(prompt: PromptLike) -> str:
    """System/developer messages and the last user message: where instructions live."""
    parts = [m.get("content") for m in prompt.messages if m.get("role") in ("system", "developer")]
    users = [m.get("content") for m in prompt.messages if m.get("role") == "user"]
    if users:
        parts.append(users[-1])
    return "\n".join(p for p in parts if isinstance(p, str))


def mine_constraints(text: str) -> list[dict[str, Any]]:
    out = []
    for kind, pat in CONSTRAINT_PATTERNS:
        m = pat.search(text or "")
        if m:
            c: dict[str, Any] = {"type": kind}
            if kind == "json_keys":
                c["keys"] = sorted(set(re.findall(r"[\"'`]([\w -]{1,40})[\"'`]", m.group(1))))
            elif m.groups():
                g = m.group(1)
                c["n" if g.isdigit() else "lang"] = int(g) if g.isdigit() else g.lower()
            out.append(c)
    return out


def check_constraint(c: dict[str, Any], text: str) -> bool:
    t = (text or "").strip()
    kind = c["type"]
    if kind == "one_word":
        return len(re.findall(r"[^\W_]+(?:[-'][^\W_]+)*", t)) == 1
    if kind == "number_only":
        return re.fullmatch(r"[-+]?\d+(?:[.,]\d+)?\.?", t) is not None
    if kind == "yes_no":
        return t.lower().rstrip(".!") in ("yes", "no")
    if kind == "json_only":
        return _parse_json(t)[0]
    if kind == "json_keys":
        ok, data = _parse_json(t)
        return ok and isinstance(data, dict) and set(c["keys"]) <= set(data)
    if kind == "max_words":
        return len(t.split()) <= c["n"]
    if kind == "max_sentences":
        return len([s for s in re.split(r"(?<=[.!?])\s+", t) if s]) <= c["n"]
    if kind == "max_chars":
        return len(t) <= c["n"]
    if kind == "language":
        words = re.findall(r"[a-zäöüßàâçéèêëîïôûùüÿñáíóú]+", t.lower())
        if len(words) < 4:
            return True  # too short to tell; a one-word answer in any language passes
        hits = {lang: sum(w in set(ws) for w in words) for lang, ws in _LANG_WORDS.items()}
        return max(hits, key=lambda k: (hits[k], k == c["lang"])) == c["lang"]
    raise RewardError(f"unknown format constraint {kind!r}")


class FormatVerifier(Reward):
    """1 if the answer meets every constraint its own prompt states, 0 if it breaks one; None when
    the prompt states none of the family's mined constraints (a family found by embeddings can mix
    prompts that ask for "the number only" with prompts that do not)."""

    kind = "format"

    def __init__(self, family_id: str, constraints: list[dict[str, Any]], name: str | None = None):
        super().__init__(family_id, name)
        if not constraints:
            raise RewardError("a format verifier needs at least one constraint")
        self.constraints = constraints

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        if completion.tool_calls and not completion.text:
            return None
        stated = mine_constraints(_prompt_instructions(prompt))
        active = [c for c in self.constraints if c in stated]
        if not active:
            return None
        return 1.0 if all(check_constraint(c, completion.text) for c in active) else 0.0

    def params(self) -> dict[str, Any]:
        return {"constraints": self.constraints}


class RefusalReward(Reward):
    """0 for an answer that declines to help, 1 otherwise."""

    kind = "refusal"

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        if completion.tool_calls and not completion.text:
            return None
        return 0.0 if REFUSAL.search(completion.text or "") else 1.0

    def params(self) -> dict[str, Any]:
        return {"pattern": REFUSAL.pattern}


class LengthReward(Reward):
    """"Longer is better": score = min(1, words / ``scale``). A control that validation should reject
    wherever people do not prefer longer answers."""

    kind = "length"

    def __init__(self, family_id: str, scale: int = 100, name: str | None = None):
        super().__init__(family_id, name)
        self.scale = scale

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        return min(1.0, len((completion.text or "").split()) / self.scale)

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}


def propose_verifiers(family: TaskFamily, trajectories: Sequence[Trajectory], majority: float = 0.2,
                      include_length_control: bool = True) -> list[Reward]:
    """Verifiers suggested by what the family's requests asked for (see the module docstring)."""
    fid = family.family_id
    out: list[Reward] = []
    if not trajectories:
        return out
    rfs = Counter(json.dumps(t.response_format, sort_keys=True) for t in trajectories if t.response_format)
    schema = None
    if rfs:
        rf = json.loads(rfs.most_common(1)[0][0])
        schema = json_schema_of(rf)
        if schema is not None:
            out.append(JsonSchemaVerifier(fid, schema))
        if rf.get("type") in ("json_object", "json_schema"):
            out.append(JsonParseVerifier(fid))
    tools = next((t.tools for t in trajectories if t.tools), None)
    if tools:
        out.append(ToolCallVerifier(fid, tools))
    # constraints stated in system prompts or user messages of at least ``majority`` of the family
    found: Counter[str] = Counter()
    by_key: dict[str, dict] = {}
    sample = trajectories[:: max(1, len(trajectories) // 5000)]  # mining 5k prompts finds any common constraint
    for t in sample:
        for c in {json.dumps(c, sort_keys=True) for c in mine_constraints(_prompt_instructions(t))}:
            found[c] += 1
            by_key[c] = json.loads(c)
    constraints = [by_key[k] for k, n in sorted(found.items()) if n / len(sample) >= majority]
    # "as JSON" stated in the prompt stays a per-prompt format constraint (a family found by embeddings
    # may mix JSON and plain prompts); only response_format makes the whole family JSON.
    if constraints:
        out.append(FormatVerifier(fid, constraints))
    out.append(RefusalReward(fid))
    if include_length_control:
        out.append(LengthReward(fid))
    return out
