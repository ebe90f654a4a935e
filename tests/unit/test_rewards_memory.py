"""Answer memory, open and closed-world: what each scores, and that validation decides whether the
closed-world assumption (approved answers are all that is right) holds for a family."""

from __future__ import annotations

import datetime as dt

from learner.rewards.base import Completion
from learner.rewards.memory import AnswerMemory
from learner.rewards.registry import load_reward
from learner.rewards.validation import ValidationSettings, validate
from learner.types import FeedbackSignal, Trajectory

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _traj(i: int, prompt: str, answer: str, up: bool) -> Trajectory:
    ts = T0 + dt.timedelta(seconds=i)
    return Trajectory(
        interaction_id=f"i{i}", event_id=f"e{i}", ts=ts, tenant="t", user_id="u", episode_id=f"i{i}",
        public_model="m", adapter_version="", endpoint="chat.completions",
        messages=({"role": "user", "content": prompt},), request_kwargs={}, response_text=answer,
        feedback=(FeedbackSignal(kind="thumbs", value=1 if up else -1, ts=ts),))


def _prompt(text: str) -> Trajectory:
    return _traj(0, text, "", True)


def test_closed_world_scores_an_unknown_answer_zero_only_where_an_answer_was_approved():
    fit = [_traj(0, "What is 3 + 4?", "7", True), _traj(1, "What is 3 + 4?", "8", False),
           _traj(2, "What is 7 + 5?", "2", False)]
    open_, closed = AnswerMemory.fit("f", fit), AnswerMemory.fit("f", fit, closed_world=True)
    assert closed.name == "answer_memory_closed" and open_.name == "answer_memory"
    p34, p75, unseen = _prompt("What is 3 + 4?"), _prompt("What is 7 + 5?"), _prompt("What is 1 + 1?")
    assert open_.score(p34, Completion("17")) is None
    assert closed.score(p34, Completion("17")) == 0.0  # 3 + 4 has an approved answer: "17" is not it
    assert closed.score(p34, Completion("7.")) == open_.score(p34, Completion("7")) > 0.5  # known answers agree
    assert closed.score(p75, Completion("12")) is None  # nothing approved for 7 + 5: no opinion
    assert closed.score(unseen, Completion("2")) is None
    # stored and rebuilt as what it is; the open memory's parameters (hence version) are unchanged
    again = load_reward("answer_memory", "f", closed.name, closed.params())
    assert again.closed_world and again.version == closed.version and again.score(p34, Completion("17")) == 0.0
    assert "closed_world" not in open_.params() and closed.version != open_.version


def test_validation_rejects_the_closed_world_memory_where_many_answers_are_right():
    # "Name a color": people approve any color; before the split only red and blue were seen.
    colors_fit, colors_new = ("red", "blue"), ("green", "purple", "orange", "white")
    fit = [_traj(i, "Name a color.", colors_fit[i % 2] if i % 3 else "banana", i % 3 != 0) for i in range(60)]
    held = [_traj(100 + i, "Name a color.", colors_new[i % 4] if i % 2 else "banana", i % 2 == 1)
            for i in range(60)]
    settings = ValidationSettings()
    closed = validate(AnswerMemory.fit("f", fit, closed_world=True), held, settings, T0)
    open_ = validate(AnswerMemory.fit("f", fit), held, settings, T0)
    # scored (approved new colors get 0, below the known-bad "banana"), and found to disagree with people
    assert not closed.passed and closed.auc is not None and closed.auc < 0.5, closed.reason
    assert not open_.passed and open_.auc is None, open_.reason  # it only knows "banana": too few approved


def test_validation_keeps_the_closed_world_memory_where_one_answer_is_right():
    # "What is 3 + 4?": one right answer; wrong answers after the split are ones nobody judged before.
    fit = [_traj(i, "What is 3 + 4?", "7" if i % 2 else "8", i % 2 == 1) for i in range(60)]
    held = [_traj(100 + i, "What is 3 + 4?", "7" if i % 2 else ("17", "6", "34")[i % 3], i % 2 == 1)
            for i in range(60)]
    rep = validate(AnswerMemory.fit("f", fit, closed_world=True), held, ValidationSettings(), T0)
    assert rep.passed and rep.auc == 1.0, rep.reason
    open_ = validate(AnswerMemory.fit("f", fit), held, ValidationSettings(), T0)
    assert not open_.passed, open_.reason  # the new wrong answers are unknown to it: no rejected ones scored
