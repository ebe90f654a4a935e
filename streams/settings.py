"""Settings for the streams components: one frozen object each, from env vars (ONPOLICY_ prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    import os

    return Path(os.environ.get("ONPOLICY_HOME", Path.home() / ".onpolicy"))


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONPOLICY_KAFKA_", frozen=True)

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Comma-separated host:port list of the Kafka-protocol brokers (Apache Kafka in production).",
    )
    client_id: str = Field(default="onpolicy", description="Kafka client id prefix.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _hostports(cls, value: str) -> str:
        for hp in value.split(","):
            host, sep, port = hp.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"bootstrap server {hp!r} is not host:port; set ONPOLICY_KAFKA_BOOTSTRAP_SERVERS like 'kafka:9092'"
                )
        return value

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",")]


class ProducerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONPOLICY_PRODUCER_", frozen=True)

    spool_dir: Path = Field(default_factory=lambda: default_home() / "spool" / "default",
                            description="Write-ahead spool directory; one per producing process.")
    segment_bytes: int = Field(default=16 * 1024 * 1024, ge=4096, description="Spool segment size.")
    disk_budget_bytes: int = Field(default=2 * 1024**3, ge=4096, description="Most disk the spool may use.")
    memory_budget_bytes: int = Field(default=64 * 1024**2, ge=0,
                                     description="In-memory overflow used only while the disk is full or over budget.")
    fsync_interval_s: float = Field(default=1.0, gt=0, description="fsync the spool this often (power-loss window).")
    delivery_timeout_ms: int = Field(default=15000, ge=1000, description="Give up on one send after this long and retry from the spool.")
    max_in_flight_records: int = Field(default=20000, ge=1, description="Records sent but not yet acknowledged.")
    # Large, lingering batches: on the durable embedded broker every batch is one object in the S3
    # store (a PUT, a conditional watermark PUT, and the sink's GET), and s3rver spends ~3 ms of CPU
    # per request. 512 KiB / 20 ms took end-to-end landing from 3.4k to 7.4k events/s in
    # bench/capture.py (quiet machine, 2026-11-26). At a steady 100 req/s through the chaos stack
    # 20 ms made ~2 events per batch: the store used 75% of a core and the capture worker 3.7 ms per
    # request, and the stack could not hold 100 req/s for 10 minutes; 200 ms caps it at 5 batches
    # per partition per second: store 31%, worker 0.7 ms, 200 req/s held with 0 failures (a
    # 30 s run each, 2026-11-26). The wait is off the request path (emit() returns after the spool
    # write); a control event reaches the other replicas up to that much later.
    client: Literal["confluent", "kafka-python"] = Field(
        default="confluent", description="Kafka client for sending: confluent (librdkafka; ~2-3 us of CPU per record) "
                                         "or kafka-python (~20 us per record, pure Python).")
    linger_ms: int = Field(default=200, ge=0, description="Wait this long to fill a batch.")
    compression_type: str | None = Field(default="lz4", description="Batch compression: lz4 (default), zstd, gzip or none. Events are repetitive JSON: compression cuts broker and disk bytes several-fold.")
    batch_size: int = Field(default=512 * 1024, ge=1024, description="Bytes per partition batch (compressed).")


class WarehouseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONPOLICY_WAREHOUSE_", frozen=True)

    url: str = Field(default_factory=lambda: f"chdb://{default_home() / 'warehouse'}",
                     description="chdb:///abs/path for the embedded engine, or http(s)://user:pass@host:8123 for a ClickHouse server.")
    database: str = Field(default="onpolicy", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("chdb://", "http://", "https://", "onpolicy+http://")):
            raise ValueError(
                f"warehouse url {value!r} must start with chdb:/// (embedded, an absolute path), http(s):// (a ClickHouse "
                "server) or onpolicy+http:// (the local stack's warehouse owner)"
            )
        if value.startswith("chdb://") and not value[len("chdb://"):].startswith("/"):
            raise ValueError(f"embedded warehouse path must be absolute: chdb:///abs/path, got {value!r}")
        return value


class SinkSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONPOLICY_SINK_", frozen=True)

    group_id: str = Field(default="onpolicy-sink", description="Kafka consumer group of the sink.")
    batch_max_records: int = Field(default=5000, ge=1, description="Insert once this many records are buffered...")
    batch_max_wait_s: float = Field(default=0.5, gt=0, description="...or once the oldest buffered record is this old.")
    metrics_port: int | None = Field(default=None, description="Serve Prometheus /metrics on this port.")
    metrics_host: str = Field(default="127.0.0.1", description="Interface for /metrics (0.0.0.0 in a container, so Prometheus can scrape it).")
    implicit_interval_s: float = Field(default=30.0, ge=0, description="Mine implicit feedback (regenerate, edit, abandonment) from the warehouse this often; 0 = off.")
    warehouse_port: int | None = Field(default=None, description="Serve the embedded warehouse to other local processes on this loopback port (streams.warehouse_server).")
    reconcile_interval_s: float = Field(default=30.0, ge=0, description="Compare the proxies' per-minute tallies with landed events this often (streams.reconcile); 0 = off.")
    reconcile_lookback_s: float = Field(default=900.0, gt=0, description="Reconcile the minutes of this past window...")
    reconcile_settle_s: float = Field(default=120.0, ge=0, description="...except the most recent ones, still travelling (spool, broker, sink batch).")
