"""Producer -> real broker (tansu) -> sink -> real warehouse (chdb), and the faults around it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
from kafka import KafkaProducer

from streams.embedded import EmbeddedBroker, free_port
from streams.events import InteractionEvent
from streams.kafka_admin import ensure_topics
from streams.producer import EventProducer
from streams.settings import KafkaSettings, ProducerSettings, SinkSettings
from streams.sink import Sink
from streams.topics import INTERACTIONS

from .helpers import REPO, onpolicy_env, query_other_warehouse, wait_until


def make_event(tag: str, i: int) -> InteractionEvent:
    return InteractionEvent(interaction_id=f"{tag}-{i}", endpoint="/v1/chat/completions", public_model=tag,
                            request={"messages": [{"role": "user", "content": "x" * 1500 + str(i)}]})


class RunningSink:
    def __init__(self, kafka, warehouse, group):
        self.stop = threading.Event()
        self.sink = Sink(kafka, warehouse, SinkSettings(group_id=group, batch_max_wait_s=0.2), stop=self.stop)
        self.thread = threading.Thread(target=self.sink.run, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(30)


def landed(warehouse, tag: str) -> tuple[int, int]:
    final, distinct = warehouse.query(
        "SELECT count(), uniqExact(event_id) FROM {db}.interactions FINAL WHERE public_model = %(t)s", {"t": tag})[0]
    return int(final), int(distinct)


def test_events_land_exactly_once(kafka, warehouse, unique_group, tmp_path):
    tag = f"m-{uuid.uuid4().hex[:8]}"
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    sink = RunningSink(kafka, warehouse, unique_group)
    try:
        for i in range(3000):
            assert producer.emit(make_event(tag, i))
        assert producer.flush(60)
        wait_until(lambda: landed(warehouse, tag)[0] >= 3000, 60, "3000 events to land")
        assert landed(warehouse, tag) == (3000, 3000)
        assert producer.stats()["dropped"] == 0
    finally:
        sink.close()
        producer.close()


@pytest.fixture
def private_kafka(tmp_path):
    """A broker of this test's own: its topics hold only what this test writes."""
    broker = EmbeddedBroker(data_dir=tmp_path / "private-broker", durable=False).start()
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(settings)
    yield settings
    broker.stop()


def test_bad_payloads_go_to_dead_letters_and_the_sink_keeps_going(private_kafka, warehouse, unique_group, tmp_path):
    # Garbage goes to a private broker: other tests read the shared topics and must not see it.
    kafka = private_kafka
    tag = f"m-{uuid.uuid4().hex[:8]}"
    raw = KafkaProducer(bootstrap_servers=kafka.servers)
    raw.send(INTERACTIONS.name, key=tag.encode(), value=b"{not json")
    raw.send(INTERACTIONS.name, key=tag.encode(), value=b'{"event_type": "interaction", "schema_version": 7, "tag": "%s"}' % tag.encode())
    raw.flush()
    raw.close()
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    sink = RunningSink(kafka, warehouse, unique_group)
    try:
        for i in range(10):
            producer.emit(make_event(tag, i))
        wait_until(lambda: landed(warehouse, tag)[0] == 10, 60, "good events after bad ones")
        reasons = [r[0] for r in warehouse.query(
            "SELECT reason FROM {db}.dead_letters FINAL WHERE payload LIKE %(p)s OR payload = '{not json'",
            {"p": f"%{tag}%"})]
        assert any("not JSON" in r for r in reasons)
        assert any("newer than this code" in r for r in reasons)
    finally:
        sink.close()
        producer.close()


