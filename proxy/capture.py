"""Capture: exactly one ``InteractionEvent`` per request, built after the response is finished.

The relay fills an ``Exchange`` as it goes (references to bytes it already has: the request body,
the parsed request, the response body or the list of stream chunks, timestamps) and calls
``Capture.record`` once, after the last byte went to the client (or the client left, or the
upstream failed). ``record`` never raises and never blocks: it parses, assembles and redacts, then
hands the event to ``EventProducer.emit`` (a spool append).

What is captured of a request that opted out of training (``x-onpolicy-train: false``): the event
is still emitted (so the request counts in metrics and feedback can still reference its id), with
``train_opt_out=True`` and **no content**: ``request`` keeps only ``model`` and ``stream``, and
``response``/``logprobs`` are omitted. Usage, latency, status, finish reasons and routing are kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.redaction import Redactor
from proxy.sse import assemble
from streams.events import InteractionEvent
from streams.ids import new_id
from streams.producer import event_key
from streams.topics import INTERACTIONS

log = logging.getLogger(__name__)

# Request fields that describe how the sample was drawn (copied into ``sampling``).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "seed", "n", "stop",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs",
                 "logit_bias", "response_format", "tool_choice", "best_of", "echo")


@dataclass(slots=True)
class Exchange:
    """One request through the relay: what capture needs, filled on the hot path by reference."""

    endpoint: str
    interaction_id: str
    public_model: str
    request: dict[str, Any]
    t0: float
    upstream: str
    upstream_model: str | None = None
    adapter_version: str | None = None
    stream: bool = False
    episode_id: str | None = None
    user_id: str | None = None
    tenant: str | None = None
    train_opt_out: bool = False
    status: int = 200
    body: bytes | None = None  # non-streaming response body as relayed
    chunks: list[bytes] = field(default_factory=list)  # streaming: the bytes relayed, in order
    t_first: float | None = None
    t_end: float | None = None
    error: str | None = None
    abandoned: bool = False
    response: dict[str, Any] | None = None  # set directly by paths that already hold an object (hosted)
    request_body: bytes | None = None  # the body as the client sent it (for the capture worker)
    handed_at: float | None = None  # wall clock when handed to capture (the event's ts; set by the tally)


def _strings(value: Any, out: list[str]) -> None:
    t = type(value)
    if t is str:
        out.append(value)
        return
    if t is dict:
        value = value.values()
    elif t is not list:
        return
    for v in value:  # leaves are handled here: a call per container, not per value
        t = type(v)
        if t is str:
            out.append(v)
        elif t is dict or t is list:
            _strings(v, out)


def _replace_strings(value: Any, it) -> Any:
    t = type(value)
    if t is str:
        return next(it)
    if t is dict:
        return {k: _replace_strings(v, it) for k, v in value.items()}
    if t is list:
        return [_replace_strings(v, it) for v in value]
    return value


# Joins every string of an event for one redactor call; redactors must not match across it.
SEPARATOR = "\x00"


def redact_all(redactor: Redactor, values: list[Any]) -> list[Any]:
    """Redact every string inside ``values`` (JSON-like trees) with one ``redactor.redact`` call.

    All strings are joined with NUL (which no JSON string from a client contains unescaped and no
    default rule matches), redacted once, split back and put where they were. Clean text -- the
    usual case -- costs one scan per rule and no rebuild.
    """
    strings: list[str] = []
    for v in values:
        _strings(v, strings)
    if not strings:
        return values
    joined = SEPARATOR.join(strings)
    if joined.count(SEPARATOR) != len(strings) - 1:  # a string with a NUL in it: redact one by one
        return [_replace_strings(v, iter([redactor.redact(s) for s in _collect(v)])) for v in values]
    redacted = redactor.redact(joined)
    if redacted == joined:
        return values
    pieces = redacted.split(SEPARATOR)
    if len(pieces) != len(strings):  # a custom redactor ate a separator: fall back to one by one
        pieces = [redactor.redact(s) for s in strings]
    it = iter(pieces)
    return [_replace_strings(v, it) for v in values]


def _collect(value: Any) -> list[str]:
    out: list[str] = []
    _strings(value, out)
    return out


def _error_message(body: bytes | None, status: int) -> str:
    if body:
        try:
            data = orjson.loads(body)
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if isinstance(data, dict) and data.get("message"):  # vLLM's older error shape
                return str(data["message"])
        except orjson.JSONDecodeError:
            pass
        return body[:500].decode(errors="replace")
    return f"HTTP {status}"


def _truncate_strings(value: Any, max_chars: int) -> Any:
    t = type(value)
    if t is str:
        if len(value) > max_chars:
            return value[:max_chars] + f"...[truncated {len(value) - max_chars} chars]"
        return value
    if t is dict:
        return {k: _truncate_strings(v, max_chars) for k, v in value.items()}
    if t is list:
        return [_truncate_strings(v, max_chars) for v in value]
    return value


# Marks a captured request whose long strings were cut to fit the event size limit.
TRUNCATED_KEY = "x_onpolicy_truncated"


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_STR_FIELDS = ("interaction_id", "endpoint", "public_model")
_OPTIONAL_STR_FIELDS = ("upstream_model", "adapter_version", "upstream", "error", "episode_id", "user_id", "tenant")
_BOOL_FIELDS = ("stream", "abandoned", "train_opt_out")


def _plain(data: dict[str, Any]) -> bool:
    """Whether ``data`` is already what ``InteractionEvent`` would validate to (no coercion, no error)."""
    for k in _STR_FIELDS:
        if type(data[k]) is not str:
            return False
    for k in _OPTIONAL_STR_FIELDS:
        if data[k] is not None and type(data[k]) is not str:
            return False
    for k in _BOOL_FIELDS:
        if type(data[k]) is not bool:
            return False
    lf = data["latency_first_token_ms"]
    usage = data["usage"]
    if usage is not None and not all(v is None or type(v) is int for v in usage.values()):
        return False
    return (type(data["request"]) is dict and (data["response"] is None or type(data["response"]) is dict)
            and type(data["http_status"]) is int and type(data["latency_total_ms"]) is float
            and (lf is None or type(lf) is float)
            and (data["logprobs"] is None or type(data["logprobs"]) is list)
            and all(f is None or type(f) is str for f in data["finish_reasons"]))


class CapturedEvent:
    """An ``InteractionEvent`` as capture builds it: the dict its model would dump, serialized once.

    Why not the pydantic model: constructing and validating one per request, then dumping it, cost
    more CPU than everything else the capture worker does but redaction (bench/capture_cpu.py). The
    dict is checked field by field against the model's types (``_plain``); anything else goes through
    the model (``validated``: coerced, or a ValidationError counted as a failed event). The JSON is the
    model's: same fields, order and formats; tests/unit/test_capture_event_contract.py decodes it with
    the model and compares it with the model-built event. Read the fields as attributes
    (``event.request``); ``model()`` gives the pydantic event.
    """

    __slots__ = ("data", "_json")
    event_type = "interaction"

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self._json: bytes | None = None

    @classmethod
    def validated(cls, data: dict[str, Any]) -> "CapturedEvent":
        model = InteractionEvent(**data)
        event = cls(model.model_dump())
        event._json = model.to_json()
        return event

    # the fields streams.producer.event_key reads for every record, without going through __getattr__
    episode_id = property(lambda self: self.data["episode_id"])
    interaction_id = property(lambda self: self.data["interaction_id"])
    event_id = property(lambda self: self.data["event_id"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "data":  # copy/pickle probes, or a half-built instance
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_json(self) -> bytes:
        if self._json is None:
            try:
                self._json = orjson.dumps(self.data, option=orjson.OPT_UTC_Z)
            except TypeError:  # a value orjson does not know (a hosted SDK's object): the model's serializer
                self._json = InteractionEvent(**self.data).to_json()
        return self._json

    def model(self) -> InteractionEvent:
        return InteractionEvent.model_validate_json(self.to_json())


class Capture:
    """Builds and emits the events. ``producer`` is an ``EventProducer`` (or anything with ``emit``).

    Events are kept under ``max_event_bytes`` (Kafka refuses records over its message size, 1 MB by
    default): when the raw request and response are bigger, every string longer than a share of the
    limit is cut, with a note, and the request gets ``"x_onpolicy_truncated": true``.
    """

    def __init__(self, producer, redactor: Redactor, max_event_bytes: int = 900_000):
        self.producer = producer
        self.redactor = redactor
        self.max_event_bytes = max_event_bytes
        self.emitted = 0
        self.dropped = 0
        self.failed = 0  # events that could not be built (a bug); counted and logged, never raised
        self.tally = None  # streams.reconcile.Tally in the proxy's process (inline mode); None in the worker

    def record(self, ex: Exchange) -> None:
        if self.tally is not None:
            self.tally.served(ex)
        try:
            event = self.build(ex)
            event.to_json()  # serialized here, so a failure is counted as one (emit reuses the bytes)
        except Exception:
            self.failed += 1
            log.exception("could not build the interaction event for %s", ex.interaction_id)
            return
        if self.producer.emit(event):
            self.emitted += 1
        else:
            self.dropped += 1

    def record_many(self, exchanges: list[Exchange]) -> None:
        """``record`` for a batch, handed to the producer with one spool write (``emit_many``)."""
        records = []
        for ex in exchanges:
            try:
                event = self.build(ex)
                records.append((INTERACTIONS.name, event_key(event), event.to_json()))
            except Exception:
                self.failed += 1
                log.exception("could not build the interaction event for %s", ex.interaction_id)
        accepted = self.producer.emit_many(records)
        self.emitted += accepted
        self.dropped += len(records) - accepted

    def build(self, ex: Exchange) -> CapturedEvent:
        t_end = ex.t_end or time.perf_counter()
        response: dict[str, Any] | None = ex.response
        finish: list[str | None] = []
        usage = None
        logprobs = None
        error = ex.error
        assembled = bool(ex.chunks)
        if assembled:
            asm = assemble(ex.endpoint, b"".join(ex.chunks))
            response, finish, usage, logprobs = asm.response, asm.finish_reasons, asm.usage, asm.logprobs
            error = error or asm.error
        elif response is None and ex.body is not None:
            if ex.status >= 400:
                error = error or _error_message(ex.body, ex.status)
            try:
                parsed = orjson.loads(ex.body)
                response = parsed if isinstance(parsed, dict) else {"data": parsed}
            except orjson.JSONDecodeError:
                response = {"text": ex.body[:10000].decode(errors="replace")}
        if response is not None and ex.status < 400 and not assembled:
            choices = response.get("choices")
            if isinstance(choices, list):
                lps = []
                for c in choices:
                    if isinstance(c, dict):
                        finish.append(c.get("finish_reason"))
                        lps.append(c.get("logprobs"))
                logprobs = lps if lps.count(None) != len(lps) else None
            usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
        req = ex.request
        sampling = {k: req[k] for k in SAMPLING_KEYS if k in req}
        if ex.endpoint == "/embeddings" and isinstance(response, dict) and isinstance(response.get("data"), list):
            # Vectors teach the learner nothing and can be megabytes: keep their shape only.
            response = dict(response, data=[
                {"index": d.get("index"), "dimensions": len(d.get("embedding") or ())} if isinstance(d, dict) else d
                for d in response["data"]])
        size = len(ex.request_body or b"") + len(ex.body or b"") + (sum(map(len, ex.chunks)) if assembled else 0)
        if size > self.max_event_bytes:
            n = len(_collect(req)) + len(_collect(response)) + len(_collect(logprobs)) + 1
            max_chars = max(256, self.max_event_bytes // (2 * n))
            req, response, logprobs = (_truncate_strings(v, max_chars) for v in (req, response, logprobs))
            req = dict(req, **{TRUNCATED_KEY: True})
        if ex.train_opt_out:
            request_out: dict[str, Any] = {"model": req.get("model"), "stream": ex.stream}
            response, logprobs = None, None
        else:
            request_out, response, logprobs, error = redact_all(self.redactor, [req, response, logprobs, error])
        if usage is not None:
            if "input_tokens" in usage:  # the Responses API's names
                usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
                         "total_tokens": usage.get("total_tokens")}
            usage = {k: v if isinstance(v := usage.get(k), int) else None for k in _USAGE_KEYS}
        ts = (dt.datetime.fromtimestamp(ex.handed_at, dt.timezone.utc) if ex.handed_at is not None  # the same
              else dt.datetime.now(dt.timezone.utc))  # minute the proxy's tally counted (streams.reconcile)
        # The fields in InteractionEvent's order, as its model_dump_json would write them.
        data = {
            "event_id": new_id(), "ts": ts, "event_type": "interaction", "schema_version": 1,
            "interaction_id": ex.interaction_id, "endpoint": ex.endpoint, "public_model": ex.public_model,
            "upstream_model": ex.upstream_model, "adapter_version": ex.adapter_version, "upstream": ex.upstream,
            "request": request_out, "response": response, "stream": ex.stream, "sampling": sampling,
            "usage": usage,
            "latency_first_token_ms": (ex.t_first - ex.t0) * 1000 if ex.t_first is not None else None,
            "latency_total_ms": (t_end - ex.t0) * 1000, "http_status": ex.status, "error": error,
            "finish_reasons": finish, "logprobs": logprobs, "abandoned": ex.abandoned, "episode_id": ex.episode_id,
            "user_id": ex.user_id, "tenant": ex.tenant, "train_opt_out": ex.train_opt_out,
        }
        event = CapturedEvent(data) if _plain(data) else CapturedEvent.validated(data)
        if size > self.max_event_bytes and len(event.to_json()) > self.max_event_bytes:
            # Still too big (huge arrays, not long strings): keep the request, drop the answer's body.
            event = CapturedEvent(dict(event.data, response={"omitted": f"the response was too large to capture ({size} bytes)"},
                                             logprobs=None))
            if len(event.to_json()) > self.max_event_bytes:
                event = CapturedEvent(dict(event.data, request={"model": req.get("model"), TRUNCATED_KEY: True,
                                                                "omitted": "the request was too large to capture"}))
        return event
