"""SSE assembly (the fast path must agree with the general one), redaction, and the events capture
builds (they must decode with the streams contract)."""

from __future__ import annotations

import json
import time

import orjson
import pytest

from proxy.capture import TRUNCATED_KEY, Capture, Exchange, redact_all
from proxy.capture_worker import pack, unpack
from proxy.redaction import RegexRedactor, load_redactor
from proxy.sse import _fast_chat, assemble, assemble_general, sse_payloads
from streams.events import InteractionEvent, decode


def sse(*events, done=True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta=None, finish=None, index=0, usage=None, logprobs=None, choices=True):
    c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}] if choices else []}
    if usage:
        c["usage"] = usage
    return c


SIMPLE = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo \"q\" \\ é 🙂"}),
             chunk({"content": "!"}, finish="stop"), chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                                                     "total_tokens": 7}))


def test_fast_path_agrees_with_general_path():
    fast, general = _fast_chat(SIMPLE), assemble_general("/v1/chat/completions", SIMPLE)
    assert fast is not None
    assert fast.response == general.response
    assert fast.response["choices"][0]["message"]["content"] == 'Hello "q" \\ é 🙂!'
    assert fast.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert fast.finish_reasons == general.finish_reasons == ["stop"] and fast.complete


def test_cut_stream_keeps_what_was_complete():
    cut = SIMPLE[: SIMPLE.index(b"!") - 20]  # torn inside the 4th event
    for asm in (_fast_chat(cut), assemble_general("/v1/chat/completions", cut)):
        assert asm.response["choices"][0]["message"]["content"] == 'Hello "q" \\ é 🙂'
        assert not asm.complete and asm.finish_reasons == [None]


def test_torn_last_event_with_a_whole_content_string_is_not_counted():
    raw = SIMPLE[: SIMPLE.index(b'"content":"!"') + len(b'"content":"!"}')]  # the 4th event, cut after its content
    for asm in (_fast_chat(raw), assemble_general("/v1/chat/completions", raw)):
        assert asm.response["choices"][0]["message"]["content"] == 'Hello "q" \\ é 🙂'


def test_tool_calls_n2_logprobs_and_errors_take_the_general_path():
    tools = sse(chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                               "function": {"name": "get_", "arguments": ""}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": "{\"city\":"}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}, finish="tool_calls"))
    assert _fast_chat(tools) is None
    tc = assemble("/v1/chat/completions", tools).response["choices"][0]["message"]["tool_calls"]
    assert tc == [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]

    two = sse(chunk({"content": "a"}, index=0), chunk({"content": "b"}, index=1), chunk({"content": "c"}, index=0, finish="stop"),
              chunk({}, index=1, finish="length"))
    assert _fast_chat(two) is None
    asm = assemble("/v1/chat/completions", two)
    assert [c["message"]["content"] for c in asm.response["choices"]] == ["ac", "b"]
    assert asm.finish_reasons == ["stop", "length"]

    lp = {"content": [{"token": "a", "logprob": -0.1, "top_logprobs": []}]}
    with_lp = sse(chunk({"content": "a"}, logprobs=lp), chunk({"content": "a"}, logprobs=lp, finish="stop"))
    asm = assemble("/v1/chat/completions", with_lp)
    assert asm.logprobs == [{"content": lp["content"] * 2}]

    err = sse(chunk({"content": "a"}), {"error": {"message": "engine died", "type": "InternalServerError"}}, done=False)
    asm = assemble("/v1/chat/completions", err)
    assert asm.error == "engine died" and asm.response["choices"][0]["message"]["content"] == "a"


def test_completions_stream_and_crlf_and_multiline_data():
    events = [{"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": t, "logprobs": {"tokens": [t], "token_logprobs": [-1.0], "top_logprobs": [None],
                                                                "text_offset": [0]}, "finish_reason": f}]}
              for t, f in (("Par", None), ("is", "length"))]
    raw = sse(*events).replace(b"\n", b"\r\n")
    asm = assemble("/v1/completions", raw)
    assert asm.response["object"] == "text_completion" and asm.response["choices"][0]["text"] == "Paris"
    assert asm.logprobs[0]["tokens"] == ["Par", "is"]
    payloads, done = sse_payloads(b'event: x\ndata: {"a":\ndata: 1}\n\ndata: [DONE]\n\n')
    assert payloads == [b'{"a":\n1}'] and done


