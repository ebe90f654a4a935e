"""schemathesis against the proxy's own OpenAPI description, with the real vLLM behind it: whatever
is sent, no 500 and no traceback comes back (vLLM's own 4xx are relayed unchanged)."""

from __future__ import annotations

import os
import types

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

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


@pytest.fixture(scope="module")
def fuzz_proxy(vllm_server, tmp_path_factory):
    s = ProxySettings(upstream_url=vllm_server.base_url, capture=False, follow_control=False,
                      interaction_id_key="fuzz-key-0123456789abcdef", upstream_timeout_s=60)
    running = RunningProxy(s).start()
    yield running
    running.stop()
    print("status codes seen:", dict(sorted(seen.items())))


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=50)
def test_no_500_no_traceback(case, fuzz_proxy, vllm_server):
    response = case.call(base_url=fuzz_proxy.root_url, timeout=60)
    seen[response.status_code] = seen.get(response.status_code, 0) + 1
    text = response.text
    assert response.status_code != 500, f"{case.method} {case.path} -> 500: {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis keeps header values as lists
    if response.status_code >= 400 and case.path.startswith("/v1/") and content_type.startswith("application/json"):
        body = response.json()
        assert "error" in body or "detail" in body or "message" in body, text[:300]
