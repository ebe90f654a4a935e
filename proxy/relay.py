"""The relay: the OpenAI endpoints' hot path (HTTP glue only; routing, capture and SSE assembly live
in their own modules).

Per request: read the body, parse it once with orjson (to read ``model``, ``stream`` and the
episode/user/tenant fields), resolve the route, forward the original bytes (re-serialized only when
the route changes the model name), relay the answer, then -- after the last byte went out -- hand
the exchange to capture. Responses are never decoded on this path: the interaction id replaces the
upstream's ``id`` by a byte splice, streams are forwarded chunk by chunk as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.capture import Exchange
from proxy.errors import ProxyError
from proxy.http1 import Http1Response
from proxy.state import STATE, ProxyState
from proxy.upstream import response_headers

log = logging.getLogger(__name__)

IID_HEADER = "x-onpolicy-interaction-id"
VERSION_HEADER = "x-onpolicy-adapter-version"

# endpoint -> (prefix of the ids it returns, the field the body must have, its expected JSON type)
ENDPOINTS: dict[str, tuple[str, str | None, tuple[type, ...] | None]] = {
    "/chat/completions": ("chatcmpl-", "messages", (list,)),
    "/completions": ("cmpl-", "prompt", (str, list)),
    "/embeddings": ("embd-", "input", (str, list)),
    "/responses": ("resp-", "input", None),
}
# vLLM's runtime LoRA API: only the learner's publisher may call it, never a client through the proxy.
UPSTREAM_ADMIN = frozenset({"/load_lora_adapter", "/unload_lora_adapter"})
# Endpoints whose response ``id`` becomes the interaction id. (The Responses API's id is kept: a
# client chains turns with previous_response_id, which the upstream must recognise.)
REWRITE_ID = frozenset({"/chat/completions", "/completions"})

# The first key of an OpenAI response object is its id: {"id":"chatcmpl-...", ...}
_HEAD_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]*)"')
_STREAM_ID = re.compile(rb'data:\s*\{\s*"id"\s*:\s*"([^"\\]*)"')
_RESPONSES_END = re.compile(rb'"type":\s*"response\.(?:completed|failed|incomplete)"')

_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, ConnectionError)
CLIENT_CLOSED = 499  # recorded (never sent) when the client left before any response: nginx's convention


def _require_fields(req: dict[str, Any], route: str) -> None:
    model = req.get("model")
    if model is None:
        raise ProxyError(400, "'model' is required: the name of the model to use (GET /v1/models lists them)", param="model",
                         code="missing_required_parameter")
    if type(model) is not str or not model:
        raise ProxyError(400, f"'model' must be a non-empty string, got {type(model).__name__}", param="model",
                         code="invalid_type")
    _, field, types = ENDPOINTS[route]
    if field is not None:
        value = req.get(field)
        if value is None:
            raise ProxyError(400, f"'{field}' is required for {route}", param=field, code="missing_required_parameter")
        if types is not None and not isinstance(value, types):
            want = " or ".join("array" if t is list else "string" for t in types)
            raise ProxyError(400, f"'{field}' must be an {want}, got {type(value).__name__}", param=field, code="invalid_type")
    stream = req.get("stream")
    if stream is not None and type(stream) is not bool:
        raise ProxyError(400, f"'stream' must be true or false, got {stream!r}", param="stream", code="invalid_type")


def _identity(request: web.Request, req: dict[str, Any]) -> tuple[str | None, str | None, str | None, bool]:
    h = request.headers
    meta = req.get("metadata")
    meta = meta if type(meta) is dict else {}
    episode = h.get("x-onpolicy-episode-id") or meta.get("episode_id")
    user = h.get("x-onpolicy-user") or req.get("user") or meta.get("user")
    tenant = h.get("x-onpolicy-tenant") or meta.get("tenant")
    opt_out = h.get("x-onpolicy-train", "").strip().lower() in ("false", "0", "no", "off")
    as_str = lambda v: v if v is None or type(v) is str else str(v)  # noqa: E731
    return as_str(episode), as_str(user), as_str(tenant), opt_out


async def parse_body(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413 by the middleware
    if not body:
        raise ProxyError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"the request body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from None
    if type(req) is not dict:
        raise ProxyError(400, f"the request body must be a JSON object, got {type(req).__name__}", code="invalid_json")
    return body, req


async def openai_post(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses."""
    st: ProxyState = request.app[STATE]
    t0 = time.perf_counter()
    route = request.path[3:]  # strip "/v1"
    body, req = await parse_body(request)
    _require_fields(req, route)
    model: str = req["model"]
    episode, user, tenant, opt_out = _identity(request, req)
    iid = st.ids.issue(ENDPOINTS[route][0], tenant)
    stream = req.get("stream") is True

    hosted = st.hosted.get(model) if st.hosted else None
    if hosted is not None:
        from proxy.hosted import serve_hosted

        ex = Exchange(route, iid, model, req, t0, upstream="litellm", upstream_model=hosted.litellm_params["model"],
                      stream=stream, episode_id=episode, user_id=user, tenant=tenant, train_opt_out=opt_out,
                      request_body=body)
        return await serve_hosted(request, st, hosted, req, ex)

    res = st.router.resolve(model, episode or user)
    client_body = body
    if res.upstream_model != model:
        req_out = dict(req)
        req_out["model"] = res.upstream_model
        body = orjson.dumps(req_out)
    ex = Exchange(route, iid, model, req, t0, upstream=st.upstream.name, upstream_model=res.upstream_model,
                  adapter_version=res.adapter_version, stream=stream, episode_id=episode, user_id=user, tenant=tenant,
                  train_opt_out=opt_out, request_body=client_body)
    headers = {IID_HEADER: iid}
    if res.adapter_version is not None:
        headers[VERSION_HEADER] = res.adapter_version
    # vLLM names its response "chatcmpl-<X-Request-Id>" / "cmpl-<X-Request-Id>": handing it our id
    # makes the upstream's id the interaction id already, so no byte splice is needed (and vLLM's
    # logs carry the same id). Upstreams that ignore the header get their ids rewritten below.
    up_headers = st.upstream.headers(request.headers,
                                     iid[len(ENDPOINTS[route][0]):] if route in REWRITE_ID else None)
    st.metrics.in_flight.inc()
    try:
        try:
            upstream = await st.upstream.request("POST", request.path[3:], body, up_headers,
                                                 stream=stream, query=request.query_string)
        except asyncio.CancelledError:
            # The client hung up while the upstream was still thinking (aiohttp cancels the handler:
            # handler_cancellation=True); the upstream connection is dropped, so vLLM stops too.
            ex.abandoned, ex.status = True, CLIENT_CLOSED
            raise
        except ProxyError as err:
            ex.status, ex.error, ex.t_end = err.status, err.message, time.perf_counter()
            st.metrics.upstream_errors.labels(route, err.code or "error").inc()
            resp = web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)
            await _finish(request, resp)
            return resp
        st.metrics.observe_upstream(route, st.upstream.name, time.perf_counter() - t0)
        if upstream.content_type == "text/event-stream":
            return await _relay_stream(request, st, upstream, ex, headers, route in REWRITE_ID)
        return await _relay_body(request, st, upstream, ex, headers, route in REWRITE_ID)
    finally:
        st.metrics.in_flight.dec()
        ex.t_end = ex.t_end or time.perf_counter()
        st.metrics.observe(route, model, ex.adapter_version, ex.status, ex.t_end - t0)
        if ex.abandoned:
            st.metrics.abandoned.labels(route).inc()
        if st.capture is not None:
            st.capture.record(ex)


