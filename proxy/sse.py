"""The SSE tap: the relay hands over the raw stream bytes it forwarded, untouched; after the response
is finished this module turns them into the response the client would have got without ``stream``.

Nothing here runs on the critical path: the relay only appends each chunk to a list (a pointer
copy). Assembly parses every ``data:`` payload in one ``orjson.loads`` call (a JSON array built by
joining the payloads), because per-chunk parse calls cost more than the parsing itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from io import BytesIO
from operator import itemgetter
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


_STRING_BODY = re.compile(rb'(?:[^"\\]+|\\.)*')  # a JSON string's body: what lies before its closing quote
_SEP = "\x7f"  # joins content strings for one decode: it continues no escape nor UTF-8 sequence
_ROLE = b'"role":"assistant","content":"'
_DONE = b"\n\ndata: [DONE]\n\n"


def _fast_chat(raw: bytes) -> Assembled | None:
    """The common stream -- one choice, text only, the chunks between the first and the last ones
    the same bytes but for their content -- assembled without parsing every chunk. None when the
    stream is not that shape; when it is, the result is exactly the general path's.

    The second event gives the bytes around a content string (``prefix``, ``suffix``), and one parse
    of prefix + sentinel + suffix what such a chunk does (``_middle_chunk``). The middle events are
    cut out of the lines at fixed offsets; one compare of the bytes rebuilt from those contents with
    the stream proves each event is prefix + content + suffix, and the contents' decode that each is
    a valid JSON string body (``_decode``). The first event is either that envelope with
    ``"role":"assistant"`` before an empty content (vLLM's first chunk) or is parsed; the events
    after the middle ones are parsed as the general path parses them.
    """
    lines = BytesIO(raw).readlines()  # memchr-fast; the blank lines are all the one cached b"\n"
    if len(lines) < 6 or lines[1] != b"\n" or raw.find(b"\r") >= 0:
        return None
    second = lines[2]
    at = second.find(b'"content":"') + 11
    if at == 10:
        return None
    end = second.find(b'"', at)
    if second[end - 1] == 92:  # a backslash: the quote may be escaped, find the content's end
        end = _STRING_BODY.match(second, at).end()
    prefix, suffix = second[6:at], second[end:]  # suffix: the closing quote to the newline
    glue = suffix + b"\ndata: " + prefix
    if glue.count(b"\n") != 2 or suffix[:1] != b'"' or second[:6] != b"data: ":
        return None
    chunk = _middle_chunk(prefix, suffix)
    if chunk is None:
        return None
    last = (len(lines) - 3) & -2  # the last event line that another event follows
    while last > 2 and not lines[last].endswith(suffix):
        last -= 2
    contents = list(map(itemgetter(slice(at, -len(suffix))), lines[2:last + 1:2]))
    middle = glue.join(contents)
    start = len(lines[0]) + 1 + at
    after = start + len(middle)  # where the last middle event's suffix starts
    if not raw.startswith(middle, start) or not raw.startswith(glue[:len(suffix) + 7], after):
        return None
    text = _decode(contents)
    if text is None:
        return None
    tail = raw[after + len(suffix) + 1:]  # the events after the middle ones
    payloads = tail[6:-16].split(b"\n\ndata: ")
    if tail.endswith(_DONE) and tail.count(b"\n") == 2 * len(payloads) + 2 and b"[DONE]" not in payloads:
        done = True  # each event one data line, then [DONE]: the payloads sse_payloads finds
    else:
        payloads, done = sse_payloads(tail)
    rest = _parse_all(payloads)
    choice = chunk["choices"][0]
    vllm_first = lines[0] == second[:at - 11] + _ROLE + suffix
    if vllm_first and (plain := _plain_end(rest)) is not None:  # what _assemble_choices would build
        parts, finish, extra, usage = plain
        obj = chunk.get("object", "")
        message = {"role": "assistant", "content": text + "".join(parts) or None}
        response = {"id": chunk.get("id"), "object": obj[: -len(".chunk")] if obj.endswith(".chunk") else obj,
                    "created": chunk.get("created"), "model": chunk.get("model"),
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish, **extra}],
                    "usage": usage}
        return Assembled(response=response, finish_reasons=[finish], usage=usage, complete=done)
    if vllm_first:  # the role goes in front of the content key: one more member of the same delta
        first = {**chunk, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}]}
    else:
        try:  # inside an array, like the middle chunk's parse
            parsed = orjson.loads(b"[" + lines[0][6:] + b"]")
        except orjson.JSONDecodeError:
            return None
        if len(parsed) != 1 or lines[0][:6] != b"data: ":
            return None
        first = parsed[0]
    choice["delta"]["content"] = text  # the middle chunks as one: all each does is add its text
    return _assemble_choices([first, chunk, *rest], done, chat=True)


def _decode(contents: list[bytes]) -> str | None:
    """The content strings decoded and joined; None unless each is a valid JSON string body.

    One decode: a quote left unescaped ends the string early, which the parse refuses. Where an
    escape or a UTF-8 sequence could run from one piece into the next (a backslash, a non-ASCII
    byte), the pieces are joined by _SEP, which no escape or sequence can take as its continuation,
    and a count tells the joins from a _SEP in the text.
    """
    body = b"".join(contents)
    try:
        if body.isascii() and body.find(b"\\") < 0:
            return orjson.loads(b'"' + body + b'"')
        text = orjson.loads(b'"' + _SEP.encode().join(contents) + b'"')
    except orjson.JSONDecodeError:
        return None
    return text.replace(_SEP, "") if text.count(_SEP) == len(contents) - 1 else None


def _middle_chunk(prefix: bytes, suffix: bytes) -> dict[str, Any] | None:
    """The chunk prefix + X + suffix, parsed with a sentinel for X; None unless all it does is add
    X's text to choice 0.

    The sentinel is longer than any string that lies in the prefix or the suffix alone, so finding it
    in choices[0].delta.content proves that is where X lands: the parse with any valid string body
    in its place is this one with that body's text there.
    """
    sentinel = "x" * max(len(prefix), len(suffix))
    try:  # inside an array, as the general path parses it: at the depth it has there, and one value
        parsed = orjson.loads(b"[" + prefix + sentinel.encode() + suffix + b"]")
    except orjson.JSONDecodeError:
        return None
    chunk = parsed[0] if len(parsed) == 1 else None
    if type(chunk) is not dict or "error" in chunk or chunk.get("usage"):
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1:
        return None
    c = choices[0]
    if (type(c) is not dict or c.get("delta") != {"content": sentinel} or c.get("finish_reason") is not None
            or c.get("logprobs") or type(c.get("index", 0)) is not int or c.get("index", 0)):
        return None
    return chunk


def _plain_end(chunks: list[Any]) -> tuple[list[str], Any, dict[str, Any], Any] | None:
    """What the chunks after the middle ones add to choice 0 (text, finish and stop reason) and the
    usage they carry, when each is a plain finish or usage chunk; None when one is not."""
    parts: list[str] = []
    finish = usage = None
    extra: dict[str, Any] = {}
    for chunk in chunks:
        if type(chunk) is not dict or "error" in chunk:
            return None
        if chunk.get("usage"):
            usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if type(choices) is not list:
            return None
        for c in choices:
            if type(c) is not dict:
                return None
            index, delta = c.get("index", 0), c.get("delta")
            if type(index) is not int or index or c.get("logprobs") or (delta is not None and type(delta) is not dict):
                return None
            if delta:
                if len(delta) != 1 or type(delta.get("content")) is not str:
                    return None
                parts.append(delta["content"])
            if c.get("finish_reason") is not None:
                finish = c["finish_reason"]
                if c.get("stop_reason") is not None:
                    extra["stop_reason"] = c["stop_reason"]
    return parts, finish, extra, usage


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
