"""Event types: immutable, versioned, with time-ordered ids and UTC timestamps.

Every event carries ``event_type`` and ``schema_version``. ``decode`` accepts any version this code
has ever written: an older payload is brought up to the current model by the upgraders registered
in ``UPGRADERS`` (one function per (event_type, old_version)); a version newer than this code, or
an unknown type, raises ``EventDecodeError`` so the caller can dead-letter it with the reason.

Rules for changing a schema: never edit the meaning of an existing field. Add a field with a
default, or bump ``schema_version``, add an upgrader from the old version and keep the old golden
payload in ``tests/fixtures/events/`` so the decode test proves old events still read.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Callable, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from streams.ids import new_id, utcnow


class EventDecodeError(ValueError):
    """A payload that is not a valid event of a known type and version. ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Event(_Frozen):
    event_id: str = Field(default_factory=new_id, description="UUIDv7, time-ordered; the dedup key downstream.")
    ts: dt.datetime = Field(default_factory=utcnow, description="When the event happened, UTC.")

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware UTC")
        return value.astimezone(dt.timezone.utc)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class Usage(_Frozen):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class InteractionEvent(_Event):
    """One request through the proxy and what was answered: exactly one per request."""

    event_type: Literal["interaction"] = "interaction"
    schema_version: Literal[1] = 1
    interaction_id: str = Field(description="The signed id the client saw (response id and header).")
    endpoint: str = Field(description="The route, e.g. /v1/chat/completions.")
    public_model: str = Field(description="The model name the client asked for.")
    upstream_model: str | None = Field(default=None, description="The model name sent upstream (base or adapter name).")
    adapter_version: str | None = Field(default=None, description="The adapter that served it (the behaviour policy); None = base model.")
    upstream: str | None = Field(default=None, description="Which upstream served it.")
    request: dict[str, Any] = Field(description="The request body as the client sent it (after redaction).")
    response: dict[str, Any] | None = Field(default=None, description="The response; for streams the assembled response.")
    stream: bool = False
    sampling: dict[str, Any] = Field(default_factory=dict, description="temperature, top_p, max_tokens, seed, n, stop, ...")
    usage: Usage | None = None
    latency_first_token_ms: float | None = None
    latency_total_ms: float | None = None
    http_status: int = 200
    error: str | None = None
    finish_reasons: list[str | None] = Field(default_factory=list, description="One per choice.")
    logprobs: list[Any] | None = Field(default=None, description="Per choice, when the client asked for them.")
    abandoned: bool = Field(default=False, description="The client disconnected before the response was complete.")
    episode_id: str | None = None
    user_id: str | None = None
    tenant: str | None = None
    train_opt_out: bool = Field(default=False, description="x-onpolicy-train: false — served, never trained on.")


FeedbackKind = Literal["thumbs", "score", "outcome", "comment", "correction"]


class FeedbackEvent(_Event):
    """A judgement on one interaction or one episode, explicit (a person) or implicit (mined)."""

    event_type: Literal["feedback"] = "feedback"
    schema_version: Literal[1] = 1
    interaction_id: str | None = None
    episode_id: str | None = None
    kind: FeedbackKind
    value: float | None = Field(default=None, description="thumbs: +1/-1; score: the float; outcome: 1/0.")
    comment: str | None = None
    correction: list[dict[str, Any]] | None = Field(default=None, description="The message(s) the model should have given.")
    source: Literal["explicit", "implicit"] = "explicit"
    weight: float = 1.0
    idempotency_key: str | None = None
    user_id: str | None = None
    tenant: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_target(self) -> "FeedbackEvent":
        if self.episode_id is None and self.interaction_id is None:
            raise ValueError("feedback needs an interaction_id or an episode_id")
        return self


ControlAction = Literal[
    "adapter_registered",
    "adapter_published",
    "adapter_promoted",
    "adapter_rolled_back",
    "adapter_retired",
    "routing_changed",
    "learning_paused",
    "learning_resumed",
]


class ControlEvent(_Event):
    """A change of control state: adapters, routing, learning. The audit log is these events."""

    event_type: Literal["control"] = "control"
    schema_version: Literal[1] = 1
    action: ControlAction
    actor: str = Field(description="Who or what did it: 'admin:<name>', 'learner', 'canary', ...")
    reason: str = ""
    public_model: str | None = None
    adapter_version: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict, description="Routing table, lineage, evidence, ...")


class TallyEvent(_Event):
    """What one proxy replica counted in one UTC minute: requests it handed to capture and feedback
    events it accepted. Reconciliation (``streams.reconcile``) compares these with what landed.

    A replica reports each minute several times as it goes; the counts are cumulative within the
    minute, so the largest report per (reporter, minute) is the truth and a lost or repeated report
    costs nothing. ``reporter`` is unique per process lifetime: a restarted replica reports anew.
    """

    event_type: Literal["tally"] = "tally"
    schema_version: Literal[1] = 1
    reporter: str = Field(description="The replica's id for this process lifetime: host, pid and a random suffix.")
    minute: dt.datetime = Field(description="Start of the UTC minute counted (the event's ts minute is the same bucket).")
    interactions: int = Field(default=0, ge=0, description="Requests handed to capture in this minute (before any queue that could drop).")
    feedback: int = Field(default=0, ge=0, description="Feedback events accepted by the feedback API in this minute.")

    @field_validator("minute")
    @classmethod
    def _utc_minute(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware UTC")
        return value.astimezone(dt.timezone.utc).replace(second=0, microsecond=0)


Event = Annotated[Union[InteractionEvent, FeedbackEvent, ControlEvent, TallyEvent], Field(discriminator="event_type")]
EVENT_TYPES: dict[str, type[_Event]] = {
    "interaction": InteractionEvent,
    "feedback": FeedbackEvent,
    "control": ControlEvent,
    "tally": TallyEvent,
}
CURRENT_VERSION: dict[str, int] = {
    name: cls.model_fields["schema_version"].default for name, cls in EVENT_TYPES.items()
}

# (event_type, old schema_version) -> function turning that payload into the next version's.
UPGRADERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}

_event_adapter: TypeAdapter = TypeAdapter(Event)


def decode(payload: bytes | str | dict[str, Any]) -> InteractionEvent | FeedbackEvent | ControlEvent | TallyEvent:
    """Parse any event version this code knows, upgrading old versions. Raises EventDecodeError."""
    if isinstance(payload, dict):
        data = dict(payload)
    else:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise EventDecodeError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EventDecodeError(f"an event is a JSON object, got {type(data).__name__}")
    event_type = data.get("event_type")
    if event_type not in EVENT_TYPES:
        raise EventDecodeError(f"unknown event_type {event_type!r}; known: {sorted(EVENT_TYPES)}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EventDecodeError(f"schema_version must be an integer, got {version!r}")
    current = CURRENT_VERSION[event_type]
    if version > current:
        raise EventDecodeError(
            f"{event_type} schema_version {version} is newer than this code understands ({current}); upgrade onpolicy"
        )
    while version < current:
        upgrade = UPGRADERS.get((event_type, version))
        if upgrade is None:
            raise EventDecodeError(f"no upgrader for {event_type} schema_version {version}")
        data = upgrade(data)
        version = data["schema_version"]
    try:
        return _event_adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "event"
        raise EventDecodeError(f"invalid {event_type} event: {where}: {first['msg']}") from None


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event type, generated from the models (written to docs/ by a command)."""
    return {name: cls.model_json_schema() for name, cls in EVENT_TYPES.items()}
