"""A planted bad adapter meets the release pipeline on the real stack: the shadow refuses it, and when
the shadow is skipped the live canary rolls it back within 200 feedback-carrying canary requests.

Everything is real: the session's vLLM (SmolLM2-135M-Instruct), the broker, a proxy capturing traffic
and following the control topic, the sink landing events in the embedded warehouse, and simulated
users (deploy/simulated_users.py, the demo task families) sending requests through the unmodified
OpenAI SDK and feedback through ``/v1/feedback``. The learner side is ``learner.release.Releaser``, the
loop's ``ship`` callback, with the learner's Publisher.

The task family is :class:`CapitalsTask` (the simulated-users plugin contract, with the demo tasks'
noisy-thumbs feedback model): the demo's arithmetic and format families are built for the tiny model,
and SmolLM2 -- the session vLLM's model -- answers them right about 6% of the time at the default
temperature (measured in this test's first version: 5.5 good of 85 judged), which leaves nothing for a
bad adapter to be worse than. SmolLM2 names a famous capital in about 63% of sampled answers
(transformers, temperature 1, 60 samples).

The "bad" adapter is a random LoRA with its B matrices scaled up: it answers garbage. It is registered
and marked as having passed the gate (the planted failure is a gate that missed it), so what stops it
here is the shadow or the canary. The shadow scores with validated rewards built, as the loop builds
them, from a simulated history of the same task family (the live warm-up alone is too little
feedback to validate a reward on held-out data).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import types
import uuid

import pytest

from learner.canary import CanarySettings
from learner.gate import GateResult, record
from learner.registry import AdapterRegistry, Lineage, NotRoutable
from learner.release import Releaser, ReleaseSettings, RoundContext
from learner.shadow import ShadowSettings
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from streams.events import ControlEvent
from streams.producer import EventProducer
from streams.settings import ProducerSettings, SinkSettings, WarehouseSettings
from streams.sink import Sink

from .helpers import wait_until

# Timeout above pytest's 600 s default: the first test also pays for the session's vLLM start, which
# took over 3 minutes on this 2-core machine while other jobs ran three more vLLMs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SHADOW_SAMPLE = 24

SIGNING = "canary-live-signing-key-0123456789"
USER_KEY = "op-canary-live-user-key-000000000000"
BAD_SCALE = 20.0  # B x 20: the adapter's answers are garbage
WALL_S = 420  # a canary still undecided after this long fails the test (instead of pytest's timeout)

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Japan": "Tokyo", "England": "London",
            "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens"}


class CapitalsTask:
    """A task family SmolLM2 is decent at: name a famous country's capital (truth: the capital's name
    appears in the answer)."""

    name = "capitals"

    def requests(self, rng: random.Random, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": f"What is the capital of {rng.choice(sorted(CAPITALS))}?"}],
                 "max_tokens": 12} for _ in range(n)]

    def _country(self, request: dict) -> str:
        return request["messages"][-1]["content"].removeprefix("What is the capital of ").rstrip("?")

    def score(self, request: dict, response_text: str) -> float:
        return 1.0 if CAPITALS[self._country(request)].lower() in response_text.lower() else 0.0

    def feedback(self, request: dict, response_text: str, rng: random.Random) -> list[dict]:
        from learner.demo_tasks import _human_feedback

        return _human_feedback(self.score(request, response_text), CAPITALS[self._country(request)], rng)

    def synthetic_answer(self, request: dict, rng: random.Random) -> str:
        country = self._country(request)
        r = rng.random()
        if r < 0.45:
            return f"The capital of {country} is {CAPITALS[country]}."
        if r < 0.6:
            return CAPITALS[country]
        if r < 0.85:
            return f"The capital of {country} is {rng.choice(sorted(set(CAPITALS.values()) - {CAPITALS[country]}))}."
        return "I am not sure."


@pytest.fixture(scope="module")
def live(vllm_server, kafka, chdb_path, tmp_path_factory):
    from proxy.api_keys import hash_key
    from streams.warehouse import Warehouse

    root = tmp_path_factory.mktemp("canary-live")
    wh = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database=f"canary_live_{uuid.uuid4().hex[:6]}"))
    wh.migrate()
    stop = threading.Event()
    sink = Sink(kafka, wh, SinkSettings(group_id=f"canary-live-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.2,
                                        implicit_interval_s=0, reconcile_interval_s=0), stop=stop)
    sink_thread = threading.Thread(target=sink.run, daemon=True)
    sink_thread.start()
    proxy = RunningProxy(ProxySettings(
        upstream_url=vllm_server.base_url, kafka=kafka, interaction_id_key=SIGNING, capture=True, capture_mode="inline",
        follow_control=True, shutdown_grace_s=5, admin_token="canary-live-admin-token-0123456789",
        api_keys=[{"name": "u", "tenant": "", "sha256": hash_key(USER_KEY, None)}],
        producer=ProducerSettings(spool_dir=root / "proxy-spool"))).start()
    producer = EventProducer(kafka, ProducerSettings(spool_dir=root / "learner-spool"))
    yield types.SimpleNamespace(wh=wh, proxy=proxy, producer=producer, vllm=vllm_server, root=root)
    producer.close()
    proxy.stop()
    stop.set()
    sink_thread.join(30)


def route_of(proxy, public: str):
    return proxy.state.router.table.routes.get(public)


def route_to_base(live, public: str) -> None:
    """Production = the base: the route the public model has before any adapter."""
    live.producer.emit(ControlEvent(action="routing_changed", actor="test", public_model=public, reason="initial route",
                                    payload={"routing_version": 1, "route": {"base": live.vllm.model, "adapter": None,
                                                                             "canary": None}}))
    live.producer.flush(30)
    wait_until(lambda: route_of(live.proxy, public) is not None, 30, f"the proxy to route {public}", 0.05)


def users(live, public: str, seed: int, rate: float = 4.0):
    from deploy.simulated_users import SimulatedUsers

    u = SimulatedUsers([CapitalsTask()], live.proxy.base_url, public, api_key=USER_KEY, rate=rate, concurrency=4,
                       seed=seed)
    thread = threading.Thread(target=u.run, daemon=True)
    thread.start()
    return u, thread


def landed(wh, public: str, adapter: str | None = None) -> int:
    extra, params = "", {"m": public}
    if adapter is not None:
        extra, params = " AND adapter_version = {a:String}", {"m": public, "a": adapter}
    return int(wh.query(f"SELECT count() FROM {{db}}.interactions FINAL WHERE public_model = {{m:String}}{extra}",
                        params)[0][0])


def planted(live, make_adapter, smollm2_model, family: str, seed: int):
    """The bad adapter in the registry, as if the gate had passed it."""
    reg = AdapterRegistry(live.wh, live.root / f"registry-{family}")
    v = reg.register(family, make_adapter(smollm2_model.path, seed=seed, scale=BAD_SCALE),
                     Lineage(base_model=smollm2_model.served_name))
    v = record(reg, v.name, "", GateResult(True, "planted: a gate that missed it", {}, {}))
    return reg, v


def releaser(live, reg, public: str, family: str, shadow: ShadowSettings | None, canary: CanarySettings) -> Releaser:
    from learner.publisher import Publisher

    deadline = time.monotonic() + WALL_S

    routed = lambda: [v.name for v in reg.versions(family) if v.status in ("canary", "production")]  # noqa: E731
    pub = Publisher([live.vllm.base_url], live.root / f"store-{family}", live.producer, routed=routed)
    return Releaser(pub, live.producer, reg, live.wh, ReleaseSettings(
        public_model=public, base=live.vllm.model, family=family, shadow=shadow, canary=canary, poll_s=1.0,
        settle_s=2.0, progress_s=20.0), stop=lambda: time.monotonic() > deadline, report=lambda rec: print(rec, flush=True))


def simulated_history():
    """Validated rewards for the task family, built the way the loop builds them, from a simulated
    history two hours old (tenant "" like the proxy's traffic without a tenant)."""
    from learner.environments.build import build_environments
    from learner.loop import simulated_trajectories
    from learner.rewards.build import build_rewards
    from learner.trainer import ValidatedObjective

    rng, start = random.Random(0), dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    trajs = []
    for task in (CapitalsTask(),):
        reqs = task.requests(rng, 800)
        trajs += simulated_trajectories(task, reqs, [task.synthetic_answer(r, rng) for r in reqs], random.Random(1),
                                        start, tenant="", step_s=5, id_prefix=f"h-{task.name}-")
    envs = build_environments(trajs)
    rewards = build_rewards(envs, trajs)
    objs = {fid: ValidatedObjective(fr.combined, fr.reports) for fid, fr in rewards.items() if fr.trainable}
    assert objs, "no family of the simulated history has a validated reward"
    return RoundContext(envs, objs, trajs)


def test_gate_failed_candidate_is_refused_and_bad_adapter_fails_the_shadow(live, make_adapter, smollm2_model):
    family = f"sh{uuid.uuid4().hex[:6]}"
    public = f"canary-{family}"
    route_to_base(live, public)
    reg, bad = planted(live, make_adapter, smollm2_model, family, seed=31)
    # a candidate that failed the gate: refused before anything is published or routed
    failed = reg.register(family, make_adapter(smollm2_model.path, seed=32, scale=0.5), Lineage(parent=bad.name))
    failed = record(reg, failed.name, "", GateResult(False, "failed: held-out gain below the margin", {}, {}))
    rel = releaser(live, reg, public, family, ShadowSettings(sample=SHADOW_SAMPLE, min_pairs=12), CanarySettings(fraction=0.5))
    with pytest.raises(NotRoutable):
        rel(failed)
    assert rel.publisher.loaded() == []

    u, thread = users(live, public, seed=5)
    try:
        wait_until(lambda: landed(live.wh, public) >= SHADOW_SAMPLE, 400, f"{SHADOW_SAMPLE} live requests to land")
    finally:
        u.stop.set()
        thread.join(60)
    t0 = time.monotonic()
    outcome = rel(bad, simulated_history())
    shadow_s = time.monotonic() - t0
    ev = [e for e in reg.evaluations(bad.name) if e["stage"] == "shadow"]
    print(f"\nshadow of the planted adapter: {outcome} in {shadow_s:.0f} s: {ev[-1]['reason'] if ev else '-'}; "
          f"evidence {ev[-1]['evidence'] if ev else '-'}")
    assert outcome == "shadow_failed" and ev and not ev[-1]["passed"]
    assert reg.get(bad.name).status == "shadow_failed"
    with pytest.raises(NotRoutable):
        reg.assert_routable(bad.name)
    route = route_of(live.proxy, public)
    assert route.adapter is None and route.canary_adapter is None and route.canary_fraction == 0.0
    # never routed: no live request of the public model was served by either candidate
    assert landed(live.wh, public, bad.name) == 0 and landed(live.wh, public, failed.name) == 0
    assert bad.name not in rel.publisher.loaded()  # unloaded after failing
    rel.publisher.close()


def test_live_canary_rolls_back_a_bad_adapter_within_200_judged_requests(live, make_adapter, smollm2_model):
    """The shadow already stops the planted adapter, so the canary is started directly (shadow=None):
    the 200-request claim is measured on live traffic and live feedback."""
    family = f"cn{uuid.uuid4().hex[:6]}"
    public = f"canary-{family}"
    route_to_base(live, public)
    reg, bad = planted(live, make_adapter, smollm2_model, family, seed=41)
    rel = releaser(live, reg, public, family, None, CanarySettings(fraction=0.5, max_observations=200,
                                                                    max_seconds=600))
    u, thread = users(live, public, seed=6)
    try:
        t0 = time.monotonic()
        outcome = rel(bad)
        canary_s = time.monotonic() - t0
    finally:
        u.stop.set()
        thread.join(60)
    decision = [e for e in reg.evaluations(bad.name) if e["stage"] == "canary" and e["decision"] != "continue"]
    assert outcome == "rolled_back" and decision and decision[-1]["decision"] == "rollback"
    import json

    evidence = json.loads(decision[-1]["evidence"])
    n_cand, n_prod = evidence["candidate"]["n"], evidence["production"]["n"]
    print(f"\nlive canary: rolled back after {n_cand:.0f} judged canary requests (good rate "
          f"{evidence['candidate']['rate']:.2f}) vs {n_prod:.0f} judged production requests (good rate "
          f"{evidence['production']['rate']:.2f}), P(worse) {evidence['p_candidate_worse']:.3f}, in {canary_s:.0f} s; "
          f"{u.stats.requests} requests, {u.stats.failed} failed")
    assert 10 <= n_cand <= 200
    assert reg.get(bad.name).status == "rolled_back"
    # the candidate really served live traffic during the canary ...
    assert landed(live.wh, public, bad.name) >= n_cand
    # ... and routing is back on production (the base) in the proxy
    wait_until(lambda: route_of(live.proxy, public).canary_fraction == 0.0, 15, "the proxy to drop the canary", 0.05)
    route = route_of(live.proxy, public)
    assert route.adapter is None and route.canary_adapter is None
    from openai import OpenAI

    client = OpenAI(base_url=live.proxy.base_url, api_key=USER_KEY, max_retries=0, timeout=120)
    served = {client.chat.completions.with_raw_response.create(
        model=public, messages=[{"role": "user", "content": f"Say hi #{i}."}], max_tokens=2
    ).headers.get("x-onpolicy-adapter-version") or "" for i in range(6)}
    assert served == {""}, served
    assert u.stats.failed == 0
    rel.publisher.close()
