"""Faults vLLM cannot be made to produce on demand, against bench/standin_upstream.py -- a STAND-IN
for vLLM's wire format (not vLLM): a slow stream, a connection reset mid-stream, an upstream that
never answers. Also: graceful shutdown drains a stream in flight, and a killed capture worker is
replaced without failing requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from proxy.settings import ProxySettings
from proxy.testing import RunningProxy, free_port
from streams.producer import EventProducer  # noqa: F401  (the real producer type the collector stands in for)
from streams.settings import ProducerSettings

REPO = Path(__file__).resolve().parents[2]
KEY = "faults-test-key-0123456789abcdef"
MSGS = [{"role": "user", "content": "hi"}]


class Collector:
    """Keeps the events a proxy emits (the fault tests look at what was captured, not at Kafka)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def emit(self, event) -> bool:
        with self.lock:
            self.events.append(event)
        return True

    def wait_for(self, iid: str, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                found = [e for e in self.events if e.interaction_id == iid]
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no event for {iid}")


@pytest.fixture(scope="module")
def standin():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "standin_upstream.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "stand-in upstream did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(5)


def _proxy(upstream: str, collector: Collector, **overrides) -> RunningProxy:
    settings = ProxySettings(upstream_url=upstream, follow_control=False, interaction_id_key=KEY, capture_mode="inline",
                             **overrides)
    return RunningProxy(settings, producer=collector).start()


@pytest.fixture(scope="module")
def collector():
    return Collector()


@pytest.fixture(scope="module")
def proxy(standin, collector):
    running = _proxy(standin, collector, upstream_timeout_s=1.5, upstream_read_timeout_s=1.0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(proxy):
    return OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)


def test_slow_stream_is_relayed_chunk_by_chunk(client, collector):
    t0 = time.monotonic()
    arrivals = []
    iid = None
    for chunk in client.chat.completions.create(model="standin-slow", messages=MSGS, stream=True):
        arrivals.append(time.monotonic() - t0)
        iid = chunk.id
    # 8 chunks 50 ms apart: the first reaches the client long before the last is sent
    assert len(arrivals) == 8
    assert arrivals[0] < 0.2 and arrivals[-1] > 0.3
    ev = collector.wait_for(iid)
    assert ev.latency_first_token_ms < 200 and ev.latency_total_ms > 300
    assert ev.response["choices"][0]["message"]["content"].startswith("tok1 tok2")
    assert not ev.abandoned and ev.error is None


def test_reset_mid_stream_raises_in_sdk_and_is_captured(client, collector):
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="standin-reset", messages=MSGS, stream=True):
            seen.append(chunk.id)
    assert "broke off" in str(info.value)
    ev = collector.wait_for(seen[0])
    assert ev.error and "broke off" in ev.error and ev.stream
    assert ev.response["choices"][0]["message"]["content"] == "tok1 tok2 "  # what had been sent


def test_upstream_that_never_answers_is_504(client, proxy):
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="standin-hang", messages=MSGS, stream=stream)
        assert info.value.status_code == 504
        assert info.value.body["code"] == "upstream_timeout"


def test_upstream_4xx_body_unchanged(client, standin):
    import httpx

    direct = httpx.post(standin + "/chat/completions", json={"model": "standin-400", "messages": MSGS})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="standin-400", messages=MSGS)
    assert info.value.response.content == direct.content


def test_graceful_shutdown_drains_streams_in_flight(standin):
    collector = Collector()
    running = _proxy(standin, collector, shutdown_grace_s=10)
    client = OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
    got: list[str] = []
    errors: list[BaseException] = []

    def consume():
        try:
            for chunk in client.chat.completions.create(model="standin-slow", messages=MSGS, stream=True):
                got.append(chunk.choices[0].delta.content or "")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    while not got:
        time.sleep(0.01)
    running.stop()  # SIGTERM's path: stop accepting, wait for in-flight requests, clean up
    t.join(10)
    assert not errors and len(got) == 8  # the stream finished in full
    assert len(collector.events) == 1 and not collector.events[0].abandoned


