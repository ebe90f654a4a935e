"""Other local processes reach the embedded warehouse through its owner (streams.warehouse_server)."""

import pytest

from streams.events import FeedbackEvent, InteractionEvent
from streams.warehouse_server import RemoteWarehouse, RemoteWarehouseError, WarehouseServer


@pytest.fixture
def remote(warehouse, tmp_path, monkeypatch):
    monkeypatch.setenv("ONPOLICY_HOME", str(tmp_path))
    server = WarehouseServer(warehouse, port=0).start()
    yield RemoteWarehouse(f"onpolicy+http://127.0.0.1:{server.port}", warehouse.db)
    server.stop()


def test_same_interface_as_the_local_warehouse(remote, warehouse):
    events = [InteractionEvent(interaction_id=f"i{i}", endpoint="/v1/chat/completions", public_model="m",
                               request={"messages": []}) for i in range(20)]
    remote.insert_events([(e, ("t", 0, i)) for i, e in enumerate(events)])
    remote.insert_events([(FeedbackEvent(interaction_id="i1", kind="thumbs", value=1), ("f", 0, 0))])
    assert remote.counts() == warehouse.counts()
    assert remote.counts()["interactions"]["final"] == 20
    rows = remote.query_dicts("SELECT interaction_id, ts FROM {db}.interactions FINAL WHERE interaction_id = %(i)s",
                              {"i": "i3"})
    local = warehouse.query_dicts("SELECT interaction_id, ts FROM {db}.interactions FINAL WHERE interaction_id = %(i)s",
                                  {"i": "i3"})
    assert rows == local  # datetimes come back as datetimes, as from the local warehouse
    assert remote.applied() == warehouse.applied()
    assert remote.migrate() == []  # DDL through the owner (what the learner does at start)
    remote.command("CREATE TABLE IF NOT EXISTS {db}.probe (x UInt8) ENGINE = Memory")


def test_errors_carry_the_database_message(remote):
    with pytest.raises(RemoteWarehouseError, match="UNKNOWN_TABLE|does not exist|Unknown table"):
        remote.query("SELECT * FROM {db}.no_such_table")


def test_a_wrong_token_is_refused(remote):
    remote.token = "wrong"
    with pytest.raises(RemoteWarehouseError, match="wrong warehouse token"):
        remote.query("SELECT 1")


def test_datetime_parameters_and_inserts_round_trip(remote, warehouse):
    import datetime as dt

    t = dt.datetime(2026, 11, 26, 10, 0, 0, 250000)
    remote.insert("schema_migrations", [[9999, "probe", t]], ["version", "name", "applied_at"])
    got = remote.query("SELECT applied_at FROM {db}.schema_migrations WHERE applied_at = {t:DateTime64(3)}",
                       {"t": t})
    assert got == [(t,)]
