"""Two real vLLM replicas: a publish is loaded and probed on both before routing changes, and
10 publishes with 5 rollbacks under steady load over both replicas fail no request (the full
20 + 10 churn runs through the proxy in test_vllm_proxy_churn.py; this one keeps CI time down).

There is no proxy in this test: a tiny router (``_Router``) follows the control events the way
the proxy does (route the public name to the adapter named by the latest ``adapter_published`` or
rollback) and round-robins requests over the two replicas. Requests go to vLLM directly.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from learner.publisher import Publisher
from learner.serving import http_json
from tests.vllm_fixtures import CollectingProducer

pytestmark = pytest.mark.slow

ADAPTER_SCALE = 0.5


@pytest.fixture(scope="module")
def second_server(smollm2_model, vllm_settings):
    from learner.serving import VllmServer

    server = VllmServer(smollm2_model.path, smollm2_model.served_name, vllm_settings, name="vllm-replica2")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(vllm_server, second_server):
    return [vllm_server.base_url, second_server.base_url]


def _served_by_all(replicas: list[str], name: str) -> bool:
    for base in replicas:
        status, models = http_json("GET", f"{base}/models")
        if status != 200 or name not in {m["id"] for m in models["data"]}:
            return False
        status, body = http_json("POST", f"{base}/completions", {"model": name, "prompt": "Hi", "max_tokens": 1})
        if status != 200:
            return False
    return True


def test_publish_loads_and_probes_every_replica_before_the_event(replicas, smollm2_model, make_adapter, tmp_path):
    class CheckingProducer(CollectingProducer):
        def emit(self, event):
            self.ready_at_emit = _served_by_all(replicas, event.adapter_version)
            return super().emit(event)

    producer = CheckingProducer()
    pub = Publisher(replicas, tmp_path / "store", producer, max_lora_rank=8)
    try:
        result = pub.publish("replicas-v0001", make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE))
        assert producer.ready_at_emit
        assert result.replicas == tuple(replicas)
        assert producer.events[0].payload["replicas"] == replicas
        # Same weights on both replicas: same greedy output.
        outs = [http_json("POST", f"{b}/completions", {"model": "replicas-v0001", "prompt": "The sea is",
                                                       "max_tokens": 8, "temperature": 0})[1]["choices"][0]["text"]
                for b in replicas]
        assert outs[0] == outs[1]
        pub.retire("replicas-v0001")
        assert not any(_served_by_all([b], "replicas-v0001") for b in replicas)
    finally:
        pub.close()


class _Router:
    """Follows control events like the proxy: the public name goes to the current adapter."""

    GRACE_S = 2.0  # an adapter stays "routed" this long after routing moved off it (requests in flight)

    def __init__(self, replicas):
        self.replicas = itertools.cycle(replicas)
        self.lock = threading.Lock()
        self.current: str | None = None
        self.left: dict[str, float] = {}

    def route(self, name: str | None) -> None:
        with self.lock:
            if self.current:
                self.left[self.current] = time.monotonic()
            self.current = name
            self.left.pop(name, None)

    def routed(self) -> set[str]:
        with self.lock:
            now = time.monotonic()
            recent = {n for n, t in self.left.items() if now - t < self.GRACE_S}
            return recent | ({self.current} if self.current else set())

    def pick(self) -> tuple[str, str | None]:
        with self.lock:
            return next(self.replicas), self.current


def test_publishes_and_rollbacks_on_two_replicas_under_load_fail_no_request(replicas, vllm_server, smollm2_model, make_adapter, tmp_path):
    router = _Router(replicas)
    producer = CollectingProducer()
    pub = Publisher(replicas, tmp_path / "store", producer, max_lora_rank=8, max_loaded=3, routed=router.routed)
    adapters = [make_adapter(smollm2_model.path, seed=s, scale=ADAPTER_SCALE) for s in (1, 2)]
    stop = threading.Event()
    results = {"ok": 0, "failed": []}
    results_lock = threading.Lock()

    def client(i: int) -> None:
        while not stop.is_set():
            base, adapter = router.pick()
            model = adapter if (adapter and i % 3) else vllm_server.model  # mostly adapter traffic, some base
            status, body = http_json("POST", f"{base}/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}, timeout=120)
            with results_lock:
                if status == 200:
                    results["ok"] += 1
                else:
                    results["failed"].append((model, status, str(body)[:200]))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    latencies = []
    try:
        version = 0
        for step in range(5):
            # publish two versions, route to each; then roll back to the first of the two
            for _ in range(2):
                version += 1
                name = f"churn-v{version:04d}"
                latencies.append(pub.publish(name, adapters[version % 2]).latency_s)
                router.route(name)
            router.route(f"churn-v{version - 1:04d}")  # rollback: re-point the alias, no reload
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        router.route(None)
        time.sleep(router.GRACE_S)
        for name in pub.loaded():
            pub.retire(name)
        pub.close()
    published = [e for e in producer.events if e.action == "adapter_published"]
    assert len(published) == 10
    assert results["failed"] == [], f"{len(results['failed'])} failed requests, e.g. {results['failed'][:3]}"
    assert results["ok"] > 10
    print(f"\nchurn on 2 replicas: 10 publishes + 5 rollbacks, {results['ok']} requests ok, 0 failed; "
          f"publish latency median {sorted(latencies)[5]:.3f}s max {max(latencies):.3f}s")