async def _finish(request: web.Request, resp: web.StreamResponse) -> None:
    """Write the whole response now, so capture (after this) runs once the client has its bytes."""
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except _CLIENT_GONE:
        pass


async def _relay_body(request, st: ProxyState, upstream: Http1Response, ex: Exchange, headers: dict[str, str],
                      rewrite_id: bool) -> web.StreamResponse:
    try:
        data = await upstream.read()
    except asyncio.CancelledError:  # the client hung up: drop the upstream connection so vLLM stops
        upstream.close()
        ex.abandoned, ex.status = True, CLIENT_CLOSED
        raise
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        upstream.close()
        err = ProxyError(504, f"the upstream model server did not finish within {st.upstream.timeout_s:g}s; "
                              "raise upstream_timeout_s if long generations are expected", code="upstream_timeout")
        ex.status, ex.error = err.status, err.message
        st.metrics.upstream_errors.labels(ex.endpoint, "timeout").inc()
        resp = web.Response(status=504, body=err.body(), content_type="application/json", headers=headers)
        await _finish(request, resp)
        return resp
    except (aiohttp.ClientError, OSError) as exc:
        upstream.close()
        err = ProxyError(502, f"the upstream model server broke off its answer ({type(exc).__name__}: {exc})",
                         code="upstream_error")
        ex.status, ex.error = err.status, err.message
        st.metrics.upstream_errors.labels(ex.endpoint, "cut").inc()
        resp = web.Response(status=502, body=err.body(), content_type="application/json", headers=headers)
        await _finish(request, resp)
        return resp
    status = upstream.status
    if rewrite_id and status == 200:
        data = _splice_id(data, ex.interaction_id)
    ex.status, ex.body = status, data
    headers.update(response_headers(upstream))
    resp = web.Response(status=status, body=data, headers=headers)
    await _finish(request, resp)
    ex.t_end = time.perf_counter()
    if request.transport is None or request.transport.is_closing():
        ex.abandoned = True  # the client left while the upstream was working
    return resp