def test_responses_stream_takes_the_final_event():
    final = {"id": "resp_1", "status": "completed", "output": [], "usage": {"input_tokens": 1}}
    raw = (b'event: response.created\ndata: {"type":"response.created"}\n\n'
           b"event: response.completed\ndata: " + orjson.dumps({"type": "response.completed", "response": final}) + b"\n\n")
    asm = assemble("/v1/responses", raw)
    assert asm.response == final and asm.finish_reasons == ["completed"]


def test_redactor_rules_and_no_false_positives():
    r = RegexRedactor()
    text = ("write to jane.doe+x@mail.example.co.uk, call +1 415 555 0100 or (415) 555-0100; key sk-abcdefghijklmnop1234 "
            "and AKIAABCDEFGHIJKLMNOP; Bearer abcdefghijklmnopqrstuvwxyz")
    out = r.redact(text)
    for secret in ("jane.doe", "415", "sk-abc", "AKIA", "Bearer abc"):
        assert secret not in out, out
    assert out.count("[EMAIL]") == 1 and out.count("[PHONE]") == 2 and out.count("[SECRET]") == 3
    clean = "seed 12345678, version 1.2.3, 2026-11-26, id chatcmpl-0000000000000, 3.14159, x@y"
    assert r.redact(clean) == clean
    assert r.counts == {"email": 1, "secret": 3, "phone": 2}


def test_redact_all_puts_strings_back_in_place():
    r = RegexRedactor()
    req = {"model": "m", "messages": [{"role": "user", "content": "me@example.com"}, {"role": "user", "content": "ok"}],
           "n": 1, "stop": ["a@b.io", None]}
    out_req, out_none, out_err = redact_all(r, [req, None, "call +44 20 7946 0958"])
    assert out_req == {"model": "m", "messages": [{"role": "user", "content": "[EMAIL]"}, {"role": "user", "content": "ok"}],
                       "n": 1, "stop": ["[EMAIL]", None]}
    assert out_none is None and out_err == "call [PHONE]"
    same = redact_all(r, [{"a": "clean"}])
    assert same == [{"a": "clean"}]


def test_pluggable_redactor_spec():
    assert load_redactor("none").redact("me@example.com") == "me@example.com"
    assert isinstance(load_redactor("proxy.redaction:default_redactor"), RegexRedactor)
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_redactor("nope.module:factory")


class Keep:
    def __init__(self):
        self.events = []

    def emit(self, e):
        self.events.append(e)
        return True


def _exchange(**kw) -> Exchange:
    req = {"model": "pub", "messages": [{"role": "user", "content": "mail me@example.com"}], "temperature": 0.5,
           "max_tokens": 7, "seed": 3, "user": "u"}
    base = dict(endpoint="/chat/completions", interaction_id="chatcmpl-op1.x.y", public_model="pub", request=req,
                t0=time.perf_counter() - 0.05, upstream="http://u/v1", upstream_model="pub-v0001",
                adapter_version="pub-v0001", request_body=orjson.dumps(req))
    base.update(kw)
    return Exchange(**base)


