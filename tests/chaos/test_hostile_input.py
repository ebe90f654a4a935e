"""Hostile input against a running proxy process (``onpolicy proxy``, real sockets; raw sockets for
what no well-behaved client sends): every attack gets a clean 4xx -- an OpenAI-style JSON error that
quotes none of the request's bytes -- and, while each attack runs, the unmodified OpenAI SDK keeps
being served (counted into docs/reliability.md).

The upstream is bench/standin_upstream.py, a STAND-IN for vLLM (its answers do not matter here).
Timeouts and the body limit are shortened so the suite stays fast: head and body deadlines 1.5 s,
max_body_bytes 1 MiB.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from proxy.api_keys import hash_key
from proxy.openapi import openapi_spec
from tests.chaos.proxy_process import CHAT, ProxyProcess, Reply, SdkLoad, Standin, raw_exchange, request_bytes
from tests.chaos.report import record

HEAD_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MAX_BODY = 1024 * 1024
ADMIN_TOKEN = "hostile-admin-token-0123456789abcdef"
API_KEY = "op-hostile-input-key-0123456789abcdef0123"
MARKER = b"ECHO-MARKER-7f3a"  # put in attack bytes; must never come back in a body
TRACEBACK = re.compile(rb'Traceback \(most recent call last\)|File "[^"]+", line \d+')
# headers a proxy answer may carry; anything else (an injected header) fails the injection checks
KNOWN_RESPONSE_HEADERS = {"content-type", "content-length", "date", "server", "connection", "allow",
                          "x-onpolicy-interaction-id", "x-onpolicy-adapter-version", "x-request-id", "transfer-encoding",
                          "cache-control", "openai-version", "openai-processing-ms", "openai-organization", "retry-after",
                          "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    standin = Standin()
    env = {
        "ONPOLICY_HOME": str(tmp / "home"),
        "ONPOLICY_PROXY_UPSTREAM_URL": standin.base_url,
        "ONPOLICY_PROXY_CAPTURE": "false",
        "ONPOLICY_PROXY_FOLLOW_CONTROL": "false",
        "ONPOLICY_PROXY_INTERACTION_ID_KEY": "hostile-signing-key-0123456789",
        "ONPOLICY_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "ONPOLICY_PROXY_API_KEYS": json.dumps([{"name": "hostile", "tenant": "", "sha256": hash_key(API_KEY, None)}]),
        "ONPOLICY_PROXY_REQUEST_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "ONPOLICY_PROXY_REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "ONPOLICY_PROXY_MAX_BODY_BYTES": str(MAX_BODY),
        "ONPOLICY_PROXY_SHUTDOWN_GRACE_S": "2",
    }
    proxy = ProxyProcess(env, tmp / "proxy.log")
    load = SdkLoad(proxy.base_url, pause_s=0.02).start()
    deadline = time.monotonic() + 20
    while load.ok == 0 and not load.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load.ok > 0, f"the SDK is not served before any attack: {load.failed[:3]}"
    yield proxy, load
    load.stop()
    proxy.stop()
    standin.stop()
    log = proxy.log_path.read_bytes()
    assert not TRACEBACK.search(log), f"a traceback in the proxy's log:\n{log.decode(errors='replace')[-3000:]}"


@dataclass
class Attack:
    label: str
    send: Callable[[int], Reply]  # port -> what came back
    expect: frozenset[int]
    closes: bool = False  # the proxy must close the connection after answering


def _send(data, **kw) -> Callable[[int], Reply]:
    kw.setdefault("linger_s", 1.0)  # long enough to see the proxy close the connection (or answer twice)
    return lambda port: raw_exchange(port, data, **kw)


def _check_reply(a: Attack, r: Reply) -> None:
    assert r.responses, f"{a.label}: no HTTP response (closed={r.closed}, raw={r.raw[:200]!r})"
    assert len(r.responses) == 1, f"{a.label}: {len(r.responses)} responses on one connection (smuggled?): {r.raw[:600]!r}"
    status, headers, body = r.responses[0]
    assert status in a.expect, f"{a.label}: {status} (want {sorted(a.expect)}): {body[:300]!r}"
    assert not TRACEBACK.search(r.raw), f"{a.label}: traceback in the answer"
    assert MARKER not in r.raw, f"{a.label}: the request's bytes were echoed back"
    if status >= 400:
        assert headers.get("content-type", [""])[0].startswith("application/json"), f"{a.label}: {headers}"
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), body
    unknown = set(headers) - KNOWN_RESPONSE_HEADERS
    assert not unknown, f"{a.label}: unexpected response headers {unknown} (injected?)"
    if a.closes:
        assert r.closed, f"{a.label}: the connection was left open after a {status}"


def run_check(stack, name: str, attacks: list[Attack], *, min_s: float = 1.0, parallel: int = 1,
              notes: str | Callable[[], str] = "") -> dict:
    """Send every attack, round after round, for at least ``min_s`` while the SDK load runs; assert
    each answer and that the SDK saw no failure; record the row."""
    proxy, load = stack
    ok0, failed0 = load.snapshot()
    statuses: dict[int, int] = {}
    attempts = 0
    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        while attempts == 0 or time.monotonic() - t0 < min_s:
            replies = list(pool.map(lambda a: (a, a.send(proxy.port)), attacks * parallel))
            for a, r in replies:
                attempts += 1
                _check_reply(a, r)
                statuses[r.status] = statuses.get(r.status, 0) + 1
    ok1, failed1 = load.snapshot()
    served, failed = ok1 - ok0, failed1 - failed0
    row = {"check": name, "attempts": attempts,
           "responses": ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())),
           "5xx": sum(n for s, n in statuses.items() if s >= 500), "tracebacks": 0,
           "others served meanwhile": f"{served} SDK requests, {failed} failed",
           "notes": notes() if callable(notes) else notes}
    record("hostile", **row)
    assert failed == 0, f"the SDK failed while '{name}' ran: {load.failed[-3:]}"
    assert served > 0, f"the SDK was not served while '{name}' ran"
    return row


def _chat(headers: list[bytes] | None = None, body: bytes = CHAT, **kw) -> bytes:
    return request_bytes("/v1/chat/completions", body, headers, **kw)


AUTH = b"Authorization: Bearer " + API_KEY.encode()
ADMIN = b"Authorization: Bearer " + ADMIN_TOKEN.encode()
FEEDBACK_ITEM = json.dumps({"episode_id": "ep-1", "kind": "thumbs", "value": 1}).encode()


def test_oversized_bodies_get_413(stack):
    big = b'{"model":"standin-model","messages":[{"role":"user","content":"' + b"x" * (MAX_BODY + 1024) + b'"}]}'
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (64 * 1024, b"y" * 64 * 1024) for _ in range(20)) + b"0\r\n\r\n")
    huge_declared = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n{\"model\":")
    attacks = [
        Attack("body over max_body_bytes (Content-Length)", _send(_chat(body=big)), frozenset({413})),
        Attack("chunked body over max_body_bytes", _send(chunked), frozenset({413})),
        Attack("10 GB declared, 9 bytes sent", _send(huge_declared, timeout_s=5), frozenset({413}), closes=True),
        Attack("feedback body over max_body_bytes",
               _send(request_bytes("/v1/feedback", b"[" + b",".join([FEEDBACK_ITEM] * 30000) + b"]", [AUTH])),
               frozenset({413})),
    ]
    row = run_check(stack, "oversized bodies (1 MiB limit; declared, chunked, 10 GB declared)", attacks,
                    notes="413 on the declared length before reading; chunked cut at the limit")
    assert row["5xx"] == 0


def test_deeply_nested_json_gets_400(stack):
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_obj = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    attacks = [
        Attack("chat: messages nested 100k deep",
               _send(_chat(body=b'{"model":"standin-model","messages":' + deep + b"}")), frozenset({400})),
        Attack("completions: prompt nested 50k deep objects",
               _send(request_bytes("/v1/completions", b'{"model":"standin-model","prompt":' + deep_obj + b"}")),
               frozenset({400})),
        Attack("feedback: metadata nested 100k deep",
               _send(request_bytes("/v1/feedback", b'{"episode_id":"e","kind":"thumbs","value":1,"metadata":' + deep + b"}",
                                   [AUTH])), frozenset({400})),
        Attack("admin: body nested 100k deep", _send(request_bytes("/admin/pause", deep, [ADMIN])), frozenset({400})),
    ]
    run_check(stack, "deeply nested JSON (100k levels; chat, completions, feedback, admin)", attacks,
              notes="orjson's depth limit -> 400 invalid_json")


def test_invalid_utf8_gets_400(stack):
    attacks = [
        Attack("body: invalid UTF-8 in a string", _send(_chat(body=b'{"model":"standin-\xff\xfe","messages":[]}')),
               frozenset({400})),
        Attack("body: lone surrogate escape",
               _send(_chat(body=b'{"model":"standin-model","messages":[{"role":"user","content":"\\ud800"}]}')),
               frozenset({400})),
        Attack("feedback body: invalid UTF-8", _send(request_bytes("/v1/feedback", b'{"kind":"\xc3\x28"}', [AUTH])),
               frozenset({400})),
    ]
    for name in (b"x-onpolicy-episode-id", b"x-onpolicy-user", b"x-onpolicy-tenant", b"x-onpolicy-interaction-id",
                 b"x-custom-header", b"Authorization"):
        attacks.append(Attack(f"header {name.decode()}: invalid UTF-8",
                              _send(_chat([name + b": Bearer " + MARKER + b"\xff\xfe\xc3\x28"])), frozenset({400})))
    attacks += [
        Attack("feedback: Authorization with invalid UTF-8",
               _send(request_bytes("/v1/feedback", FEEDBACK_ITEM, [b"Authorization: Bearer \xff" + MARKER])),
               frozenset({400})),
        Attack("admin: Authorization with invalid UTF-8",
               _send(request_bytes("/admin/routing", None, [b"Authorization: Bearer \xff" + MARKER], method="GET")),
               frozenset({400})),
        Attack("feedback: Idempotency-Key with invalid UTF-8",
               _send(request_bytes("/v1/feedback", FEEDBACK_ITEM, [AUTH, b"Idempotency-Key: \xfe\xff"])), frozenset({400})),
        Attack("path: invalid UTF-8", _send(b"GET /v1/mod\xffels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
               frozenset({400, 404})),
    ]
    run_check(stack, "invalid UTF-8 (bodies; id, auth and other headers; path)", attacks,
              notes="before the fix: tenant/Authorization -> 500 (UnicodeEncodeError), episode accepted")


def test_huge_headers_get_431_or_414(stack):
    attacks = [
        Attack("one header of 20 KiB", _send(_chat([b"x-big: " + MARKER + b"a" * 20_000])), frozenset({431}), closes=True),
        Attack("Authorization of 64 KiB to admin",
               _send(request_bytes("/admin/routing", None, [b"Authorization: Bearer " + MARKER + b"a" * 65_536], method="GET")),
               frozenset({431}), closes=True),
        Attack("300 headers", _send(_chat([b"x-h%d: v" % i for i in range(300)])), frozenset({431}), closes=True),
        Attack("request line of 10 KiB", _send(request_bytes("/v1/" + "a" * 10_000, None, method="GET")),
               frozenset({414}), closes=True),
        Attack("header name of 20 KiB", _send(_chat([MARKER + b"n" * 20_000 + b": v"])), frozenset({431}), closes=True),
    ]
    run_check(stack, "huge headers (20 KiB field, 64 KiB Authorization, 300 headers, 10 KiB URL)", attacks,
              notes="was aiohttp's text/plain 400 quoting the header bytes (an Authorization value too)")


def test_slowloris_heads_are_cut(stack):
    proxy, _ = stack
    head = _chat([b"x-note: " + MARKER])
    trickled = [head[i:i + 1] for i in range(len(head))]  # 1 byte / 100 ms: ~25 s for the whole head

    def slow_head(port: int) -> Reply:
        return raw_exchange(port, trickled, delay_s=0.1, timeout_s=HEAD_TIMEOUT_S + 8)

    def silent(port: int) -> Reply:
        return raw_exchange(port, [], timeout_s=HEAD_TIMEOUT_S + 8)

    attacks = [Attack("head trickled 1 byte/100 ms", slow_head, frozenset({408}), closes=True),
               Attack("connection that sends nothing", silent, frozenset({408}), closes=True)]
    times: list[float] = []
    lock = threading.Lock()
    for a in attacks:
        inner = a.send

        def timed(port, inner=inner):
            r = inner(port)
            with lock:
                times.append(r.elapsed_s)
            return r
        a.send = timed
    run_check(stack, f"slowloris: heads trickled or never sent (64 connections at once, {HEAD_TIMEOUT_S:g} s head deadline)",
              attacks, parallel=32, min_s=0.1, notes=lambda: f"408 + close after {min(times):.1f}-{max(times):.1f} s "
              "(request_header_timeout_s); before the fix: held forever")
    assert max(times) < HEAD_TIMEOUT_S + 3, times


def test_slow_bodies_are_cut(stack):
    body = CHAT
    head = _chat(body=body)[: -len(body)]
    trickled = [head] + [body[i:i + 1] for i in range(len(body))]  # 1 byte / 100 ms after the head
    times: list[float] = []

    def slow_body(port: int) -> Reply:
        r = raw_exchange(port, trickled, delay_s=0.1, timeout_s=BODY_TIMEOUT_S + 8)
        times.append(r.elapsed_s)
        return r

    def stalled_feedback(port: int) -> Reply:
        data = request_bytes("/v1/feedback", FEEDBACK_ITEM, [AUTH])
        r = raw_exchange(port, data[:-5], timeout_s=BODY_TIMEOUT_S + 8)  # 5 body bytes never come
        times.append(r.elapsed_s)
        return r

    attacks = [Attack("chat body trickled 1 byte/100 ms", slow_body, frozenset({408}), closes=True),
               Attack("feedback body stalled", stalled_feedback, frozenset({408}), closes=True)]
    run_check(stack, f"slow bodies: trickled or stalled (32 connections at once, {BODY_TIMEOUT_S:g} s body deadline)",
              attacks, parallel=16, min_s=0.1, notes=lambda: f"408 + close after {min(times):.1f}-{max(times):.1f} s "
              "(request_body_timeout_s); before the fix: held forever")
    assert max(times) < BODY_TIMEOUT_S + 3, times


def test_request_smuggling_is_refused(stack):
    smuggled = b"GET /admin/routing HTTP/1.1\r\nHost: x\r\n" + ADMIN + b"\r\n\r\n"
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    variants = {
        "CL.TE: Content-Length and Transfer-Encoding": post + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        % len(chunked_body) + chunked_body + smuggled,
        "TE.CL: Transfer-Encoding then Content-Length": post + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + chunked_body + smuggled,
        "two different Content-Lengths": post + b"Content-Length: %d\r\nContent-Length: 4\r\n\r\n" % len(CHAT) + CHAT + smuggled,
        "two equal Content-Lengths": post + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(CHAT), len(CHAT))
        + CHAT + smuggled,
        "Content-Length list '60, 60'": post + b"Content-Length: %d, %d\r\n\r\n" % (len(CHAT), len(CHAT)) + CHAT,
        "Transfer-Encoding: xchunked": post + b"Transfer-Encoding: xchunked\r\n\r\n" + chunked_body + smuggled,
        "Transfer-Encoding: chunked, identity": post + b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked_body,
        "two Transfer-Encoding headers": post + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
        + chunked_body + smuggled,
        "Transfer-Encoding with obs-fold": post + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + chunked_body + smuggled,
        "space before colon (Transfer-Encoding :)": post + b"Transfer-Encoding : chunked\r\n\r\n" + chunked_body + smuggled,
        "obs-fold in an id header": post + b"x-onpolicy-episode-id: a\r\n " + MARKER + b"\r\nContent-Length: %d\r\n\r\n"
        % len(CHAT) + CHAT,
        "Content-Length '+60'": post + b"Content-Length: +%d\r\n\r\n" % len(CHAT) + CHAT + smuggled,
        "Content-Length negative": post + b"Content-Length: -1\r\n\r\n" + smuggled,
        "chunk size '0x10'": post + b"Transfer-Encoding: chunked\r\n\r\n0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n" + smuggled,
        "chunk size overflowing 64 bits": post + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nab\r\n0\r\n\r\n",
        "bare LF line endings": post.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % len(CHAT) + CHAT + smuggled,
        "NUL in the request line": b"POST /v1/chat/completions\x00 HTTP/1.1\r\nHost: x\r\n\r\n" + smuggled,
        "TLS bytes on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    }
    attacks = [Attack(label, _send(data, linger_s=0.5, timeout_s=5), frozenset({400}), closes=True)
               for label, data in variants.items()]
    run_check(stack, "request smuggling (CL+TE, TE+CL, duplicate CL, TE variants, obs-fold, bad chunk sizes; "
              f"{len(variants)} variants, each with a smuggled admin request behind it)", attacks,
              notes="one 400 per connection, then closed: the smuggled request is never served; "
                    "was aiohttp's text/plain quoting the bytes")


def test_header_injection_through_ids(stack):
    id_headers = (b"x-onpolicy-episode-id", b"x-onpolicy-interaction-id", b"x-onpolicy-user", b"x-onpolicy-tenant")
    attacks: list[Attack] = []
    for name in id_headers:
        short = name.decode()
        attacks += [
            Attack(f"{short}: CR LF + header", _send(_chat([name + b": a\r\nX-Injected: " + MARKER])),
                   frozenset({200}), closes=True),  # a valid request with an extra header: served, nothing echoed
            Attack(f"{short}: bare CR", _send(_chat([name + b": a\rX-Injected: " + MARKER])), frozenset({400}), closes=True),
            Attack(f"{short}: bare LF", _send(_chat([name + b": a\nX-Injected: " + MARKER])),
                   frozenset({400, 200}), closes=True),
            Attack(f"{short}: NUL", _send(_chat([name + b": a\x00b"])), frozenset({400}), closes=True),
            Attack(f"{short}: tab", _send(_chat([name + b": a\tb"])), frozenset({400})),
            Attack(f"{short}: DEL", _send(_chat([name + b": a\x7fb"])), frozenset({400})),
            Attack(f"{short}: 300 characters", _send(_chat([name + b": " + b"a" * 300])), frozenset({400})),
            Attack(f"{short}: non-token characters", _send(_chat([name + b': a; b="c", <d>{e}/\\ \xc3\xa9'])),
                   frozenset({200})),
        ]
    # the same through the body, where JSON can carry CR LF: data, never a header
    body = json.dumps({"model": "standin-model", "messages": [{"role": "user", "content": "hi"}],
                       "user": "u\r\nX-Injected: 1", "metadata": {"episode_id": "e\r\nX-Injected: 1",
                                                                   "tenant": "t\r\nX-Injected: 1"}}).encode()
    attacks.append(Attack("body user/metadata ids with CR LF", _send(_chat(body=body)), frozenset({200})))
    attacks += [
        Attack("feedback Idempotency-Key: CR LF + header",
               _send(request_bytes("/v1/feedback", FEEDBACK_ITEM, [AUTH, b"Idempotency-Key: k\r\nX-Injected: 1"])),
               frozenset({202}), closes=True),
        Attack("feedback Idempotency-Key: control character",
               _send(request_bytes("/v1/feedback", FEEDBACK_ITEM, [AUTH, b"Idempotency-Key: k\x01"])), frozenset({400})),
        Attack("feedback x-onpolicy-user: tab", _send(request_bytes("/v1/feedback", FEEDBACK_ITEM, [AUTH, b"x-onpolicy-user: a\tb"])),
               frozenset({400})),
    ]
    row = run_check(stack, f"header injection through ids (CR/LF, control and non-token characters; {len(attacks)} variants)",
                    attacks, notes="ids are never echoed into response headers (only the proxy's own signed id is); "
                                   "control characters and >256 chars in id headers -> 400 invalid_header; "
                                   "CR LF splits into a separate header, never into ours")
    assert row["5xx"] == 0


# -- schemathesis over the proxy's whole OpenAPI description (the real-vLLM run is
# tests/integration/test_proxy_fuzz.py; here the stand-in answers, so the proxy's own checks are fuzzed) --
FUZZ_EXAMPLES = 20
fuzz_schema = schemathesis.openapi.from_dict(openapi_spec())
fuzz_schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=FUZZ_EXAMPLES,
                                     deterministic=True)
FUZZ: dict = {"cases": 0, "statuses": {}, "operations": set(), "load_before": None, "tracebacks": 0, "5xx": set()}


@fuzz_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=FUZZ_EXAMPLES)
def test_schemathesis_every_endpoint(case, stack):
    proxy, load = stack
    if FUZZ["load_before"] is None:
        FUZZ["load_before"] = load.snapshot()
    if case.path == "/v1/feedback" or case.path.startswith("/admin/"):
        # valid credentials, so the fuzzing reaches the body checks (auth itself: test_security.py)
        token = API_KEY if case.path == "/v1/feedback" else ADMIN_TOKEN
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    response = case.call(base_url=proxy.root_url, timeout=30)
    FUZZ["cases"] += 1
    FUZZ["operations"].add(f"{case.method.upper()} {case.path}")
    FUZZ["statuses"][response.status_code] = FUZZ["statuses"].get(response.status_code, 0) + 1
    text = response.text
    if response.status_code >= 500:
        code = (response.json().get("error") or {}).get("code") if text.startswith("{") else None
        FUZZ["5xx"].add(f"{case.method.upper()} {case.path} -> {response.status_code} {code}")
    if TRACEBACK.search(text.encode()):
        FUZZ["tracebacks"] += 1
    assert response.status_code != 500, f"{case.method} {case.path} -> 500: {text[:500]}"
    assert not TRACEBACK.search(text.encode()), text[:500]
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert "error" in response.json(), text[:300]


def test_schemathesis_covered_every_operation(stack):
    _, load = stack
    if not FUZZ["cases"]:
        pytest.fail("no schemathesis case ran in this session: run this test together with "
                    "test_schemathesis_every_endpoint (it checks what those cases covered)")
    spec_ops = {f"{m.upper()} {p}" for p, item in openapi_spec()["paths"].items() for m in item}
    # negative cases also call each path with methods it does not allow (405): a superset
    assert spec_ops <= FUZZ["operations"], spec_ops - FUZZ["operations"]
    ok0, failed0 = FUZZ["load_before"]
    ok1, failed1 = load.snapshot()
    statuses = FUZZ["statuses"]
    record("hostile", **{
        "check": f"schemathesis: every operation of /openapi.json ({len(spec_ops)}), positive and negative cases",
        "attempts": FUZZ["cases"], "responses": ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())),
        "5xx": sum(n for s, n in statuses.items() if s >= 500), "tracebacks": FUZZ["tracebacks"],
        "others served meanwhile": f"{ok1 - ok0} SDK requests, {failed1 - failed0} failed",
        "notes": f"up to {FUZZ_EXAMPLES} cases per operation (and wrong methods on each path); 0 responses with 500; "
                 f"other 5xx: {', '.join(sorted(FUZZ['5xx'])) or 'none'} (this proxy has no warehouse URL: the admin "
                 "API's history reads answer 503 warehouse_unavailable); feedback and admin fuzzed with valid "
                 "credentials; upstream: the stand-in (tests/integration/test_proxy_fuzz.py runs it with vLLM)"})
    assert failed1 == failed0


def test_the_proxy_still_serves_after_the_attacks(stack):
    proxy, load = stack
    r = raw_exchange(proxy.port, _chat())
    assert r.status == 200 and json.loads(r.body)["choices"][0]["message"]["content"]
    assert proxy.proc.poll() is None
    assert not load.failed, load.failed[:5]
