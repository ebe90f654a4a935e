"""A batching consumer loop that commits offsets only after the batch's work is durable.

The commit order, which every consumer in onpolicy follows:

1. poll records until the batch is full (``batch_max_records``) or its oldest record has waited
   ``batch_max_wait_s``;
2. hand the whole batch to ``handle(batch)``, which must make its effects durable before it
   returns (insert into the warehouse, write a checkpoint, ...) and raise if it could not;
3. only then commit, for each partition, the offset after the last record of the batch.

If ``handle`` raises, nothing is committed: the consumer rewinds every assigned partition to its
last committed offset and retries the same records after a back-off (so a handler sees each record
*at least* once and must be idempotent -- the sink deduplicates by event id). A crash anywhere in
between has the same effect as a failure: the uncommitted batch is delivered again.

Subscribe to explicit topic names (a regex subscription joins the group twice on tansu). Offsets
start from the earliest record for a new group: end-offset based resets are wrong on tansu's S3
storage and a new sink must not skip history anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from streams.settings import KafkaSettings

log = logging.getLogger(__name__)

Batch = list  # list[kafka.consumer.fetcher.ConsumerRecord]


class BatchConsumer:
    def __init__(self, kafka: KafkaSettings, topics: Sequence[str], group_id: str, handle: Callable[[Batch], None], *,
                 batch_max_records: int = 5000, batch_max_wait_s: float = 0.5, stop: threading.Event | None = None,
                 max_backoff_s: float = 10.0, rejoin_after_s: float = 20.0):
        self.kafka = kafka
        self.topics = list(topics)
        self.group_id = group_id
        self.handle = handle
        self.batch_max_records = batch_max_records
        self.batch_max_wait_s = batch_max_wait_s
        self.stop = stop or threading.Event()
        self.max_backoff_s = max_backoff_s
        self.rejoin_after_s = rejoin_after_s
        self.rejoins = 0
        self.failing = False  # True while the handler keeps failing (exported as a metric by callers)
        self.batches = 0
        self.records = 0
        self.failures = 0
        self._consumer = None

    def _make_consumer(self):
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            bootstrap_servers=self.kafka.servers,
            client_id=f"{self.kafka.client_id}-{self.group_id}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=min(self.batch_max_records, 5000),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            # A slow handler (a warehouse outage) must not get this member kicked out of the group.
            max_poll_interval_ms=600_000,
            # A killed member's partitions move to a restarted one after this long (Kafka's minimum
            # is group.min.session.timeout.ms = 6 s).
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            # kafka-python backs off reconnects exponentially up to 30 s by default: after a 30 s broker
            # outage the sink then sat idle ~27 s after the broker was back (chaos suite). Retry each second.
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=1000,
        )
        consumer.subscribe(self.topics)
        return consumer

    def run(self) -> None:
        """Loop until ``stop`` is set. Commits after every durable batch."""
        from kafka.structs import OffsetAndMetadata

        consumer = self._consumer = self._make_consumer()
        backoff = 0.2
        unassigned_since: float | None = None
        try:
            while not self.stop.is_set():
                # Watchdog: a member that has had no partitions for a long time is stuck in a
                # rebalance (seen after a broker restart that forgot the group); start afresh. No
                # offsets are lost: nothing uncommitted is held across this point.
                if consumer.assignment():
                    unassigned_since = None
                elif unassigned_since is None:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > self.rejoin_after_s:
                    log.warning("%s: no partitions assigned for %.0fs; reconnecting to the group", self.group_id,
                                self.rejoin_after_s)
                    try:
                        consumer.close(autocommit=False)
                    except Exception:
                        pass
                    consumer = self._consumer = self._make_consumer()
                    unassigned_since = None
                    self.rejoins += 1
                batch: Batch = []
                started = None
                while not self.stop.is_set() and len(batch) < self.batch_max_records:
                    if started is None:
                        timeout_ms = 200
                    else:
                        remaining = self.batch_max_wait_s - (time.monotonic() - started)
                        if remaining <= 0:
                            break
                        timeout_ms = max(1, int(remaining * 1000))
                    polled = consumer.poll(timeout_ms=timeout_ms, max_records=self.batch_max_records - len(batch))
                    for records in polled.values():
                        if records and started is None:
                            started = time.monotonic()
                        batch.extend(records)
                if not batch:
                    continue
                try:
                    self.handle(batch)
                except Exception as exc:  # not durable: do not commit; rewind and retry
                    self.failures += 1
                    self.failing = True
                    log.error("%s: batch of %d records failed (%s: %s); not committing, retrying in %.1fs",
                              self.group_id, len(batch), type(exc).__name__, exc, backoff)
                    self._rewind(consumer, batch)
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                offsets: dict = {}
                for rec in batch:
                    tp = (rec.topic, rec.partition)
                    if tp not in offsets or rec.offset + 1 > offsets[tp]:
                        offsets[tp] = rec.offset + 1
                from kafka import TopicPartition

                try:
                    consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
                except Exception as exc:
                    # The work is durable; a lost commit only means redelivery after a restart, which is
                    # deduplicated, and the next batch's commit covers these offsets too. No rewind: it
                    # would need the broker that just failed (asking it for committed offsets while it
                    # was down killed the sink in the chaos suite).
                    log.warning("%s: commit failed (%s); the batch may be delivered again", self.group_id, exc)
                self.failing = False
                backoff = 0.2
                self.batches += 1
                self.records += len(batch)
        finally:
            try:
                self._consumer.close(autocommit=False)
            except Exception:
                pass

    @staticmethod
    def _rewind(consumer, batch: Batch) -> None:
        """Seek back to the first record of ``batch`` in each of its partitions, so the same records
        come again. Local: it needs no broker (every record polled since the last commit is in the
        batch, so that is exactly the position before it). A partition no longer assigned (a
        rebalance) is skipped: its next owner starts from the committed offset."""
        from kafka import TopicPartition

        first: dict[tuple[str, int], int] = {}
        for rec in batch:
            key = (rec.topic, rec.partition)
            if key not in first or rec.offset < first[key]:
                first[key] = rec.offset
        assigned = consumer.assignment()
        for (topic, partition), offset in first.items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:
                consumer.seek(tp, offset)
