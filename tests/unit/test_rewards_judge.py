"""The optional parts that talk to an OpenAI-compatible endpoint: the LLM judge and paraphrased
variants. A real HTTP server (stdlib) stands in for the model; the OpenAI SDK talks to it."""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from learner.environments import EnvironmentSettings, build_environments
from learner.environments.embedding import HashingEncoder
from learner.environments.synth import ParaphraseSettings
from learner.rewards.base import Completion, RewardError
from learner.rewards.judge import JudgeSettings, LLMJudge
from learner.types import Trajectory

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


class _Model(BaseHTTPRequestHandler):
    """Judge: 9 for answers containing "Paris", 2 otherwise, "banana" when asked to grade "???".
    Paraphraser: prefixes "In other words: "."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "grade" in system:
            answer = user.rsplit("ANSWER TO GRADE:\n", 1)[-1]
            text = "banana" if answer == "???" else ("9" if "Paris" in answer else "2")
        else:
            text = "In other words: " + user
        out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def model_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _traj(i, user):
    return Trajectory(f"i{i}", f"e{i:04d}", T0 + dt.timedelta(minutes=i), "acme", "u", "", "demo", "", "/v1/chat/completions",
                      ({"role": "user", "content": user},), {}, "ok")


def test_llm_judge_scores_and_raises_on_nonsense(model_url):
    judge = LLMJudge("f", JudgeSettings(base_url=model_url))
    p = _traj(0, "Capital of France?")
    assert judge.score(p, Completion("Paris")) == pytest.approx(8 / 9)
    assert judge.score(p, Completion("Lyon")) == pytest.approx(1 / 9)
    with pytest.raises(RewardError, match="not an integer"):
        judge.score(p, Completion("???"))


def test_llm_judge_endpoint_down_raises_not_zero():
    judge = LLMJudge("f", JudgeSettings(base_url="http://127.0.0.1:9/v1", timeout_s=2))
    with pytest.raises(RewardError, match="failed"):
        judge.score(_traj(0, "x"), Completion("y"))


def test_paraphrased_variants_are_synthetic_and_a_dead_endpoint_is_recorded(model_url):
    trajs = [_traj(i, f"Please write a short poem about the colour number {i} and the sea") for i in range(40)]
    ok = build_environments(trajs, EnvironmentSettings(paraphrase=ParaphraseSettings(base_url=model_url, max_prompts=5)),
                            HashingEncoder())
    env = next(iter(ok.environments.values()))
    para = [p for p in env.train if p.origin == "paraphrase"]
    assert len(para) == 5 and all(p.synthetic and p.parent_id for p in para)
    assert all(p.messages[-1]["content"].startswith("In other words: ") for p in para)
    assert not any(p.synthetic for p in env.heldout) and env.manifest["paraphrase"] == "on"

    dead = build_environments(trajs, EnvironmentSettings(paraphrase=ParaphraseSettings(base_url="http://127.0.0.1:9/v1",
                                                                                         timeout_s=2)),
                              HashingEncoder())
    env = next(iter(dead.environments.values()))
    assert env.manifest["paraphrase"].startswith("failed")
    assert not any(p.origin == "paraphrase" for p in env.train)