def test_capture_builds_events_the_contract_decodes():
    cap = Capture(Keep(), RegexRedactor())
    body = orjson.dumps({"id": "chatcmpl-op1.x.y", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    cases = [
        _exchange(body=body, t_end=time.perf_counter()),
        _exchange(stream=True, chunks=[SIMPLE[:40], SIMPLE[40:]], t_first=time.perf_counter()),
        _exchange(status=404, body=b'{"error":{"message":"The model `pub` does not exist.","type":"NotFoundError"}}'),
        _exchange(status=502, error="cannot connect to upstream"),
        _exchange(stream=True, chunks=[SIMPLE[:SIMPLE.index(b'"lo ')]], abandoned=True),
        _exchange(body=body, train_opt_out=True),
    ]
    for ex in cases:
        cap.record(ex)
    assert cap.emitted == len(cases) and cap.failed == 0
    events = [decode(e.to_json()) for e in cap.producer.events]
    ok, streamed, notfound, unreachable, abandoned, optout = events
    assert isinstance(ok, InteractionEvent) and ok.usage.total_tokens == 6 and ok.finish_reasons == ["stop"]
    assert ok.request["messages"][0]["content"] == "mail [EMAIL]" and ok.sampling == {"temperature": 0.5, "max_tokens": 7, "seed": 3}
    assert ok.adapter_version == "pub-v0001" and ok.latency_total_ms >= 45
    assert streamed.stream and streamed.response["choices"][0]["message"]["content"] == 'Hello "q" \\ é 🙂!'
    assert streamed.usage.total_tokens == 7
    assert notfound.http_status == 404 and notfound.error == "The model `pub` does not exist."
    assert unreachable.http_status == 502 and unreachable.response is None and unreachable.error
    assert abandoned.abandoned and abandoned.response["choices"][0]["message"]["content"] == "Hel"
    assert optout.train_opt_out and optout.response is None and optout.request == {"model": "pub", "stream": False}
    assert optout.usage.total_tokens == 6


def test_capture_never_raises_and_counts_failures():
    class Broken:
        def emit(self, e):
            return False

    cap = Capture(Broken(), RegexRedactor())
    cap.record(_exchange(body=b"{}"))
    assert cap.dropped == 1
    cap.record(_exchange(request=None))  # a bug-shaped exchange: logged and counted, not raised
    assert cap.failed == 1


def test_oversized_exchanges_are_truncated_under_the_event_limit():
    cap = Capture(Keep(), RegexRedactor(), max_event_bytes=20_000)
    req = {"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}]}
    cap.record(_exchange(request=req, request_body=orjson.dumps(req), body=b'{"choices":[]}'))
    ev = cap.producer.events[0]
    assert len(ev.to_json()) < 20_000 and ev.request[TRUNCATED_KEY] is True
    assert "truncated" in ev.request["messages"][0]["content"]


def test_worker_frames_round_trip():
    ex = _exchange(stream=True, chunks=[b"data: 1\n\n", b"data: 2\n\n"], t_first=1.5, t_end=2.0, error=None, episode_id="e")
    frame = pack(ex, ex.request_body)
    import struct

    m, r, s = struct.unpack("<III", frame[:12])
    back = unpack(frame[12:12 + m], frame[12 + m:12 + m + r], frame[12 + m + r:])
    assert back.request == ex.request and back.chunks == [b"data: 1\n\ndata: 2\n\n"]
    assert (back.episode_id, back.t_first, back.adapter_version, back.stream) == ("e", 1.5, "pub-v0001", True)
    obj = _exchange(response={"id": "x", "choices": []})
    frame = pack(obj, obj.request_body)
    m, r, s = struct.unpack("<III", frame[:12])
    assert unpack(frame[12:12 + m], frame[12 + m:12 + m + r], frame[12 + m + r:]).response == {"id": "x", "choices": []}


def test_embeddings_keep_only_their_shape_and_huge_arrays_are_dropped():
    cap = Capture(Keep(), RegexRedactor(), max_event_bytes=20_000)
    body = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 384}
                                                    for i in range(30)], "usage": {"prompt_tokens": 30, "total_tokens": 30}})
    req = {"model": "e", "input": ["hello"] * 30}
    cap.record(_exchange(endpoint="/embeddings", request=req, request_body=orjson.dumps(req), body=body))
    ev = cap.producer.events[-1]
    assert ev.response["data"][3] == {"index": 3, "dimensions": 384} and len(ev.to_json()) < 20_000
    huge = orjson.dumps({"id": "x", "choices": [{"index": 0, "logprobs": {"content": [{"token": "a", "logprob": -1.0}] * 5000}}]})
    cap.record(_exchange(body=huge))
    ev = cap.producer.events[-1]
    assert "omitted" in ev.response and ev.logprobs is None and len(ev.to_json()) < 20_000
