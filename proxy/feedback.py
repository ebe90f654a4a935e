"""POST /v1/feedback: judgements on interactions and episodes, validated, authenticated, idempotent.

Body: one item (a JSON object) or a batch (a JSON array of items, at most ``feedback_max_batch``)::

    {"interaction_id": "chatcmpl-op1....",   # the response id / x-onpolicy-interaction-id (signed)
     "episode_id": "conv-42",                 # instead of (or with) interaction_id: a whole conversation/run
     "kind": "thumbs" | "score" | "outcome" | "comment" | "correction",
     "value": 1,                              # thumbs: 1/-1 ("up"/"down", true/false); score: a number in
                                              # [feedback_score_min, feedback_score_max]; outcome: true/false (1/0)
     "comment": "free text",                  # required for kind=comment, allowed on any kind
     "correction": "the right answer",        # kind=correction: a string, a message, or a list of messages
     "source": "explicit" | "implicit",       # default explicit; implicit = mined by the client app
     "weight": 0.5,                           # optional, in [0, 1]; default 1 (explicit) / 0.3 (implicit)
     "idempotency_key": "...",                # optional; also the Idempotency-Key header (single item)
     "user": "u-7",                           # optional; also x-onpolicy-user
     "metadata": {...}}                       # optional, small

Authentication: ``Authorization: Bearer <api key>`` (``proxy.api_keys``). The key's tenant must be the
tenant the interaction id was signed for: an id this proxy never issued is 400 ``invalid_interaction_id``,
an id of another tenant is 403 ``wrong_tenant``. A batch is all or nothing: the first invalid item is
reported (``param`` = ``[i].field``) and nothing is accepted.

Answer: 202 with the feedback id(s) as soon as ``EventProducer.emit`` accepted the events (a spool
append: it never waits on Kafka). 503 if the producer dropped them (spool and memory budgets full).

Idempotency. The event id of an item with an idempotency key is **derived**, not drawn:
``uuid5(FEEDBACK_NAMESPACE, tenant + "\\n" + key)``. The sink lands events in ``ReplacingMergeTree
ORDER BY event_id`` tables, so every copy of that item -- a client retry on another replica, after a
proxy restart, or a producer resend -- collapses into one row, with no shared state between replicas.
Scoping by tenant keeps two tenants' keys from colliding. Within one process a small LRU of recent keys
(``IDEMPOTENCY_CACHE``) answers a replay directly (same id, ``"duplicate": true``, no second event)
and refuses the same key reused for a *different* item (409), which the derived id alone cannot tell.
Derived ids are not time-ordered like UUIDv7; readers order feedback by ``ts`` (``feedback_current``
uses ``argMax(..., (ts, event_id))``). Limit: a retry that reaches another replica after the user
changed their mind lands again with a later ``ts`` (one row, by id) and may become the latest.

Latest wins: a person who changes their mind sends a new item (another key, or none); the warehouse
view ``feedback_current`` keeps one current judgement per (tenant, user, interaction, episode, kind)
and the ``feedback`` table keeps the history.
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.api_keys import ApiKey, ApiKeys, bearer
from proxy.errors import ProxyError
from proxy.interaction_ids import InteractionIds
from proxy.settings import ProxySettings
from proxy.state import STATE
from streams.events import FeedbackEvent
from streams.ids import new_id

FEEDBACK_NAMESPACE = uuid.UUID("6f6e706f-6c69-6379-8000-666565646261")  # fixed forever: ids derive from it
IDEMPOTENCY_CACHE = 8192  # entries of about 0.4 KiB each: a few MiB when full
FEEDBACK_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_ID_CHARS = 256
MAX_CORRECTION_MESSAGES = 16
IMPLICIT_WEIGHT = 0.3
KINDS = ("thumbs", "score", "outcome", "comment", "correction")
FIELDS = frozenset({"interaction_id", "episode_id", "kind", "value", "comment", "correction", "source", "weight",
                    "idempotency_key", "user", "metadata"})
_THUMBS_WORDS = {"up": 1.0, "down": -1.0}


def load_api_keys(settings: ProxySettings) -> ApiKeys:
    """The configured keys: ``api_keys`` plus ``api_keys_file`` (a JSON list of the same entries)."""
    entries = list(settings.api_keys)
    if settings.api_keys_file is not None:
        try:
            data = orjson.loads(settings.api_keys_file.read_bytes())
        except FileNotFoundError:
            raise ValueError(f"api_keys_file {settings.api_keys_file} does not exist; fix ONPOLICY_PROXY_API_KEYS_FILE") from None
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"api_keys_file {settings.api_keys_file} is not JSON ({exc}); it must be a list of "
                             "{name, tenant, sha256}") from None
        if not isinstance(data, list):
            raise ValueError(f"api_keys_file {settings.api_keys_file} must hold a JSON list of {{name, tenant, sha256}}")
        entries.extend(data)
    pepper = settings.api_key_pepper.get_secret_value().encode() if settings.api_key_pepper else None
    return ApiKeys(entries, pepper)


def feedback_event_id(tenant: str, idempotency_key: str) -> str:
    return str(uuid.uuid5(FEEDBACK_NAMESPACE, f"{tenant}\n{idempotency_key}"))


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    duplicate: bool

    def as_json(self) -> dict[str, Any]:
        return {"object": "feedback", "id": self.id, "status": "accepted", "duplicate": self.duplicate}


def _bad(message: str, param: str, code: str = "invalid_value", status: int = 400) -> ProxyError:
    return ProxyError(status, message, param=param, code=code)


def _text(value: Any, param: str, limit: int, *, allow_empty: bool = False) -> str:
    if type(value) is not str:
        raise _bad(f"'{param}' must be a string, got {type(value).__name__}", param, "invalid_type")
    if not allow_empty and not value.strip():
        raise _bad(f"'{param}' must not be empty", param)
    if len(value) > limit:
        raise _bad(f"'{param}' is {len(value)} characters; the limit is {limit} (feedback_max_text_chars)", param,
                   "too_long")
    return value


def _number(value: Any, param: str) -> float:
    if type(value) not in (int, float):
        raise _bad(f"'{param}' must be a number, got {type(value).__name__}", param, "invalid_type")
    f = float(value)
    if not math.isfinite(f):
        raise _bad(f"'{param}' must be a finite number", param)
    return f


class FeedbackService:
    """Validation and idempotency, without HTTP: ``accept(items, key, ...)`` -> ids, or a ProxyError."""

    def __init__(self, settings: ProxySettings, ids: InteractionIds, keys: ApiKeys, emit):
        self.settings = settings
        self.ids = ids
        self.keys = keys
        self.emit = emit
        self._recent: collections.OrderedDict[tuple[str, str], tuple[str, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.tenants = sorted({k.tenant for k in keys._by_hash.values()})

    # -- validation --------------------------------------------------------------------------
    def _target(self, item: dict[str, Any], key: ApiKey, at: str) -> tuple[str | None, str | None]:
        iid, episode = item.get("interaction_id"), item.get("episode_id")
        if iid is None and episode is None:
            raise _bad(f"{at}needs 'interaction_id' (the response id, or the x-onpolicy-interaction-id header) or "
                       "'episode_id'", f"{at}interaction_id", "missing_required_parameter")
        if iid is not None:
            iid = _text(iid, f"{at}interaction_id", MAX_ID_CHARS)
            if not self.ids.verify(iid, key.tenant or None):
                if any(t != key.tenant and self.ids.verify(iid, t or None) for t in self.tenants):
                    raise _bad(f"interaction {iid!r} belongs to another tenant than this API key's; send feedback "
                               "with a key of the tenant that made the request", f"{at}interaction_id", "wrong_tenant", 403)
                raise _bad(f"{iid!r} is not an interaction id this proxy issued (its signature does not match); use "
                           "the response 'id' or the x-onpolicy-interaction-id header exactly as returned",
                           f"{at}interaction_id", "invalid_interaction_id")
        if episode is not None:
            episode = _text(episode, f"{at}episode_id", MAX_ID_CHARS)
        return iid, episode

    def _value(self, kind: str, item: dict[str, Any], at: str) -> tuple[float | None, list[dict[str, Any]] | None]:
        value, correction = item.get("value"), item.get("correction")
        s = self.settings
        if kind != "correction" and correction is not None:
            raise _bad(f"'correction' is only for kind=correction (this item is kind={kind})", f"{at}correction")
        if kind == "thumbs":
            if value is None:
                raise _bad("kind=thumbs needs 'value': 1 (up) or -1 (down)", f"{at}value", "missing_required_parameter")
            # bool first: True == 1 and False == 0 in Python, and 0 is not a thumb
            if type(value) is bool:
                v = 1.0 if value else -1.0
            elif type(value) in (int, float) and value in (1, -1):
                v = float(value)
            else:
                v = _THUMBS_WORDS.get(value) if type(value) is str else None
            if v is None:
                raise _bad(f"thumbs 'value' must be 1 or -1 (or \"up\"/\"down\"), got {value!r}"[:300], f"{at}value")
            return v, None
        if kind == "score":
            if value is None:
                raise _bad(f"kind=score needs a numeric 'value' in [{s.feedback_score_min}, {s.feedback_score_max}]",
                           f"{at}value", "missing_required_parameter")
            v = _number(value, f"{at}value")
            if not s.feedback_score_min <= v <= s.feedback_score_max:
                raise _bad(f"score {v} is outside [{s.feedback_score_min}, {s.feedback_score_max}] (the range this proxy "
                           "declares: feedback_score_min/max)", f"{at}value", "out_of_range")
            return v, None
        if kind == "outcome":
            if type(value) is bool:
                return (1.0 if value else 0.0), None
            if type(value) is int and value in (0, 1):
                return float(value), None
            raise _bad(f"outcome 'value' must be true or false (1 or 0), got {value!r}"[:300], f"{at}value",
                       "missing_required_parameter" if value is None else "invalid_value")
        if value is not None:
            raise _bad(f"kind={kind} takes no 'value'", f"{at}value")
        if kind == "comment":
            if item.get("comment") is None:
                raise _bad("kind=comment needs 'comment': the text", f"{at}comment", "missing_required_parameter")
            return None, None
        # correction: the message(s) the model should have given
        if correction is None:
            raise _bad("kind=correction needs 'correction': the answer the model should have given (a string, a "
                       "message {role, content}, or a list of messages)", f"{at}correction", "missing_required_parameter")
        if type(correction) is str:
            correction = [{"role": "assistant", "content": correction}]
        elif type(correction) is dict:
            correction = [correction]
        if type(correction) is not list or not correction:
            raise _bad("'correction' must be a string, a message or a non-empty list of messages", f"{at}correction",
                       "invalid_type")
        if len(correction) > MAX_CORRECTION_MESSAGES:
            raise _bad(f"'correction' has {len(correction)} messages; at most {MAX_CORRECTION_MESSAGES}", f"{at}correction",
                       "too_long")
        out = []
        for i, msg in enumerate(correction):
            p = f"{at}correction[{i}]"
            if type(msg) is not dict:
                raise _bad(f"'{p}' must be a message object {{role, content}}", p, "invalid_type")
            role = msg.get("role", "assistant")
            if role not in ("assistant", "user", "system", "tool"):
                raise _bad(f"'{p}.role' must be assistant, user, system or tool", f"{p}.role")
            content = _text(msg.get("content"), f"{p}.content", self.settings.feedback_max_text_chars)
            out.append({**msg, "role": role, "content": content})
        if len(orjson.dumps(out)) > 4 * self.settings.feedback_max_text_chars + 4096:
            raise _bad("'correction' is too large", f"{at}correction", "too_long")
        return None, out

    def build(self, item: Any, key: ApiKey, at: str, *, user: str | None, header_key: str | None) -> FeedbackEvent:
        if type(item) is not dict:
            raise _bad(f"{at or 'the body'} must be a feedback object, got {type(item).__name__}", at or "body", "invalid_type")
        unknown = sorted(set(item) - FIELDS)
        if unknown:
            raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; feedback fields are: "
                       f"{', '.join(sorted(FIELDS))}", f"{at}{unknown[0]}"[:200], "unknown_parameter")
        kind = item.get("kind")
        if kind is None:
            raise _bad(f"'kind' is required: one of {', '.join(KINDS)}", f"{at}kind", "missing_required_parameter")
        if kind not in KINDS:
            raise _bad(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}"[:300], f"{at}kind")
        iid, episode = self._target(item, key, at)
        value, correction = self._value(kind, item, at)
        comment = item.get("comment")
        if comment is not None:
            comment = _text(comment, f"{at}comment", self.settings.feedback_max_text_chars)
        source = item.get("source", "explicit")
        if source not in ("explicit", "implicit"):
            raise _bad(f"'source' must be 'explicit' or 'implicit', got {source!r}"[:200], f"{at}source")
        weight = item.get("weight")
        if weight is None:
            weight = 1.0 if source == "explicit" else IMPLICIT_WEIGHT
        else:
            weight = _number(weight, f"{at}weight")
            if not 0.0 <= weight <= 1.0:
                raise _bad(f"'weight' must be in [0, 1], got {weight}", f"{at}weight", "out_of_range")
        idem = item.get("idempotency_key", header_key)
        if idem is not None:
            idem = _text(idem, f"{at}idempotency_key", MAX_ID_CHARS)
        u = item.get("user", user)
        if u is not None:
            u = _text(u, f"{at}user", MAX_ID_CHARS)
        metadata = item.get("metadata") or {}
        if type(metadata) is not dict:
            raise _bad("'metadata' must be an object", f"{at}metadata", "invalid_type")
        if metadata and len(orjson.dumps(metadata)) > self.settings.feedback_max_metadata_bytes:
            raise _bad(f"'metadata' is larger than {self.settings.feedback_max_metadata_bytes} bytes as JSON "
                       "(feedback_max_metadata_bytes)", f"{at}metadata", "too_long")
        event_id = feedback_event_id(key.tenant, idem) if idem is not None else new_id()
        return FeedbackEvent(event_id=event_id, interaction_id=iid, episode_id=episode, kind=kind, value=value,
                             comment=comment, correction=correction, source=source, weight=weight,
                             idempotency_key=idem, user_id=u, tenant=key.tenant or None,
                             metadata={**metadata, "api_key": key.name})

    # -- acceptance --------------------------------------------------------------------------
    @staticmethod
    def _fingerprint(ev: FeedbackEvent) -> bytes:
        """What the item says, as a 16-byte digest (what the idempotency cache keeps for each key).

        Not orjson's bytes themselves: orjson hands back a ~200-byte item in a 4 KiB allocation, so a full
        cache held ~36 MiB, and the proxy's RSS climbed for 14 minutes at 10 feedback/s (chaos soak)."""
        return hashlib.blake2b(orjson.dumps([ev.interaction_id, ev.episode_id, ev.kind, ev.value, ev.comment, ev.correction,
                                             ev.source, ev.weight, ev.user_id, ev.metadata]), digest_size=16).digest()

    def accept(self, items: list[Any], key: ApiKey, *, batch: bool, user: str | None,
               header_key: str | None) -> list[Accepted]:
        """Validate every item (all or nothing), then emit the new ones. Raises ProxyError."""
        events = [self.build(item, key, f"[{i}]." if batch else "", user=user, header_key=None if batch else header_key)
                  for i, item in enumerate(items)]
        out: list[Accepted] = []
        fresh: list[tuple[FeedbackEvent, bytes]] = []
        with self._lock:
            for i, ev in enumerate(events):
                fp = self._fingerprint(ev)
                if ev.idempotency_key is not None:
                    seen = self._recent.get((key.tenant, ev.idempotency_key))
                    if seen is not None:
                        if seen[1] != fp:
                            raise _bad(f"idempotency key {ev.idempotency_key!r} was already used for different feedback; "
                                       "use a new key for a new judgement", f"[{i}].idempotency_key" if batch else
                                       "idempotency_key", "idempotency_key_reused", 409)
                        out.append(Accepted(ev.event_id, True))
                        continue
                out.append(Accepted(ev.event_id, False))
                fresh.append((ev, fp))
        for ev, fp in fresh:
            if not self.emit(ev):
                raise ProxyError(503, "feedback could not be queued (the proxy's event spool and memory budget are "
                                      "full); retry later with the same idempotency_key", code="spool_full")
            if ev.idempotency_key is not None:
                with self._lock:
                    self._recent[(key.tenant, ev.idempotency_key)] = (ev.event_id, fp)
                    self._recent.move_to_end((key.tenant, ev.idempotency_key))
                    while len(self._recent) > IDEMPOTENCY_CACHE:
                        self._recent.popitem(last=False)
        return out


