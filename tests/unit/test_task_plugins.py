"""The task-family plugin contract: any class on the Python path with the four members loads."""

import random
import subprocess
import sys

import pytest

from deploy.simulated_users import TaskLoadError, load_task
from streams.errors import OnpolicyUserError, is_user_error


class EchoTask:
    """Defined only in this test file: the contract must not depend on onpolicy's own tasks."""

    name = "echo"

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": f"say {rng.randint(0, 9)}"}], "max_tokens": 4}
                for _ in range(n)]

    def score(self, request: dict, response_text: str) -> float:
        return float(request["messages"][0]["content"].split()[-1] in response_text)

    def feedback(self, request: dict, response_text: str, rng: random.Random) -> list[dict]:
        return [{"kind": "thumbs", "value": 1 if self.score(request, response_text) else -1}]


class NoScore:
    name = "broken"

    def requests(self, rng, n):
        return []

    def feedback(self, request, text, rng):
        return []


def test_a_class_from_a_test_file_loads():
    task = load_task("tests.unit.test_task_plugins:EchoTask")
    assert task.name == "echo"
    request = task.requests(random.Random(0), 1)[0]
    assert task.score(request, request["messages"][0]["content"]) == 1.0


def test_the_shipped_families_fit_the_contract():
    for spec in ("learner.demo_tasks:ArithmeticTask", "learner.demo_tasks:FormatTask"):
        task = load_task(spec)
        rng = random.Random(1)
        for request in task.requests(rng, 20):
            assert "model" not in request and request["messages"]
            assert 0.0 <= task.score(request, "42") <= 1.0
            for body in task.feedback(request, "42", rng):
                assert body["kind"] in {"thumbs", "score", "outcome", "comment", "correction"}
                assert "interaction_id" not in body


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "package.module:Class"),
    ("does.not.exist:Task", "cannot import"),
    ("tests.unit.test_task_plugins:Missing", "has no 'Missing'"),
    ("tests.unit.test_task_plugins:NoScore", "missing score"),
])
def test_bad_task_specs_say_what_is_wrong(spec, message):
    with pytest.raises(TaskLoadError, match=message) as info:
        load_task(spec)
    assert is_user_error(info.value)


def test_cli_reports_a_bad_task_in_one_line():
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "eval", "--task", "nope.nope:X", "--model", "m"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "cannot import" in out.stderr


def test_heldout_prompts_are_never_sent_by_the_users_and_are_all_eval_asks():
    from deploy.simulated_users import _draw
    from learner.demo_tasks import ArithmeticTask

    task, rng = ArithmeticTask(), random.Random(3)
    sent = {_draw(task, rng, heldout=False)["messages"][0]["content"] for _ in range(2000)}
    asked = {_draw(task, rng, heldout=True)["messages"][0]["content"] for _ in range(2000)}
    assert len(sent) == 78 and len(asked) == 22 and not sent & asked  # every pair, on one side only
    # a task without heldout() has none: both sides draw from all its prompts
    echo = {_draw(EchoTask(), rng, heldout=True)["messages"][0]["content"] for _ in range(200)}
    assert len(echo) == 10


def test_a_heldout_that_keeps_nothing_on_one_side_is_a_clear_error():
    from deploy.simulated_users import _draw

    class AllHeldOut(EchoTask):
        def heldout(self, request: dict) -> bool:
            return True

    with pytest.raises(OnpolicyUserError, match="no non-held-out prompt"):
        _draw(AllHeldOut(), random.Random(0), heldout=False)
