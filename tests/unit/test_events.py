import datetime as dt
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.events import (
    CURRENT_VERSION,
    ControlEvent,
    EventDecodeError,
    FeedbackEvent,
    InteractionEvent,
    decode,
    json_schemas,
)
from streams.ids import id_time, new_id

FIXTURES = Path(__file__).parent.parent / "fixtures" / "events"
REPO = Path(__file__).parents[2]


def _interaction(**kw):
    base = dict(interaction_id="i-1", endpoint="/v1/chat/completions", public_model="m", request={"messages": []})
    base.update(kw)
    return InteractionEvent(**base)


def test_round_trip_every_type():
    events = [
        _interaction(adapter_version="m-v0001", episode_id="e", train_opt_out=True),
        FeedbackEvent(interaction_id="i-1", kind="correction", correction=[{"role": "assistant", "content": "4"}]),
        ControlEvent(action="adapter_promoted", actor="admin:ops", adapter_version="m-v0002", reason="won canary"),
    ]
    for event in events:
        assert decode(event.to_json()) == event


def test_events_are_immutable():
    event = _interaction()
    with pytest.raises(ValidationError):
        event.endpoint = "/v1/other"


def test_ids_are_time_ordered_uuid7():
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert all(i[14] == "7" for i in ids)  # the version nibble
    assert abs((id_time(ids[0]) - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 5


def test_timestamps_are_utc():
    local = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert _interaction(ts=local).ts == dt.datetime(2026, 1, 1, 10, tzinfo=dt.timezone.utc)
    with pytest.raises(ValidationError):
        _interaction(ts=dt.datetime(2026, 1, 1, 12))


def test_feedback_needs_a_target():
    with pytest.raises(ValidationError, match="interaction_id or an episode_id"):
        FeedbackEvent(kind="thumbs", value=1)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_golden_payloads_of_every_written_version_still_decode(name):
    """Payloads written by older versions of this code must decode forever (see streams/events.py)."""
    payload = json.loads((FIXTURES / name).read_text())
    event = decode(json.dumps(payload))
    assert event.event_type == payload["event_type"]
    assert event.schema_version == CURRENT_VERSION[event.event_type]
    assert event.event_id == payload["event_id"]


def test_every_type_and_current_version_has_a_golden_payload():
    have = {(json.loads(p.read_text())["event_type"], json.loads(p.read_text())["schema_version"]) for p in FIXTURES.glob("*.json")}
    for event_type, version in CURRENT_VERSION.items():
        assert (event_type, version) in have, f"add tests/fixtures/events/{event_type}.v{version}.json"


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"event_type": "telemetry", "schema_version": 1}', "unknown event_type"),
        (b'{"event_type": "interaction", "schema_version": 99}', "newer than this code"),
        (b'{"event_type": "interaction", "schema_version": "1"}', "must be an integer"),
        (b'{"event_type": "feedback", "schema_version": 1, "kind": "thumbs"}', "interaction_id or an episode_id"),
        (b'{"event_type": "feedback", "schema_version": 1, "kind": "stars", "interaction_id": "x"}', "kind"),
    ],
)
def test_bad_payloads_raise_with_a_reason(payload, reason):
    with pytest.raises(EventDecodeError) as info:
        decode(payload)
    assert reason in info.value.reason


def test_json_schemas_in_docs_are_generated_from_the_code():
    for name, schema in json_schemas().items():
        path = REPO / "docs" / "schemas" / f"{name}.schema.json"
        assert path.exists(), "run `onpolicy schemas` to generate docs/schemas"
        assert json.loads(path.read_text()) == schema, f"{path} is stale: run `onpolicy schemas`"
