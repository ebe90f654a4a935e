"""Broker reachability and explicit topic creation (never rely on auto-create)."""

from __future__ import annotations

import logging
import socket
import time

from streams.errors import OnpolicyUserError
from streams.settings import KafkaSettings
from streams.topics import ALL, Topic

log = logging.getLogger(__name__)


class BrokerUnreachable(OnpolicyUserError):
    """The configured brokers do not answer. The message says what to check."""


def wait_for_broker(kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Return once one bootstrap server accepts TCP connections; raise BrokerUnreachable after timeout."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        for hp in kafka.servers:
            host, _, port = hp.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    return
            except OSError as exc:
                last = exc
        time.sleep(0.2)
    raise BrokerUnreachable(
        f"cannot reach Kafka at {kafka.bootstrap_servers} ({last}); start the broker (`onpolicy up` starts an embedded one) "
        "or set ONPOLICY_KAFKA_BOOTSTRAP_SERVERS to a reachable host:port"
    )


def ensure_topics(kafka: KafkaSettings, topics: tuple[Topic, ...] = ALL, timeout_s: float = 30.0) -> None:
    """Create any missing topic with its configured partitions and configs. Idempotent."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wait_for_broker(kafka, timeout_s=min(timeout_s, 5.0))
    admin = KafkaAdminClient(bootstrap_servers=kafka.servers, client_id=f"{kafka.client_id}-admin",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        for topic in missing:
            try:
                admin.create_topics([NewTopic(name=topic.name, num_partitions=topic.partitions, replication_factor=1,
                                              topic_configs=dict(topic.configs))])
                log.info("created topic %s (%d partitions)", topic.name, topic.partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
