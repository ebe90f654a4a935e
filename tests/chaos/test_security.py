"""Nobody is let in who should not be: every privileged route refuses missing, wrong, near-miss and
user credentials; feedback refuses forged ids and other tenants' ids, and a replayed idempotency key
is answered as the product promises (proxy/feedback.py) -- against a running proxy (real socket,
``ProxyRunner``), while the OpenAI SDK keeps being served.

Routes are enumerated from the app's router: a route that is not on the short public list below is
treated as privileged, so a new admin route is covered (and must refuse anonymous callers) without
editing this file. The upstream is bench/standin_upstream.py, a STAND-IN for vLLM.
"""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest

from proxy.api_keys import hash_key
from proxy.feedback import feedback_event_id
from proxy.interaction_ids import InteractionIds
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from tests.chaos.proxy_process import SdkLoad, Standin
from tests.chaos.report import record

ADMIN_TOKEN = "security-admin-token-0123456789abcdefXYZ"
SIGNING = "security-signing-key-0123456789"
KEYS = {"acme": "op-security-acme-key-00000000000000000000", "beta": "op-security-beta-key-11111111111111111111",
        "": "op-security-default-key-222222222222222222"}
MODEL = "standin-model"
MIN_S = 1.0  # each check runs at least this long, so the SDK load overlaps it
# Routes anyone may call (the OpenAI API is the upstream's business; feedback checks its own API keys).
PUBLIC = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/healthz",
          "/readyz", "/metrics", "/openapi.json", "/v1/feedback", "/v1/{tail}"}


class Collector:
    """The proxy's producer: keeps what the feedback and admin APIs emit (counted by the replay checks)."""

    def __init__(self) -> None:
        self.events: list = []
        self.lock = threading.Lock()
        self.connected = True

    def emit(self, event) -> bool:
        with self.lock:
            self.events.append(event)
        return True

    def count(self) -> int:
        with self.lock:
            return len(self.events)


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    standin = Standin()
    collector = Collector()
    settings = ProxySettings(
        upstream_url=standin.base_url, capture=False, follow_control=False, interaction_id_key=SIGNING,
        admin_token=ADMIN_TOKEN, shutdown_grace_s=2,
        api_keys=tuple({"name": f"{t or 'default'}-app", "tenant": t, "sha256": hash_key(k, None)} for t, k in KEYS.items()),
        admin_token_file=tmp_path_factory.mktemp("sec") / "admin_token")
    proxy = RunningProxy(settings, producer=collector).start()
    load = SdkLoad(proxy.base_url, pause_s=0.02).start()
    http = httpx.Client(base_url=proxy.root_url, timeout=30)
    deadline = time.monotonic() + 20
    while load.ok == 0 and not load.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load.ok > 0, f"the SDK is not served before any check: {load.failed[:3]}"
    yield proxy, collector, load, http
    http.close()
    load.stop()
    proxy.stop()
    standin.stop()


def _row(load: SdkLoad, before: tuple[int, int], name: str, statuses: dict[int, int], notes: str) -> None:
    ok, failed = load.snapshot()
    record("hostile", **{"check": name, "attempts": sum(statuses.values()),
                         "responses": ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())),
                         "5xx": sum(n for s, n in statuses.items() if s >= 500), "tracebacks": 0,
                         "others served meanwhile": f"{ok - before[0]} SDK requests, {failed - before[1]} failed",
                         "notes": notes})
    assert failed == before[1], load.failed[-3:]


def _error(resp: httpx.Response, *secrets: str) -> dict:
    """The OpenAI-style error of ``resp``, checked: JSON, no traceback, no presented secret echoed."""
    assert "Traceback" not in resp.text
    for s in secrets:
        if s:
            assert s not in resp.text, f"a presented credential was echoed: {resp.text[:300]}"
    if resp.request.method == "HEAD":
        return {}
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


def _privileged_routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.router.routes():
        path = route.resource.canonical
        if path in PUBLIC:
            continue
        out.append((route.method if route.method != "*" else "POST", path.replace("{", "").replace("}", "")))
    return sorted(set(out))


