"""``onpolicy sink``, ``onpolicy broker``, ``onpolicy schemas``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sink", help="consume events from Kafka and land them in the warehouse exactly once")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--warehouse-port", type=int, default=None,
                   help="serve the embedded warehouse to other local processes on this loopback port")
    p.set_defaults(func=run_sink)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (tansu on a local S3 store) in the foreground")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="keep the log in memory (lost on stop)")
    p.set_defaults(func=run_broker)

    p = sub.add_parser("schemas", help="write the JSON Schema of every event type (generated from the code)")
    p.add_argument("--out", type=Path, default=Path("docs/schemas"))
    p.set_defaults(func=write_schemas)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_sink(args) -> int:
    from prometheus_client import REGISTRY, start_http_server

    from streams.kafka_admin import ensure_topics
    from streams.settings import KafkaSettings, SinkSettings, WarehouseSettings
    from streams.sink import Sink, SinkCollector
    from streams.warehouse import Warehouse

    kafka = KafkaSettings()
    overrides = {k: v for k, v in (("metrics_port", args.metrics_port), ("warehouse_port", args.warehouse_port)) if v}
    settings = SinkSettings(**overrides)
    warehouse = Warehouse(WarehouseSettings())
    warehouse.migrate()
    ensure_topics(kafka)
    stop = _stop_on_signals()
    sink = Sink(kafka, warehouse, settings, stop=stop)
    if settings.metrics_port:
        REGISTRY.register(SinkCollector(sink))
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    implicit_producer = None
    if settings.implicit_interval_s > 0:
        from streams.implicit_runner import ImplicitMiner
        from streams.producer import EventProducer
        from streams.settings import ProducerSettings, default_home

        implicit_producer = EventProducer(kafka, ProducerSettings(spool_dir=default_home() / "spool" / f"implicit-{settings.group_id}"))
        ImplicitMiner(warehouse, implicit_producer, interval_s=settings.implicit_interval_s, stop=stop).start()
    if settings.reconcile_interval_s > 0:
        from streams.reconcile import ReconcileCollector, Reconciler

        reconciler = Reconciler(warehouse, interval_s=settings.reconcile_interval_s, lookback_s=settings.reconcile_lookback_s,
                                settle_s=settings.reconcile_settle_s, stop=stop).start()
        if settings.metrics_port:
            REGISTRY.register(ReconcileCollector(reconciler))
    server = None
    if settings.warehouse_port:
        from streams.warehouse_server import WarehouseServer

        server = WarehouseServer(warehouse, settings.warehouse_port).start()
    try:
        sink.run()
    finally:
        if server is not None:
            server.stop()
        if implicit_producer is not None:
            implicit_producer.close()
    return 0


def run_broker(args) -> int:
    from streams.embedded import EmbeddedBroker
    from streams.settings import default_home

    broker = EmbeddedBroker(data_dir=args.data_dir or default_home() / "broker", durable=not args.memory, port=args.port)
    broker.start()
    print(f"broker: {broker.bootstrap_servers} (data in {broker.data_dir})", flush=True)
    stop = _stop_on_signals()
    stop.wait()
    broker.stop()
    return 0


def write_schemas(args) -> int:
    from streams.events import json_schemas

    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (args.out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(args.out / f"{name}.schema.json")
    return 0
