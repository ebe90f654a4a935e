import datetime as dt

from streams.events import ControlEvent, FeedbackEvent, InteractionEvent, Usage
from streams.warehouse import Warehouse, migrations


def _tables(wh: Warehouse) -> set[str]:
    return {r[0] for r in wh.query(f"SELECT name FROM system.tables WHERE database = '{wh.db}'")}


def _schema(wh: Warehouse) -> set[tuple[str, str]]:
    return {(r[0], r[1]) for r in wh.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{wh.db}'")}


def test_every_migration_goes_up_and_down(warehouse):
    all_migrations = migrations()
    assert [m.version for m in all_migrations] == list(range(1, len(all_migrations) + 1))
    warehouse.rollback(0)
    assert _tables(warehouse) == {"schema_migrations"}
    seen: list[set[tuple[str, str]]] = [_schema(warehouse)]
    for m in all_migrations:
        assert warehouse.migrate(target=m.version) == [m.version]
        seen.append(_schema(warehouse))
        assert seen[-1] != seen[-2], f"migration {m.version} changed nothing"
    for m in reversed(all_migrations):
        assert warehouse.rollback(m.version - 1) == [m.version]
        assert _schema(warehouse) == seen[m.version - 1]
    assert warehouse.migrate() == [m.version for m in all_migrations]
    assert warehouse.migrate() == []  # idempotent


def test_redelivered_events_land_once(warehouse):
    events = [InteractionEvent(interaction_id=f"i{i}", endpoint="/v1/chat/completions", public_model="m",
                               request={"messages": [{"role": "user", "content": str(i)}]},
                               usage=Usage(prompt_tokens=3, completion_tokens=i)) for i in range(500)]
    items = [(e, ("interactions", 0, i)) for i, e in enumerate(events)]
    warehouse.insert_events(items)
    warehouse.insert_events(items[100:300])  # at-least-once delivery: a replayed range
    counts = warehouse.counts()["interactions"]
    assert counts["raw"] == 700
    assert counts["final"] == counts["distinct"] == 500


def test_columns_round_trip(warehouse):
    ts = dt.datetime(2026, 11, 26, 8, 30, 0, 123000, tzinfo=dt.timezone.utc)
    event = InteractionEvent(ts=ts, interaction_id="x", endpoint="/v1/completions", public_model="demo",
                             adapter_version="demo-v0003", request={"prompt": "hi"}, finish_reasons=["stop", None],
                             http_status=502, error="upstream unreachable", train_opt_out=True, episode_id="ep")
    warehouse.insert_events([(event, ("interactions", 2, 7))])
    row = warehouse.query_dicts("SELECT * FROM {db}.interactions FINAL")[0]
    assert row["ts"].replace(tzinfo=dt.timezone.utc) == ts
    assert row["adapter_version"] == "demo-v0003"
    assert row["finish_reasons"] == ["stop", ""]
    assert (row["http_status"], row["error"], row["train_opt_out"]) == (502, "upstream unreachable", True)
    assert (row["kafka_partition"], row["kafka_offset"]) == (2, 7)


def test_feedback_current_keeps_history_and_latest_wins(warehouse):
    t0 = dt.datetime(2026, 11, 26, 9, tzinfo=dt.timezone.utc)
    up = FeedbackEvent(ts=t0, interaction_id="i1", kind="thumbs", value=1, user_id="u1")
    down = FeedbackEvent(ts=t0 + dt.timedelta(seconds=5), interaction_id="i1", kind="thumbs", value=-1, user_id="u1")
    other_user = FeedbackEvent(ts=t0, interaction_id="i1", kind="thumbs", value=1, user_id="u2")
    warehouse.insert_events([(e, ("feedback", 0, i)) for i, e in enumerate([down, up, other_user, down])])
    current = {r["user_id"]: r for r in warehouse.query_dicts("SELECT * FROM {db}.feedback_current")}
    assert current["u1"]["value"] == -1 and current["u1"]["revisions"] == 2
    assert current["u2"]["value"] == 1
    assert warehouse.counts()["feedback"]["final"] == 3


def test_control_events_are_the_audit_log(warehouse):
    e = ControlEvent(action="adapter_rolled_back", actor="admin:ops", reason="canary lost", adapter_version="d-v2",
                     payload={"to": "d-v1"})
    warehouse.insert_events([(e, ("control", 0, 0))])
    row = warehouse.query_dicts("SELECT action, actor, reason, payload FROM {db}.control FINAL")[0]
    assert row == {"action": "adapter_rolled_back", "actor": "admin:ops", "reason": "canary lost", "payload": '{"to":"d-v1"}'}


def test_every_merge_tree_table_removes_outdated_parts_serially(warehouse):
    # Migration 0006; a table added later without it brings back the thread growth tested below.
    engines = warehouse.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{warehouse.db}' "
                              "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'")
    assert len(engines) >= 11
    missing = [name for name, full in engines if "concurrent_part_removal_threshold = 1000000000" not in full]
    assert not missing, f"MergeTree tables without serial part removal: {missing}"


_PART_REMOVAL_SCRIPT = r"""
import os, sys, time
from streams.settings import WarehouseSettings
from streams.warehouse import Warehouse

wh = Warehouse(WarehouseSettings(url="chdb://" + sys.argv[1]))
wh.migrate()
out = {}
for table, setting in (("serial", "concurrent_part_removal_threshold = 1000000000"), ("parallel", "")):
    sep = ", " if setting else ""
    wh.command(f"CREATE TABLE {{db}}.{table} (k UInt64) ENGINE = MergeTree ORDER BY k "
               f"SETTINGS cleanup_delay_period = 1, max_cleanup_delay_period = 1{sep}{setting}")
    for i in range(150):  # one part per insert; the merge below leaves 150 outdated parts
        wh.command(f"INSERT INTO {{db}}.{table} VALUES ({i})")
    wh.command(f"OPTIMIZE TABLE {{db}}.{table} FINAL")
    deadline = time.time() + 60
    while wh.query(f"SELECT countIf(NOT active) FROM system.parts WHERE database = '{wh.db}' AND table = '{table}'")[0][0]:
        assert time.time() < deadline, "outdated parts were not removed in 60 s"
        time.sleep(0.5)
    wh.query(f"SELECT count() FROM {{db}}.{table}")
    out[table] = len(os.listdir("/proc/self/task"))
print(out["serial"], out["parallel"])
"""


def test_outdated_part_removal_does_not_grow_the_engine_threads(tmp_path):
    """The sink's descriptor leak (docs/reliability.md): parallel part removal leaves ~128 threads behind.

    Each leftover engine thread later holds three procfs descriptors. Run in a fresh process: threads
    are per process and the session's embedded engine has its own history.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PART_REMOVAL_SCRIPT, str(tmp_path / "wh")], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    serial, parallel = map(int, proc.stdout.split()[-2:])
    assert serial < 60, f"threads after serial part removal: {serial}"
    assert parallel > serial + 64, f"parallel removal no longer grows the pool ({serial} -> {parallel}): " \
                                   "the workaround in migration 0006 may be unnecessary now"
