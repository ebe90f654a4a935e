"""Capture builds events as dicts serialized by orjson (not pydantic models): prove they are the model's.

For every shape of exchange the capture path sees, the bytes capture emits must be exactly what
``InteractionEvent(**fields).model_dump_json()`` writes, and must decode with the contract's
``decode``. And the redactor's fast detectors must redact exactly like its plain regex detectors.
"""

from __future__ import annotations

import random
import time

import orjson
import pytest

from proxy.capture import Capture, CapturedEvent, Exchange
from proxy.redaction import _RULES, RegexRedactor
from streams.events import InteractionEvent, decode
from streams.producer import event_key

def _chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
    ch = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return b"data: " + orjson.dumps(ch) + b"\n\n"


SSE = (_chunk({"role": "assistant", "content": ""}) + _chunk({"content": "call +1 415 555 0100"})
       + _chunk({}, "stop", usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) + b"data: [DONE]\n\n")


class Keep:
    def __init__(self):
        self.events = []

    def emit(self, e):
        self.events.append(e)
        return True


def _exchange(**kw) -> Exchange:
    req = {"model": "pub", "messages": [{"role": "user", "content": "mail me@example.com, price 42.50"}],
           "temperature": 0.5, "max_tokens": 7, "stop": ["\n"]}
    now = time.perf_counter()
    base = dict(endpoint="/chat/completions", interaction_id="chatcmpl-op1.x.y", public_model="pub", request=req,
                t0=now - 0.05, upstream="http://u/v1", upstream_model="pub-v0001", adapter_version="pub-v0001",
                request_body=orjson.dumps(req), t_end=now, handed_at=time.time())
    base.update(kw)
    return Exchange(**base)


BODY = orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok é 🙂"},
     "logprobs": {"content": [{"token": "ok", "logprob": -0.5}]}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

CASES = {
    "json": dict(body=BODY),
    "stream": dict(stream=True, chunks=[SSE[:100], SSE[100:]], t_first=time.perf_counter()),
    "error_body": dict(status=404, body=b'{"error":{"message":"no such model"}}'),
    "unreachable": dict(status=502, error="cannot connect", handed_at=None),
    "abandoned": dict(stream=True, chunks=[SSE[:250]], abandoned=True),
    "opt_out": dict(body=BODY, train_opt_out=True, episode_id="ep", user_id="u", tenant="t"),
    "object": dict(response={"id": "h", "choices": [{"index": 0, "finish_reason": "length"}],
                             "usage": {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}}),
    "not_json": dict(body=b"<html>bad gateway</html>", status=200),
    "list_body": dict(body=b"[1, 2]"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_captured_events_are_byte_for_byte_the_models(name):
    cap = Capture(Keep(), RegexRedactor())
    cap.record(_exchange(**CASES[name]))
    assert cap.emitted == 1 and cap.failed == 0
    ev = cap.producer.events[0]
    assert isinstance(ev, CapturedEvent)
    model = InteractionEvent(**ev.data)  # validates every field
    assert ev.to_json() == model.model_dump_json().encode()
    assert decode(ev.to_json()) == model == ev.model()
    assert event_key(ev) == event_key(model)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_batch_hands_the_producer_the_records_emit_would(name):
    """The worker's path (``record_many`` -> ``emit_many``): topic, key and payload as ``emit`` of the event."""
    from streams.topics import INTERACTIONS

    class KeepMany:
        def __init__(self):
            self.records = []

        def emit_many(self, records):
            self.records += records
            return len(records)

    cap = Capture(KeepMany(), RegexRedactor())
    cap.record_many([_exchange(**{**CASES[name], "episode_id": ep}) for ep in (None, "ep-1")])
    assert cap.emitted == 2 and cap.failed == 0
    for topic, key, payload in cap.producer.records:
        model = decode(payload)
        assert topic == INTERACTIONS.name and key == event_key(model)
        assert payload == model.model_dump_json().encode()  # the model's bytes, as emit() sends


def test_values_the_fast_checks_do_not_vouch_for_go_through_the_model():
    cap = Capture(Keep(), RegexRedactor())
    cap.record(_exchange(body=BODY, t0=0, t_end=1))  # int latencies: coerced to floats by the model
    ev = cap.producer.events[0]
    assert b'"latency_total_ms":1000.0' in ev.to_json() and decode(ev.to_json()).latency_total_ms == 1000.0
    cap.record(_exchange(error={"code": 1}, status=500))  # not a string: the model refuses, counted, not raised
    assert cap.failed == 1 and len(cap.producer.events) == 1
    cap.record(_exchange(body=orjson.dumps({"choices": [{"finish_reason": 3}]})))  # refused by the model too
    assert cap.failed == 2


def test_fast_detectors_redact_exactly_like_the_plain_regexes():
    # an equal copy of the rules takes the generic path (tuple() of a tuple is the same object)
    fast, plain = RegexRedactor(), RegexRedactor(tuple(list(_RULES)))
    assert plain._ascii == [None, None, None] and None not in fast._ascii
    rng = random.Random(7)
    alphabet = "0123456789" * 4 + " .-+()@_" * 3 + "abcxyzAKIBskghpoBearer" + "\u0663\u00e9\x00"
    pieces = ["+1 415 555 0100", "(415) 555-0100", "me@ex.com", "sk-" + "a" * 20, "ghp_" + "b" * 24, "xoxb-" + "1" * 12,
              "AKIA" + "Q" * 16, "Bearer " + "t" * 20, "+4915155501000", "42.50", "2026-11-26", "123.456.7890",
              "\u0663" * 3 + "-456-7890"]
    for _ in range(3000):
        size = rng.randint(0, 40) if rng.random() < 0.8 else rng.randint(100, 400)  # long: many "-", "_", "K"
        text = "".join(rng.choice(pieces) if rng.random() < 0.15 else rng.choice(alphabet) for _ in range(size))
        assert fast.redact(text) == plain.redact(text), text
    assert fast.counts == plain.counts


def _stream(rng: random.Random) -> bytes:
    texts = ["tok", " ", 'say "hi"', "a\\b", "line\nbreak", "é🙂", "\"content\":\"x\"", "\r", "data: x\n\n", '"index":1',
             "reasoning", ""]
    n = rng.randint(1, 12)
    events = []
    for i in range(n):
        delta = ({"role": "assistant", "content": ""} if i == 0
                 else {"content": "".join(rng.choice(texts) for _ in range(rng.randint(0, 3)))})
        ch = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if i == n - 1 else None}]}
        if rng.random() < 0.1:
            ch["choices"].append({"index": 1, "delta": {"content": "other"}, "logprobs": None, "finish_reason": None})
        events.append(b"data: " + orjson.dumps(ch) + b"\n\n")
    if rng.random() < 0.5:
        events.append(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
                      b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n')
    if rng.random() < 0.7:
        events.append(b"data: [DONE]\n\n")
    raw = b"".join(events)
    if rng.random() < 0.3:
        raw = raw[: rng.randint(0, len(raw))]
    return raw


def test_fast_stream_assembly_agrees_with_the_general_path():
    from proxy.sse import _fast_chat, assemble_general

    rng = random.Random(11)
    fast_taken = 0
    for _ in range(3000):
        raw = _stream(rng)
        fast = _fast_chat(raw)
        if fast is None:
            continue
        fast_taken += 1
        general = assemble_general("/v1/chat/completions", raw)
        assert (fast.response, fast.finish_reasons, fast.usage, fast.complete) == \
            (general.response, general.finish_reasons, general.usage, general.complete), raw
    assert fast_taken > 1000
