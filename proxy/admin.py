"""The admin API under /admin: adapter versions with lineage, the routing table, and the actions that
change them. Its own bearer token (``admin_token`` / ``admin_token_file``), never a user's API key.

Routes (all JSON; every action needs ``reason``; ``actor`` defaults to ``admin``)::

    GET  /admin/versions[?family=F]   versions with lineage, evaluations and control history + routing table
    GET  /admin/routing               this replica's routing table, its control offset, and pins
    POST /admin/promote   {version, public_model?, base?, reason, force?}   route the public name to version
    POST /admin/pin       {version, public_model?, reason}                  route to version and pin it there
    POST /admin/unpin     {public_model?, reason}
    POST /admin/rollback  {public_model?, to?, reason}                      to the previous version, or 'to'
    POST /admin/canary    {version, fraction, public_model?, reason, force?}  split fraction to version
    POST /admin/pause     {reason, family?}     POST /admin/resume {reason, family?}

Every action is **one** ``ControlEvent`` on the control topic (emitted through the spool: the answer
never waits on Kafka), with ``actor`` = ``admin:<actor>`` and ``reason``; the sink lands it in the
``control`` table, which is the audit log. Routing actions are a single ``routing_changed`` event that
changes one public model's route, with ``payload.admin = {op, from, to, pinned}`` saying what the
operator did -- so a rollback is one event, and every replica switches when its control follower reads
it (requests already resolved keep the version they started on: ``proxy.routing``). The answer waits
up to ``APPLY_WAIT_S`` for this replica's table to show the change and says whether it did.

Pins: ``pin`` routes to a version and records ``pinned: true``; while a public model is pinned (its
latest admin routing event says so, read from the warehouse) promote/canary refuse without ``force``,
and the learner must not re-route it (it reads the same events). Safety checks before a routing
change: the version must be served by the upstream (GET /v1/models), and must not have failed its gate
or shadow in the registry (``adapter_versions``) unless ``force``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.api_keys import bearer
from proxy.errors import ProxyError
from proxy.routing import Route
from proxy.settings import ProxySettings
from proxy.state import STATE, ProxyState
from streams.events import ControlEvent
from streams.secret_files import ensure_secret_file

log = logging.getLogger(__name__)

APPLY_WAIT_S = 3.0
NOT_ROUTABLE = ("candidate", "gate_failed", "shadow_failed")
MAX_REASON_CHARS = 2000


def admin_token(settings: ProxySettings, *, create: bool = False) -> str | None:
    """The configured token, or the token file's; None when neither exists. ``create`` (the admin CLI,
    the local stack) makes the file once, mode 0600; the proxy only reads it, so a proxy (or a test)
    never writes a secret into the home directory as a side effect of a request."""
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value()
        if len(token) < 16:
            raise ValueError("admin_token must be at least 16 characters; use e.g. `openssl rand -hex 32`")
        return token
    path = settings.admin_token_file
    if not path.exists() and not create:
        return None
    return ensure_secret_file(path, lambda: secrets.token_urlsafe(32))


class AdminService:
    """Auth, reads from the warehouse, and the control events of the admin API."""

    def __init__(self, state: ProxyState, emit, keys):
        self.state = state
        self.emit = emit
        # Resolved on the first admin request: a proxy nobody administers never writes a token file.
        self._token_hash: bytes | None = None
        self.keys = keys
        self.warehouse: Any | None = None  # opened on first use (tests set it); see _warehouse()
        self._wh_lock = asyncio.Lock()

    # -- auth --------------------------------------------------------------------------------
    def authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization")
        if not header:
            raise ProxyError(401, "the admin API needs 'Authorization: Bearer <admin token>' (admin_token, or the file "
                                  "at admin_token_file)", code="missing_admin_token")
        token = bearer(header) or ""
        if self._token_hash is None:
            configured = admin_token(self.state.settings)  # re-read while missing: the CLI may create it later
            if configured is None:
                raise ProxyError(503, "the admin API has no token yet: run `onpolicy admin versions` once on this host "
                                      "(it creates admin_token_file), or set ONPOLICY_PROXY_ADMIN_TOKEN",
                                 code="admin_not_configured")
            self._token_hash = hashlib.sha256(configured.encode()).digest()
        if hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._token_hash):
            return
        if token and self.keys.lookup(token) is not None:
            raise ProxyError(403, "this is a feedback API key; it cannot use the admin API. Use the admin token",
                             code="user_key_not_admin")
        raise ProxyError(401, "invalid admin token", code="invalid_admin_token")

    # -- warehouse ---------------------------------------------------------------------------
    async def _warehouse(self):
        if self.warehouse is None:
            async with self._wh_lock:
                if self.warehouse is None:
                    from streams.settings import WarehouseSettings
                    from streams.warehouse_server import open_warehouse

                    ws = WarehouseSettings()
                    if ws.url.startswith("chdb://"):
                        # chdb locks its path to one process (the sink's): opening it here would take it away.
                        raise ProxyError(503, "the admin API reads the warehouse through its owner: set "
                                              "ONPOLICY_WAREHOUSE_URL to onpolicy+http://... (the local stack's sink) or a "
                                              "ClickHouse server URL", code="warehouse_unavailable")
                    self.warehouse = await asyncio.to_thread(open_warehouse, ws)
        return self.warehouse

    async def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            wh = await self._warehouse()
            return await asyncio.to_thread(wh.query_dicts, sql, params)
        except ProxyError:
            raise
        except Exception as exc:  # warehouse down or misconfigured: say so, never a 500
            log.warning("admin: warehouse query failed: %s: %s", type(exc).__name__, exc)
            raise ProxyError(503, f"the warehouse is not reachable ({type(exc).__name__}); check ONPOLICY_WAREHOUSE_URL "
                                  "(the local stack serves it as onpolicy+http://)", code="warehouse_unavailable") from None

    async def versions(self, family: str | None) -> list[dict[str, Any]]:
        where, params = ("WHERE family = {f:String}", {"f": family}) if family else ("", None)
        rows = await self.query(
            "SELECT name, family, version, parent, base_model, status, data_window, env_versions, reward_versions, "
            f"hyperparams, metrics, reason, created_at, updated_at FROM {{db}}.adapter_versions FINAL {where} "
            "ORDER BY family, version", params)
        evals = await self.query(
            "SELECT name, stage, against, passed, decision, evidence, reason, evaluated_at "
            "FROM {db}.adapter_evaluations FINAL ORDER BY evaluated_at")
        control = await self.query(
            "SELECT ts, action, actor, reason, public_model, adapter_version FROM {db}.control FINAL "
            "WHERE adapter_version != '' ORDER BY ts")
        by_eval: dict[str, list] = {}
        for e in evals:
            e["evidence"] = orjson.loads(e["evidence"] or "{}")
            by_eval.setdefault(e.pop("name"), []).append(e)
        by_ctl: dict[str, list] = {}
        for c in control:
            by_ctl.setdefault(c["adapter_version"], []).append(c)
        out = []
        for r in rows:
            for k in ("data_window", "hyperparams", "metrics"):
                r[k] = orjson.loads(r[k] or "{}")
            r["evaluations"] = by_eval.get(r["name"], [])
            r["gate"] = [e for e in r["evaluations"] if e["stage"] == "gate"]
            r["canary"] = [e for e in r["evaluations"] if e["stage"] == "canary"]
            r["control"] = by_ctl.get(r["name"], [])
            promos = [c for c in r["control"] if c["action"] in ("adapter_promoted", "routing_changed")]
            r["promoted_by"] = promos[-1]["actor"] if promos else None
            out.append(r)
        return out

    async def history(self, public_model: str) -> list[dict[str, Any]]:
        """routing_changed events of one public model, oldest first (the control table is the audit log)."""
        return await self.query(
            "SELECT ts, event_id, actor, reason, adapter_version, payload FROM {db}.control FINAL "
            "WHERE action = 'routing_changed' AND public_model = {m:String} ORDER BY ts, event_id", {"m": public_model})

    async def pinned(self, public_model: str) -> str | None:
        """The version the public model is pinned to, or None (the latest admin routing event decides)."""
        for ev in reversed(await self.history(public_model)):
            admin = orjson.loads(ev["payload"] or "{}").get("admin")
            if admin:
                return admin.get("to") if admin.get("pinned") else None
        return None

    async def status_of(self, version: str) -> str | None:
        rows = await self.query("SELECT status FROM {db}.adapter_versions FINAL WHERE name = {n:String}", {"n": version})
        return rows[0]["status"] if rows else None

    async def served_upstream(self, version: str) -> bool:
        st = self.state
        try:
            resp = await st.upstream.request("GET", "/models", None, st.upstream.headers(CIMultiDict()), stream=False)
            data = orjson.loads(await resp.read())
            return any(m.get("id") == version for m in data.get("data", []) if isinstance(m, dict))
        except ProxyError:
            raise
        except Exception as exc:
            raise ProxyError(502, f"could not list the upstream's models to check {version!r} is loaded "
                                  f"({type(exc).__name__})", code="upstream_error") from None


ADMIN: web.AppKey[AdminService] = web.AppKey("onpolicy_admin", AdminService)


# -- request helpers ------------------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if type(body) is not dict:
        raise ProxyError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _str(body: dict[str, Any], name: str, *, required: bool = True, limit: int = 256) -> str | None:
    v = body.get(name)
    if v is None or v == "":
        if required:
            raise ProxyError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return None
    if type(v) is not str:
        raise ProxyError(400, f"'{name}' must be a string, got {type(v).__name__}", param=name, code="invalid_type")
    if len(v) > limit:
        raise ProxyError(400, f"'{name}' is longer than {limit} characters", param=name, code="too_long")
    return v


def _actor(body: dict[str, Any]) -> str:
    return "admin:" + (_str(body, "actor", required=False, limit=128) or "admin")


def _public_model(body: dict[str, Any], state: ProxyState) -> str:
    name = _str(body, "public_model", required=False)
    if name:
        return name
    routes = state.router.table.routes
    if len(routes) == 1:
        return next(iter(routes))
    raise ProxyError(400, "'public_model' is required: the routing table has "
                          f"{'no routes' if not routes else 'several: ' + ', '.join(sorted(routes))[:500]}",
                     param="public_model", code="missing_required_parameter")


def _force(body: dict[str, Any]) -> bool:
    force = body.get("force", False)
    if type(force) is not bool:
        raise ProxyError(400, "'force' must be true or false", param="force", code="invalid_type")
    return force


async def _emit_and_wait(request: web.Request, event: ControlEvent, expect: Route | None) -> web.Response:
    svc = request.app[ADMIN]
    state = request.app[STATE]
    if not svc.emit(event):
        raise ProxyError(503, "the control event could not be queued (the proxy's spool is full); nothing changed",
                         code="spool_full")
    applied = None
    if expect is not None and event.public_model:
        t0 = time.monotonic()
        applied = False
        while time.monotonic() - t0 < APPLY_WAIT_S:
            if state.router.table.routes.get(event.public_model) == expect:
                applied = True
                break
            await asyncio.sleep(0.01)
    log.info("admin %s by %s on %s: %s", event.action, event.actor, event.public_model or "-", event.reason)
    return web.json_response({"object": "control_event", "id": event.event_id, "action": event.action,
                              "actor": event.actor, "reason": event.reason, "public_model": event.public_model,
                              "adapter_version": event.adapter_version, "payload": event.payload,
                              "applied_on_this_replica": applied}, status=202)


async def _check_version(svc: AdminService, version: str, force: bool, op: str) -> None:
    if not await svc.served_upstream(version):
        raise ProxyError(409, f"{version!r} is not served by the upstream (not in its /v1/models); publish it first "
                              "(the learner's publisher loads adapters into vLLM)", param="version", code="not_loaded")
    if force:
        return
    try:
        status = await svc.status_of(version)
    except ProxyError:
        status = None  # no warehouse: the upstream check above is the safety net
    if status in NOT_ROUTABLE:
        raise ProxyError(409, f"{version!r} has status {status!r} in the registry and must not be routed ({op}); pass "
                              "\"force\": true to override", param="version", code="not_routable")


async def _route_change(request: web.Request, op: str) -> web.Response:
    svc = request.app[ADMIN]
    svc.authenticate(request)
    state = request.app[STATE]
    body = await _body(request)
    reason = _str(body, "reason", limit=MAX_REASON_CHARS)
    actor = _actor(body)
    force = _force(body)
    public = _public_model(body, state)
    current = state.router.table.routes.get(public)
    base = _str(body, "base", required=False) or (current.base if current else None)
    if base is None:
        raise ProxyError(400, f"there is no route for {public!r} yet; pass 'base': the upstream base model name",
                         param="base", code="missing_required_parameter")
    cur_adapter = current.adapter if current else None
    pinned = False
    if op in ("promote", "pin", "canary"):
        version = _str(body, "version")
    elif op == "unpin":
        version = cur_adapter
    else:  # rollback
        version = _str(body, "to", required=False)
        if version is None:
            try:
                events = await svc.history(public)
            except ProxyError as err:
                raise ProxyError(503, f"{err.message}; or name the version to roll back to with 'to'", param="to",
                                 code=err.code) from None
            history = [orjson.loads(ev["payload"] or "{}") for ev in events]
            # never back to a version that was itself rolled back from
            undone = {p["admin"].get("from") for p in history if (p.get("admin") or {}).get("op") == "rollback"}
            for p in reversed(history):
                route = p.get("route")
                adapter = route.get("adapter") if isinstance(route, dict) else None
                if adapter and adapter != cur_adapter and adapter not in undone:
                    version = adapter
                    break
            if version is None:
                raise ProxyError(409, f"no earlier version of {public!r} in the control history; name one with 'to'",
                                 param="to", code="no_previous_version")
    if op in ("promote", "canary") and not force:
        pin = await _pin_or_none(svc)(public)
        if pin is not None:
            raise ProxyError(409, f"{public!r} is pinned to {pin!r}; unpin it first (POST /admin/unpin) or pass "
                                  "\"force\": true", param="public_model", code="pinned")
    if version is not None and op != "unpin":
        await _check_version(svc, version, force, op)
    if op == "canary":
        fraction = body.get("fraction")
        if type(fraction) not in (int, float) or not 0.0 < float(fraction) <= 1.0:
            raise ProxyError(400, "'fraction' must be a number in (0, 1]", param="fraction", code="invalid_value")
        route = Route(base=base, adapter=cur_adapter, canary_adapter=version, canary_fraction=float(fraction))
    else:
        route = Route(base=base, adapter=version)
        pinned = op == "pin"
    payload = {"routing_version": 1, "route": route.to_payload(),
               "admin": {"op": op, "from": cur_adapter, "to": version, "pinned": pinned}}
    event = ControlEvent(action="routing_changed", actor=actor, reason=f"{op}: {reason}", public_model=public,
                         adapter_version=version, payload=payload)
    return await _emit_and_wait(request, event, route)


def _pin_or_none(svc: AdminService):
    async def pinned(public: str) -> str | None:
        try:
            return await svc.pinned(public)
        except ProxyError:
            return None  # no warehouse: pins cannot be read; the upstream check still applies
    return pinned


# -- handlers -------------------------------------------------------------------------------------
async def get_versions(request: web.Request) -> web.Response:
    svc = request.app[ADMIN]
    svc.authenticate(request)
    family = request.query.get("family") or None
    table = request.app[STATE].router.table
    payload: dict[str, Any] = {"routing": table.to_payload()["routes"], "routing_offset": table.offset}
    try:
        payload["versions"] = await svc.versions(family)
    except ProxyError as err:
        payload["versions"] = None
        payload["warehouse_error"] = err.message
    return web.json_response(payload, dumps=lambda o: orjson.dumps(o, default=str).decode())


async def get_routing(request: web.Request) -> web.Response:
    svc = request.app[ADMIN]
    svc.authenticate(request)
    table = request.app[STATE].router.table
    pins = {}
    for name in table.routes:
        pin = await _pin_or_none(svc)(name)
        if pin is not None:
            pins[name] = pin
    return web.json_response({"routing": table.to_payload()["routes"], "routing_offset": table.offset, "pins": pins})


async def post_learning(request: web.Request) -> web.Response:
    svc = request.app[ADMIN]
    svc.authenticate(request)
    body = await _body(request)
    reason = _str(body, "reason", limit=MAX_REASON_CHARS)
    family = _str(body, "family", required=False)
    action = "learning_paused" if request.path.endswith("/pause") else "learning_resumed"
    event = ControlEvent(action=action, actor=_actor(body), reason=reason,
                         payload={"family": family} if family else {})
    return await _emit_and_wait(request, event, None)


def _route_handler(op: str):
    async def handler(request: web.Request) -> web.Response:
        return await _route_change(request, op)
    handler.__name__ = f"post_{op}"
    return handler


def register(app: web.Application) -> None:
    from proxy.apis import API_METRICS, API_PRODUCER
    from proxy.feedback import FEEDBACK

    state = app[STATE]
    if state.settings.admin_token is not None:
        admin_token(state.settings)  # a too-short configured token fails at start, not on a request
    app[ADMIN] = AdminService(state, app[API_PRODUCER].emit, app[FEEDBACK].keys)
    counted = app[API_METRICS].counted
    app.router.add_get("/admin/versions", counted("/admin/versions", get_versions))
    app.router.add_get("/admin/routing", counted("/admin/routing", get_routing))
    for op in ("promote", "pin", "unpin", "rollback", "canary"):
        app.router.add_post(f"/admin/{op}", counted(f"/admin/{op}", _route_handler(op)))
    app.router.add_post("/admin/pause", counted("/admin/pause", post_learning))
    app.router.add_post("/admin/resume", counted("/admin/resume", post_learning))
