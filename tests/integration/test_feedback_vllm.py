"""Feedback on REAL interactions: the unmodified OpenAI SDK through the proxy in front of the session's
vLLM, feedback by plain HTTP and by the helper (``proxy.client``), the real broker and a real sink:
every judgement lands in ClickHouse joined to its interaction (and episode); forged ids, another
tenant's ids, missing and bad keys are refused; an idempotency key sent to two replicas lands once;
a change of mind leaves one current judgement with the history kept.
"""

from __future__ import annotations

import json
import os
import threading
import types
import urllib.error
import urllib.request
import uuid

import pytest
from openai import OpenAI

from proxy.api_keys import hash_key
from proxy.client import FeedbackError, feedback, feedback_batch
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from streams.settings import ProducerSettings
from tests.integration.helpers import wait_until

SIGNING = "feedback-integration-signing-key-0123"
KEY_ACME, KEY_BETA = "op-acme-integration-key-000000000", "op-beta-integration-key-111111111"
KEYS = [{"name": "acme-app", "tenant": "acme", "sha256": hash_key(KEY_ACME, None)},
        {"name": "beta-app", "tenant": "beta", "sha256": hash_key(KEY_BETA, None)}]

if os.environ.get("ONPOLICY_TEST_VLLM_URL"):  # developing: reuse a running vLLM (see test_proxy_vllm.py)
    @pytest.fixture(scope="module")
    def vllm_server():
        url, model = os.environ["ONPOLICY_TEST_VLLM_URL"].split()
        return types.SimpleNamespace(base_url=url, model=model)


def _settings(vllm_server, kafka, spool, **kw) -> ProxySettings:
    return ProxySettings(upstream_url=vllm_server.base_url, kafka=kafka, interaction_id_key=SIGNING, follow_control=False,
                         shutdown_grace_s=5, api_keys=KEYS, admin_token="feedback-integration-admin-0123456",
                         producer=ProducerSettings(spool_dir=spool), **kw)


