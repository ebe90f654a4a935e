"""Hosted providers (OpenAI, Anthropic, ...) through litellm, so their traffic is captured too.

litellm is optional (the ``hosted`` extra) and imported here, lazily, on the first request for a
hosted model: the vLLM path never pays its ~3 s / ~200 MB import. Its price-list fetch at import
is switched off (``LITELLM_LOCAL_MODEL_COST_MAP=True``; the fetch blocks for seconds offline).
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.capture import Exchange
from proxy.errors import ProxyError
from proxy.settings import HostedModel
from proxy.state import ProxyState

_litellm = None


def _import_litellm():
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            import litellm
        except ModuleNotFoundError:
            raise ProxyError(502, "this model is configured as a hosted model but litellm is not installed; "
                                  "install the extra: pip install 'onpolicy[hosted]'", code="hosted_unavailable") from None
        litellm.telemetry = False
        _litellm = litellm
    return _litellm


def _params(hosted: HostedModel) -> dict[str, Any]:
    out = {}
    for k, v in hosted.litellm_params.items():
        if isinstance(v, str) and v.startswith("os.environ/"):
            name = v[len("os.environ/"):]
            if name not in os.environ:
                raise ProxyError(502, f"hosted model {hosted.model_name!r} needs the environment variable {name}, which is unset",
                                 code="hosted_misconfigured")
            v = os.environ[name]
        out[k] = v
    return out


def _to_json(obj: Any) -> dict[str, Any]:
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


async def serve_hosted(request: web.Request, st: ProxyState, hosted: HostedModel, req: dict[str, Any],
                       ex: Exchange) -> web.StreamResponse:
    headers = {"x-onpolicy-interaction-id": ex.interaction_id}
    try:
        try:
            litellm = _import_litellm()
            kwargs = {k: v for k, v in req.items() if k != "model"}
            kwargs.update(_params(hosted))
            call = {"/chat/completions": litellm.acompletion, "/completions": litellm.atext_completion,
                    "/embeddings": litellm.aembedding}.get(ex.endpoint)
            if call is None:
                raise ProxyError(404, f"{ex.endpoint} is not available for hosted model {hosted.model_name!r}", code="not_found")
            result = await call(**kwargs)
        except ProxyError:
            raise
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            status = status if isinstance(status, int) and 400 <= status < 600 else 502
            raise ProxyError(status, f"hosted provider error for {hosted.model_name!r}: {getattr(exc, 'message', None) or exc}",
                             code="hosted_error") from None
        if not ex.stream:
            obj = _to_json(result)
            if ex.endpoint != "/embeddings":
                obj["id"] = ex.interaction_id
            obj["model"] = hosted.model_name
            ex.status, ex.response, ex.t_end = 200, obj, time.perf_counter()
            resp = web.Response(body=orjson.dumps(obj), content_type="application/json", headers=headers)
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        try:
            async for chunk in result:
                obj = _to_json(chunk)
                obj["id"] = ex.interaction_id
                obj["model"] = hosted.model_name
                data = b"data: " + orjson.dumps(obj) + b"\n\n"
                if ex.t_first is None:
                    ex.t_first = time.perf_counter()
                ex.chunks.append(data)
                await resp.write(data)
            ex.chunks.append(b"data: [DONE]\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            ex.abandoned = True
        except Exception as exc:  # the provider failed mid-stream: say so in-band, as vLLM does
            ex.error = f"hosted provider error mid-stream: {type(exc).__name__}: {exc}"
            try:
                await resp.write(b"data: " + ProxyError(502, ex.error, code="hosted_error").body() + b"\n\n")
                await resp.write_eof()
            except (ConnectionResetError, ConnectionError):
                ex.abandoned = True
        ex.t_end = time.perf_counter()
        return resp
    except ProxyError as err:
        ex.status, ex.error, ex.t_end = err.status, err.message, time.perf_counter()
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    finally:
        st.metrics.observe(ex.endpoint, ex.public_model, None, ex.status, (ex.t_end or time.perf_counter()) - ex.t0)
        if st.capture is not None:
            st.capture.record(ex)
