"""Verifiers proposed from traffic: JSON Schema from response_format, tool calls against declared
tools, format constraints mined from prompts; and the reward contract (None vs raise)."""

import datetime as dt
import json

import pytest

from learner.rewards.base import Completion, RewardError
from learner.rewards.combiner import CombinedReward, Component
from learner.rewards.verifiers import (
    FormatVerifier, JsonParseVerifier, JsonSchemaVerifier, LengthReward, RefusalReward, ToolCallVerifier,
    check_constraint, mine_constraints, propose_verifiers,
)
from learner.types import TaskFamily, Trajectory
from tests.unit.learner_fixtures import PERSON_SCHEMA

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
RF = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}]


def traj(i, user, kwargs=None, system=None, text="", calls=()):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return Trajectory(f"i{i}", f"e{i}", T0 + dt.timedelta(seconds=i), "acme", "u", "", "demo", "", "/v1/chat/completions",
                      tuple(msgs), kwargs or {}, text, tuple(calls))


FAMILY = TaskFamily("fjson", "json person", "acme", {})


def test_json_schema_family_gets_a_schema_verifier_that_accepts_valid_and_rejects_invalid():
    trajs = [traj(i, f"Person {i} is {20 + i} years old and lives in Oslo.", {"response_format": RF},
                  system="Extract the person.") for i in range(10)]
    proposed = {r.kind: r for r in propose_verifiers(FAMILY, trajs)}
    assert {"json_schema", "json_parse", "refusal", "length"} <= set(proposed)
    v = proposed["json_schema"]
    p = trajs[0]
    valid = [json.dumps({"name": "Ann", "age": 30, "city": "Oslo"}), '  {"city": "Oslo", "age": 0, "name": ""}  ']
    invalid = [
        json.dumps({"name": "Ann", "city": "Oslo"}),                      # missing required key
        json.dumps({"name": "Ann", "age": "30", "city": "Oslo"}),         # wrong type
        json.dumps({"name": "Ann", "age": 30, "city": "Oslo", "x": 1}),   # additionalProperties: false
        'Sure! {"name": "Ann", "age": 30, "city": "Oslo"}',               # prose around the JSON
        "{'name': 'Ann', 'age': 30, 'city': 'Oslo'}",                     # not JSON
        "",
    ]
    assert [v.score(p, Completion(t)) for t in valid] == [1.0, 1.0]
    assert [v.score(p, Completion(t)) for t in invalid] == [0.0] * len(invalid)
    # a tool-call-only answer is not this verifier's business
    assert v.score(p, Completion("", ({"function": {"name": "x", "arguments": "{}"}},))) is None


def test_invalid_schema_raises_instead_of_scoring():
    with pytest.raises(RewardError, match="not a valid JSON Schema"):
        JsonSchemaVerifier("f", {"type": "objekt"})


def test_tool_call_verifier():
    p = traj(0, "Weather in Oslo?", {"tools": WEATHER_TOOLS})
    v = ToolCallVerifier("f", WEATHER_TOOLS)

    def call(name, args):
        return Completion("", ({"id": "c1", "type": "function", "function": {"name": name, "arguments": args}},))

    assert v.score(p, call("get_weather", '{"city": "Oslo", "unit": "c"}')) == 1.0
    assert v.score(p, call("get_weather", '{"unit": "c"}')) == 0.0          # missing required arg
    assert v.score(p, call("get_weather", '{"city": "Oslo", "unit": "k"}')) == 0.0  # not in enum
    assert v.score(p, call("get_weather", '{"city": ')) == 0.0              # arguments not JSON
    assert v.score(p, call("get_stock", '{"city": "Oslo"}')) == 0.0         # undeclared function
    assert v.score(p, Completion("It is sunny.")) is None                   # answering in text is allowed...
    required = traj(1, "Weather?", {"tools": WEATHER_TOOLS, "tool_choice": "required"})
    assert v.score(required, Completion("It is sunny.")) == 0.0             # ...unless a call was required
    assert ToolCallVerifier("f").score(traj(2, "hi"), Completion("hello")) is None  # no tools declared
    fam = TaskFamily("ftools", "tools", "acme", {})
    assert any(r.kind == "tool_calls" for r in propose_verifiers(fam, [p]))