def test_every_privileged_route_refuses_anyone_but_the_admin(sec):
    proxy, collector, load, http = sec
    before = load.snapshot()
    routes = _privileged_routes(proxy.app)
    paths = {p for _, p in routes}
    # the admin API as documented today; more routes are fine (and get the same checks)
    assert {"/admin/versions", "/admin/routing", "/admin/promote", "/admin/pin", "/admin/unpin", "/admin/rollback",
            "/admin/canary", "/admin/pause", "/admin/resume"} <= paths, paths
    near = ADMIN_TOKEN[:-1] + ("A" if ADMIN_TOKEN[-1] != "A" else "B")
    credentials = [  # (label, headers, expected status, expected code)
        ("no token", {}, 401, "missing_admin_token"),
        ("wrong token", {"Authorization": "Bearer not-the-admin-token-0123456789"}, 401, "invalid_admin_token"),
        ("near miss: last character changed", {"Authorization": f"Bearer {near}"}, 401, "invalid_admin_token"),
        ("near miss: a prefix of the token", {"Authorization": f"Bearer {ADMIN_TOKEN[:20]}"}, 401, "invalid_admin_token"),
        ("near miss: token plus a character", {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401, "invalid_admin_token"),
        ("near miss: Basic scheme", {"Authorization": f"Basic {ADMIN_TOKEN}"}, 401, "invalid_admin_token"),
        ("near miss: no scheme", {"Authorization": ADMIN_TOKEN}, 401, "invalid_admin_token"),
        ("empty bearer", {"Authorization": "Bearer"}, 401, "invalid_admin_token"),
        ("token in another header", {"x-api-key": ADMIN_TOKEN, "x-admin-token": ADMIN_TOKEN}, 401, "missing_admin_token"),
        ("a user's API key", {"Authorization": f"Bearer {KEYS['acme']}"}, 403, "user_key_not_admin"),
        ("another tenant's API key", {"Authorization": f"Bearer {KEYS['']}"}, 403, "user_key_not_admin"),
    ]
    statuses: dict[int, int] = {}
    emitted = collector.count()
    t0, rounds = time.monotonic(), 0
    while rounds == 0 or time.monotonic() - t0 < MIN_S:  # long enough for the SDK load to overlap it
        rounds += 1
        for (method, path), (label, headers, want, code) in itertools.product(routes, credentials):
            resp = http.request(method, path, headers=headers, json={"reason": "attack", "version": "x", "fraction": 0.5},
                                params={"token": ADMIN_TOKEN} if label == "token in another header" else None)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code == want, f"{method} {path} with {label}: {resp.status_code} {resp.text[:200]}"
            err = _error(resp, ADMIN_TOKEN, near, KEYS["acme"], KEYS[""])
            if err:
                assert err["code"] == code, (method, path, label, err)
    for method, path in routes:
        # the admin token itself opens the route (an empty body stops a POST before it acts)
        resp = http.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, content=b"{}")
        assert resp.status_code not in (401, 403), f"{method} {path}: the admin token was refused: {resp.text[:200]}"
    assert collector.count() == emitted, "a refused admin call emitted a control event"
    _row(load, before, f"admin auth: {len(routes)} privileged routes (from the router) x {len(credentials)} credentials",
         statuses, "none, wrong, near-miss (changed/prefix/suffix/scheme), other header or query, user keys: "
                   "401 (403 for a user key); 0 control events emitted; the token opens each route")


