"""The request-path producer: ``emit()`` never blocks on the broker and never fails the caller.

Flow: ``emit(event)`` serializes the event and appends it to the write-ahead spool (one
``write(2)``, a few microseconds) and returns. A sender thread reads the spool in order and sends
to Kafka with ``acks=all`` (through librdkafka by default, or kafka-python: ``ProducerSettings.client``); once the broker has acknowledged every record up to a point, the spool
is trimmed to that point. When the broker is slow or down, records simply wait in the spool; when
a send fails, the sender rewinds to the first unacknowledged record and sends again from there, in
order. A record may therefore reach Kafka more than once (after a failure or a crash between
"delivered" and "trimmed"); the sink deduplicates by ``event_id``, so each event lands once.

What ``emit()`` returning True promises: the event is in the spool file (it survives SIGKILL of
this process; power loss within ``fsync_interval_s``), or -- only while the disk budget is exhausted
or the disk is failing -- in a bounded in-memory overflow (lost on SIGKILL; counted in
``overflowed``). False means both budgets were exhausted: the event was dropped and counted.

Events are keyed by episode id when there is one (so an episode's events stay ordered in one
partition), else by interaction id, else by event id.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from typing import Any, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.events import ControlEvent, FeedbackEvent, InteractionEvent
from streams.settings import KafkaSettings, ProducerSettings
from streams.spool import Position, Spool, SpoolFull
from streams.topics import BY_EVENT_TYPE

log = logging.getLogger(__name__)


def _unsendable(exc: BaseException) -> bool:
    """Errors that no resend can fix."""
    if isinstance(exc, DeliveryError):
        return exc.permanent
    from kafka import errors

    permanent = tuple(getattr(errors, name) for name in (
        "MessageSizeTooLargeError", "RecordListTooLargeError", "InvalidTopicError", "TopicAuthorizationFailedError",
        "CorruptRecordError", "InvalidRecordError") if hasattr(errors, name))
    return isinstance(exc, permanent)


_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's ``Utils.murmur2``), the same values as kafka-python's
    pure-Python one in about half the time: the words are read with one ``struct.unpack``."""
    length = len(data)
    h = 0x9747B28C ^ length
    n = length >> 2
    for k in struct.unpack_from(f"<{n}I", data):
        k = (k * _M) & 0xFFFFFFFF
        k ^= k >> 24
        h = ((h * _M) & 0xFFFFFFFF) ^ ((k * _M) & 0xFFFFFFFF)
    tail = length & 3
    if tail:
        i = n << 2
        if tail >= 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def _key_partitioner():
    """kafka-python's DefaultPartitioner (the Java client's: murmur2 of the key modulo the partition
    count), without its per-record extras: the list of available partitions it builds and never uses
    for a keyed record, and the slow hash. Partitioning the CPU profile of ``send()`` showed those at a
    fifth of it; every record here has a key. The same partition for every key (tested)."""
    from kafka.partitioner.default import DefaultPartitioner

    class KeyPartitioner(DefaultPartitioner):
        def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
            partitions = cluster.partitions_for_topic(topic) if serialized_key is not None else None
            if not partitions:
                return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
            ordered = sorted(partitions)
            return ordered[(murmur2(serialized_key) & 0x7FFFFFFF) % len(ordered)]

    return KeyPartitioner()


class DeliveryError(Exception):
    """A record librdkafka could not deliver; ``permanent`` when no resend can fix it."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Backpressure(Exception):
    """The client's own queue is full: the record was not taken; try again after a poll."""


REJECTED = "rejected"  # a _Pending's done when Kafka refused the record for good


class _Pending:
    """One record handed to the Kafka client, until its delivery report. It is the report callback
    itself (``pending(err, msg)``, librdkafka's signature): one small object per record instead of
    closures, because the capture worker pays this for every request (bench/capture_cpu.py)."""

    __slots__ = ("end", "rec", "gen", "done", "failed")

    def __init__(self, end: Position | None, rec: Any, gen: int, failed):
        self.end = end  # spool position after the record (None: a record from the memory overflow)
        self.rec = rec
        self.gen = gen
        self.done: bool | str = False  # True once delivered; REJECTED when refused for good
        self.failed = failed  # the sender's handler: failed(pending, exc)

    def __call__(self, err, msg=None) -> None:
        if err is None:
            self.done = True
        else:
            self.failed(self, err)