FEEDBACK: web.AppKey[FeedbackService] = web.AppKey("onpolicy_feedback", FeedbackService)


def authenticate(request: web.Request, keys: ApiKeys) -> ApiKey:
    """The caller's key, or 401 with what to do. Never echoes the presented key."""
    header = request.headers.get("Authorization")
    if not header:
        raise ProxyError(401, "missing API key: send 'Authorization: Bearer <your onpolicy API key>'",
                         code="missing_api_key")
    token = bearer(header)
    key = keys.lookup(token) if token else None
    if key is None:
        raise ProxyError(401, "invalid API key: it is not one this proxy knows (check the key, or ask your operator "
                              "for one: python -m proxy.api_keys new --tenant ...)", code="invalid_api_key")
    return key


async def post_feedback(request: web.Request) -> web.Response:
    """POST /v1/feedback: one item or a list; 202 with the feedback id(s)."""
    svc = request.app[FEEDBACK]
    key = authenticate(request, svc.keys)
    if request.content_length is not None and request.content_length > FEEDBACK_MAX_BODY_BYTES:
        raise ProxyError(413, f"a feedback request is at most {FEEDBACK_MAX_BODY_BYTES} bytes; send smaller batches",
                         code="request_too_large")
    raw = await request.read()
    if not raw:
        raise ProxyError(400, "the request body is empty; send a feedback object or a list of them", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    batch = type(body) is list
    items = body if batch else [body]
    if batch and not items:
        raise ProxyError(400, "the batch is empty; send at least one feedback object", code="invalid_value")
    if len(items) > svc.settings.feedback_max_batch:
        raise ProxyError(413, f"the batch has {len(items)} items; at most {svc.settings.feedback_max_batch} "
                              "(feedback_max_batch) per request", code="batch_too_large")
    h = request.headers
    accepted = svc.accept(items, key, batch=batch, user=h.get("x-onpolicy-user"), header_key=h.get("Idempotency-Key"))
    payload = {"object": "list", "data": [a.as_json() for a in accepted]} if batch else accepted[0].as_json()
    return web.json_response(payload, status=202, dumps=lambda o: orjson.dumps(o).decode())


def register(app: web.Application) -> None:
    from proxy.apis import API_METRICS, API_PRODUCER

    state = app[STATE]
    metrics = app[API_METRICS]
    producer = app[API_PRODUCER]

    def emit(event: FeedbackEvent) -> bool:
        ok = producer.emit(event)
        if ok:
            metrics.feedback.labels(event.kind, event.source).inc()
            if state.tally is not None and event.source == "explicit":
                state.tally.feedback_accepted(event.ts)  # reconciliation (streams/reconcile.py)
        return ok

    app[FEEDBACK] = FeedbackService(state.settings, state.ids, load_api_keys(state.settings), emit)
    resource = app.router.add_resource("/v1/feedback")
    resource.add_route("POST", metrics.counted("/v1/feedback", post_feedback))
    # Any other method is 405 here; without this the /v1 catch-all would forward it to vLLM.
    resource.add_route("*", _method_not_allowed)


async def _method_not_allowed(request: web.Request) -> web.Response:
    raise ProxyError(405, f"{request.method} is not allowed on /v1/feedback; allowed: POST", code="method_not_allowed")
