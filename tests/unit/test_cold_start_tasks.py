"""The cold-start families (learner/cold_start_tasks.py): contract, strict-but-fair scoring, the
held-out split and what the simulated people send. No model: bench/cold_start_base.py measures the
base model on them."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest

from deploy.simulated_users import COLD_START_TASKS, DEFAULT_TASKS, _draw, default_tasks, load_task
from learner import cold_start_tasks as cst
from learner.models import SMOLLM2, TINY

FEEDBACK_KINDS = {"thumbs", "score", "outcome", "comment", "correction"}


def _request(text: str, max_tokens: int = 16) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def ticket(message: str) -> dict:
    return _request(cst._TICKET_PROMPT.format(labels=", ".join(cst._LABELS), message=message))


def extract(sentence: str) -> dict:
    return _request(cst._EXTRACT_PROMPT.format(sentence=sentence))


def date(text: str) -> dict:
    return _request(cst._DATE_PROMPT.format(text=text))


@pytest.fixture(scope="module", params=COLD_START_TASKS)
def task(request):
    return load_task(request.param)


def test_smollm2_gets_the_cold_start_families_and_the_tiny_model_keeps_the_demo_ones():
    assert default_tasks(SMOLLM2) == COLD_START_TASKS
    assert default_tasks(None) == DEFAULT_TASKS and default_tasks(TINY) == DEFAULT_TASKS
    assert {load_task(spec).name for spec in COLD_START_TASKS} == {"ticket_label", "extract_json", "iso_date"}


def test_each_family_fits_the_plugin_contract(task):
    rng = random.Random(0)
    requests = task.requests(rng, 200)
    assert len(requests) == 200 and requests == task.requests(random.Random(0), 200)
    for request in requests:
        assert "model" not in request and request["messages"][-1]["role"] == "user" and request["max_tokens"] > 0
        answer = task.answer(request)
        assert isinstance(answer, str) and task.score(request, answer) == 1.0 and task.reference(request, rng) == answer
        for text in ("", "42", "I'm not sure.", answer):
            assert task.score(request, text) in (0.0, 1.0)
            for body in task.feedback(request, text, rng):
                assert body["kind"] in FEEDBACK_KINDS and "interaction_id" not in body
        assert isinstance(task.heldout(request), bool)


def test_ticket_label_wants_exactly_the_label():
    req = ticket("Hi, the tracking for my kettle hasn't moved since Monday. Thanks.")
    assert cst.TicketLabelTask().answer(req) == "delivery_delay"
    score = cst.TicketLabelTask().score
    for right in ("delivery_delay", " Delivery_delay.\n", "`delivery_delay`", '"delivery_delay"'):
        assert score(req, right) == 1.0, right
    for wrong in ("billing_error", "delivery delay", "Delivery", "The label is delivery_delay.",
                  'The customer message is labeled as "delivery_delay"', "delivery_delay, return_request"):
        assert score(req, wrong) == 0.0, wrong


def test_every_ticket_template_belongs_to_its_own_label_only():
    for label, templates in cst._TICKETS.items():
        for template in templates:
            message = template.format(product="kettle", day="Monday", amount="$7.45", device="phone")
            assert {lab for pattern, lab in cst._TICKET_PATTERNS if pattern.search(message)} == {label}, message


def test_extract_json_parses_the_reply_as_an_app_would():
    req = extract("Our new chef, Priya Nair, turned 41 last month.")
    task = cst.ExtractJsonTask()
    assert json.loads(task.answer(req)) == {"name": "Priya Nair", "age": 41}
    for right in ('{"name": "Priya Nair", "age": 41}', '{\n  "age": 41,\n  "name": "Priya Nair"\n}',
                  '```json\n{"name": "Priya Nair", "age": 41}\n```', '{"name": "Priya  Nair", "age": 41.0}'):
        assert task.score(req, right) == 1.0, right
    for wrong in ('JSON:\n{"name": "Priya Nair", "age": 41}', '{"name": "Priya", "age": 41}',
                  '{"name": "Priya Nair", "age": "41"}', '{"name": "Priya Nair", "age": 42}',
                  '{"name": "Priya Nair", "age": 41, "job": "chef"}', '{"name": "Priya Nair", "age": 41,}',
                  '[{"name": "Priya Nair", "age": 41}]', 'Priya Nair, 41'):
        assert task.score(req, wrong) == 0.0, wrong


@pytest.mark.parametrize("style", range(len(cst._DATE_STYLES)))
def test_iso_date_reads_every_written_style(style):
    task = cst.IsoDateTask()
    for day in (dt.date(1990, 1, 1), dt.date(2003, 11, 22), dt.date(2021, 3, 4), dt.date(2035, 12, 31)):
        req = date(f"The meeting is on {cst._DATE_STYLES[style](day)}.")
        assert task.answer(req) == day.isoformat(), req


def test_iso_date_wants_the_iso_form_only():
    req = date("Invoice due the 4th of March 2021.")
    score = cst.IsoDateTask().score
    for right in ("2021-03-04", "2021-03-04.", " `2021-03-04`\n"):
        assert score(req, right) == 1.0, right
    for wrong in ("2021-3-4", "04/03/2021", "2021-04-03", "March 4, 2021", "The date is 2021-03-04.", "YYYY-MM-DD"):
        assert score(req, wrong) == 0.0, wrong


def test_heldout_is_a_fixed_fifth_of_a_large_prompt_space_and_never_sent(task):
    rng = random.Random(7)
    requests = task.requests(rng, 5000)
    distinct = {r["messages"][-1]["content"] for r in requests}
    assert len(distinct) > 3500, f"{task.name}: only {len(distinct)} distinct prompts in 5,000 draws"
    share = sum(task.heldout(r) for r in requests) / len(requests)
    assert 0.16 < share < 0.24, share
    sent = {_draw(task, rng, heldout=False)["messages"][-1]["content"] for _ in range(1000)}
    asked = {_draw(task, rng, heldout=True)["messages"][-1]["content"] for _ in range(300)}
    assert not sent & asked and all(task.heldout(_request(text)) for text in asked)


def test_feedback_is_sparse_noisy_and_corrects_a_minority_of_wrong_answers(task):
    rng, draws = random.Random(3), 4000
    for request in task.requests(random.Random(5), 2):
        right = task.answer(request)
        for text, good in ((right, True), ("Sure! Here is my answer.", False)):
            nothing = thumbs = flipped = corrections = 0
            for _ in range(draws):
                bodies = task.feedback(request, text, rng)
                nothing += not bodies
                for body in bodies:
                    if body["kind"] == "thumbs":
                        thumbs += 1
                        flipped += (body["value"] > 0) != good
                    if body["kind"] == "correction":
                        corrections += 1
                        assert body["correction"] == [{"role": "assistant", "content": right}]
            assert nothing / draws > 0.25, "people often send nothing"
            assert 0.5 < thumbs / draws < 0.7
            assert 0.07 < flipped / thumbs < 0.13, "a tenth of the thumbs are the wrong one"
            if good:
                assert corrections == 0, "nobody corrects a right answer"
            else:
                assert 0.15 <= corrections / draws <= 0.25, "a minority of wrong answers get the right one typed in"


def test_same_seed_same_requests_and_feedback(task):
    def run(seed: int) -> list:
        rng = random.Random(seed)
        return [(r, task.feedback(r, "nope", rng)) for r in task.requests(rng, 50)]

    assert run(11) == run(11) and run(11) != run(12)
