"""The SSE tap: the relay hands over the raw stream bytes it forwarded, untouched; after the response
is finished this module turns them into the response the client would have got without ``stream``.

Nothing here runs on the critical path: the relay only appends each chunk to a list (a pointer
copy). Assembly parses every ``data:`` payload in one ``orjson.loads`` call (a JSON array built by
joining the payloads), because per-chunk parse calls cost more than the parsing itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Assembled:
    """What a stream amounted to."""

    response: dict[str, Any] | None
    finish_reasons: list[str | None] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    logprobs: list[Any] | None = None
    error: str | None = None
    complete: bool = False  # the upstream sent its terminator ([DONE] or a final event)


def sse_payloads(raw: bytes) -> tuple[list[bytes], bool]:
    """The ``data:`` payloads of an SSE byte stream, and whether ``[DONE]`` was seen.

    A trailing event without its blank-line terminator (a cut stream) is ignored: it may be torn.
    """
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    events = raw.split(b"\n\n")[:-1]  # the last piece is either empty or incomplete
    payloads: list[bytes] = []
    done = False
    for event in events:
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual shape: one data line
            data = event[6:]
        else:
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                continue
            data = b"\n".join(lines)
        if data == b"[DONE]":
            done = True
        else:
            payloads.append(data)
    return payloads, done


def _parse_all(payloads: list[bytes]) -> list[Any]:
    try:
        return orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        out = []
        for p in payloads:  # one bad payload must not lose the others
            try:
                out.append(orjson.loads(p))
            except orjson.JSONDecodeError:
                continue
        return out


_CONTENT = re.compile(rb'"content":"((?:[^"\\]+|\\.)*)"')
# Anything that needs the general path: several choices, tool calls, logprobs, reasoning, errors,
# or JSON that is not compact (the byte patterns below assume vLLM's compact separators).
_NOT_SIMPLE = (b'"tool_calls"', b'"logprobs":{', b'"error"', b'"reasoning', b'"function_call"', b'\r')
_OTHER_CHOICE = re.compile(rb'"index":[1-9]')


def _fast_chat(raw: bytes) -> Assembled | None:
    """The common stream -- one choice, text only -- assembled without parsing every chunk: the
    content strings are cut out of the raw bytes and decoded once; the first and last chunks are
    parsed for the envelope, the finish reason and usage. None when the stream is not that shape.

    One regex pass splits the stream into content strings and what lies between them (the
    envelopes). Every check runs on the envelopes only -- a content string cannot hold a quote,
    newline or CR unescaped, so no marker hides in it -- and a stream's envelopes between two
    contents are usually all the same bytes (same id, created, model), so each check reads one.
    """
    if not raw.startswith(b"data: "):
        return None
    end = raw.rfind(b"\n\n")
    if end < 0:
        return None
    complete = raw if end + 2 == len(raw) else raw[: end + 2]  # a cut stream's torn last event is dropped
    pieces = _CONTENT.split(complete)  # envelope, content, envelope, content, ..., envelope
    contents = pieces[1::2]
    envelopes = pieces[0::2]
    mids = envelopes[1:-1]
    if len(mids) > 1 and mids.count(mids[0]) == len(mids):
        distinct, weights = (envelopes[0], mids[0], envelopes[-1]), (1, len(mids), 1)
    else:
        distinct, weights = envelopes, (1,) * len(envelopes)
    for e in distinct:
        if any(marker in e for marker in _NOT_SIMPLE) or _OTHER_CHOICE.search(e) is not None:
            return None
    # every event must be a single data line: its only newlines are the blank line that ends it
    events = 1 + sum(w * e.count(b"\n\ndata: ") for e, w in zip(distinct, weights))
    if sum(w * e.count(b"\n") for e, w in zip(distinct, weights)) != 2 * events:
        return None
    first = complete[6 : complete.find(b"\n\n")]
    parts = complete[6:-2].rsplit(b"\n\ndata: ", 3)
    if events == 1:
        parts = [first]
    done = parts[-1] == b"[DONE]"
    if done:
        parts.pop()
        if events == 1:
            return None
    if b'": ' in first or b'", "' in first:  # not compact JSON: the byte patterns do not apply
        return None
    try:
        head = orjson.loads(first)
        tail = [orjson.loads(p) for p in parts[-2:]] if events - done > 1 else [head]
        text = orjson.loads(b'"' + b"".join(contents) + b'"')
    except orjson.JSONDecodeError:
        return None
    finish = None
    usage = None
    extra = {}
    role = "assistant"
    for ch in (head, *tail):
        if not isinstance(ch, dict):
            return None
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch.get("choices") or ():
            if (c.get("delta") or {}).get("role"):
                role = c["delta"]["role"]
            if c.get("finish_reason") is not None:
                finish = c["finish_reason"]
                if c.get("stop_reason") is not None:
                    extra["stop_reason"] = c["stop_reason"]
    obj = head.get("object", "")
    choice = {"index": 0, "message": {"role": role, "content": text or None}, "logprobs": None, "finish_reason": finish,
              **extra}
    response = {"id": head.get("id"), "object": obj[: -len(".chunk")] if obj.endswith(".chunk") else obj,
                "created": head.get("created"), "model": head.get("model"), "choices": [choice], "usage": usage}
    return Assembled(response=response, finish_reasons=[finish], usage=usage, complete=done)


def assemble(endpoint: str, raw: bytes) -> Assembled:
    if endpoint.endswith("/chat/completions"):
        fast = _fast_chat(raw)
        if fast is not None:
            return fast
    return assemble_general(endpoint, raw)


def assemble_general(endpoint: str, raw: bytes) -> Assembled:
    payloads, done = sse_payloads(raw)
    chunks = _parse_all(payloads)
    if endpoint.endswith("/responses"):
        return _assemble_responses(chunks, done)
    return _assemble_choices(chunks, done, chat=endpoint.endswith("/chat/completions"))


def _assemble_choices(chunks: list[Any], done: bool, chat: bool) -> Assembled:
    head: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    error = None
    any_logprobs = False
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:  # vLLM reports mid-stream failures as a data event with an error object
            err = chunk["error"]
            error = err.get("message") if isinstance(err, dict) else str(err)
            continue
        if head is None:
            head = chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            idx = c.get("index", 0)
            if chat:
                delta = c.get("delta")
                # The common chunk: content only. Take it without the general bookkeeping below.
                if (delta is not None and len(delta) == 1 and "content" in delta and c.get("finish_reason") is None
                        and not c.get("logprobs") and idx in choices):
                    if delta["content"]:
                        choices[idx]["parts"].append(delta["content"])
                    continue
            acc = choices.get(idx)
            if acc is None:
                acc = choices[idx] = {"index": idx, "parts": [], "tool_calls": {}, "role": None, "finish_reason": None,
                                      "logprobs": [], "reasoning": [], "extra": {}}
            if chat:
                delta = c.get("delta") or {}
                if delta.get("role"):
                    acc["role"] = delta["role"]
                if delta.get("content"):
                    acc["parts"].append(delta["content"])
                if delta.get("reasoning_content"):
                    acc["reasoning"].append(delta["reasoning_content"])
                for tc in delta.get("tool_calls") or ():
                    slot = acc["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                           "function": {"name": "", "arguments": ""}})
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    if tc.get("type"):
                        slot["type"] = tc["type"]
                    fn = tc.get("function") or {}
                    if fn.get("name"):
                        slot["function"]["name"] += fn["name"]
                    if fn.get("arguments"):
                        slot["function"]["arguments"] += fn["arguments"]
            elif c.get("text"):
                acc["parts"].append(c["text"])
            lp = c.get("logprobs")
            if lp:
                any_logprobs = True
                acc["logprobs"].append(lp)
            if c.get("finish_reason") is not None:
                acc["finish_reason"] = c["finish_reason"]
                if c.get("stop_reason") is not None:
                    acc["extra"]["stop_reason"] = c["stop_reason"]
    if head is None:
        return Assembled(response=None, error=error, complete=done)
    out_choices = []
    for idx in sorted(choices):
        acc = choices[idx]
        if chat:
            message: dict[str, Any] = {"role": acc["role"] or "assistant", "content": "".join(acc["parts"]) or None}
            if acc["tool_calls"]:
                message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
            if acc["reasoning"]:
                message["reasoning_content"] = "".join(acc["reasoning"])
            choice: dict[str, Any] = {"index": idx, "message": message}
            choice["logprobs"] = _merge_chat_logprobs(acc["logprobs"]) if acc["logprobs"] else None
        else:
            choice = {"index": idx, "text": "".join(acc["parts"])}
            choice["logprobs"] = _merge_completion_logprobs(acc["logprobs"]) if acc["logprobs"] else None
        choice["finish_reason"] = acc["finish_reason"]
        choice.update(acc["extra"])
        out_choices.append(choice)
    obj = head.get("object", "")
    response = {
        "id": head.get("id"),
        "object": obj[: -len(".chunk")] if obj.endswith(".chunk") else obj,
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": out_choices,
        "usage": usage,
    }
    return Assembled(
        response=response,
        finish_reasons=[c["finish_reason"] for c in out_choices],
        usage=usage,
        logprobs=[c["logprobs"] for c in out_choices] if any_logprobs else None,
        error=error,
        complete=done,
    )


def _merge_chat_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    content: list[Any] = []
    for p in parts:
        content.extend(p.get("content") or ())
    return {"content": content}


def _merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in merged:
            merged[k].extend(p.get(k) or ())
    return merged


def _assemble_responses(chunks: list[Any], done: bool) -> Assembled:
    # The Responses API ends a stream with a response.completed (or .failed/.incomplete) event that
    # carries the whole response object.
    final = None
    for chunk in chunks:
        if isinstance(chunk, dict) and chunk.get("type") in ("response.completed", "response.failed", "response.incomplete"):
            final = chunk.get("response")
    if final is None:
        return Assembled(response=None, complete=done)
    return Assembled(response=final, usage=final.get("usage"), finish_reasons=[final.get("status")], complete=True)
