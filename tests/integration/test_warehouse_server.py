"""The same warehouse code against a real ClickHouse server over HTTP.

No modern ClickHouse server installs on this machine (Debian's is from 2018), so this runs only
where ONPOLICY_TEST_CLICKHOUSE_URL points at one (e.g. http://default:@localhost:8123) and is
reported as skipped otherwise -- never counted as a pass.
"""

import os
import uuid

import pytest

from streams.events import InteractionEvent
from streams.settings import WarehouseSettings
from streams.warehouse import Warehouse

URL = os.environ.get("ONPOLICY_TEST_CLICKHOUSE_URL")


@pytest.mark.skipif(not URL, reason="set ONPOLICY_TEST_CLICKHOUSE_URL to test against a ClickHouse server")
def test_migrate_insert_dedup_over_http():
    wh = Warehouse(WarehouseSettings(url=URL, database=f"onpolicy_test_{uuid.uuid4().hex[:8]}"))
    try:
        assert wh.migrate()
        events = [InteractionEvent(interaction_id=str(i), endpoint="/v1/completions", public_model="m",
                                   request={"prompt": str(i)}) for i in range(100)]
        items = [(e, ("t", 0, i)) for i, e in enumerate(events)]
        wh.insert_events(items)
        wh.insert_events(items[:50])
        assert wh.counts()["interactions"]["final"] == 100
    finally:
        wh.command(f"DROP DATABASE IF EXISTS {wh.db}")
