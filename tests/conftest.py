"""Shared fixtures: real services, started once per test session.

- ``kafka``: a real Kafka-protocol broker (tansu, in memory) with every onpolicy topic created.
- ``warehouse``: a fresh, migrated database in the session's embedded ClickHouse (chdb). chdb
  opens one data path per process, so every test shares that path and gets its own database.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

from streams.embedded import EmbeddedBroker
from streams.kafka_admin import ensure_topics
from streams.settings import KafkaSettings, WarehouseSettings

pytest_plugins = [p for p in ("tests.vllm_fixtures",) if (Path(__file__).parent / (p.split(".")[-1] + ".py")).exists()]

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """An in-memory tansu broker for the session (durable-mode tests start their own)."""
    b = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker"), durable=False).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def kafka(broker) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture
def warehouse(chdb_path, request):
    """A fresh migrated warehouse database for this test, in the session's embedded ClickHouse."""
    from streams.warehouse import Warehouse

    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    settings = WarehouseSettings(url=f"chdb://{chdb_path}", database=f"t{next(_db_counter)}_{name}")
    wh = Warehouse(settings)
    wh.migrate()
    return wh


@pytest.fixture
def unique_group(request) -> str:
    """A consumer group id no other test uses."""
    return f"test-{re.sub(r'[^A-Za-z0-9_]', '_', request.node.name)}-{os.getpid()}-{next(_db_counter)}"
