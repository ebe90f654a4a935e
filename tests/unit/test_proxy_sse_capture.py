"""SSE assembly (the fast path must agree with the general one), redaction, and the events capture
builds (they must decode with the streams contract)."""

from __future__ import annotations

import json
import random
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


_TEXTS = ["tok", " ", "ab", '"', "\\", '\\"', '"},"', '"content":"', "\n", "\r\n", "\t", "é", "🙂", "\u2028", "\x00",
          "\x1f", "\x7f", "\\u00e9", "data: [DONE]\n\n", "{", "",
          '"},"logprobs":null,"finish_reason":null}]}\n\ndata: {"id":"']


def _random_stream(rng: random.Random) -> tuple[bytes, bool]:
    """A chat stream built from the fast path's edge cases, and whether it is the plain shape (vLLM's:
    compact JSON, one choice, text only, the middle chunks the same bytes but for their content,
    whole) that the fast path must take."""
    def text() -> str:
        return "".join(rng.choice(_TEXTS) for _ in range(rng.randint(0, 4)))

    ensure_ascii, compact = rng.random() < 0.5, rng.random() < 0.9
    env = {"id": f"chatcmpl-{rng.getrandbits(64):x}", "object": "chat.completion.chunk",
           "created": rng.randint(0, 2**40), "model": rng.choice(["m", "shop-assistant-v0007", 'we"ird\\model'])}
    if rng.random() < 0.2:
        env["usage"] = None  # some servers send it in every chunk
    stop_reason = {"stop_reason": None} if rng.random() < 0.2 else {}
    logprobs = {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": []}]}
    every = rng.choice([{}] * 8 + [{"logprobs": logprobs}, {"logprobs": {}}])  # the same in every chunk

    def make(delta, finish=None, index=0, **extra):
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish, **stop_reason, **every,
                  **extra}
        return {**env, "choices": [choice]}

    events = []
    first = rng.choice(["role", "role", "role", "role only", "content", "none"])
    if first != "none":
        events.append(make({"role": "assistant", "content": ""} if first == "role" else
                           {"role": "assistant"} if first == "role only" else {"content": text()}))
    middle = [make({"content": text()}) for _ in range(rng.randint(0, 12))]
    plain = compact and first != "none" and bool(middle) and "logprobs" not in every
    if middle and rng.random() < 0.25:  # one chunk unlike the others
        i = rng.randrange(len(middle))
        middle[i] = rng.choice([
            lambda: {**middle[i], "created": env["created"] + 1},
            lambda: make({"content": text()}, index=1),
            lambda: make({"tool_calls": [{"index": 0, "function": {"arguments": text()}}]}),
            lambda: make({"content": text()}, logprobs=logprobs),
            lambda: make({"reasoning_content": text()}),
            lambda: make({"role": "assistant", "content": text()}),
            lambda: {"error": {"message": "engine died", "type": "InternalServerError"}},
            lambda: {**middle[i], "usage": {"prompt_tokens": 1, "completion_tokens": i, "total_tokens": i + 1}},
            lambda: make({"content": 7}),
        ])()
        plain = False
    events += middle
    end = rng.random()
    if end < 0.6:
        events.append(make({}, finish=rng.choice(["stop", "length"]), **{"stop_reason": rng.choice([None, 7, "</s>"])}))
    elif end < 0.9 and events:
        events[-1] = make({"content": text()}, finish="stop")
        plain = plain and len(middle) > 1
    if rng.random() < 0.4:
        events.append({**env, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    dumps = (lambda e: json.dumps(e, ensure_ascii=ensure_ascii, separators=(",", ":"))) if compact else json.dumps
    lines = [f"data: {dumps(e)}" for e in events]
    if rng.random() < 0.8:
        lines.append("data: [DONE]")
    # a DEL in a content with a backslash or a non-ASCII byte beside it takes the general path
    plain = (plain and len(lines) > len(middle) + 1
             and not any("\x7f" in m["choices"][0]["delta"]["content"] for m in middle))
    raw = "".join(line + "\n\n" for line in lines).encode()
    framing = rng.random()
    if framing < 0.05:
        raw = raw.replace(b"\n", b"\r\n")
    elif framing < 0.1:  # another line at one event boundary
        events = raw.split(b"\n\ndata: ")
        i = rng.randrange(len(events))
        other = rng.choice([b"\n\n: keep-alive\n\ndata: ", b"\n\nevent: chunk\ndata: ", b"\n\ndata:", b"\ndata: "])
        raw = b"\n\ndata: ".join(events[:i]) + other + b"\n\ndata: ".join(events[i:])
    elif framing < 0.2:
        at = rng.randrange(len(raw) + 1)
        bad = rng.choice([b"", b'"', b"\\", b"\n", b"\n\n", b"\r", b"\r\n", b"}", b"\xc3", b"\x7f"])
        raw = raw[:at] + bad + raw[at + rng.randint(0, 1):]
    elif framing < 0.45:
        raw = raw[:rng.randrange(len(raw) + 1)]
    else:
        return raw, plain
    return raw, False


def _outcome(f, raw):
    try:
        return f(raw)
    except Exception as e:  # noqa: BLE001 -- a malformed stream may break the general path; the fast one must agree
        return type(e)


def test_fast_path_is_the_general_path_for_any_stream():
    rng = random.Random(2026)
    taken = plain_seen = 0
    for _ in range(6000):
        raw, plain = _random_stream(rng)
        fast = _outcome(_fast_chat, raw)
        plain_seen += plain
        if fast is None:
            assert not plain, raw  # the plain shape must not fall back: the fast path would silently stop paying
            continue
        taken += 1
        assert fast == _outcome(lambda r: assemble_general("/v1/chat/completions", r), raw), raw
    assert plain_seen > 600 and taken > plain_seen  # and, exact, it takes some other shapes too


def test_fast_path_refuses_contents_that_are_not_json_strings():
    # Each middle event is prefix + content + suffix, byte for byte, but a content is no valid JSON
    # string body: the general path drops the event, or reads another structure into it.
    head = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{'
    tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def stream(*contents: bytes) -> bytes:
        middle = b"".join(head + b'"content":"' + c + b'"' + tail for c in contents)
        return head + b'"role":"assistant","content":""' + tail + middle + b"data: [DONE]\n\n"

    cases = [(b"a\\u00", b"e9b"), (b"a\\", b"nb"), (b"\xc3", b"\xa9"), (b"\\ud83d", b"\\ude42"), (b"a\nb", b"c"),
             (b'x","role":"user', b"y"), (b'x"},"logprobs":{"content":[]},"z":{"a":"', b"y"), (b"\x7f\\\\", b"d"),
             (b'\\\\"', b"e")]
    for contents in cases:
        raw = stream(*contents, b"z")
        fast, general = _fast_chat(raw), assemble_general("/v1/chat/completions", raw)
        assert fast is None or fast == general, raw
    # the first "content" key is another object's: the delta's content is the same in every chunk
    raw = b"".join(b'data: {"meta":{"content":"%s"},"choices":[{"index":0,"delta":{"content":"x"},"logprobs":null,'
                   b'"finish_reason":null}]}\n\n' % c for c in (b"", b"a", b"b", b"c")) + b"data: [DONE]\n\n"
    assert _fast_chat(raw) in (None, assemble_general("/v1/chat/completions", raw))
    valid = [((b"a\\u00e9", b"\\ud83d\\ude42", b"\xc3\xa9\\\\", b'\\"', b""), 'aé🙂é\\"'),
             ((b"a\x7f", b" b"), "a\x7f b")]
    for contents, text in valid:
        raw = stream(*contents)
        assert _fast_chat(raw) == assemble_general("/v1/chat/completions", raw)
        assert _fast_chat(raw).response["choices"][0]["message"]["content"] == text


def test_fast_path_parses_as_deep_as_the_general_path():
    # Chunks as deep as orjson allows alone fail inside the general path's one array: it parses
    # each payload alone, and drops the two-value one. The fast path must not read them otherwise.
    pad = b',"pad":' + b"[" * 1023 + b"]" * 1023 + b"}\n\n"
    events = (chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), chunk({"content": "b"}))
    raw = (sse(*events, done=False).replace(b"}\n\n", pad)
           + b'data: {"x":1},' + json.dumps(chunk({"content": "!"}, finish="stop")).encode() + b"\n\n")
    general = assemble_general("/v1/chat/completions", raw)
    assert general.response["choices"][0]["message"]["content"] == "ab" and general.finish_reasons == [None]
    assert _fast_chat(raw) in (None, general)


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


def test_frame_reader_cuts_any_split_of_the_pipe_into_the_frames_written():
    """Frames of random sizes (some bigger than the reader's buffer, so it must grow), written to a
    real pipe in random pieces, come out whole and in order; EOF inside a frame leaves it pending."""
    import os
    import random
    import threading

    from proxy.capture_worker import FRAME, FrameReader

    rng = random.Random(7)
    frames = []
    for i in range(400):
        size = rng.choice((0, 1, 40, 3000, 70_000)) if i % 97 else 3_000_000
        parts = (b"m%d" % i, bytes([i % 251]) * rng.randint(0, 500), bytes([i % 13]) * size)
        frames.append(parts)
    stream = b"".join(FRAME.pack(*map(len, p)) + b"".join(p) for p in frames)
    r, w = os.pipe()

    def write():
        at = 0
        while at < len(stream):
            n = rng.choice((1, 7, 12, 4096, 65_536, 300_000))
            os.write(w, stream[at:at + n])
            at += n
        os.write(w, FRAME.pack(5, 0, 0) + b"ab")  # a torn frame, then EOF
        os.close(w)

    t = threading.Thread(target=write)
    t.start()
    reader = FrameReader(r, capacity=1000)
    got = []
    while (batch := reader.read()) is not None:
        got += batch
    t.join()
    os.close(r)
    assert got == frames
    assert reader.pending == FRAME.size + 2