class _KafkaPythonClient:
    """kafka-python's ``KafkaProducer`` behind the sender's three calls (``send``, ``poll``, ``close``)."""

    def __init__(self, producer):
        self.p = producer

    def send(self, topic: str, key: bytes, value: bytes, pending: _Pending) -> None:
        fut = self.p.send(topic, key=key, value=value)
        fut.add_callback(lambda _meta: pending(None))
        fut.add_errback(pending)

    def error(self, err) -> BaseException:
        return err

    def poll(self) -> None:
        """Delivery callbacks run on kafka-python's own I/O thread."""

    def close(self, timeout_s: float) -> None:
        from kafka.errors import KafkaTimeoutError

        try:
            self.p.close(timeout=timeout_s)
        except KafkaTimeoutError:
            # kafka-python 3.0.12's close() flushes first (dpkp/kafka-python#2537) and raises when the
            # flush times out, before it reaches its force close: the sender thread and its
            # connections lived on, and __del__ raised the same at GC. Related upstream work on
            # shutdown with brokers unreachable: dpkp/kafka-python#3108. What was not flushed stays in
            # our spool, so close without waiting for it; drop this once close(timeout) force-closes
            # after a timed-out flush.
            self.p.flush = lambda timeout=None: None
            self.p.close(timeout=0)


class _ConfluentClient:
    """librdkafka (confluent-kafka) behind the sender's three calls.

    Why (bench/capture_cpu.py, docs/proxy.md): kafka-python spends ~20 us of Python per record in
    ``send()``, its accumulator, futures and callbacks (measured alone against tansu, 20k records of
    1.5 kB with lz4: 18-21 us of CPU per record); librdkafka does the batching, compression and I/O in
    C threads that do not hold the GIL: 1.8-3.1 us per record, delivery report included. The capture
    worker pays this for every request, on the proxy's core.

    Same semantics as the kafka-python client: acks=all, no idempotence (docs/streams.md, "Tansu quirks"), the same
    partition for a key (``murmur2_random`` is the Java client's and kafka-python's default),
    delivery reports per record (run by ``poll``, on the sender thread).
    """

    # librdkafka error codes no resend can fix (confluent_kafka.KafkaError)
    _PERMANENT = ("MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "TOPIC_AUTHORIZATION_FAILED", "TOPIC_EXCEPTION",
                  "INVALID_MSG", "CORRUPT_MESSAGE", "INVALID_RECORD", "_INVALID_ARG", "_UNKNOWN_TOPIC")

    def __init__(self, kafka: KafkaSettings, s: ProducerSettings):
        from confluent_kafka import KafkaError, Producer

        self._permanent = frozenset(getattr(KafkaError, n) for n in self._PERMANENT if hasattr(KafkaError, n))
        p = Producer({
            "bootstrap.servers": ",".join(kafka.servers),
            "client.id": f"{kafka.client_id}-producer",
            "acks": "all",
            "enable.idempotence": False,
            "linger.ms": s.linger_ms,
            "batch.size": s.batch_size,
            "compression.type": s.compression_type or "none",
            "partitioner": "murmur2_random",
            "message.timeout.ms": s.delivery_timeout_ms,
            "request.timeout.ms": max(1000, s.delivery_timeout_ms - s.linger_ms - 500),
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            # what librdkafka may hold unsent; past it produce() refuses (Backpressure) and the
            # record stays in the spool for the next pass
            "queue.buffering.max.kbytes": 64 * 1024,
            "queue.buffering.max.messages": max(100_000, 2 * s.max_in_flight_records),
            "log.connection.close": False,
        }, logger=log)
        # Like kafka-python's bootstrap: fail now (and keep spooling) when the broker is not there.
        try:
            p.list_topics(timeout=2)
        except Exception as exc:
            why = str(exc)
            # Drop this instance now: a live one keeps its threads and reconnects (and logs) forever,
            # and the sender tries again every few seconds while the broker is down.
            del p
            raise ConnectionError(f"no metadata from {kafka.bootstrap_servers}: {why}") from None
        self.p = p

    def send(self, topic: str, key: bytes, value: bytes, pending: _Pending) -> None:
        try:
            self.p.produce(topic, value, key, on_delivery=pending)
        except BufferError:
            raise Backpressure() from None
        except Exception as exc:  # KafkaException: refused before it was queued (too large, unknown topic)
            err = exc.args[0] if exc.args else None
            code = err.code() if hasattr(err, "code") else None
            raise DeliveryError(str(exc), code in self._permanent) from None

    def error(self, err) -> BaseException:
        """A delivery report's KafkaError as the exception the sender handles."""
        if isinstance(err, BaseException):
            return err
        return DeliveryError(f"{err.name()}: {err.str()}", err.code() in self._permanent)

    def poll(self) -> None:
        self.p.poll(0)

    def close(self, timeout_s: float) -> None:
        """Deliver what it can within ``timeout_s``; the rest stays in the spool for the next start.

        The undelivered messages are purged, and their reports served: each holds its delivery
        callback, which (through the sender's closures) holds this client, so without that the
        librdkafka instance outlived ``close``, its threads reconnecting and logging until exit.
        """
        self.p.flush(timeout_s)
        self.p.purge()
        deadline = time.monotonic() + 1.0
        while len(self.p) and time.monotonic() < deadline:  # len counts reports not yet served
            self.p.poll(0.01)


