"""Secrets never leak: a proxy process with API keys (peppered hashes), an admin token, an upstream
key and a signing key, capturing through its capture worker into a real broker (tansu) and a real
sink into the warehouse (chdb), is driven with traffic that includes upstream errors, malformed HTTP
carrying credentials, near-miss keys and tokens, the admin API and feedback. Then every place a
secret could end up is searched: the proxy's and capture worker's log (DEBUG), the sink's log, every
row of every warehouse table, the spool files, /metrics, and every response (headers and body) the
clients received. 0 hits of any secret or of any Authorization value a client sent.

The upstream is bench/standin_upstream.py, a STAND-IN for vLLM (its answers do not matter here).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from proxy.api_keys import hash_key
from streams.embedded import EmbeddedBroker
from streams.kafka_admin import ensure_topics
from streams.settings import KafkaSettings, SinkSettings, WarehouseSettings
from streams.sink import Sink
from streams.warehouse import Warehouse
from tests.chaos.proxy_process import ProxyProcess, Standin, raw_exchange
from tests.chaos.report import record
from tests.integration.helpers import wait_until

RUN = secrets.token_hex(4)
SECRETS = {
    "acme API key": f"op-acme-{secrets.token_urlsafe(24)}",
    "beta API key": f"op-beta-{secrets.token_urlsafe(24)}",
    "admin token": f"adm-{secrets.token_urlsafe(24)}",
    "upstream API key": f"sk-upstream-{secrets.token_urlsafe(24)}",
    "interaction-id signing key": f"sign-{secrets.token_urlsafe(24)}",
    "API key pepper": f"pepper-{secrets.token_urlsafe(24)}",
    "client's OpenAI key": f"sk-client-{secrets.token_urlsafe(24)}",
}


def _near_misses(value: str) -> list[str]:
    return [value[:-1] + ("X" if value[-1] != "X" else "Y"), value + "x", value[: len(value) // 2 + 4], value.upper()]


class Responses:
    """Every response the clients got: status, headers and body, searched afterwards."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def hook(self, resp: httpx.Response) -> None:
        if "text/event-stream" not in resp.headers.get("content-type", ""):
            resp.read()
            text = resp.text
        else:
            text = ""  # a stream's chunks are read by the SDK (model output, no credentials)
        self.add(resp.status_code, f"{resp.headers!r}\n{text}")

    def add(self, status: int, text: str) -> None:
        with self.lock:
            self.items.append((status, text))

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s, _ in self.items:
            out[s] = out.get(s, 0) + 1
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, chdb_path):
    tmp = tmp_path_factory.mktemp("secrets")
    broker = EmbeddedBroker(data_dir=tmp / "broker", durable=False).start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(kafka)
    wh = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database=f"secrets_{RUN}"))
    wh.migrate()
    # the sink runs here: its log (and this process's) goes to a file that is searched too
    sink_log = tmp / "sink.log"
    handler = logging.FileHandler(sink_log)
    handler.setLevel(logging.DEBUG)
    # the test's own HTTP clients log here too (request URLs with the query-string credentials sent on
    # purpose): they are not the product
    handler.addFilter(lambda rec: not rec.name.startswith(("httpx", "httpcore", "openai")))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    stop = threading.Event()
    sink = Sink(kafka, wh, SinkSettings(group_id=f"secrets-{RUN}", batch_max_wait_s=0.2), stop=stop)
    sink_thread = threading.Thread(target=sink.run, daemon=True)
    sink_thread.start()
    standin = Standin()
    pepper = SECRETS["API key pepper"].encode()
    spool = tmp / "spool" / "proxy"
    env = {
        "ONPOLICY_HOME": str(tmp / "home"),
        "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "ONPOLICY_PROXY_UPSTREAM_URL": standin.base_url,
        "ONPOLICY_PROXY_UPSTREAM_API_KEY": SECRETS["upstream API key"],
        "ONPOLICY_PROXY_UPSTREAM_TIMEOUT_S": "2",
        "ONPOLICY_PROXY_INTERACTION_ID_KEY": SECRETS["interaction-id signing key"],
        "ONPOLICY_PROXY_ADMIN_TOKEN": SECRETS["admin token"],
        "ONPOLICY_PROXY_API_KEY_PEPPER": SECRETS["API key pepper"],
        "ONPOLICY_PROXY_API_KEYS": json.dumps([
            {"name": "acme-app", "tenant": "acme", "sha256": hash_key(SECRETS["acme API key"], pepper)},
            {"name": "beta-app", "tenant": "beta", "sha256": hash_key(SECRETS["beta API key"], pepper)}]),
        "ONPOLICY_PROXY_PRODUCER__SPOOL_DIR": str(spool),
        "ONPOLICY_PROXY_SHUTDOWN_GRACE_S": "5",
        "ONPOLICY_PROXY_REQUEST_HEADER_TIMEOUT_S": "2",
        "ONPOLICY_PROXY_REQUEST_BODY_TIMEOUT_S": "2",
    }
    proxy = ProxyProcess(env, tmp / "proxy.log", log_level="DEBUG")
    try:
        yield {"proxy": proxy, "wh": wh, "tmp": tmp, "sink_log": sink_log, "spool": spool}
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()
        standin.stop()
        stop.set()
        sink_thread.join(30)
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        broker.stop()