def _splice_id(data: bytes, iid: str) -> bytes:
    m = _HEAD_ID.match(data)
    if m is not None:
        if m.group(1) == iid.encode():  # the upstream used our X-Request-Id
            return data
        return b"".join((data[: m.start(1)], iid.encode(), data[m.end(1):]))
    try:  # an upstream that does not put "id" first: the slow, always-right way
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if isinstance(obj, dict):
        obj["id"] = iid
        return orjson.dumps(obj)
    return data


async def _relay_stream(request, st: ProxyState, upstream: Http1Response, ex: Exchange, headers: dict[str, str],
                        rewrite_id: bool) -> web.StreamResponse:
    headers.update(response_headers(upstream))
    headers["Cache-Control"] = "no-cache"
    ex.status = upstream.status
    resp = web.StreamResponse(status=upstream.status, headers=headers)
    chunks = ex.chunks
    iid_b = ex.interaction_id.encode()
    up_id: bytes | None = None
    carry = b""  # a partial line held back so an id split across reads is still replaced
    try:
        await resp.prepare(request)
    except _CLIENT_GONE:
        ex.abandoned = True
        upstream.close()
        return resp
    upstream_done = delivered_all = False
    responses_api = ex.endpoint == "/responses"
    try:
        async for chunk in upstream.iter_any():
            if rewrite_id:
                if carry:
                    chunk = carry + chunk
                    carry = b""
                if not chunk.endswith(b"\n"):
                    cut = chunk.rfind(b"\n") + 1
                    chunk, carry = chunk[:cut], chunk[cut:]
                    if not chunk:
                        continue
                if up_id is None:
                    m = _STREAM_ID.search(chunk)
                    if m is not None:
                        up_id = m.group(1)
                        if up_id == iid_b:  # the upstream used our X-Request-Id: nothing to rewrite
                            rewrite_id = False
                if up_id is not None and rewrite_id:
                    chunk = chunk.replace(up_id, iid_b)
            if ex.t_first is None:
                ex.t_first = time.perf_counter()
            chunks.append(chunk)
            await resp.write(chunk)
            if not delivered_all and (b"[DONE]" in chunk[-16:] or (responses_api and _RESPONSES_END.search(chunk))):
                delivered_all = True  # the client has the whole answer; hanging up now abandons nothing
        if carry:
            chunks.append(carry)
            await resp.write(carry)
        upstream_done = True
        # Everything the upstream sent was delivered. A client that hangs up now (the SDK closes
        # as soon as it read [DONE]) did not abandon anything.
        try:
            await resp.write_eof()
        except _CLIENT_GONE:
            pass
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client's connection drops (handler_cancellation).
        # Once everything was relayed (the SDK hangs up right after [DONE]) nothing was abandoned.
        ex.abandoned = not (upstream_done or delivered_all)
        upstream.close()
        ex.t_end = time.perf_counter()
        raise
    except _CLIENT_GONE:
        # The client left: close the upstream connection so vLLM stops generating for nobody.
        ex.abandoned = not delivered_all
        upstream.close()
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The upstream stalled or cut the stream: tell the client in-band (the OpenAI SDK raises
        # APIError on an error event) and end the response.
        upstream.close()
        kind = "timeout" if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)) else "cut"
        ex.error = (f"the upstream stream stalled for over {st.upstream.read_timeout_s:g}s" if kind == "timeout"
                    else f"the upstream broke off the stream ({type(exc).__name__}: {exc})")
        st.metrics.upstream_errors.labels(ex.endpoint, f"stream_{kind}").inc()
        err = ProxyError(504 if kind == "timeout" else 502, ex.error, code=f"upstream_{kind}")
        try:
            await resp.write(b"data: " + err.body() + b"\n\n")
            await resp.write_eof()
        except _CLIENT_GONE:
            ex.abandoned = True
    finally:
        upstream.release()
    if ex.t_first is not None:
        st.metrics.observe_ttft(ex.endpoint, ex.public_model, ex.adapter_version, ex.t_first - ex.t0)
    ex.t_end = time.perf_counter()
    return resp