def test_privileged_paths_cannot_be_reached_around_the_router(sec):
    """Path tricks, and vLLM's adapter API behind the /v1 catch-all: never forwarded, never unauthenticated."""
    proxy, collector, load, http = sec
    before = load.snapshot()
    statuses: dict[int, int] = {}
    emitted = collector.count()
    attempts = [("POST", "/admin/promote/"), ("POST", "/ADMIN/promote"), ("POST", "//admin/promote"),
                ("POST", "/admin/./promote"), ("POST", "/v1/../admin/promote"), ("POST", "/admin%2Fpromote"),
                ("GET", "/admin"), ("GET", "/admin/"),
                ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
                ("POST", "/v1//load_lora_adapter"), ("POST", "/v1/load_lora_adapter/")]
    t0, rounds = time.monotonic(), 0
    while rounds == 0 or time.monotonic() - t0 < MIN_S:
        rounds += 1
        for (method, path), headers in itertools.product(attempts, ({}, {"Authorization": f"Bearer {KEYS['acme']}"})):
            # raw_path: httpx would normalise the dot segments away
            url = httpx.URL(proxy.root_url).copy_with(raw_path=path.encode())
            resp = http.request(method, url, headers=headers, json={"reason": "x", "version": "x", "lora_name": "x",
                                                                     "lora_path": "/tmp/x"})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code in (400, 401, 403, 404, 405), f"{method} {path}: {resp.status_code} {resp.text[:200]}"
            _error(resp, KEYS["acme"])
    assert collector.count() == emitted
    _row(load, before, f"privileged paths reached around the router ({len(attempts)} path tricks incl. vLLM's LoRA API)",
         statuses, "trailing slash, case, //, dot segments, %2F on /admin and vLLM's LoRA API: 4xx, never "
                   "forwarded, never acted on; before the fix /v1//load_lora_adapter and a trailing slash were forwarded upstream")