@pytest.mark.slow
def test_broker_down_30s_under_steady_stream_loses_nothing(warehouse, unique_group, tmp_path):
    """The broker stops for 30 s (its store keeps the log) while events keep coming at ~200/s."""
    broker = EmbeddedBroker(data_dir=tmp_path / "broker", durable=True).start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(kafka)
    tag = f"m-{uuid.uuid4().hex[:8]}"
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool", delivery_timeout_ms=5000))
    sink = RunningSink(kafka, warehouse, unique_group)
    accepted = 0
    emit_times = []
    try:
        def emit_for(seconds: float):
            nonlocal accepted
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                assert producer.emit(make_event(tag, accepted))
                emit_times.append(time.perf_counter() - t0)
                accepted += 1
                time.sleep(0.005)

        emit_for(3)
        broker.stop_broker_only()
        emit_for(30)
        assert producer.stats()["backlog_bytes"] > 0, "events must wait in the spool while the broker is down"
        broker.start()
        emit_for(3)
        assert producer.flush(120), producer.stats()
        wait_until(lambda: landed(warehouse, tag)[0] >= accepted, 120, f"{accepted} events after the outage")
        assert landed(warehouse, tag) == (accepted, accepted)
        emit_times.sort()
        assert emit_times[len(emit_times) // 2] < 0.001, "emit() must not block while the broker is down"
    finally:
        sink.close()
        producer.close()
        broker.stop()


PRODUCER_SCRIPT = """
import sys, time
from streams.events import InteractionEvent
from streams.producer import EventProducer
from streams.settings import KafkaSettings, ProducerSettings
tag, spool = sys.argv[1], sys.argv[2]
p = EventProducer(KafkaSettings(), ProducerSettings(spool_dir=spool))
i = 0
while True:
    e = InteractionEvent(interaction_id=f"{tag}-{i}", endpoint="/v1/chat/completions", public_model=tag,
                         request={"messages": [{"role": "user", "content": "y" * 1500}]})
    if p.emit(e):
        sys.stdout.write(e.event_id + "\\n")
        sys.stdout.flush()
    i += 1
    if i >= 30000:  # faster than the sender can ship: a backlog builds up in the spool
        time.sleep(3600)
"""


def test_sigkill_of_the_producing_process_loses_nothing_it_accepted(kafka, warehouse, unique_group, tmp_path):
    tag = f"m-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    env = onpolicy_env(ONPOLICY_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers)
    accepted_log = tmp_path / "accepted.txt"
    with open(accepted_log, "w") as out:  # a file, not a pipe: a full pipe would block the producer
        proc = subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT, tag, str(spool)], stdout=out, cwd=REPO, env=env)
        # Kill it mid-stream, once it has accepted a good number of events (however slow the machine).
        wait_until(lambda: accepted_log.stat().st_size > 3000 * 37, 120, "the producer to accept 3000 events",
                   interval_s=0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    accepted = [line for line in accepted_log.read_text().splitlines() if len(line) == 36]
    assert len(accepted) > 500
    # A new process on the same spool replays what the killed one had not delivered.
    producer = EventProducer(kafka, ProducerSettings(spool_dir=spool))
    sink = RunningSink(kafka, warehouse, unique_group)
    try:
        assert producer.flush(90)
        assert producer.stats()["replayed"] > 0, "the kill left nothing to replay: the test proves nothing"
        wait_until(lambda: landed(warehouse, tag)[0] >= len(accepted), 90, "accepted events to land")
        ids = {r[0] for r in warehouse.query(
            "SELECT event_id FROM {db}.interactions FINAL WHERE public_model = %(t)s", {"t": tag})}
        missing = set(accepted) - ids
        assert not missing, f"{len(missing)} accepted events lost"
        final, distinct = landed(warehouse, tag)
        assert final == distinct
    finally:
        sink.close()
        producer.close()


def test_sigkill_of_the_sink_mid_batch_loses_and_duplicates_nothing(private_kafka, tmp_path):
    # A private broker, so the sink's landed-count metric counts only this test's events.
    kafka = private_kafka
    tag = f"m-{uuid.uuid4().hex[:8]}"
    n = 12000
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    for i in range(n):
        producer.emit(make_event(tag, i))
    assert producer.flush(120)
    producer.close()
    path = tmp_path / "warehouse"
    group = f"sink-{tag}"
    env = onpolicy_env(ONPOLICY_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, ONPOLICY_WAREHOUSE_URL=f"chdb://{path}",
                       ONPOLICY_WAREHOUSE_DATABASE="sinktest", ONPOLICY_SINK_GROUP_ID=group,
                       ONPOLICY_SINK_BATCH_MAX_RECORDS="1500")
    log = open(tmp_path / "sink.log", "ab")
    port = free_port()
    argv = [sys.executable, "-m", "deploy.cli", "sink", "--metrics-port", str(port)]
    sink = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)
    # Kill it while it is landing: some batches are in, the next one is on its way.
    wait_until(lambda: 0 < landed_by_metrics(port) < n, 120, "the sink to land its first batches", interval_s=0.05)
    sink.send_signal(signal.SIGKILL)
    sink.wait()
    partial = query_other_warehouse(path, "sinktest",
                                    f"SELECT count() FROM {{db}}.interactions WHERE public_model = '{tag}'")[0][0]
    assert 0 < partial < n
    sink = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: landed_by_metrics(port) + partial >= n, 120, "the restarted sink to catch up")
    finally:
        sink.send_signal(signal.SIGTERM)  # a clean stop commits and releases the warehouse
        sink.wait(60)
    final, distinct, raw = query_other_warehouse(
        path, "sinktest",
        f"SELECT count(), uniqExact(event_id), (SELECT count() FROM {{db}}.interactions) FROM {{db}}.interactions FINAL "
        f"WHERE public_model = '{tag}'")[0]
    assert (final, distinct) == (n, n), f"landed {final} rows, {distinct} distinct, of {n} (after a kill at {partial})"


def landed_by_metrics(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return 0
    m = re.search(r'^onpolicy_sink_events_landed_total\{table="interactions"\} ([0-9.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def test_wrong_broker_address_is_one_clear_line(tmp_path):
    env = onpolicy_env(ONPOLICY_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", ONPOLICY_WAREHOUSE_URL=f"chdb://{tmp_path / 'w'}")
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "sink"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in out.stderr and "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS" in out.stderr


@pytest.mark.parametrize("env, message", [
    ({"ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": "kafka"}, "not host:port"),
    ({"ONPOLICY_WAREHOUSE_URL": "chdb://relative/path"}, "must be absolute"),
    ({"ONPOLICY_WAREHOUSE_URL": "postgres://x"}, "must start with chdb:///"),
])
def test_bad_settings_are_one_clear_line(env, message):
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "sink"], cwd=REPO, env=onpolicy_env(**env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_record_the_broker_refuses_for_good_does_not_block_the_rest(kafka, tmp_path):
    """Too large for Kafka: kept aside and counted; the events after it are still delivered."""
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    try:
        tag = f"m-{uuid.uuid4().hex[:8]}"
        huge = InteractionEvent(interaction_id=f"{tag}-huge", endpoint="/v1/chat/completions", public_model=tag,
                                request={"messages": [{"role": "user", "content": "z" * 3_000_000}]})
        assert producer.emit(huge)
        for i in range(20):
            assert producer.emit(make_event(tag, i))
        assert producer.flush(60), producer.stats()
        stats = producer.stats()
        assert stats["rejected"] == 1 and stats["sent"] == 20
        assert len(list((tmp_path / "spool" / "rejected").iterdir())) == 1
    finally:
        producer.close()
