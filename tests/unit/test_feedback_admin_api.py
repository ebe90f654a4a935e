"""The admin API in-process: auth on every route, and each action as one control event.

The control path is closed by hand: a producer that feeds every emitted event to the proxy's Router
(as the control follower would) and lands it in a real embedded warehouse (as the sink would). The
upstream's model list is stubbed (``served``). The whole path with Kafka, two replicas and vLLM is
tests/integration/test_admin_rollback.py.
"""

from __future__ import annotations

import itertools

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import ADMIN
from proxy.api_keys import hash_key
from proxy.app import create_app
from proxy.routing import Router
from proxy.settings import ProxySettings

ADMIN_TOKEN = "admin-token-for-unit-tests-0123456789"
USER_KEY = "op-user-key-000000000000000000000"
ROUTES = [("GET", "/admin/versions"), ("GET", "/admin/routing")] + [
    ("POST", f"/admin/{op}") for op in ("promote", "pin", "unpin", "rollback", "canary", "pause", "resume")]


class Loopback:
    """emit(): the event reaches the Router and the warehouse at once (follower + sink stand-ins)."""

    def __init__(self, router: Router, warehouse):
        self.router, self.wh, self.events, self.offsets = router, warehouse, [], itertools.count()

    def emit(self, event) -> bool:
        offset = next(self.offsets)
        self.events.append(event)
        if event.event_type == "control":
            self.router.on_control(event.action, event.public_model, event.payload, offset)
        self.wh.insert_events([(event, ("onpolicy.control", 0, offset))])
        return True


@pytest.fixture
async def admin(warehouse):
    router = Router()
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key="unit-admin-signing-key-0123456789", admin_token=ADMIN_TOKEN,
                      api_keys=[{"name": "u", "tenant": "acme", "sha256": hash_key(USER_KEY, None)}])
    producer = Loopback(router, warehouse)
    app = create_app(s, producer=producer, router=router)
    svc = app[ADMIN]
    svc.warehouse = warehouse
    served = {"smol", "fam-v0001", "fam-v0002", "fam-v0003", "bad-v0001"}

    async def served_upstream(version: str) -> bool:
        return version in served

    svc.served_upstream = served_upstream
    async with TestClient(TestServer(app)) as client:
        client.producer, client.router = producer, router  # type: ignore[attr-defined]
        yield client


