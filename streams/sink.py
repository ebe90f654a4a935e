"""The sink: Kafka -> ClickHouse, at least once in, exactly once landed.

Delivery is at least once end to end (the producer resends from its spool after a failure, and
this consumer re-reads an uncommitted batch after a crash), so the same event can arrive more than
once. Each event is landed exactly once by **deduplicating on ``event_id`` in the table engine**:
the event tables are ``ReplacingMergeTree ORDER BY event_id``, a redelivered event has the same
``event_id`` and identical columns, merges keep one row, and every reader uses ``FINAL`` (or
``argMax``) so it sees one row even before a merge.

Why not insert deduplication tokens: they deduplicate identical *blocks*, and after a crash the
re-read batch is cut at different boundaries (and a producer resend interleaves differently), so
the same event arrives in a different block and is not caught; they also do not cover a resend
by the producer. Deduplication by key catches every case. Cost: ``FINAL`` reads merge at query
time; measured in bench/capture.py.

Commit order (see ``streams.consumer``): decode -> dead letters durable (topic acked + table) ->
insert events (durable when the insert returns) -> commit offsets. A failure before the commit
means the batch is read again.
"""

from __future__ import annotations

import logging
import threading
import time

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.consumer import BatchConsumer
from streams.events import EventDecodeError, decode
from streams.settings import KafkaSettings, SinkSettings
from streams.topics import CONTROL, DEADLETTER, FEEDBACK, INTERACTIONS, TALLIES
from streams.warehouse import Warehouse

log = logging.getLogger(__name__)

SINK_TOPICS = (INTERACTIONS.name, FEEDBACK.name, CONTROL.name, TALLIES.name)


class Sink:
    def __init__(self, kafka: KafkaSettings, warehouse: Warehouse, settings: SinkSettings | None = None,
                 stop: threading.Event | None = None):
        self.kafka = kafka
        self.warehouse = warehouse
        self.settings = settings or SinkSettings()
        self.stop = stop or threading.Event()
        self.landed = {"interactions": 0, "feedback": 0, "control": 0, "tallies": 0}
        self.dead_letters = 0
        self.last_batch_s = 0.0
        self._dlq_producer = None
        self.consumer = BatchConsumer(kafka, SINK_TOPICS, self.settings.group_id, self.handle,
                                      batch_max_records=self.settings.batch_max_records,
                                      batch_max_wait_s=self.settings.batch_max_wait_s, stop=self.stop)

    def handle(self, batch) -> None:
        """Land one batch durably; raise if any part could not be made durable."""
        started = time.perf_counter()
        events, dead = [], []
        for rec in batch:
            try:
                events.append((decode(rec.value), (rec.topic, rec.partition, rec.offset)))
            except EventDecodeError as exc:
                dead.append((rec.topic, rec.partition, rec.offset, exc.reason,
                             (rec.value or b"").decode("utf-8", errors="replace")))
        if dead:
            self._dead_letter(dead)
        counts = self.warehouse.insert_events(events)
        for table, n in counts.items():
            self.landed[table] = self.landed.get(table, 0) + n
        self.dead_letters += len(dead)
        self.last_batch_s = time.perf_counter() - started

    def _dead_letter(self, dead) -> None:
        from kafka import KafkaProducer

        if self._dlq_producer is None:
            self._dlq_producer = KafkaProducer(bootstrap_servers=self.kafka.servers, acks="all",
                                               enable_idempotence=False, client_id=f"{self.kafka.client_id}-sink-dlq")
        futures = []
        for topic, partition, offset, reason, payload in dead:
            log.warning("dead letter %s[%d]@%d: %s", topic, partition, offset, reason)
            body = orjson.dumps({"topic": topic, "partition": partition, "offset": offset, "reason": reason,
                                 "payload": payload})
            futures.append(self._dlq_producer.send(DEADLETTER.name, key=f"{topic}:{partition}:{offset}".encode(),
                                                   value=body))
        for f in futures:
            f.get(timeout=30)  # durable on the broker before we commit past these records
        self.warehouse.insert_dead_letters(dead)

    def run(self) -> None:
        log.info("sink: %s -> %s (database %s)", ",".join(SINK_TOPICS), self.warehouse.settings.url, self.warehouse.db)
        try:
            self.consumer.run()
        finally:
            if self._dlq_producer is not None:
                self._dlq_producer.close(timeout=5)


class SinkCollector(Collector):
    def __init__(self, sink: Sink):
        self.sink = sink

    def collect(self):
        c = CounterMetricFamily("onpolicy_sink_events_landed", "Events inserted into the warehouse.", labels=["table"])
        for table, n in self.sink.landed.items():
            c.add_metric([table], n)
        yield c
        c = CounterMetricFamily("onpolicy_sink_dead_letters", "Records sent to the dead-letter topic.")
        c.add_metric([], self.sink.dead_letters)
        yield c
        c = CounterMetricFamily("onpolicy_sink_batch_failures", "Batches that could not be landed (retried).")
        c.add_metric([], self.sink.consumer.failures)
        yield c
        g = GaugeMetricFamily("onpolicy_sink_failing", "1 while the sink cannot land batches (offsets not committed).")
        g.add_metric([], 1 if self.sink.consumer.failing else 0)
        yield g
        g = GaugeMetricFamily("onpolicy_sink_last_batch_seconds", "Time to land the last batch.")
        g.add_metric([], self.sink.last_batch_s)
        yield g
