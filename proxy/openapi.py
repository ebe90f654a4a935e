"""The proxy's own OpenAPI description (served at /openapi.json; schemathesis fuzzes against it).

It describes what the proxy itself checks -- the fields it reads -- and leaves every other field
open (``additionalProperties: true``): unknown fields are forwarded unchanged to the upstream.
"""

from __future__ import annotations

from typing import Any

from proxy.apis import openapi_paths

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_MESSAGE = {"type": "object", "required": ["role", "content"], "additionalProperties": True,
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}
_COMMON = {
    "model": {"type": "string", "description": "Public model name (GET /v1/models)."},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "user": {"type": "string"},
}


def _post(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "parameters": [
            {"name": "x-onpolicy-episode-id", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "x-onpolicy-train", "in": "header", "required": False, "schema": {"type": "string", "enum": ["true", "false"]}},
        ],
        "responses": {
            "200": {"description": "The upstream's answer, with the interaction id as its id and in x-onpolicy-interaction-id."},
            "default": {"description": "An OpenAI-style error.", "content": {"application/json": {"schema": _ERROR}}},
        },
    }}


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "onpolicy proxy", "version": "1",
                 "description": "OpenAI-compatible pass-through that captures every interaction."},
        "paths": {
            "/v1/chat/completions": _post("Chat completion (streaming with stream=true).", {
                "type": "object", "required": ["model", "messages"], "additionalProperties": True,
                "properties": dict(_COMMON, messages={"type": "array", "items": _MESSAGE, "minItems": 1}),
            }),
            "/v1/completions": _post("Text completion.", {
                "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
                "properties": dict(_COMMON, prompt={"type": "string"}),
            }),
            "/v1/embeddings": _post("Embeddings.", {
                "type": "object", "required": ["model", "input"], "additionalProperties": True,
                "properties": {"model": _COMMON["model"], "input": {"type": "string"}},
            }),
            "/v1/responses": _post("Responses API (the upstream's response id is kept for previous_response_id).", {
                "type": "object", "required": ["model", "input"], "additionalProperties": True,
                "properties": dict(_COMMON, input={"type": ["string", "array"]}),
            }),
            "/v1/models": {"get": {"summary": "Models: the upstream's plus the public names routed by onpolicy.",
                                   "responses": {"200": {"description": "A model list."}}}},
            "/healthz": {"get": {"summary": "Liveness.", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness (503 while starting or draining).",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": {"description": "text format"}}}},
            "/openapi.json": {"get": {"summary": "This description.", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            **openapi_paths(),  # /v1/feedback and /admin/* (proxy/apis.py)
        },
    }
