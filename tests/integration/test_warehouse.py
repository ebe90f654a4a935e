import datetime as dt

from streams.events import ControlEvent, FeedbackEvent, InteractionEvent, Usage
from streams.warehouse import Warehouse, migrations


def _tables(wh: Warehouse) -> set[str]:
    return {r[0] for r in wh.query(f"SELECT name FROM system.tables WHERE database = '{wh.db}'")}


def test_every_migration_goes_up_and_down(warehouse):
    all_migrations = migrations()
    assert [m.version for m in all_migrations] == list(range(1, len(all_migrations) + 1))
    warehouse.rollback(0)
    assert _tables(warehouse) == {"schema_migrations"}
    seen: list[set[str]] = [_tables(warehouse)]
    for m in all_migrations:
        assert warehouse.migrate(target=m.version) == [m.version]
        seen.append(_tables(warehouse))
        assert seen[-1] > seen[-2], f"migration {m.version} created nothing"
    for m in reversed(all_migrations):
        assert warehouse.rollback(m.version - 1) == [m.version]
        assert _tables(warehouse) == seen[m.version - 1]
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