async def call(client, method, path, body=None, token=ADMIN_TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await client.request(method, path, json=body, headers=headers)
    return resp.status, await resp.json()


@pytest.mark.parametrize("method,path", ROUTES)
async def test_every_admin_route_refuses_no_token_wrong_token_and_user_keys(admin, method, path):
    body = {"version": "fam-v0001", "public_model": "m", "base": "smol", "reason": "r", "fraction": 0.5}
    status, err = await call(admin, method, path, body, token=None)
    assert status == 401 and err["error"]["code"] == "missing_admin_token"
    status, err = await call(admin, method, path, body, token="not-the-admin-token-0000000")
    assert status == 401 and err["error"]["code"] == "invalid_admin_token"
    assert "not-the-admin-token" not in str(err)
    status, err = await call(admin, method, path, body, token=USER_KEY)
    assert status == 403 and err["error"]["code"] == "user_key_not_admin" and USER_KEY not in str(err)
    assert admin.producer.events == []


async def test_promote_canary_rollback_pin_each_one_event_with_actor_and_reason(admin):
    events = admin.producer.events
    status, body = await call(admin, "POST", "/admin/promote", {"version": "fam-v0001", "public_model": "m", "base": "smol",
                                                                 "reason": "first", "actor": "alice"})
    assert status == 202 and body["applied_on_this_replica"] is True, body
    assert admin.router.resolve("m").upstream_model == "fam-v0001"
    assert (events[-1].action, events[-1].actor, events[-1].reason) == ("routing_changed", "admin:alice", "promote: first")
    assert (await call(admin, "POST", "/admin/promote", {"version": "fam-v0002", "reason": "better"}))[0] == 202
    # canary: production keeps serving, a fraction goes to the candidate
    status, body = await call(admin, "POST", "/admin/canary", {"version": "fam-v0003", "fraction": 0.25, "reason": "try"})
    assert status == 202 and body["payload"]["route"]["canary"] == {"adapter": "fam-v0003", "fraction": 0.25}
    route = admin.router.table.routes["m"]
    assert (route.adapter, route.canary_adapter, route.canary_fraction) == ("fam-v0002", "fam-v0003", 0.25)
    # rollback with no target: the previous version (the canary's is dropped), in ONE event
    n = len(events)
    status, body = await call(admin, "POST", "/admin/rollback", {"reason": "complaints"})
    assert status == 202 and len(events) == n + 1 and events[-1].action == "routing_changed"
    assert body["payload"]["admin"] == {"op": "rollback", "from": "fam-v0002", "to": "fam-v0001", "pinned": False}
    route = admin.router.table.routes["m"]
    assert (route.adapter, route.canary_adapter) == ("fam-v0001", None)
    # a second rollback does not bounce back to the version just rolled back from
    status, body = await call(admin, "POST", "/admin/rollback", {"reason": "again"})
    assert status == 409 and body["error"]["code"] == "no_previous_version"
    assert (await call(admin, "POST", "/admin/rollback", {"to": "fam-v0003", "reason": "named"}))[0] == 202
    # pin: promote and canary refuse until unpinned (or forced)
    assert (await call(admin, "POST", "/admin/pin", {"version": "fam-v0002", "reason": "freeze for the launch"}))[0] == 202
    status, body = await call(admin, "POST", "/admin/promote", {"version": "fam-v0003", "reason": "x"})
    assert status == 409 and body["error"]["code"] == "pinned" and "fam-v0002" in body["error"]["message"]
    assert (await call(admin, "GET", "/admin/routing"))[1]["pins"] == {"m": "fam-v0002"}
    assert (await call(admin, "POST", "/admin/unpin", {"reason": "launch over"}))[0] == 202
    assert (await call(admin, "POST", "/admin/promote", {"version": "fam-v0003", "reason": "x"}))[0] == 202
    assert admin.router.table.routes["m"].adapter == "fam-v0003"
    # the audit log: every action landed in the control table with its actor and reason
    rows = admin.producer.wh.query("SELECT actor, reason FROM {db}.control FINAL ORDER BY ts")
    assert len(rows) == len(events) and all(a.startswith("admin:") and r for a, r in rows)


async def test_pause_resume_and_refusals(admin, warehouse):
    status, body = await call(admin, "POST", "/admin/pause", {"reason": "incident", "family": "fam"})
    assert status == 202 and body["action"] == "learning_paused" and body["payload"] == {"family": "fam"}
    assert (await call(admin, "POST", "/admin/resume", {"reason": "fixed"}))[1]["action"] == "learning_resumed"
    assert (await call(admin, "POST", "/admin/pause", {}))[1]["error"]["param"] == "reason"
    # not loaded upstream, no route/base, bad fraction, failed gate
    status, body = await call(admin, "POST", "/admin/promote", {"version": "ghost-v0001", "public_model": "m", "base": "smol",
                                                                 "reason": "x"})
    assert status == 409 and body["error"]["code"] == "not_loaded"
    status, body = await call(admin, "POST", "/admin/promote", {"version": "fam-v0001", "public_model": "new", "reason": "x"})
    assert status == 400 and body["error"]["param"] == "base"
    warehouse.insert("adapter_versions", [["bad-v0001", "bad", 1, "", "smol", "/x", "0" * 64, "gate_failed", "{}", [], [],
                                           "{}", "{}", "worse on the gate", _now(), _now()]],
                     ("name", "family", "version", "parent", "base_model", "path", "sha256", "status", "data_window",
                      "env_versions", "reward_versions", "hyperparams", "metrics", "reason", "created_at", "updated_at"))
    status, body = await call(admin, "POST", "/admin/promote", {"version": "bad-v0001", "public_model": "m", "base": "smol",
                                                                 "reason": "x"})
    assert status == 409 and body["error"]["code"] == "not_routable"
    assert (await call(admin, "POST", "/admin/promote", {"version": "bad-v0001", "public_model": "m", "base": "smol",
                                                          "reason": "x", "force": True}))[0] == 202
    status, body = await call(admin, "POST", "/admin/canary", {"version": "fam-v0001", "fraction": 2, "reason": "x"})
    assert status == 400 and body["error"]["param"] == "fraction"
    # versions: lineage and the control history of each
    status, body = await call(admin, "GET", "/admin/versions")
    assert status == 200 and body["routing"]["m"]["adapter"] == "bad-v0001"
    [v] = body["versions"]
    assert v["name"] == "bad-v0001" and v["status"] == "gate_failed" and v["promoted_by"] == "admin:admin"
    assert orjson.dumps(body)  # plain JSON


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


async def test_without_a_configured_token_the_admin_api_is_closed_and_nothing_is_written(tmp_path):
    token_file = tmp_path / "secrets" / "admin_token"
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key="unit-admin-signing-key-0123456789", admin_token_file=token_file)
    app = create_app(s, producer=Loopback.__new__(Loopback), router=Router())
    async with TestClient(TestServer(app)) as client:
        status, body = await call(client, "GET", "/admin/routing", token="anything-at-all-000000000")
        assert status == 503 and body["error"]["code"] == "admin_not_configured" and not token_file.exists()
        from proxy.admin import admin_token

        made = admin_token(s, create=True)  # what `onpolicy admin` does on first use
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert (await call(client, "GET", "/admin/routing", token=made))[0] == 200
