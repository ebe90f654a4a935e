"""schemathesis against /v1/feedback and /admin/* from the proxy's OpenAPI description, with VALID
credentials (so the fuzz reaches validation and the actions, not just the auth check): whatever is
sent, no 500 and no traceback, and every error is OpenAI-style JSON.

The admin actions run for real against the proxy's Router and an embedded warehouse (events go
straight to both: the Kafka path is covered by test_admin_rollback.py); the upstream's model list is
stubbed to "every version is loaded" so fuzzed versions get past that check into the routing code.
(The proxy's own fuzz test, test_proxy_fuzz.py, also covers these paths without credentials.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from proxy.admin import ADMIN
from proxy.api_keys import hash_key
from proxy.interaction_ids import InteractionIds
from proxy.openapi import openapi_spec
from proxy.routing import Router
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from tests.unit.test_feedback_admin_api import Loopback

SIGNING = "fuzz-feedback-signing-key-0123456789"
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
USER_KEY = "op-fuzz-user-key-0000000000000000"

schema = schemathesis.openapi.from_dict(openapi_spec()).include(path_regex=r"^/(v1/feedback|admin/)")
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=40,
                                deterministic=True)
seen: dict[tuple[str, int], int] = {}


@pytest.fixture(scope="module")
def fuzz_api(chdb_path, tmp_path_factory):
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    wh = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database="feedback_fuzz"))
    wh.migrate()
    router = Router()
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key=SIGNING, admin_token=ADMIN_TOKEN,
                      api_keys=[{"name": "fuzz", "tenant": "", "sha256": hash_key(USER_KEY, None)}])
    running = RunningProxy(s, producer=Loopback(router, wh), router=router).start()
    svc = running.app[ADMIN]
    svc.warehouse = wh

    async def served_upstream(version: str) -> bool:
        return True

    svc.served_upstream = served_upstream
    yield running
    running.stop()
    print("status codes seen:", dict(sorted(seen.items())))


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=40)
def test_no_500_no_traceback_with_valid_credentials(case, fuzz_api):
    token = ADMIN_TOKEN if case.path.startswith("/admin/") else USER_KEY
    if case.path == "/v1/feedback" and isinstance(case.body, dict) and "interaction_id" in case.body:
        # half the time a real signed id, so the value rules behind the signature check get fuzzed too
        if hash(str(case.body)) % 2:
            case.body["interaction_id"] = InteractionIds(SIGNING.encode()).issue("chatcmpl-")
    headers = dict(case.headers or {})
    headers["Authorization"] = f"Bearer {token}"
    response = case.call(base_url=fuzz_api.root_url, headers=headers, timeout=30)
    seen[(case.path, response.status_code)] = seen.get((case.path, response.status_code), 0) + 1
    text = response.text
    assert response.status_code < 500 or response.status_code in (502, 503), f"{case.method} {case.path}: {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert ADMIN_TOKEN not in text and USER_KEY not in text
    if response.status_code >= 400:
        err = response.json()["error"]
        assert err["message"] and err["type"], text[:300]
