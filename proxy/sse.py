"""The SSE tap: the relay hands over the raw stream bytes it forwarded, untouched; after the response
is finished this module turns them into the response the client would have got without ``stream``.

Nothing here runs on the critical path: the relay only appends each chunk to a list (a pointer
copy). Assembly parses every ``data:`` payload in one ``orjson.loads`` call (a JSON array built by
joining the payloads), because per-chunk parse calls cost more than the parsing itself.
"""

from __future__ import annotations

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
    payloads: list[bytes] = []
    done = False
    raw = raw.replace(b"\r\n", b"\n")
    events = raw.split(b"\n\n")
    for event in events[:-1]:  # the last piece is either empty or incomplete
        data_lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data_lines:
            continue
        data = b"\n".join(data_lines)
        if data == b"[DONE]":
            done = True
            continue
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


def assemble(endpoint: str, raw: bytes) -> Assembled:
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
