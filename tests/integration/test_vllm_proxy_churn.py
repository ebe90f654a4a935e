"""20 publishes and 10 rollbacks under steady load THROUGH THE PROXY: 0 failed requests.

The whole control path is real: the publisher loads each version into the session's vLLM server and
emits ``adapter_published`` on Kafka through the spool-backed ``EventProducer``; then, as the learner
does, a ``routing_changed`` event re-points the public model name; the proxy (``follow_control``)
follows it from the control topic. Clients use the unmodified OpenAI SDK against the proxy.
A rollback is a route naming the previous (still loaded) version. Versions are retired only once
no route has pointed at them for a grace period, because a request resolved just before a
switch may still be on its way to vLLM.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

GRACE_S = 2.0


@pytest.fixture(scope="module")
def proxy(vllm_server, kafka, tmp_path_factory):
    from proxy.settings import ProxySettings
    from proxy.testing import RunningProxy
    from streams.settings import ProducerSettings

    settings = ProxySettings(
        upstream_url=vllm_server.base_url, kafka=kafka, interaction_id_key="churn-test-key-0123456789abcdef",
        capture=True, follow_control=True, shutdown_grace_s=5,
        producer=ProducerSettings(spool_dir=tmp_path_factory.mktemp("churn-proxy-spool") / "spool"),
    )
    running = RunningProxy(settings).start()
    yield running
    running.stop()


def test_publish_and_rollback_churn_through_the_proxy_fails_no_request(proxy, vllm_server, kafka, smollm2_model,
                                                                       make_adapter, tmp_path):
    from openai import OpenAI

    from learner.publisher import Publisher
    from streams.events import ControlEvent
    from streams.producer import EventProducer
    from streams.settings import ProducerSettings

    public = f"churn-{uuid.uuid4().hex[:6]}"
    family = f"churn{uuid.uuid4().hex[:6]}"
    events = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    left_at: dict[str, float] = {}
    current: dict[str, str | None] = {"adapter": None}

    def routed() -> set[str]:
        now = time.monotonic()
        recent = {n for n, t in left_at.items() if now - t < GRACE_S}
        return recent | ({current["adapter"]} if current["adapter"] else set())

    pub = Publisher([vllm_server.base_url], tmp_path / "store", events, max_lora_rank=8, max_loaded=3, routed=routed)
    adapters = [make_adapter(smollm2_model.path, seed=s, scale=0.5) for s in (1, 2)]
    routing_version = [0]

    def route_to(name: str) -> None:
        """What the learner's registry does after a publish or for a rollback; waits for the proxy."""
        if current["adapter"]:
            left_at[current["adapter"]] = time.monotonic()
        routing_version[0] += 1
        assert events.emit(ControlEvent(action="routing_changed", actor="test", public_model=public,
                                        payload={"routing_version": 1, "route": {"base": vllm_server.model, "adapter": name}}))
        deadline = time.monotonic() + 15
        while True:
            route = proxy.state.router.table.routes.get(public)
            if route is not None and route.adapter == name:
                break
            assert time.monotonic() < deadline, "the proxy did not follow the routing event"
            time.sleep(0.02)
        current["adapter"] = name
        left_at.pop(name, None)

    stop = threading.Event()
    ok, failed = [0], []
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        client = OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0, timeout=120)
        while not stop.is_set():
            model = public if i else vllm_server.model  # one client keeps base traffic going too
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
                with lock:
                    ok[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failed.append(f"{model}: {type(exc).__name__}: {exc}"[:300])

    latencies = []
    version = 0
    pub_version = lambda v: f"{family}-v{v:04d}"  # noqa: E731
    # Route first so clients never ask for an unrouted public name.
    version += 1
    latencies.append(pub.publish(pub_version(version), adapters[version % 2], public_model=public).latency_s)
    route_to(pub_version(version))
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        rollbacks = 0
        while version < 20:
            version += 1
            latencies.append(pub.publish(pub_version(version), adapters[version % 2], public_model=public).latency_s)
            route_to(pub_version(version))
            if version % 2 == 0:
                route_to(pub_version(version - 1))  # rollback to the previous version: no reload
                rollbacks += 1
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        events.emit(ControlEvent(action="routing_changed", actor="test", public_model=public, payload={"route": None}))
        current["adapter"] = None
        left_at.clear()
        for name in pub.loaded():
            pub.retire(name, reason="test cleanup")
        pub.close()
        events.close()
    assert version == 20 and rollbacks == 10
    assert failed == [], f"{len(failed)} of {ok[0] + len(failed)} requests failed, e.g. {failed[:3]}"
    assert ok[0] >= 20
    print(f"\nchurn through the proxy: 20 publishes, 10 rollbacks, {ok[0]} requests ok, 0 failed; publish latency "
          f"median {statistics.median(latencies):.3f}s max {max(latencies):.3f}s")