@pytest.fixture(scope="module")
def proxies(vllm_server, kafka, tmp_path_factory):
    """Two replicas: A captures (process mode, as deployed), B serves feedback only. Same keys."""
    a = RunningProxy(_settings(vllm_server, kafka, tmp_path_factory.mktemp("fb-a") / "spool", capture=True)).start()
    b = RunningProxy(_settings(vllm_server, kafka, tmp_path_factory.mktemp("fb-b") / "spool", capture=False)).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def landing(kafka, chdb_path):
    from streams.settings import SinkSettings, WarehouseSettings
    from streams.sink import Sink
    from streams.warehouse import Warehouse

    wh = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database=f"feedback_vllm_{uuid.uuid4().hex[:8]}"))
    wh.migrate()
    stop = threading.Event()
    sink = Sink(kafka, wh, SinkSettings(group_id=f"feedback-vllm-{uuid.uuid4().hex[:8]}", batch_max_wait_s=0.2), stop=stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    yield wh
    stop.set()
    thread.join(30)


def http_feedback(base_url: str, body, key: str | None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base_url + "/feedback", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_feedback_on_sdk_interactions_lands_joined_in_clickhouse(proxies, landing, vllm_server):
    a, b = proxies
    episode = f"conv-{uuid.uuid4().hex[:8]}"
    client = OpenAI(base_url=a.base_url, api_key=KEY_ACME, max_retries=0, timeout=120,
                    default_headers={"x-onpolicy-tenant": "acme", "x-onpolicy-episode-id": episode})
    turn1 = client.chat.completions.create(model=vllm_server.model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Name a colour."}]).id
    chunks = list(client.chat.completions.create(model=vllm_server.model, max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Name a fruit."}]))
    turn2 = chunks[0].id
    # plain HTTP, the helper (single and batch), and an episode-level outcome
    status, body = http_feedback(a.base_url, {"interaction_id": turn1, "kind": "thumbs", "value": 1, "user": "u1"}, KEY_ACME)
    assert status == 202, body
    up_id = body["id"]
    fid = feedback(turn2, "correction", correction="Apple.", user="u1", base_url=a.base_url, api_key=KEY_ACME)
    ids = feedback_batch([{"interaction_id": turn2, "kind": "score", "value": 0.25, "user": "u1"},
                          {"interaction_id": turn1, "kind": "comment", "comment": "fine", "user": "u1"}],
                         base_url=b.base_url, api_key=KEY_ACME)  # the other replica verifies the same ids
    ep_id = feedback(None, "outcome", True, episode_id=episode, user="u1", base_url=a.base_url, api_key=KEY_ACME)
    # idempotency across replicas: the same key to A and to B is one row
    item = {"interaction_id": turn1, "kind": "outcome", "value": False, "idempotency_key": "ticket-7-closed", "user": "u1"}
    s1, r1 = http_feedback(a.base_url, item, KEY_ACME)
    s2, r2 = http_feedback(b.base_url, item, KEY_ACME)
    assert (s1, s2) == (202, 202) and r1["id"] == r2["id"] and not r2["duplicate"]  # B had not seen it: derived id
    # a change of mind: thumbs down later on the same interaction
    status, body = http_feedback(a.base_url, {"interaction_id": turn1, "kind": "thumbs", "value": -1, "user": "u1"}, KEY_ACME)
    assert status == 202
    down_id = body["id"]

    want = {up_id, fid, *ids, ep_id, r1["id"], down_id}

    def landed() -> bool:
        rows = landing.query("SELECT event_id FROM {db}.feedback FINAL WHERE tenant = 'acme'")
        return {r[0] for r in rows} >= want

    wait_until(landed, 60, "feedback rows in ClickHouse")

    def joined() -> list[dict]:
        return landing.query_dicts(
            "SELECT f.event_id AS id, f.kind AS kind, f.value AS value, i.episode_id AS episode, i.public_model AS model, "
            "i.stream AS stream FROM {db}.feedback AS f FINAL INNER JOIN {db}.interactions AS i FINAL "
            "ON f.interaction_id = i.interaction_id WHERE f.tenant = 'acme'")

    # Interactions (the capture worker's producer) and feedback (the API's producer) travel separately:
    # the feedback may land first. Wait for the interactions too; the assertion below still checks all.
    try:
        wait_until(lambda: {r["id"] for r in joined()} >= want - {ep_id}, 60, "the interactions to land")
    except AssertionError:
        pass
    rows = joined()
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == want - {ep_id}, "every interaction-level judgement joins its interaction"
    assert all(r["episode"] == episode and r["model"] == vllm_server.model for r in rows)
    assert by_id[fid]["kind"] == "correction" and by_id[fid]["stream"] is True
    assert by_id[ids[0]]["value"] == 0.25
    # the episode-level outcome joins the episode's interactions
    joined = landing.query("SELECT count() FROM {db}.feedback AS f FINAL INNER JOIN {db}.interactions AS i FINAL "
                           "ON f.episode_id = i.episode_id WHERE f.event_id = {e:String}", {"e": ep_id})
    assert joined[0][0] == 2
    # one row for the key sent to both replicas; latest wins with the history kept
    assert landing.query("SELECT count() FROM {db}.feedback FINAL WHERE event_id = {e:String}", {"e": r1["id"]})[0][0] == 1
    cur = landing.query_dicts("SELECT value, revisions FROM {db}.feedback_current WHERE interaction_id = {i:String} "
                              "AND kind = 'thumbs' AND user_id = 'u1'", {"i": turn1})
    assert cur == [{"value": -1.0, "revisions": 2}]


def test_forged_ids_other_tenants_and_bad_keys_are_refused(proxies, vllm_server):
    a, _ = proxies
    client = OpenAI(base_url=a.base_url, api_key=KEY_BETA, max_retries=0, timeout=120,
                    default_headers={"x-onpolicy-tenant": "beta"})
    iid = client.completions.create(model=vllm_server.model, prompt="Hello", max_tokens=2).id
    forged = iid[:-4] + ("0000" if not iid.endswith("0000") else "1111")
    cases = [
        ({"interaction_id": forged, "kind": "thumbs", "value": 1}, KEY_BETA, 400, "invalid_interaction_id"),
        ({"interaction_id": "chatcmpl-made-up", "kind": "thumbs", "value": 1}, KEY_BETA, 400, "invalid_interaction_id"),
        ({"interaction_id": iid, "kind": "thumbs", "value": 1}, KEY_ACME, 403, "wrong_tenant"),
        ({"interaction_id": iid, "kind": "thumbs", "value": 1}, None, 401, "missing_api_key"),
        ({"interaction_id": iid, "kind": "thumbs", "value": 1}, "op-not-a-real-key", 401, "invalid_api_key"),
        ({"interaction_id": iid, "kind": "score", "value": 7}, KEY_BETA, 400, "out_of_range"),
    ]
    for body, key, status, code in cases:
        got, err = http_feedback(a.base_url, body, key)
        assert (got, err["error"]["code"]) == (status, code), (body, key, err)
        assert err["error"]["message"] and (key is None or key not in json.dumps(err))
    with pytest.raises(FeedbackError) as exc:
        feedback(iid, "thumbs", 1, base_url=a.base_url, api_key=KEY_ACME)
    assert exc.value.status == 403 and exc.value.code == "wrong_tenant"
    assert feedback(iid, "thumbs", 1, base_url=a.base_url, api_key=KEY_BETA)


def test_admin_actions_land_in_the_clickhouse_audit_log(proxies, landing):
    """Through the real broker and sink: an admin action is a control event in the control table, with its
    actor and reason, and GET /admin/versions reads the same warehouse."""
    from proxy.admin import ADMIN

    a, _ = proxies
    a.app[ADMIN].warehouse = landing
    token = "feedback-integration-admin-0123456"
    reason = f"incident {uuid.uuid4().hex[:6]}"
    req = urllib.request.Request(f"{a.root_url}/admin/pause", method="POST",
                                 data=json.dumps({"reason": reason, "actor": "oncall"}).encode(),
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 202
        event_id = json.loads(resp.read())["id"]

    def audited() -> bool:
        return bool(landing.query("SELECT 1 FROM {db}.control FINAL WHERE event_id = {e:String}", {"e": event_id}))

    wait_until(audited, 60, "the admin action in the control table")
    [row] = landing.query_dicts("SELECT action, actor, reason FROM {db}.control FINAL WHERE event_id = {e:String}",
                                {"e": event_id})
    assert row == {"action": "learning_paused", "actor": "admin:oncall", "reason": reason}
    req = urllib.request.Request(f"{a.root_url}/admin/versions", headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["versions"] == [] and "routing" in body