def event_key(event: InteractionEvent | FeedbackEvent | ControlEvent) -> bytes:
    key = getattr(event, "episode_id", None) or getattr(event, "interaction_id", None) or event.event_id
    return key.encode()


class EventProducer:
    """Never-blocking, never-failing, spool-backed Kafka producer. Thread-safe ``emit``."""

    def __init__(self, kafka: KafkaSettings, settings: ProducerSettings | None = None):
        self.kafka = kafka
        self.settings = settings or ProducerSettings()
        s = self.settings
        self.spool = Spool(s.spool_dir, segment_bytes=s.segment_bytes, disk_budget_bytes=s.disk_budget_bytes,
                           fsync_interval_s=s.fsync_interval_s)
        # counters (plain ints: the hot path must not take a metrics lock)
        self.accepted = 0
        self.sent = 0
        self.spooled = 0
        self.replayed = 0
        self.overflowed = 0
        self.dropped = 0
        self.send_failures = 0
        self.rejected = 0
        self._overflow: collections.deque[tuple[str, bytes, bytes]] = collections.deque()
        self._overflow_bytes = 0
        self._overflow_lock = threading.Lock()
        self.connected = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abandon = threading.Event()  # close() ran out of time: leave what is undelivered in the spool
        self._drained = threading.Event()
        self._replay_horizon = self.spool.end  # records before this were written by an earlier run
        self._thread = threading.Thread(target=self._run, name="event-producer", daemon=True)
        self._thread.start()

    # -- the hot path ------------------------------------------------------------------------
    def emit(self, event: InteractionEvent | FeedbackEvent | ControlEvent) -> bool:
        """Accept one event for delivery. Never raises for broker or disk trouble; False = dropped."""
        return self.emit_raw(BY_EVENT_TYPE[event.event_type].name, event_key(event), event.to_json())

    def emit_raw(self, topic: str, key: bytes, payload: bytes) -> bool:
        return self.emit_many(((topic, key, payload),)) == 1

    def emit_many(self, records: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Accept serialized records ``(topic, key, payload)`` with one spool write (the capture
        worker's batch); returns how many were accepted, the rest were dropped and counted."""
        if not records:
            return 0
        accepted = len(records)
        try:
            self.spool.append_many(records)
        except SpoolFull:
            for topic, key, payload in records:
                # A right-sized copy: orjson returns a small payload inside a 4 KiB allocation (orjson
                # 3.13.0: a 164-byte dumps() holds 4,098 bytes), so keeping its bytes would let the
                # memory budget, which counts len(payload), hold ~20x its size of small events.
                payload = bytes(memoryview(payload))  # one compact copy
                with self._overflow_lock:
                    if self._overflow_bytes + len(payload) > self.settings.memory_budget_bytes:
                        self.dropped += 1
                        accepted -= 1
                        continue
                    self._overflow.append((topic, key, payload))
                    self._overflow_bytes += len(payload)
                    self.overflowed += 1
        self.accepted += accepted
        if not self.connected:
            self.spooled += accepted
        if accepted and not self._wake.is_set():
            self._wake.set()
        return accepted

    # -- the sender thread -------------------------------------------------------------------
    def _connect(self):
        s = self.settings
        if s.client == "confluent":
            return _ConfluentClient(self.kafka, s)
        from kafka import KafkaProducer

        return _KafkaPythonClient(KafkaProducer(
            bootstrap_servers=self.kafka.servers,
            client_id=f"{self.kafka.client_id}-producer",
            acks="all",
            # The idempotent producer lost acked records on a broker restart (docs/streams.md, "Tansu quirks"); we
            # deduplicate downstream by event id instead.
            enable_idempotence=False,
            linger_ms=s.linger_ms,
            batch_size=s.batch_size,
            compression_type=None if s.compression_type in (None, "none") else s.compression_type,
            partitioner=_key_partitioner(),
            delivery_timeout_ms=s.delivery_timeout_ms,
            request_timeout_ms=max(1000, s.delivery_timeout_ms - s.linger_ms - 500),
            max_block_ms=2000,
            retry_backoff_ms=100,
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=1000,
        ))

    def _run(self) -> None:
        backoff = 0.1
        producer = None
        inflight: collections.deque[_Pending] = collections.deque()  # spool records, in spool order
        overflow_inflight: list[_Pending] = []
        state = {"gen": 0, "failed_gen": -1}
        cursor = self.spool.acked
        last_ack_write = 0.0
        acked_upto: Position | None = None

        def failed(pending: _Pending, err) -> None:
            exc = producer.error(err) if producer is not None else err
            if pending.end is not None and _unsendable(exc):
                # A record the broker will never take (too large, invalid topic): resending it
                # would block every later event forever. Keep a copy for an operator, count it,
                # and let the watermark move past it.
                self.rejected += 1
                log.error("Kafka refused a record for good (%s: %s); kept in %s", type(exc).__name__, exc,
                          self.spool.dir / "rejected")
                self._keep_rejected(pending.rec)
                pending.done = REJECTED
                return
            self.send_failures += 1
            if state["failed_gen"] < pending.gen:
                state["failed_gen"] = pending.gen
                log.warning("send to Kafka failed (%s); will resend from the spool", exc)

        while True:
            if self._stopping.is_set() and ((not inflight and not overflow_inflight and self._backlog_empty(cursor))
                                            or self._abandon.is_set()):
                break
            if producer is None:
                try:
                    producer = self._connect()
                except Exception as exc:  # broker down at start: keep spooling, retry
                    self.connected = False
                    log.warning("Kafka at %s not reachable (%s: %s); spooling, retrying in %.1fs",
                                self.kafka.bootstrap_servers, type(exc).__name__, exc, backoff)
                    if self._stopping.wait(backoff):
                        break
                    backoff = min(backoff * 2, 5.0)
                    continue
                self.connected = True
            if state["failed_gen"] == state["gen"]:
                # Rewind: resend everything from the first unacknowledged record, in order.
                self.connected = False
                state["gen"] += 1
                inflight.clear()
                with self._overflow_lock:
                    for pending in reversed(overflow_inflight):
                        if not pending.done:
                            self._overflow.appendleft(pending.rec)
                            self._overflow_bytes += len(pending.rec[2])
                overflow_inflight.clear()
                cursor = self.spool.acked
                self._replay_horizon = max(self._replay_horizon, self.spool.end)
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, 5.0)
                continue
            gen = state["gen"]
            producer.poll()  # delivery reports (librdkafka runs them here, on this thread)
            progressed = False
            room = self.settings.max_in_flight_records - len(inflight) - len(overflow_inflight)
            if room > 0:
                records = self.spool.read(cursor, max_records=min(room, 2000))
                send = producer.send
                for rec in records:
                    pending = _Pending(rec.end, rec, gen, failed)
                    try:
                        send(rec.topic, rec.key, rec.payload, pending)
                    except Backpressure:
                        break  # not taken: sent again from this cursor after the next poll
                    except Exception as exc:
                        if _unsendable(exc):  # refused before it was even queued (e.g. too large)
                            failed(pending, exc)
                            inflight.append(pending)
                            cursor = rec.end
                            progressed = True
                            continue
                        failed(pending, exc)
                        break
                    inflight.append(pending)
                    if rec.end <= self._replay_horizon:
                        self.replayed += 1
                    cursor = rec.end
                    progressed = True
                if not records and self._overflow:
                    with self._overflow_lock:
                        batch = [self._overflow.popleft() for _ in range(min(room, len(self._overflow)))]
                        self._overflow_bytes -= sum(len(r[2]) for r in batch)
                    for rec in batch:
                        pending = _Pending(None, rec, gen, failed)
                        overflow_inflight.append(pending)
                        try:
                            send(rec[0], rec[1], rec[2], pending)
                        except Exception as exc:  # Backpressure included: the rewind puts it back in order
                            failed(pending, exc)
                            continue
                    progressed = bool(batch)
            # Advance the acknowledged watermark over the contiguous prefix of delivered records.
            if inflight and inflight[0].done:
                n = 0
                while inflight and inflight[0].done:
                    pending = inflight.popleft()
                    acked_upto = pending.end
                    n += pending.done is True
                self.sent += n
                progressed = True
            if overflow_inflight and all(p.done for p in overflow_inflight):
                self.sent += len(overflow_inflight)
                overflow_inflight.clear()
            now = time.monotonic()
            if acked_upto is not None and (now - last_ack_write > 0.05 or not inflight):
                self.spool.ack(acked_upto)
                acked_upto = None
                last_ack_write = now
                backoff = 0.1
                self.connected = True
            if not progressed:
                self._wake.wait(0.005 if inflight else 0.05)
                self._wake.clear()
        if acked_upto is not None:
            self.spool.ack(acked_upto)
        if producer is not None:
            try:
                producer.close(0 if self._abandon.is_set() else 2)
            except Exception:
                log.exception("closing the Kafka client failed")
        self._drained.set()

    def _keep_rejected(self, rec: Any) -> None:
        try:
            out = self.spool.dir / "rejected"
            out.mkdir(exist_ok=True)
            (out / f"{rec.end.segment:012d}-{rec.end.offset:012d}.json").write_bytes(rec.payload)
        except Exception:  # keeping the copy is best effort; the count is what alerts
            log.exception("could not keep a rejected record")

    def _backlog_empty(self, cursor: Position) -> bool:
        return not self._overflow and cursor >= self.spool.end

    # -- lifecycle and observability ---------------------------------------------------------
    @property
    def backlog_bytes(self) -> int:
        return self.spool.pending_bytes() + self._overflow_bytes

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything accepted so far is acknowledged by the broker. True if it was."""
        target = self.spool.end
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.spool.acked >= target and not self._overflow:
                return True
            self._wake.set()
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Try to deliver the backlog for up to ``timeout_s``; what is left stays in the spool (the client
        is then told to give up on it, which takes up to 5 s more)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # records still in flight (a broker gone): they stay in the spool
            self._abandon.set()
            self._wake.set()
            self._thread.join(5.0)
        self.spool.close()
        if self._overflow:
            log.error("%d events only in memory (disk was full) were not delivered at close", len(self._overflow))

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self.accepted, "sent": self.sent, "spooled": self.spooled, "replayed": self.replayed,
            "overflowed": self.overflowed, "dropped": self.dropped, "send_failures": self.send_failures,
            "rejected": self.rejected,
            "spool_bytes": self.spool.bytes_on_disk, "backlog_bytes": self.backlog_bytes,
            "corrupt_records": self.spool.corrupt_records,
        }


class ProducerCollector(Collector):
    """Exports an EventProducer's counters to Prometheus (read at scrape time, no hot-path locks)."""

    def __init__(self, producer: EventProducer, prefix: str = "onpolicy_producer"):
        self.producer = producer
        self.prefix = prefix

    def collect(self):
        st = self.producer.stats()
        for name in ("accepted", "sent", "spooled", "replayed", "overflowed", "dropped", "send_failures", "rejected",
                     "corrupt_records"):
            c = CounterMetricFamily(f"{self.prefix}_events_{name}", f"Events {name.replace('_', ' ')} by the producer.")
            c.add_metric([], st.get(name, 0))
            yield c
        for name in ("spool_bytes", "backlog_bytes"):
            g = GaugeMetricFamily(f"{self.prefix}_{name}", f"Producer {name.replace('_', ' ')}.")
            g.add_metric([], st[name])
            yield g
        g = GaugeMetricFamily(f"{self.prefix}_connected", "1 while the producer is delivering to Kafka.")
        g.add_metric([], 1 if self.producer.connected else 0)
        yield g
