"""The canary fed from the warehouse, and what a restart does to a canary in flight (real embedded
warehouse; the publisher is replaced by a recorder -- tests/integration/test_canary_live.py runs the
real one against vLLM)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

from learner.canary import CanaryController, CanarySettings
from learner.gate import GateResult, record
from learner.registry import AdapterRegistry, Lineage
from learner.release import Releaser, ReleaseSettings, WarehouseCanaryFeed
from streams.events import FeedbackEvent, InteractionEvent
from tests.vllm_fixtures import CollectingProducer


class RecordingPublisher:
    replicas = ("http://127.0.0.1:9/v1",)

    def __init__(self):
        self.published, self.retired = [], []

    def publish(self, name, path, **kw):
        self.published.append(name)

    def retire(self, name, reason=""):
        self.retired.append(name)


def served(wh, public: str, adapter: str, labels: list[float | None], ts: dt.datetime, tag: str) -> None:
    """Interactions served by ``adapter`` ("" = base), each with a thumb (None: no feedback)."""
    items = []
    for i, lab in enumerate(labels):
        iid = f"{tag}-{uuid.uuid4().hex[:8]}"
        t = ts + dt.timedelta(milliseconds=i)
        items.append((InteractionEvent(interaction_id=iid, endpoint="/v1/chat/completions", public_model=public,
                                       adapter_version=adapter or None, ts=t,
                                       request={"messages": [{"role": "user", "content": f"q {i}"}]},
                                       response={"choices": [{"message": {"role": "assistant", "content": "a"}}]}),
                      ("interactions", 0, 0)))
        if lab is not None:
            items.append((FeedbackEvent(interaction_id=iid, kind="thumbs", value=1 if lab else -1, ts=t),
                          ("feedback", 0, 0)))
            items.append((FeedbackEvent(interaction_id=iid, kind="outcome", value=lab, ts=t), ("feedback", 0, 0)))
    wh.insert_events(items)


def test_feed_gives_one_observation_per_judged_request_once(warehouse):
    start = time.time()
    now = dt.datetime.fromtimestamp(start, dt.timezone.utc)
    served(warehouse, "m", "", [1.0] * 3, now - dt.timedelta(minutes=5), "before")  # before the canary: ignored
    served(warehouse, "m", "cand", [0.0, 1.0, None], now + dt.timedelta(milliseconds=5), "c")
    served(warehouse, "m", "", [1.0, 1.0], now + dt.timedelta(milliseconds=50), "p")
    served(warehouse, "other", "cand", [0.0], now + dt.timedelta(milliseconds=60), "o")  # another public model
    time.sleep(max(0.0, start + 0.1 - time.time()))  # every request above is in the past now
    feed = WarehouseCanaryFeed(warehouse, "m", start, settle_s=0.0)
    got = sorted(feed.poll())
    # thumb + outcome on one request = one observation; the unjudged request is not one
    assert got == [("", 1.0), ("", 1.0), ("cand", 0.0), ("cand", 1.0)]
    assert feed.poll() == []


def _releaser(wh, tmp_path, producer, publisher, family="demo"):
    reg = AdapterRegistry(wh, tmp_path / "adapters")
    return reg, Releaser(publisher, producer, reg, wh, ReleaseSettings(
        public_model="m", base="base-model", family=family, shadow=None,
        canary=CanarySettings(fraction=0.5, min_rollback=10)), report=lambda rec: None)


def _gated(reg, make_adapter, tiny_model, seed):
    v = reg.register("demo", make_adapter(tiny_model.path, seed, rank=4), Lineage())
    return record(reg, v.name, "", GateResult(True, "passed", {}, {}))


def test_a_canary_in_flight_resumes_after_a_restart(warehouse, tmp_path, make_adapter, tiny_model):
    """Process 1 starts the canary and dies; process 2 finds it in the registry, publishes the adapter
    again, re-reads every judged request since the recorded start and decides."""
    first = CollectingProducer()
    reg, _ = _releaser(warehouse, tmp_path, first, RecordingPublisher())
    cand = _gated(reg, make_adapter, tiny_model, 1)
    c = CanaryController(first, "m", "base-model", cand.name, None, CanarySettings(fraction=0.5), registry=reg,
                         clock=time.time)
    c.start()  # ... and the learner is SIGKILLed here
    assert reg.get(cand.name).status == "canary"
    assert [e.action for e in first.events] == ["routing_changed"]
    now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(milliseconds=10)
    served(warehouse, "m", cand.name, [0.0] * 14 + [1.0], now, "c")
    served(warehouse, "m", "", [1.0] * 12 + [0.0] * 3, now, "p")

    from prometheus_client import REGISTRY

    def rollbacks() -> float:
        return REGISTRY.get_sample_value("onpolicy_learner_canary_decisions_total", {"decision": "rollback"}) or 0.0

    before = rollbacks()
    second, publisher = CollectingProducer(), RecordingPublisher()
    _, rel = _releaser(warehouse, tmp_path, second, publisher)
    rel.settings = ReleaseSettings(**{**rel.settings.__dict__, "settle_s": 0.0, "poll_s": 0.1})
    assert rel.recover() == [(cand.name, "rolled_back")]
    assert publisher.published == [cand.name] and publisher.retired == [cand.name]
    assert [e.action for e in second.events] == ["adapter_rolled_back", "routing_changed"]
    back = second.events[-1].payload["route"]
    assert back == {"base": "base-model", "adapter": None, "canary": None}
    decided = [e for e in reg.evaluations(cand.name) if e["stage"] == "canary" and e["decision"] == "rollback"]
    ev = json.loads(decided[-1]["evidence"])
    assert ev["candidate"]["n"] >= 10 and ev["production"]["n"] >= 1  # observations re-read from the warehouse
    assert reg.get(cand.name).status == "rolled_back"
    assert rollbacks() == before + 1
    assert REGISTRY.get_sample_value("onpolicy_learner_canary_observations", {"arm": "candidate"}) == ev["candidate"]["n"]


def test_learner_metrics_are_served():
    import urllib.request

    from learner import metrics

    metrics.record_step({"round": 3, "step": 7, "reward": 0.5, "kl": 0.01, "rollout_tok_s": 120.0})
    port = metrics.serve(0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in ("onpolicy_learner_round 3.0", "onpolicy_learner_reward 0.5", "onpolicy_learner_kl 0.01",
                 "onpolicy_learner_rollout_tokens_per_second 120.0"):
        assert line in text
    assert "onpolicy_learner_steps_total" in text and "onpolicy_learner_canary_state" in text


def test_a_canary_that_cannot_be_resumed_is_concluded_safely(warehouse, tmp_path, make_adapter, tiny_model):
    """No start record (e.g. written by an older learner): roll back to production, publish nothing."""
    producer, publisher = CollectingProducer(), RecordingPublisher()
    reg, rel = _releaser(warehouse, tmp_path, producer, publisher)
    prod = _gated(reg, make_adapter, tiny_model, 1)
    reg.set_status(prod.name, "production", "earlier promotion")
    cand = _gated(reg, make_adapter, tiny_model, 2)
    reg.set_status(cand.name, "canary", "canary started by a learner that kept no record")
    assert rel.recover() == [(cand.name, "rolled_back")]
    assert publisher.published == []
    assert [e.action for e in producer.events] == ["adapter_rolled_back", "routing_changed"]
    assert producer.events[-1].payload["route"]["adapter"] == prod.name
    assert reg.get(cand.name).status == "rolled_back" and reg.get(prod.name).status == "production"


def test_release_refuses_a_candidate_that_failed_the_gate(warehouse, tmp_path, make_adapter, tiny_model):
    import pytest

    from learner.registry import NotRoutable

    producer, publisher = CollectingProducer(), RecordingPublisher()
    reg, rel = _releaser(warehouse, tmp_path, producer, publisher)
    v = reg.register("demo", make_adapter(tiny_model.path, 3, rank=4), Lineage())
    v = record(reg, v.name, "", GateResult(False, "failed: no gain", {}, {}))
    with pytest.raises(NotRoutable):
        rel(v)
    assert publisher.published == [] and producer.events == []


def test_the_loop_hands_a_gated_adapter_and_its_round_to_ship(warehouse, tmp_path, tiny_model):
    """ship(version, context) gets the gated version with the round's families, validated objectives
    and trajectories (what the shadow needs), and its outcome is the round's ``release``; the stored
    rewards are re-validated when the round starts."""
    from learner.loop import LearningLoop, LoopSettings
    from learner.trainer import TrainerSettings
    from tests.integration.test_learning_resume import _log

    got = []

    def ship(version, context):
        got.append((version, context))
        return "rolled_back"

    from learner.environments.build import build_environments
    from learner.rewards.build import build_rewards, save_rewards

    log = _log(1500)
    # rewards stored earlier (``onpolicy rewards build``): the round re-validates them on its window
    first = log.read(0, 1000)
    save_rewards(warehouse, build_rewards(build_environments(first), first))
    loop = LearningLoop(tiny_model.path, log, AdapterRegistry(warehouse, tmp_path / "a"), tmp_path / "ckpt",
                        TrainerSettings(threads=1, group_size=4, prompts_per_step=4, max_new_tokens=8),
                        LoopSettings(min_new_feedback=500, steps_per_round=1, checkpoint_every=1),
                        gate=lambda policy, prod, envs, objs: GateResult(True, "passed: test gate", {}, {}), ship=ship)
    r = loop.run_round()
    assert r.release == "rolled_back" and len(got) == 1
    version, ctx = got[0]
    assert version.name == r.adapter and version.status == "gated"
    assert ctx.objectives and set(ctx.objectives) <= set(ctx.envs.environments)
    assert len(ctx.trajectories) == 1500
    assert loop.state["committed"] == 1500  # the window is committed after ship returned
    assert warehouse.query("SELECT count() FROM {db}.reward_validations FINAL WHERE purpose = 'revalidation'")[0][0] > 0