async def forward_other(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* route: forwarded unchanged (no capture: not a model interaction)."""
    st: ProxyState = request.app[STATE]
    if request.path[3:] in ENDPOINTS:  # a known endpoint with the wrong method
        raise ProxyError(405, f"{request.method} is not allowed on {request.path}; use POST", code="method_not_allowed")
    if request.path[3:] in UPSTREAM_ADMIN:
        raise ProxyError(404, f"{request.path} is not exposed through the proxy: adapters are loaded by the learner's "
                              "publisher and routed with the admin API", code="not_found")
    body = await request.read() if request.can_read_body else None
    upstream = await st.upstream.request(request.method, request.path[3:], body, st.upstream.headers(request.headers),
                                         stream=True, query=request.query_string)
    headers = response_headers(upstream)
    resp = web.StreamResponse(status=upstream.status, headers=headers)
    try:
        await resp.prepare(request)
        async for chunk in upstream.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except _CLIENT_GONE:
        upstream.close()
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
        upstream.close()
        if not resp.prepared:
            raise ProxyError(502, "the upstream model server broke off its answer", code="upstream_error") from None
    finally:
        upstream.release()
    return resp


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the upstream's models plus every public name from routing and model_list."""
    st: ProxyState = request.app[STATE]
    upstream = await st.upstream.request("GET", "/models", None, st.upstream.headers(request.headers), stream=False)
    data = await upstream.read()
    if upstream.status != 200:
        return web.Response(status=upstream.status, body=data, headers=response_headers(upstream))
    try:
        obj = orjson.loads(data)
        models = obj["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return web.Response(status=200, body=data, headers=response_headers(upstream))
    known = {m.get("id") for m in models if isinstance(m, dict)}
    now = int(time.time())
    for name, route in st.router.table.routes.items():
        if name not in known:
            models.append({"id": name, "object": "model", "created": now, "owned_by": "onpolicy", "root": route.base,
                           "parent": route.base})
            known.add(name)
    for name in st.hosted or ():
        if name not in known:
            models.append({"id": name, "object": "model", "created": now, "owned_by": "onpolicy-hosted"})
    return web.Response(body=orjson.dumps(obj), content_type="application/json")
