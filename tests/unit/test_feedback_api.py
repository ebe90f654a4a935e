"""POST /v1/feedback in-process (no broker: a producer that collects events): validation, auth, tenant
scoping, idempotency, batches. The real-services path is tests/integration/test_feedback_vllm.py."""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.api_keys import ApiKeys, bearer, hash_key
from proxy.app import create_app
from proxy.errors import ProxyError
from proxy.feedback import FEEDBACK, feedback_event_id
from proxy.interaction_ids import InteractionIds
from proxy.routing import Router
from proxy.settings import ProxySettings

SIGNING = "unit-feedback-signing-key-0123456789"
IDS = InteractionIds(SIGNING.encode())
KEY_A, KEY_B, KEY_ANON = "op-key-of-tenant-a-000000000000000", "op-key-of-tenant-b-111111111111111", "op-anon-2222222222222"
ADMIN = "admin-token-for-unit-tests-0123456789"


class Collecting:
    def __init__(self, accept: bool = True):
        self.events, self.accept = [], accept

    def emit(self, event) -> bool:
        if self.accept:
            self.events.append(event)
        return self.accept


def settings(**kw) -> ProxySettings:
    return ProxySettings(
        upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False, interaction_id_key=SIGNING,
        admin_token=ADMIN, feedback_max_batch=5, feedback_max_text_chars=100, feedback_score_min=1, feedback_score_max=5,
        api_keys=[{"name": "a", "tenant": "acme", "sha256": hash_key(KEY_A, None)},
                  {"name": "b", "tenant": "beta", "key": KEY_B},
                  {"name": "anon", "tenant": "", "key": KEY_ANON}], **kw)


@pytest.fixture
async def api():
    producer = Collecting()
    app = create_app(settings(), producer=producer, router=Router())
    async with TestClient(TestServer(app)) as client:
        client.producer = producer  # type: ignore[attr-defined]
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(api, body, key=KEY_A, **headers):
    resp = await api.post("/v1/feedback", json=body, headers={**auth(key), **headers})
    return resp.status, await resp.json()


async def test_thumbs_on_a_signed_id_is_accepted_as_one_event(api):
    iid = IDS.issue("chatcmpl-", tenant="acme")
    status, body = await post(api, {"interaction_id": iid, "kind": "thumbs", "value": "up", "user": "u1"})
    assert status == 202, body
    assert body["object"] == "feedback" and body["duplicate"] is False
    [ev] = api.producer.events
    assert (ev.event_id, ev.interaction_id, ev.kind, ev.value, ev.tenant, ev.user_id, ev.source, ev.weight) == (
        body["id"], iid, "thumbs", 1.0, "acme", "u1", "explicit", 1.0)
    assert ev.metadata == {"api_key": "a"}  # the key's label, never the key


async def test_every_kind_and_its_value_rules(api):
    iid = IDS.issue("cmpl-", tenant="acme")
    ok = [
        ({"kind": "thumbs", "value": -1}, -1.0),
        ({"kind": "thumbs", "value": False}, -1.0),
        ({"kind": "score", "value": 4.5}, 4.5),
        ({"kind": "outcome", "value": True}, 1.0),
        ({"kind": "outcome", "value": 0}, 0.0),
        ({"kind": "comment", "comment": "too long-winded"}, None),
    ]
    for item, value in ok:
        status, body = await post(api, {"interaction_id": iid, **item})
        assert status == 202, (item, body)
        assert api.producer.events[-1].value == value
    status, _ = await post(api, {"interaction_id": iid, "kind": "correction", "correction": "Paris."})
    assert status == 202
    assert api.producer.events[-1].correction == [{"role": "assistant", "content": "Paris."}]
    bad = [
        ({"kind": "thumbs", "value": 0}, "value"),
        ({"kind": "thumbs"}, "value"),
        ({"kind": "score", "value": 9}, "value"),
        ({"kind": "score", "value": "5"}, "value"),
        ({"kind": "outcome", "value": 2}, "value"),
        ({"kind": "comment"}, "comment"),
        ({"kind": "comment", "comment": "x" * 101}, "comment"),
        ({"kind": "correction"}, "correction"),
        ({"kind": "correction", "correction": [{"role": "assistant", "content": 5}]}, "correction[0].content"),
        ({"kind": "thumbs", "value": 1, "correction": "x"}, "correction"),
        ({"kind": "like", "value": 1}, "kind"),
        ({"value": 1}, "kind"),
        ({"kind": "thumbs", "value": 1, "valeu": 1}, "valeu"),
        ({"kind": "thumbs", "value": 1, "weight": 2}, "weight"),
        ({"kind": "thumbs", "value": 1, "source": "robot"}, "source"),
        ({"kind": "thumbs", "value": 1, "metadata": [1]}, "metadata"),
    ]
    n = len(api.producer.events)
    for item, param in bad:
        status, body = await post(api, {"interaction_id": iid, **item})
        assert status == 400, (item, body)
        assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["message"]
    assert len(api.producer.events) == n  # nothing invalid was emitted