def test_killed_capture_worker_is_replaced(standin, kafka, tmp_path):
    settings = ProxySettings(upstream_url=standin, follow_control=False, interaction_id_key=KEY, kafka=kafka,
                             capture_mode="process", producer=ProducerSettings(spool_dir=tmp_path / "spool"))
    running = RunningProxy(settings).start()
    try:
        client = OpenAI(base_url=running.base_url, api_key="unused", max_retries=0)
        worker = running.state.capture
        client.chat.completions.create(model="standin-model", messages=MSGS)
        first_pid = worker._proc.pid
        os.kill(first_pid, signal.SIGKILL)
        worker._proc.wait(5)
        for _ in range(20):  # every request still succeeds; the proxy notices the dead pipe and restarts it
            client.chat.completions.create(model="standin-model", messages=MSGS)
        assert worker.restarts == 1
        deadline = time.monotonic() + 20
        while worker._proc.pid == first_pid:  # it died right after starting: the restart is backed off
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while worker.worker_stats().get("pid") != worker._proc.pid or worker.worker_stats().get("accepted", 0) < 19:
            assert time.monotonic() < deadline, worker.worker_stats()
            time.sleep(0.1)
    finally:
        running.stop()


def _child_pid(parent: int, needle: str, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[1]) == parent and needle in cmd:
                return int(entry)
        time.sleep(0.05)
    raise AssertionError(f"no child {needle} of {parent}")


def test_sigkill_of_the_proxy_loses_no_event_it_handed_over(standin, kafka, tmp_path):
    """The capture worker outlives a SIGKILLed proxy: it drains the pipe, emits, flushes, exits."""
    import httpx
    from kafka import KafkaConsumer, TopicPartition

    from streams.events import decode
    from streams.topics import INTERACTIONS

    port = free_port()
    env = {**os.environ, "ONPOLICY_HOME": str(tmp_path), "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "ONPOLICY_PROXY_INTERACTION_ID_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port", str(port),
                             "--upstream-url", standin, "--no-follow-control"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
                time.sleep(0.1)
        worker = _child_pid(proc.pid, "proxy.capture_worker")
        os.kill(worker, signal.SIGSTOP)  # frames now pile up in the pipe, unread
        iids = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=10) as http:
            for i in range(50):
                r = http.post("/chat/completions", json={"model": "standin-model", "messages": MSGS, "stream": i % 2 == 0})
                assert r.status_code == 200
                iids.add(r.headers["x-onpolicy-interaction-id"])
        time.sleep(0.05)  # the hand-over runs on the loop iteration after the response
        proc.kill()
        proc.wait(5)
        os.kill(worker, signal.SIGCONT)  # the proxy is gone; the worker must still emit every frame
    finally:
        if proc.poll() is None:
            proc.kill()
        if worker is not None:
            os.kill(worker, signal.SIGCONT)  # never leave a stopped worker behind, whatever failed
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    tps = [TopicPartition(INTERACTIONS.name, p) for p in range(INTERACTIONS.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    found: dict[str, set[str]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(found) < len(iids):
        for records in consumer.poll(timeout_ms=300).values():
            for rec in records:
                ev = decode(rec.value)
                if getattr(ev, "interaction_id", None) in iids:
                    found.setdefault(ev.interaction_id, set()).add(ev.event_id)
    consumer.close()
    assert set(found) == iids, f"{len(iids) - len(found)} events lost"
    assert all(len(v) == 1 for v in found.values())


def test_readyz_follows_the_upstream(standin, collector):
    """Ready while the upstream answers; 503 naming the problem while it does not; ready again after."""
    port = free_port()
    upstream = f"http://127.0.0.1:{port}/v1"
    running = _proxy(upstream, collector)
    try:
        http = httpx.Client(base_url=running.root_url, timeout=5)

        def ready() -> httpx.Response:
            return http.get("/readyz")

        deadline = time.monotonic() + 15
        while "not probed" in ready().text and time.monotonic() < deadline:
            time.sleep(0.2)
        down = ready()
        assert down.status_code == 503 and "cannot connect" in down.json()["upstream"]
        proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "standin_upstream.py"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while ready().status_code != 200:
                assert time.monotonic() < deadline, ready().text
                time.sleep(0.2)
            assert ready().json()["upstream"] == "ok"
        finally:
            proc.terminate()
            proc.wait(5)
    finally:
        running.stop()
