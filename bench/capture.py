"""Capture throughput: producer -> broker -> sink -> ClickHouse, for ~2 KB interaction events.

One command: ``python bench/capture.py`` (``--events N``, ``--memory-broker``). Prints, from one run:

- ``emit()`` cost on the caller's thread (median, p99) while the sender ships to the broker;
- end-to-end landing rate of onpolicy (EventProducer in this process, the sink in its own process,
  as deployed), events/s from the first emit to the last row landed;
- the raw-client baseline measured in the same run with the same broker, payloads and layout:
  kafka-python ``send`` in this process -> broker -> a kafka-python consumer doing raw
  clickhouse-connect inserts in its own process (no spool, no validation, no dead letters, no
  dedup engine);
- raw kafka-python produce alone and raw clickhouse-connect insert alone, for reference;
- ratios: onpolicy / raw pipeline, and the targets (emit median <= 20 us, >= 5,000 events/s,
  >= 0.5x the raw pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams.embedded import EmbeddedBroker, free_port  # noqa: E402
from streams.events import InteractionEvent, Usage  # noqa: E402
from streams.kafka_admin import ensure_topics  # noqa: E402
from streams.settings import KafkaSettings, ProducerSettings  # noqa: E402
from streams.topics import Topic  # noqa: E402


def make_events(n: int, tag: str) -> list[InteractionEvent]:
    body = "The quick brown fox jumps over the lazy dog. " * 30  # ~1.3 KB of text
    return [InteractionEvent(interaction_id=f"{tag}-{i}", endpoint="/v1/chat/completions", public_model=tag,
                             upstream_model="demo-v0001", adapter_version="demo-v0001",
                             request={"model": tag, "messages": [{"role": "user", "content": body}]},
                             response={"choices": [{"message": {"role": "assistant", "content": body[:400]}}]},
                             usage=Usage(prompt_tokens=300, completion_tokens=90, total_tokens=390),
                             latency_total_ms=120.0, finish_reasons=["stop"]) for i in range(n)]


def raw_consumer_process(bootstrap: str, topic: str, path: str, n: int, port_file: str) -> None:
    """Baseline sink: consume and insert raw payloads, commit after insert. Prints its rate."""
    import clickhouse_connect
    from kafka import KafkaConsumer

    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    client.command("CREATE DATABASE IF NOT EXISTS raw")
    client.command("CREATE TABLE IF NOT EXISTS raw.events (key String, payload String) ENGINE = MergeTree ORDER BY key")
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="raw-baseline", enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=5000, fetch_max_bytes=64 * 1024 * 1024,
                             max_partition_fetch_bytes=16 * 1024 * 1024)
    Path(port_file).write_text("ready")
    got = 0
    while got < n:
        polled = consumer.poll(timeout_ms=200, max_records=5000)
        rows = [[r.key.decode(), r.value.decode()] for recs in polled.values() for r in recs]
        if rows:
            client.insert("raw.events", rows, column_names=["key", "payload"])
            consumer.commit()
            got += len(rows)
            Path(port_file).write_text(str(got))
    consumer.close()


def wait_count(read, n: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read() >= n:
            return time.perf_counter()
        time.sleep(0.02)
    raise SystemExit(f"timed out: {read()} of {n} landed")


def sink_landed(port: int) -> int:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith('onpolicy_sink_events_landed_total{table="interactions"}'):
            return int(float(line.split()[-1]))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--memory-broker", action="store_true", help="tansu on memory:// instead of the durable S3 store")
    ap.add_argument("--compression", default="lz4", help="batch compression for both producers (lz4, zstd, gzip, none)")
    args = ap.parse_args()
    n = args.events
    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    broker = EmbeddedBroker(data_dir=work / "broker", durable=not args.memory_broker).start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(kafka)
    results: dict[str, float] = {}
    try:
        events = make_events(n, "bench")
        payloads = [(e.interaction_id.encode(), e.to_json()) for e in events]
        size = statistics.mean(len(p) for _, p in payloads)

        # -- raw kafka-python produce alone ------------------------------------------------------
        from kafka import KafkaProducer
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=kafka.servers)
        raw_topic = Topic("bench.raw", partitions=4)
        admin.create_topics([NewTopic(raw_topic.name, raw_topic.partitions, 1)])
        admin.close()
        defaults = ProducerSettings()  # the same batching as onpolicy's producer: a like-for-like baseline
        raw = KafkaProducer(bootstrap_servers=kafka.servers, acks="all", enable_idempotence=False,
                            linger_ms=defaults.linger_ms, batch_size=defaults.batch_size,
                            compression_type=None if args.compression == "none" else args.compression)
        # -- raw pipeline: produce here, consume + insert in another process -----------------------
        progress = work / "raw.progress"
        consumer = subprocess.Popen([sys.executable, __file__, "--raw-consumer", broker.bootstrap_servers, raw_topic.name,
                                     str(work / "raw-warehouse"), str(n), str(progress)])
        while not progress.exists():
            time.sleep(0.05)
        time.sleep(3.5)  # group join
        t0 = time.perf_counter()
        for key, value in payloads:
            raw.send(raw_topic.name, key=key, value=value)
        raw.flush()
        t_produced = time.perf_counter()
        t_landed = wait_count(lambda: int(progress.read_text() or 0) if progress.read_text() != "ready" else 0, n, 600)
        consumer.wait(30)
        results["raw produce events/s"] = n / (t_produced - t0)
        results["raw pipeline events/s"] = n / (t_landed - t0)
        raw.close()

        # -- raw clickhouse-connect insert alone (in a fresh process: one chdb path per process) -----
        code = (
            "import sys, time, json, clickhouse_connect\n"
            f"c = clickhouse_connect.get_client(dsn='chdb://{work / 'insert-only'}')\n"
            "c.command('CREATE DATABASE IF NOT EXISTS r')\n"
            "c.command('CREATE TABLE r.e (key String, payload String) ENGINE = MergeTree ORDER BY key')\n"
            f"rows = [[str(i), 'x' * {int(size)}] for i in range({n})]\n"
            "t = time.perf_counter()\n"
            "for i in range(0, len(rows), 5000): c.insert('r.e', rows[i:i+5000], column_names=['key', 'payload'])\n"
            "print(len(rows) / (time.perf_counter() - t))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results["raw insert rows/s"] = float(out.stdout.strip().splitlines()[-1])

        # -- onpolicy: EventProducer here, the sink in its own process ------------------------------
        from streams.producer import EventProducer

        port = free_port()
        env = dict(os.environ, ONPOLICY_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
                   ONPOLICY_WAREHOUSE_URL=f"chdb://{work / 'warehouse'}", ONPOLICY_SINK_GROUP_ID="bench-sink")
        sink = subprocess.Popen([sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "sink", "--metrics-port",
                                 str(port)], cwd=REPO, env=env)
        wait_count(lambda: 1 if _up(port) else 0, 1, 60)
        time.sleep(3.5)  # group join
        producer = EventProducer(kafka, ProducerSettings(spool_dir=work / "spool", compression_type=args.compression))
        emit_ns = []
        t0 = time.perf_counter()
        for e in events:
            s = time.perf_counter_ns()
            producer.emit(e)
            emit_ns.append(time.perf_counter_ns() - s)
        t_emitted = time.perf_counter()
        t_landed = wait_count(lambda: sink_landed(port), n, 600)
        results["onpolicy end-to-end events/s"] = n / (t_landed - t0)
        results["emit() median us"] = statistics.median(emit_ns) / 1000
        results["emit() p99 us"] = sorted(emit_ns)[int(len(emit_ns) * 0.99)] / 1000
        results["emit() loop events/s"] = n / (t_emitted - t0)
        producer.close()
        sink.terminate()
        sink.wait(30)
    finally:
        broker.stop()

    ratio = results["onpolicy end-to-end events/s"] / results["raw pipeline events/s"]
    print(f"\ncapture benchmark: {n} interaction events of {size:.0f} bytes, compression {args.compression}, broker "
          f"{'tansu memory://' if args.memory_broker else 'tansu on s3rver (durable)'}, {os.cpu_count()} cores")
    for k, v in results.items():
        print(f"  {k:<32} {v:>12,.1f}")
    print(f"  {'onpolicy / raw pipeline':<32} {ratio:>12.2f}x")
    print("targets:")
    print(f"  emit() median <= 20 us           {'PASS' if results['emit() median us'] <= 20 else 'FAIL'}")
    print(f"  end-to-end >= 5,000 events/s     {'PASS' if results['onpolicy end-to-end events/s'] >= 5000 else 'FAIL'}")
    print(f"  >= 0.5x the raw pipeline          {'PASS' if ratio >= 0.5 else 'FAIL'}")
    print(json.dumps({k: round(v, 2) for k, v in results.items()} | {"ratio_vs_raw": round(ratio, 3)}))


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-consumer":
        raw_consumer_process(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