async def test_forged_and_other_tenants_ids_are_refused_with_clear_errors(api):
    mine = IDS.issue("chatcmpl-", tenant="acme")
    forged = mine[:-1] + ("0" if mine[-1] != "0" else "1")
    status, body = await post(api, {"interaction_id": forged, "kind": "thumbs", "value": 1})
    assert status == 400 and body["error"]["code"] == "invalid_interaction_id"
    assert "not an interaction id this proxy issued" in body["error"]["message"]
    other_key = InteractionIds(b"another-proxy-key-0123456789").issue("chatcmpl-", tenant="acme")
    assert (await post(api, {"interaction_id": other_key, "kind": "thumbs", "value": 1}))[0] == 400
    betas = IDS.issue("chatcmpl-", tenant="beta")
    status, body = await post(api, {"interaction_id": betas, "kind": "thumbs", "value": 1})  # key of acme
    assert status == 403 and body["error"]["code"] == "wrong_tenant", body
    assert (await post(api, {"interaction_id": betas, "kind": "thumbs", "value": 1}, key=KEY_B))[0] == 202
    anon = IDS.issue("chatcmpl-")  # a request sent without a tenant
    assert (await post(api, {"interaction_id": anon, "kind": "thumbs", "value": 1}, key=KEY_A))[0] == 403
    assert (await post(api, {"interaction_id": anon, "kind": "thumbs", "value": 1}, key=KEY_ANON))[0] == 202
    # an episode needs no signature; it is recorded under the key's tenant
    status, _ = await post(api, {"episode_id": "conv-1", "kind": "outcome", "value": True}, key=KEY_B)
    assert status == 202 and api.producer.events[-1].tenant == "beta"
    assert (await post(api, {"kind": "outcome", "value": True}))[1]["error"]["param"] == "interaction_id"


async def test_missing_bad_and_admin_keys_are_401_and_never_echoed(api):
    body = {"interaction_id": IDS.issue("chatcmpl-", tenant="acme"), "kind": "thumbs", "value": 1}
    resp = await api.post("/v1/feedback", json=body)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
    for header in ("Bearer op-not-a-key-999", "Basic " + KEY_A, "Bearer", f"Bearer {ADMIN}"):
        resp = await api.post("/v1/feedback", json=body, headers={"Authorization": header})
        text = await resp.text()
        assert resp.status == 401, header
        assert "op-not-a-key-999" not in text and KEY_A not in text and ADMIN not in text
    assert api.producer.events == []


async def test_idempotency_key_makes_one_event_and_a_stable_id(api):
    iid = IDS.issue("chatcmpl-", tenant="acme")
    item = {"interaction_id": iid, "kind": "thumbs", "value": 1, "idempotency_key": "click-42"}
    s1, b1 = await post(api, item)
    s2, b2 = await post(api, item)
    assert (s1, s2) == (202, 202) and b1["id"] == b2["id"] and (b1["duplicate"], b2["duplicate"]) == (False, True)
    assert len(api.producer.events) == 1
    # the id is derived from (tenant, key): another replica (or a restarted proxy) derives the same one
    assert b1["id"] == feedback_event_id("acme", "click-42") == str(uuid.UUID(b1["id"]))
    assert feedback_event_id("beta", "click-42") != b1["id"]
    # the header form, and the same key reused for a different judgement: 409
    s3, b3 = await post(api, {"interaction_id": iid, "kind": "thumbs", "value": 1}, **{"Idempotency-Key": "click-42"})
    assert s3 == 202 and b3["id"] == b1["id"] and b3["duplicate"]
    s4, b4 = await post(api, {**item, "value": -1})
    assert s4 == 409 and b4["error"]["code"] == "idempotency_key_reused"
    # changing one's mind = a new item (no key, or a new key): a second event, latest wins downstream
    s5, b5 = await post(api, {**item, "value": -1, "idempotency_key": "click-43"})
    assert s5 == 202 and b5["id"] != b1["id"] and len(api.producer.events) == 2


async def test_batch_is_all_or_nothing_and_bounded(api):
    iid = IDS.issue("chatcmpl-", tenant="acme")
    items = [{"interaction_id": iid, "kind": "thumbs", "value": 1},
             {"interaction_id": iid, "kind": "score", "value": 3, "idempotency_key": "s-1"}]
    status, body = await post(api, items)
    assert status == 202 and body["object"] == "list" and [d["duplicate"] for d in body["data"]] == [False, False]
    assert [e.kind for e in api.producer.events] == ["thumbs", "score"]
    status, body = await post(api, items + [{"interaction_id": iid, "kind": "score", "value": 99}])
    assert status == 400 and body["error"]["param"] == "[2].value"
    assert len(api.producer.events) == 2
    assert (await post(api, [items[0]] * 6))[0] == 413
    assert (await post(api, []))[0] == 400