def _chat(http: httpx.Client, tenant: str | None) -> str:
    headers = {"x-onpolicy-tenant": tenant} if tenant else {}
    resp = http.post("/v1/chat/completions", headers=headers,
                     json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _fb(http: httpx.Client, key: str | None, body, headers: dict | None = None) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return http.post("/v1/feedback", json=body, headers=h)


def test_feedback_refuses_forged_and_other_tenants_ids(sec):
    proxy, collector, load, http = sec
    before = load.snapshot()
    acme_id, beta_id, default_id = _chat(http, "acme"), _chat(http, "beta"), _chat(http, None)
    other_proxy = InteractionIds(b"another-deployment-signing-key-xyz")
    body, _, tag = acme_id.rpartition(".")
    flipped = body[:-1] + ("0" if body[-1] != "0" else "1")
    forged = {
        "random op1 id": "chatcmpl-op1.0190f6b2c2a87c3e9b1d4f5a6b7c8d9e.0123456789abcdef0123456789abcdef01234567",
        "tampered uuid": f"{flipped}.{tag}",
        "tampered tag": f"{body}.{tag[:-1]}{'0' if tag[-1] != '0' else '1'}",
        "another id's tag": f"{body}.{beta_id.rpartition('.')[2]}",
        "issued by another deployment": other_proxy.issue("chatcmpl-", "acme"),
        "the upstream's plain id": "chatcmpl-standin00000000000000000000",
        "id with the tenant appended": f"{acme_id}|acme",
        "empty string": "",
    }
    statuses: dict[int, int] = {}
    emitted = collector.count()
    cross = [("acme key on beta's id", KEYS["acme"], beta_id), ("beta key on acme's id", KEYS["beta"], acme_id),
             ("acme key on a no-tenant id", KEYS["acme"], default_id), ("no-tenant key on acme's id", KEYS[""], acme_id)]
    t0, rounds = time.monotonic(), 0
    while rounds == 0 or time.monotonic() - t0 < MIN_S:
        rounds += 1
        for label, iid in forged.items():
            resp = _fb(http, KEYS["acme"], {"interaction_id": iid, "kind": "thumbs", "value": 1})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code == 400, (label, resp.text)
            assert _error(resp, KEYS["acme"])["code"] in ("invalid_interaction_id", "invalid_value"), (label, resp.text)
        for label, key, iid in cross:
            resp = _fb(http, key, {"interaction_id": iid, "kind": "thumbs", "value": 1})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code == 403 and _error(resp, key)["code"] == "wrong_tenant", (label, resp.text)
    # a batch with one other-tenant item: all or nothing
    resp = _fb(http, KEYS["acme"], [{"interaction_id": acme_id, "kind": "thumbs", "value": 1},
                                    {"interaction_id": beta_id, "kind": "thumbs", "value": 1}])
    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
    assert resp.status_code == 403 and _error(resp)["param"] == "[1].interaction_id"
    assert collector.count() == emitted, "a refused feedback item was emitted"
    # the rightful owners are accepted
    for key, iid in ((KEYS["acme"], acme_id), (KEYS["beta"], beta_id), (KEYS[""], default_id)):
        resp = _fb(http, key, {"interaction_id": iid, "kind": "thumbs", "value": 1})
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code == 202, resp.text
    assert collector.count() == emitted + 3
    _row(load, before, f"feedback: forged ids ({len(forged)} kinds) and other tenants' ids ({len(cross)} pairs, a mixed batch)",
         statuses, "forged/tampered/foreign-key ids: 400 invalid_interaction_id; another tenant's id: 403 wrong_tenant; "
                   "a batch with one: 403, nothing emitted; owners: 202")


def test_feedback_auth_and_replayed_idempotency_keys(sec):
    proxy, collector, load, http = sec
    before = load.snapshot()
    iid = _chat(http, "acme")
    statuses: dict[int, int] = {}

    def count(resp: httpx.Response) -> httpx.Response:
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        return resp

    item = {"interaction_id": iid, "kind": "thumbs", "value": 1}
    acme = KEYS["acme"]
    for label, key in (("no key", None), ("wrong key", "op-not-a-key-000000000000000000000000"),
                       ("near miss", acme[:-1] + "X"), ("prefix", acme[:12]), ("admin token", ADMIN_TOKEN)):
        resp = count(_fb(http, key, item))
        assert resp.status_code == 401, (label, resp.text)
        _error(resp, acme, ADMIN_TOKEN, key or "")
    # replays: same key, same item -> one event, the same id, "duplicate": true
    emitted = collector.count()
    keyed = {**item, "idempotency_key": f"ticket-{time.time_ns()}"}
    first = count(_fb(http, acme, keyed))
    assert first.status_code == 202 and first.json()["duplicate"] is False
    replays = []
    t0 = time.monotonic()
    while len(replays) < 20 or time.monotonic() - t0 < MIN_S:
        replays.append(count(_fb(http, acme, keyed)))
    assert {r.status_code for r in replays} == {202}
    assert {r.json()["id"] for r in replays} == {first.json()["id"]} and all(r.json()["duplicate"] for r in replays)
    assert first.json()["id"] == feedback_event_id("acme", keyed["idempotency_key"]), "the id is derived (replicas agree)"
    # the Idempotency-Key header is the same key
    hdr = count(_fb(http, acme, item, {"Idempotency-Key": keyed["idempotency_key"]}))
    assert hdr.status_code == 202 and hdr.json()["id"] == first.json()["id"] and hdr.json()["duplicate"]
    assert collector.count() == emitted + 1, "a replay was emitted again"
    # the same key for a different judgement: 409, not silently dropped
    changed = count(_fb(http, acme, {**keyed, "value": -1}))
    assert changed.status_code == 409 and _error(changed)["code"] == "idempotency_key_reused"
    # another tenant's identical key is its own (no collision across tenants)
    beta_iid = _chat(http, "beta")
    other = count(_fb(http, KEYS["beta"], {"interaction_id": beta_iid, "kind": "thumbs", "value": 1,
                                           "idempotency_key": keyed["idempotency_key"]}))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"] and not other.json()["duplicate"]
    # no key: every send is a new judgement (documented: latest wins in feedback_current)
    a, b = count(_fb(http, acme, item)), count(_fb(http, acme, item))
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
    assert collector.count() == emitted + 4
    _row(load, before, f"feedback: missing/wrong/near-miss keys and the admin token; {len(replays) + 1} replays of one "
         "idempotency key",
         statuses, "bad keys 401; a replay: 202 with the same derived id, duplicate=true, emitted once; same key with "
                   "another value: 409; another tenant's same key: its own id; no key: a new judgement each time")
