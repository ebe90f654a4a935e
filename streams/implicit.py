"""Implicit feedback mined from captured traffic: regenerate, edit, abandonment -> ``FeedbackEvent``s
with ``source="implicit"`` and a lower weight.

Where, and why here (over the warehouse) rather than in the proxy: a regenerate or an edit is only
visible by comparing a request with an *earlier* interaction of the same episode -- its prompt, or the
answer that was actually served. Proxy replicas share no state and an episode's turns can reach
different replicas, so a proxy-side detector would need a shared store on the hot path and would
still miss turns across restarts. The warehouse already holds every interaction of every episode
(exactly once), so mining there is exact, costs the user's request nothing, and can be re-run. The
learner calls :func:`mine` over a time window before it reads feedback; ``python -m streams.implicit``
does the same from a shell.

Signals (only successful chat completions; an episode is ``episode_id``, or else nothing is inferred
for regenerate/edit -- two people may send the same prompt):
- **regenerate**: a later interaction in the same episode (tenant, user) whose ``messages`` equal an
  earlier one's -> the earlier answer gets ``thumbs -1`` (the person asked again).
- **edit**: a later interaction whose messages are an earlier one's messages + an assistant turn that
  differs from what was served + more -> the earlier answer gets a ``correction`` with the edited turn.
- **abandonment**: the client disconnected mid-stream (``abandoned``) -> ``outcome 0``.

Idempotency: each signal's event id is ``uuid5(IMPLICIT_NAMESPACE, signal | interaction_id)``, so
mining the same window twice lands one row per signal (the sink dedups by event id).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from typing import Any, Iterable

import orjson

from streams.events import FeedbackEvent

IMPLICIT_NAMESPACE = uuid.UUID("6f6e706f-6c69-6379-8000-696d706c6963")  # fixed forever: ids derive from it
WEIGHTS = {"regenerate": 0.3, "edit": 0.5, "abandoned": 0.2}


def _event_id(signal: str, interaction_id: str) -> str:
    return str(uuid.uuid5(IMPLICIT_NAMESPACE, f"{signal}|{interaction_id}"))


def _messages(request: str) -> list[Any] | None:
    try:
        msgs = orjson.loads(request or "{}").get("messages")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return msgs if isinstance(msgs, list) else None


def _answer(response: str) -> str | None:
    try:
        return orjson.loads(response or "{}")["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None


def signals(rows: Iterable[dict[str, Any]]) -> list[FeedbackEvent]:
    """Implicit feedback from interaction rows (warehouse columns: interaction_id, ts, episode_id,
    user_id, tenant, request, response, abandoned, http_status, endpoint), in any order."""
    out: list[FeedbackEvent] = []
    episodes: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        common = dict(interaction_id=r["interaction_id"], episode_id=r["episode_id"] or None, user_id=r["user_id"] or None,
                      tenant=r["tenant"] or None, source="implicit")
        if r["abandoned"]:
            out.append(FeedbackEvent(event_id=_event_id("abandoned", r["interaction_id"]), kind="outcome", value=0.0,
                                     weight=WEIGHTS["abandoned"], metadata={"signal": "abandoned"}, **common))
            continue
        if r["http_status"] == 200 and r["episode_id"] and r["endpoint"].endswith("/chat/completions"):
            episodes.setdefault((r["tenant"], r["user_id"], r["episode_id"]), []).append(r)
    for turns in episodes.values():
        turns.sort(key=lambda r: (r["ts"], r["interaction_id"]))
        parsed = [(r, _messages(r["request"])) for r in turns]
        for i, (later, later_msgs) in enumerate(parsed):
            if not later_msgs:
                continue
            for earlier, earlier_msgs in reversed(parsed[:i]):
                if not earlier_msgs:
                    continue
                common = dict(interaction_id=earlier["interaction_id"], episode_id=earlier["episode_id"],
                              user_id=earlier["user_id"] or None, tenant=earlier["tenant"] or None, source="implicit")
                if later_msgs == earlier_msgs:
                    out.append(FeedbackEvent(event_id=_event_id("regenerate", earlier["interaction_id"]), kind="thumbs",
                                             value=-1.0, weight=WEIGHTS["regenerate"],
                                             metadata={"signal": "regenerate", "by": later["interaction_id"]}, **common))
                    break
                k = len(earlier_msgs)
                if len(later_msgs) > k and later_msgs[:k] == earlier_msgs:
                    turn = later_msgs[k]
                    served = _answer(earlier["response"])
                    if (isinstance(turn, dict) and turn.get("role") == "assistant" and isinstance(turn.get("content"), str)
                            and served is not None and turn["content"].strip() != served.strip()):
                        out.append(FeedbackEvent(event_id=_event_id("edit", earlier["interaction_id"]), kind="correction",
                                                 correction=[{"role": "assistant", "content": turn["content"]}],
                                                 weight=WEIGHTS["edit"], metadata={"signal": "edit", "by": later["interaction_id"]},
                                                 **common))
                    break  # the conversation continued from this turn: older turns are not the one edited
    # one signal per (kind of signal, interaction): a turn regenerated three times is one thumbs-down
    unique = {ev.event_id: ev for ev in out}
    return list(unique.values())


def mine(warehouse, since: dt.datetime, until: dt.datetime | None = None) -> list[FeedbackEvent]:
    """Implicit feedback for interactions in [since, until); episodes are read whole so a turn just
    before ``since`` still pairs with one inside the window."""
    until = until or dt.datetime.now(dt.timezone.utc)
    cols = "interaction_id, ts, episode_id, user_id, tenant, request, response, abandoned, http_status, endpoint"
    rows = warehouse.query_dicts(
        f"SELECT {cols} FROM {{db}}.interactions FINAL WHERE train_opt_out = false AND ("
        "(ts >= {s:DateTime64(3)} AND ts < {u:DateTime64(3)}) OR (episode_id != '' AND episode_id IN ("
        "SELECT episode_id FROM {db}.interactions WHERE ts >= {s:DateTime64(3)} AND ts < {u:DateTime64(3)} "
        "AND episode_id != '')))",
        {"s": since.astimezone(dt.timezone.utc).replace(tzinfo=None), "u": until.astimezone(dt.timezone.utc).replace(tzinfo=None)})
    return signals(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.implicit", description="Mine implicit feedback and emit it.")
    p.add_argument("--since-minutes", type=float, default=60.0)
    args = p.parse_args(argv)
    from streams.producer import EventProducer
    from streams.settings import KafkaSettings, ProducerSettings
    from streams.warehouse_server import open_warehouse

    events = mine(open_warehouse(), dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=args.since_minutes))
    producer = EventProducer(KafkaSettings(), ProducerSettings())
    try:
        accepted = sum(producer.emit(ev) for ev in events)
    finally:
        producer.close(10.0)
    print(f"{accepted} implicit feedback events emitted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
