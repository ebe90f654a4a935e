"""EventProducer with each Kafka client (confluent: librdkafka, the default; kafka-python) against a
real Kafka-protocol broker: every record delivered, the same partition for a key whichever client
wrote it, a record the broker can never take set aside without blocking the ones after it, and a
broker that is down at start waited for."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from streams.embedded import EmbeddedBroker, free_port
from streams.kafka_admin import ensure_topics
from streams.producer import EventProducer, _key_partitioner
from streams.settings import KafkaSettings, ProducerSettings
from streams.topics import INTERACTIONS

CLIENTS = ("confluent", "kafka-python")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker"), durable=False).start()
    ensure_topics(KafkaSettings(bootstrap_servers=b.bootstrap_servers))
    yield b
    b.stop()


def _records(bootstrap: str, marker: bytes) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of every record in the interactions topic whose value has ``marker``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    parts = [TopicPartition(INTERACTIONS.name, p) for p in range(INTERACTIONS.partitions)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out = [(m.partition, m.key, m.value) for m in consumer if marker in m.value]
    consumer.close()
    return out


def _producer(tmp_path, bootstrap: str, client: str, **kw) -> EventProducer:
    return EventProducer(KafkaSettings(bootstrap_servers=bootstrap),
                         ProducerSettings(spool_dir=tmp_path / f"spool-{client}", linger_ms=5, client=client, **kw))


class _Partitions:
    def partitions_for_topic(self, topic):
        return set(range(INTERACTIONS.partitions))


@pytest.mark.parametrize("client", CLIENTS)
def test_every_record_lands_once_on_the_key_partition_of_kafka_python(tmp_path, broker, client):
    producer = _producer(tmp_path, broker.bootstrap_servers, client)
    marker = f"m-{client}-{time.time_ns()}".encode()
    sent = {f"ep-{i % 37}-{client}".encode(): [] for i in range(37)}
    for i in range(600):
        key = f"ep-{i % 37}-{client}".encode()
        value = b'{"n":%d,"marker":"%s"}' % (i, marker)
        sent[key].append(value)
        assert producer.emit_raw(INTERACTIONS.name, key, value)
    assert producer.flush(30), "not every record was acknowledged within 30 s"
    producer.close()
    got = _records(broker.bootstrap_servers, marker)
    assert sorted(v for _, _, v in got) == sorted(v for vs in sent.values() for v in vs)  # all, once (no failure here)
    part = _key_partitioner()
    for p, key, _ in got:
        assert p == part.partition(INTERACTIONS.name, key, key, None, None, _Partitions()), key
    assert producer.sent == 600 and producer.send_failures == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_too_large_for_the_broker_is_set_aside_and_the_rest_flows(tmp_path, broker, client):
    producer = _producer(tmp_path, broker.bootstrap_servers, client)
    marker = f"big-{client}-{time.time_ns()}".encode()
    assert producer.emit_raw(INTERACTIONS.name, b"k", b'{"marker":"%s","x":"%s"}' % (marker, b"x" * 3_000_000))
    assert producer.emit_raw(INTERACTIONS.name, b"k", b'{"marker":"%s","after":1}' % marker)
    assert producer.flush(30), "a record the broker refuses for good must not block the ones after it"
    producer.close()
    assert producer.rejected == 1
    assert list((tmp_path / f"spool-{client}" / "rejected").iterdir()), "the refused record is kept for an operator"
    assert [v for _, _, v in _records(broker.bootstrap_servers, marker)] == [b'{"marker":"%s","after":1}' % marker]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_broker_down_at_start_is_waited_for(tmp_path, client):
    port = free_port()
    producer = _producer(tmp_path, f"127.0.0.1:{port}", client)
    marker = f"late-{client}-{time.time_ns()}".encode()
    for i in range(50):
        assert producer.emit_raw(INTERACTIONS.name, b"k%d" % i, b'{"i":%d,"marker":"%s"}' % (i, marker))
    time.sleep(1.5)
    assert not producer.connected and producer.sent == 0 and producer.spooled == 50
    b = EmbeddedBroker(data_dir=tmp_path / "late-broker", durable=False, port=port).start()
    try:
        ensure_topics(KafkaSettings(bootstrap_servers=b.bootstrap_servers))
        assert producer.flush(60), "the spooled records were not delivered once the broker came up"
        producer.close()
        assert len(_records(b.bootstrap_servers, marker)) >= 50
        assert producer.connected
    finally:
        b.stop()


def test_a_failed_librdkafka_connect_leaves_no_client_running(tmp_path):
    """While the broker is down at start the sender tries to connect every few seconds; each failed
    try must not leave a librdkafka instance (its threads, reconnecting and logging) behind."""
    import os

    from streams.producer import _ConfluentClient

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    with pytest.raises(ConnectionError):  # the first one loads the library's own long-lived threads
        _ConfluentClient(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"), ProducerSettings(spool_dir=tmp_path))
    time.sleep(0.5)
    before = threads()
    for _ in range(4):
        with pytest.raises(ConnectionError):
            _ConfluentClient(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"), ProducerSettings(spool_dir=tmp_path))
    time.sleep(0.5)
    assert threads() <= before + 1, f"threads {before} -> {threads()}: failed clients are still running"


@pytest.mark.parametrize("client", CLIENTS)
def test_close_with_the_broker_gone_stops_the_client_and_keeps_the_rest_in_the_spool(tmp_path, client):
    """The broker goes away with records in flight: ``close`` returns within its time, the client's
    threads are gone (the librdkafka instance used to outlive close, reconnecting and logging until
    the process exited), and what was not delivered is still in the spool for the next start."""
    import gc
    import os

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    b = EmbeddedBroker(data_dir=tmp_path / "gone-broker", durable=False).start()
    try:
        ensure_topics(KafkaSettings(bootstrap_servers=b.bootstrap_servers))
        before = threads()
        producer = _producer(tmp_path, b.bootstrap_servers, client)
        for i in range(20):
            assert producer.emit_raw(INTERACTIONS.name, b"k%d" % i, b'{"i":%d}' % i)
        assert producer.flush(30)
    finally:
        b.stop()
    for i in range(20):
        assert producer.emit_raw(INTERACTIONS.name, b"k%d" % i, b'{"late":%d}' % i)
    time.sleep(0.5)
    t0 = time.monotonic()
    producer.close(2)
    assert time.monotonic() - t0 < 10
    del producer
    gc.collect()
    time.sleep(0.5)
    # librdkafka: +1, the first client in a process may start the library's own long-lived thread
    slack = 1 if client == "confluent" else 0
    assert threads() <= before + slack, f"threads {before} -> {threads()}: the closed client is still running"
    again = _producer(tmp_path, f"127.0.0.1:{free_port()}", client)
    try:
        assert again.backlog_bytes > 0, "the undelivered records were not kept in the spool"
    finally:
        again.close(0.5)