@pytest.mark.parametrize("text,kind,good,bad", [
    ("Reply with one word.", "one_word", "Paris", "The capital is Paris."),
    ("Reply with the number only.", "number_only", "42", "It is 42."),
    ("Answer yes or no.", "yes_no", "Yes.", "Maybe"),
    ("Answer in at most 5 words.", "max_words", "It is in Paris.", "It is in Paris, the city of light."),
    ("Reply in French.", "language", "La capitale est Paris et elle est belle.", "The capital is Paris and it is nice."),
    ("Output only JSON.", "json_only", '{"a": 1}', "a: 1"),
])
def test_format_constraints_are_mined_and_checked(text, kind, good, bad):
    constraints = mine_constraints(text)
    assert [c["type"] for c in constraints] == [kind]
    assert check_constraint(constraints[0], good)
    assert not check_constraint(constraints[0], bad)


def test_json_keys_are_mined_from_the_prompt():
    cs = mine_constraints('Describe a cat as JSON with keys "name" and "legs".')
    assert cs == [{"type": "json_only"}, {"type": "json_keys", "keys": ["legs", "name"]}]
    keys = cs[1]
    assert check_constraint(keys, '{"name": "cat", "legs": 4}')
    assert not check_constraint(keys, '{"name": "cat"}')
    assert not check_constraint(keys, 'The cat has 4 legs.')


def test_format_verifier_is_proposed_from_the_system_prompt_and_only_judges_prompts_that_ask():
    sys_prompt = "You are a quiz bot. Reply with one word."
    trajs = [traj(i, f"Capital of country {i}?", system=sys_prompt) for i in range(5)]
    fam = TaskFamily("fq", "quiz", "acme", {})
    fmt = next(r for r in propose_verifiers(fam, trajs) if r.kind == "format")
    assert fmt.score(trajs[0], Completion("Paris")) == 1.0
    assert fmt.score(trajs[0], Completion("It is Paris.")) == 0.0
    assert fmt.score(traj(9, "Tell me about Paris."), Completion("It is Paris.")) is None


def test_refusal_and_length():
    p = traj(0, "hi")
    assert RefusalReward("f").score(p, Completion("I'm sorry, but I can't help with that.")) == 0.0
    assert RefusalReward("f").score(p, Completion("Paris")) == 1.0
    assert LengthReward("f", scale=10).score(p, Completion("one two three four five")) == 0.5


def test_combiner_weights_none_and_errors():
    p = traj(0, "x")
    jp = JsonParseVerifier("f")
    ln = LengthReward("f", scale=4)
    combined = CombinedReward("f", [Component(jp, 1.0), Component(ln, 0.0)])
    res = combined(p, Completion('{"a": 1}'))
    assert res.score == 1.0 and res.metrics == {"json_parse": 1.0, "length": 0.5}  # weight 0: logged, not counted
    only_logged = CombinedReward("f", [Component(ln, 0.0)])
    assert only_logged(p, Completion("a b")).score is None and not only_logged.trainable

    class Broken(JsonParseVerifier):
        def score(self, prompt, completion):
            raise RewardError("endpoint down")

    with pytest.raises(RewardError):  # a failure is never a silent 0.0
        CombinedReward("f", [Component(Broken("f"), 1.0)])(p, Completion("{}"))

    class OutOfRange(JsonParseVerifier):
        def score(self, prompt, completion):
            return 3.0

    with pytest.raises(RewardError, match="outside"):
        OutOfRange("f")(p, Completion("{}"))


def test_versions_are_content_hashes():
    assert JsonSchemaVerifier("f", PERSON_SCHEMA).version == JsonSchemaVerifier("f", dict(PERSON_SCHEMA)).version
    assert LengthReward("f", 10).version != LengthReward("f", 11).version