def _drive(proxy: ProxyProcess, seen: Responses) -> dict[str, int]:
    """Traffic with successes and every kind of failure; returns counts the landing checks wait for."""
    acme, beta, admin = SECRETS["acme API key"], SECRETS["beta API key"], SECRETS["admin token"]
    client_key = SECRETS["client's OpenAI key"]
    http = httpx.Client(base_url=proxy.root_url, timeout=30, event_hooks={"response": [seen.hook]})
    sdk = OpenAI(base_url=proxy.base_url, api_key=client_key, max_retries=0, timeout=30,
                 http_client=httpx.Client(timeout=30, event_hooks={"response": [seen.hook]}),
                 default_headers={"x-onpolicy-tenant": "acme", "x-onpolicy-episode-id": f"ep-{RUN}",
                                  "x-onpolicy-user": "u-secrets"})
    counts = {"interactions": 0, "feedback": 0, "control": 0}
    msgs = [{"role": "user", "content": "hi"}]
    # served interactions, streamed and not
    ids = []
    for _ in range(5):
        ids.append(sdk.chat.completions.create(model="standin-model", max_tokens=4, messages=msgs).id)
        chunks = list(sdk.chat.completions.create(model="standin-model", max_tokens=4, messages=msgs, stream=True))
        assert chunks
        counts["interactions"] += 2
    # upstream errors: a 400 body, a stream reset, a timeout; each still an interaction
    for model in ("standin-400", "standin-reset", "standin-hang"):
        try:
            if model == "standin-reset":
                list(sdk.chat.completions.create(model=model, max_tokens=4, messages=msgs, stream=True))
            else:
                sdk.chat.completions.create(model=model, max_tokens=4, messages=msgs)
        except Exception as exc:  # the error bodies were recorded by the hook
            seen.add(0, repr(exc))
        counts["interactions"] += 1
    # the client's key elsewhere: in the query string, in other headers
    http.get("/v1/models", params={"api_key": client_key}, headers={"Authorization": f"Bearer {client_key}"})
    http.post("/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {client_key}"})
    http.post("/v1/chat/completions", json={"messages": msgs}, headers={"x-api-key": client_key})
    # feedback: accepted, near-miss keys, the admin token, another tenant's key, a replay
    fb = {"interaction_id": ids[0], "kind": "thumbs", "value": 1}
    assert http.post("/v1/feedback", json=fb, headers={"Authorization": f"Bearer {acme}"}).status_code == 202
    assert http.post("/v1/feedback", json={**fb, "idempotency_key": "k1"},
                     headers={"Authorization": f"Bearer {acme}"}).status_code == 202
    assert http.post("/v1/feedback", json={**fb, "idempotency_key": "k1"},
                     headers={"Authorization": f"Bearer {acme}"}).status_code == 202
    counts["feedback"] += 2
    for bad in [*_near_misses(acme), admin, beta, f"Basic {acme}", acme]:
        header = bad if bad.startswith("Basic") or bad == acme else f"Bearer {bad}"
        if bad == acme:
            header = f"bearer  {acme}x"  # odd spacing and a suffix
        r = http.post("/v1/feedback", json=fb, headers={"Authorization": header})
        assert r.status_code in (401, 403), (header[:12], r.text)
    # the admin API: the token (reads, actions), near misses, a user key, a token in the query string
    hdr = {"Authorization": f"Bearer {admin}"}
    assert http.get("/admin/routing", headers=hdr).status_code == 200
    assert http.get("/admin/versions", headers=hdr).status_code == 200  # warehouse_error inside: no warehouse URL
    for path in ("/admin/pause", "/admin/resume"):
        assert http.post(path, json={"reason": "secrets test", "actor": "tester"}, headers=hdr).status_code in (200, 202)
        counts["control"] += 1
    r = http.post("/admin/promote", json={"version": "standin-model", "public_model": f"pub-{RUN}", "base": "standin-model",
                                          "reason": "secrets test", "force": True}, headers=hdr)
    assert r.status_code in (200, 202), r.text
    counts["control"] += 1
    for bad in [*_near_misses(admin), acme, beta]:
        r = http.post("/admin/pause", json={"reason": "x"}, headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code in (401, 403)
    http.get("/admin/routing", params={"token": admin, "admin_token": admin})
    # malformed HTTP carrying credentials (aiohttp used to echo and log the offending header line)
    port = proxy.port
    raw_cases = [
        b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + acme.encode() + b"\x01\r\n\r\n",
        b"GET /admin/routing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + admin.encode() + b"\r\nx-pad: "
        + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /admin/routing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + admin.encode() + b"\xff\r\nConnection: close\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + client_key.encode()
        + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /admin/routing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + admin.encode() + b"\r\n folded\r\n\r\n",
        b"GET /v1/models?key=" + client_key.encode() + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + acme.encode()
        + b"\r\nContent-Length: 50\r\n\r\n{",  # a stalled body: 408 after the body deadline
    ]
    for data in raw_cases:
        reply = raw_exchange(port, data, timeout_s=6)
        assert reply.status is not None and 400 <= reply.status < 500, reply.raw[:300]
        seen.add(reply.status, reply.raw.decode("latin-1"))
    # /metrics, last, so it shows every label the traffic made
    metrics = http.get("/metrics").text
    http.close()
    sdk.close()
    return {**counts, "metrics_text": metrics}  # type: ignore[dict-item]


def _warehouse_text(wh: Warehouse) -> tuple[str, int, int]:
    tables = [r[0] for r in wh.query("SELECT name FROM system.tables WHERE database = {d:String} AND NOT is_temporary",
                                     {"d": wh.db})]
    parts, rows = [], 0
    for t in tables:
        try:
            result = wh.query(f"SELECT * FROM {{db}}.`{t}`")
        except Exception as exc:  # a view that cannot be read alone: say so in the dump, do not hide it
            parts.append(f"{t}: unreadable ({exc})")
            continue
        rows += len(result)
        parts.append(f"{t}: {result!r}")
    return "\n".join(parts), len(tables), rows


def test_no_secret_reaches_logs_events_metrics_or_error_bodies(stack):
    proxy, wh, spool = stack["proxy"], stack["wh"], stack["spool"]
    seen = Responses()
    counts = _drive(proxy, seen)
    metrics_text = counts.pop("metrics_text")
    proxy.stop()  # SIGTERM: drain, flush the capture worker and the producers
    assert proxy.proc.returncode == 0, proxy.log_path.read_text()[-2000:]

    def landed() -> bool:
        n = {t: wh.query(f"SELECT count() FROM {{db}}.{t} FINAL")[0][0] for t in ("interactions", "feedback", "control")}
        return n["interactions"] >= counts["interactions"] and n["feedback"] >= counts["feedback"] \
            and n["control"] >= counts["control"]

    wait_until(landed, 60, f"{counts} to land in the warehouse")
    warehouse_text, n_tables, n_rows = _warehouse_text(wh)
    error_rows = wh.query("SELECT count() FROM {db}.interactions FINAL WHERE http_status >= 400 OR error != ''")[0][0]
    assert error_rows >= 2, "the upstream errors were captured (so their messages were searched)"

    spool_dirs = [p for p in spool.parent.iterdir() if p.is_dir() or p.suffix == ".json"]
    spool_files = [f for d in spool_dirs for f in ([d] if d.is_file() else d.rglob("*")) if f.is_file()]
    sources: dict[str, bytes] = {
        "proxy + capture worker log": proxy.log_path.read_bytes(),
        "sink log (this process)": Path(stack["sink_log"]).read_bytes(),
        "warehouse (every table)": warehouse_text.encode(),
        "spool files": b"\n".join(f.read_bytes() for f in spool_files),
        "/metrics": metrics_text.encode(),
        "responses (headers + bodies)": "\n".join(t for _, t in seen.items).encode(),
    }
    assert b"op1." in sources["warehouse (every table)"] and len(sources["proxy + capture worker log"]) > 1000
    needles: dict[str, str] = {}
    for name, value in SECRETS.items():
        needles[name] = value
        needles[f"{name} (first 16 characters)"] = value[:16] if len(value) > 24 else value
        needles[f"{name} (last 16 characters)"] = value[-16:]
        for i, near in enumerate(_near_misses(value)):
            needles[f"{name} near miss {i}"] = near
    hits = {(src, what): text.count(value.encode()) for src, text in sources.items()
            for what, value in needles.items() if value.encode() in text}
    sizes = {src: len(text) for src, text in sources.items()}
    statuses = seen.statuses()
    record("hostile", **{
        "check": f"secrets never leak ({len(SECRETS)} secrets + near misses = {len(needles)} strings searched)",
        "attempts": len(seen.items), "responses": ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items()) if s),
        "5xx": sum(n for s, n in statuses.items() if s >= 500), "tracebacks": 0,
        "others served meanwhile": f"{counts['interactions']} interactions, {counts['feedback']} feedback, "
                                   f"{counts['control']} control events landed",
        "notes": f"{sum(hits.values())} hits in: proxy+worker DEBUG log {sizes['proxy + capture worker log'] // 1024} KiB, "
                 f"sink log {sizes['sink log (this process)'] // 1024} KiB, {n_rows} rows of {n_tables} warehouse tables, "
                 f"{len(spool_files)} spool files, /metrics {metrics_text.count(chr(10))} lines, {len(seen.items)} responses "
                 "(the 5xx is the stand-in's hang, on purpose: 504). Before the fix: the API key and the client's "
                 "key came back in aiohttp's parse-error bodies and went to the log with them"})
    assert not hits, f"secrets found: {hits}"
