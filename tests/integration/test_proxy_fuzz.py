"""schemathesis against the proxy's own OpenAPI description, with the real vLLM behind it: whatever
is sent, no 500 and no traceback comes back (vLLM's own 4xx are relayed unchanged).

Every route the app serves must be in the description (``test_the_description_covers_every_route``),
so a new endpoint is fuzzed as soon as it exists. The feedback and admin APIs are called with valid
credentials, so the fuzzing reaches their body checks (their auth: tests/chaos/test_security.py).
The chaos suite runs the same fuzzing against a proxy process with a stand-in upstream and records
the figures (tests/chaos/test_hostile_input.py)."""

from __future__ import annotations

import os
import types

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from proxy.api_keys import hash_key
from proxy.app import create_app
from proxy.openapi import openapi_spec
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy

if os.environ.get("ONPOLICY_TEST_VLLM_URL"):  # developing: reuse a running vLLM (see test_proxy_vllm.py)
    @pytest.fixture(scope="module")
    def vllm_server():
        url, model = os.environ["ONPOLICY_TEST_VLLM_URL"].split()
        return types.SimpleNamespace(base_url=url, model=model)


schema = schemathesis.openapi.from_dict(openapi_spec())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=50,
                                deterministic=True)
seen: dict[int, int] = {}
API_KEY = "op-fuzz-api-key-0123456789abcdef0123456789"
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"


class Collector:
    """The feedback and admin APIs' producer: accepted events are kept here, not sent to Kafka."""

    connected = True

    def __init__(self):
        self.events = []

    def emit(self, event) -> bool:
        self.events.append(event)
        return True


def _settings(upstream_url: str) -> ProxySettings:
    return ProxySettings(upstream_url=upstream_url, capture=False, follow_control=False,
                         interaction_id_key="fuzz-key-0123456789abcdef", upstream_timeout_s=60, admin_token=ADMIN_TOKEN,
                         api_keys=({"name": "fuzz", "tenant": "", "sha256": hash_key(API_KEY, None)},))


def test_the_description_covers_every_route():
    """Each (method, path) the app routes is in /openapi.json (HEAD and the /v1 pass-through aside)."""
    spec = openapi_spec()["paths"]
    app = create_app(_settings("http://127.0.0.1:9/v1"))
    missing = [f"{r.method} {r.resource.canonical}" for r in app.router.routes()
               if r.method not in ("HEAD", "*") and r.resource.canonical != "/v1/{tail}"
               and r.method.lower() not in spec.get(r.resource.canonical, {})]
    assert not missing, f"routes missing from proxy/openapi.py (so never fuzzed): {missing}"


@pytest.fixture(scope="module")
def fuzz_proxy(vllm_server, tmp_path_factory):
    running = RunningProxy(_settings(vllm_server.base_url), producer=Collector()).start()
    yield running
    running.stop()
    print("status codes seen:", dict(sorted(seen.items())))


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=50)
def test_no_500_no_traceback(case, fuzz_proxy, vllm_server):
    if case.path == "/v1/feedback" or case.path.startswith("/admin/"):
        token = API_KEY if case.path == "/v1/feedback" else ADMIN_TOKEN
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    response = case.call(base_url=fuzz_proxy.root_url, timeout=60)
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    text = response.text
    assert response.status_code != 500, f"{case.method} {case.path} -> 500: {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis keeps header values as lists
    if response.status_code >= 400 and case.path.startswith("/v1/") and content_type.startswith("application/json"):
        body = response.json()
        assert "error" in body or "detail" in body or "message" in body, text[:300]
