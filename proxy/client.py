"""A small client for the feedback API, standard library only (copy this file into any app).

    from openai import OpenAI
    from proxy.client import feedback

    client = OpenAI(base_url="http://onpolicy:8080/v1", api_key=KEY)
    reply = client.chat.completions.create(model="support", messages=[...])
    feedback(reply.id, "thumbs", 1, base_url="http://onpolicy:8080/v1", api_key=KEY)
    feedback(reply.id, "correction", correction="The answer is 42.", base_url=..., api_key=KEY)
    feedback(None, "outcome", True, episode_id="ticket-981", base_url=..., api_key=KEY)

``base_url`` and ``api_key`` default to ``ONPOLICY_BASE_URL`` / ``OPENAI_BASE_URL`` and
``ONPOLICY_API_KEY`` / ``OPENAI_API_KEY`` -- the same variables the OpenAI SDK reads. Every call sends
an ``idempotency_key`` (a fresh random one unless you pass yours), and retries connection errors and
5xx with back-off using the same key, so a retry never counts twice. Errors raise
:class:`FeedbackError` with the server's message (never the key).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Iterable

__all__ = ["feedback", "feedback_batch", "FeedbackError"]


class FeedbackError(RuntimeError):
    """The proxy refused the feedback (``status`` 4xx: fix the request) or could not be reached."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.code = code


def _item(interaction_id: str | None, kind: str, value: Any = None, *, episode_id: str | None = None,
          comment: str | None = None, correction: Any = None, source: str | None = None, weight: float | None = None,
          user: str | None = None, metadata: dict[str, Any] | None = None,
          idempotency_key: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"kind": kind, "idempotency_key": idempotency_key or uuid.uuid4().hex}
    for name, v in (("interaction_id", interaction_id), ("episode_id", episode_id), ("value", value),
                    ("comment", comment), ("correction", correction), ("source", source), ("weight", weight),
                    ("user", user), ("metadata", metadata)):
        if v is not None:
            item[name] = v
    return item


def _post(body: Any, base_url: str | None, api_key: str | None, timeout_s: float, retries: int) -> Any:
    base = base_url or os.environ.get("ONPOLICY_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    key = api_key or os.environ.get("ONPOLICY_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not base:
        raise FeedbackError(0, "no base_url: pass base_url= or set ONPOLICY_BASE_URL (the proxy's .../v1)")
    if not key:
        raise FeedbackError(0, "no api_key: pass api_key= or set ONPOLICY_API_KEY")
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    url = base.rstrip("/") + "/feedback"
    delay = 0.2
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read()).get("error", {})
            except (ValueError, AttributeError):
                err = {}
            if exc.code < 500 or attempt == retries:
                raise FeedbackError(exc.code, err.get("message") or exc.reason, err.get("code")) from None
        except OSError as exc:  # refused, reset, timed out: the same key makes the retry safe
            if attempt == retries:
                raise FeedbackError(0, f"cannot reach {url}: {exc}") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def feedback(interaction_id: str | None, kind: str, value: Any = None, *, base_url: str | None = None,
             api_key: str | None = None, timeout_s: float = 10.0, retries: int = 3, **fields: Any) -> str:
    """Send one judgement; returns its feedback id. ``kind``: thumbs (value 1/-1), score (a number),
    outcome (True/False), comment (``comment=``), correction (``correction=`` text or messages).
    Other fields: episode_id, comment, correction, source, weight, user, metadata, idempotency_key."""
    return _post(_item(interaction_id, kind, value, **fields), base_url, api_key, timeout_s, retries)["id"]


def feedback_batch(items: Iterable[dict[str, Any]], *, base_url: str | None = None, api_key: str | None = None,
                   timeout_s: float = 10.0, retries: int = 3) -> list[str]:
    """Send many judgements in one request (all accepted or none); each item as for :func:`feedback`
    (``interaction_id``, ``kind``, ``value``, ...). Returns their feedback ids, in order."""
    body = [_item(**{"interaction_id": None, **it}) for it in items]
    return [d["id"] for d in _post(body, base_url, api_key, timeout_s, retries)["data"]]