async def test_body_errors_are_openai_style(api):
    for raw in (b"", b"{not json", b'"a string"', b"[1, 2]", b"null"):
        resp = await api.post("/v1/feedback", data=raw, headers={**auth(KEY_A), "content-type": "application/json"})
        body = await resp.json()
        assert resp.status == 400, raw
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_a_full_spool_is_503_not_a_lost_202():
    producer = Collecting(accept=False)
    app = create_app(settings(), producer=producer, router=Router())
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/feedback", headers=auth(KEY_A), json={
            "interaction_id": IDS.issue("chatcmpl-", tenant="acme"), "kind": "thumbs", "value": 1})
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "spool_full"
        assert app[FEEDBACK].keys.lookup(KEY_A).tenant == "acme"


def test_keys_are_stored_hashed_and_config_errors_say_how_to_fix():
    keys = ApiKeys([{"name": "x", "tenant": "t", "key": "op-secret"}], pepper=b"pep")
    assert keys.lookup("op-secret").tenant == "t" and keys.lookup("op-Secret") is None
    assert "op-secret" not in repr(keys._by_hash) and hash_key("op-secret", b"pep") != hash_key("op-secret", None)
    with pytest.raises(ValueError, match="tenant"):
        ApiKeys([{"key": "k"}])
    with pytest.raises(ValueError, match="64 hex"):
        ApiKeys([{"tenant": "t", "sha256": "abc"}])
    assert bearer("bearer  tok ") == "tok" and bearer("Basic tok") is None and bearer(None) is None


def test_a_local_stack_key_file_is_made_once_and_only_its_hash_configured(tmp_path):
    from proxy.api_keys import ensure_key_file

    path = tmp_path / "secrets" / "demo_api_key"
    entry = ensure_key_file(path)
    key = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600 and key.startswith("op-")
    assert ensure_key_file(path) == entry and key not in str(entry)
    assert ApiKeys([entry]).lookup(key).tenant == ""


async def test_metrics_count_feedback_and_refusals_without_secrets(api):
    iid = IDS.issue("chatcmpl-", tenant="acme")
    await post(api, {"interaction_id": iid, "kind": "thumbs", "value": 1})
    await post(api, {"interaction_id": iid, "kind": "thumbs", "value": 1}, key="op-bad-key-123")
    text = await (await api.get("/metrics")).text()
    assert 'onpolicy_feedback_events_total{kind="thumbs",source="explicit"} 1.0' in text
    assert 'onpolicy_api_requests_total{code="invalid_api_key",route="/v1/feedback",status="401"} 1.0' in text
    assert "op-bad-key-123" not in text and KEY_A not in text


def test_the_idempotency_cache_costs_well_under_a_kib_per_key_and_stays_bounded(monkeypatch):
    """Each idempotency key the proxy remembers must cost a few hundred bytes, however it is stored.
    Kept as orjson's bytes, each cost 4 KiB (orjson returns small outputs in a 4 KiB allocation): a full
    cache held ~36 MiB, and the chaos soak saw the proxy's RSS climb +2.9 MiB/min for 10 minutes."""
    import gc
    import tracemalloc

    from proxy import feedback
    from proxy.feedback import FeedbackService, load_api_keys

    s = settings()
    keys = load_api_keys(s)
    key = keys.lookup(KEY_A)
    svc = FeedbackService(s, IDS, keys, lambda event: True)
    iids = [IDS.issue("chatcmpl-", tenant="acme") for _ in range(20)]
    n = 2000

    def send(i: int) -> list:
        item = {"interaction_id": iids[i % 20], "kind": "thumbs", "value": 1, "idempotency_key": uuid.uuid4().hex}
        return svc.accept([item], key, batch=False, user=None, header_key=None)

    send(0)  # first-use allocations (the validators, the digest's module) are not the cache's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            send(i)
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(svc._recent) == n + 1
    assert per_key < 1024, f"{per_key:.0f} bytes per remembered idempotency key"

    # and the number of keys is bounded: the oldest are forgotten, the latest still answer as duplicates
    monkeypatch.setattr(feedback, "IDEMPOTENCY_CACHE", 100)
    item = {"interaction_id": iids[0], "kind": "thumbs", "value": 1, "idempotency_key": "the-latest"}
    for i in range(300):
        send(i)
    [first] = svc.accept([item], key, batch=False, user=None, header_key=None)
    [again] = svc.accept([item], key, batch=False, user=None, header_key=None)
    assert len(svc._recent) == 100
    assert (first.duplicate, again.duplicate, again.id) == (False, True, first.id)
    with pytest.raises(ProxyError) as err:
        svc.accept([{**item, "value": -1}], key, batch=False, user=None, header_key=None)
    assert err.value.status == 409
