"""Interactions joined with their feedback, read from the warehouse.

Rules, each one a promise the tests check:

- **Opted-out traffic never leaves the warehouse**: interactions with ``train_opt_out`` are
  filtered in SQL, so no pool, memory or reward model can see them; feedback on them has nothing to
  join to and is dropped.
- **Duplicates once**: tables are read with ``FINAL`` (the sink's at-least-once redeliveries share
  an event id); a second interaction event for the same ``interaction_id`` is dropped, and for
  feedback only the latest revision per (tenant, user, target, kind) counts -- the same rule as the
  ``feedback_current`` view. We read the raw ``feedback`` rows instead of that view because the
  late-feedback window has to be applied *before* picking the latest revision.
- **Late feedback**: a judgement counts only if it arrived within ``late_feedback_window`` of the
  interaction (episode feedback: of the episode's last turn). Trajectories younger than the window
  at ``as_of`` are marked ``feedback_final=False`` (more feedback may still come).
- **Tenants apart**: feedback joins on (tenant, interaction id) / (tenant, episode id); a tenant
  never sees another tenant's traffic or judgements.
- **Deterministic**: everything is ordered by (ts, event_id); ``as_of`` defaults to the newest event
  in the log, not the wall clock, so the same log gives the same trajectories.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson

from learner.types import FeedbackSignal, Trajectory

log = logging.getLogger(__name__)

# Request fields that change what a good answer is; they travel with a replayed prompt.
REPLAY_FIELDS = ("tools", "tool_choice", "response_format", "max_tokens", "max_completion_tokens", "stop")


@dataclass(frozen=True)
class TrajectoryQuery:
    """Which trajectories to load. ``tenant=None`` loads every tenant (each trajectory keeps its own)."""

    tenant: str | None = None
    public_model: str | None = None
    since: dt.datetime | None = None
    as_of: dt.datetime | None = None
    late_feedback_window: dt.timedelta = dt.timedelta(days=7)


@dataclass
class LoadStats:
    """Counts of what was read and why rows were left out; logged and shown in manifests."""

    interactions: int = 0
    duplicates: int = 0
    opted_out: int = 0
    skipped_error: int = 0
    skipped_abandoned: int = 0
    skipped_not_chat: int = 0
    feedback_rows: int = 0
    feedback_joined: int = 0
    feedback_late: int = 0
    feedback_orphan: int = 0
    feedback_superseded: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TrajectorySet:
    trajectories: list[Trajectory]
    stats: LoadStats = field(default_factory=LoadStats)
    as_of: dt.datetime | None = None

    def by_tenant(self) -> dict[str, list[Trajectory]]:
        out: dict[str, list[Trajectory]] = defaultdict(list)
        for t in self.trajectories:
            out[t.tenant].append(t)
        return dict(out)

    def episodes(self) -> dict[tuple[str, str], list[Trajectory]]:
        """Turns of each (tenant, episode) in time order; single-turn traffic is left out."""
        out: dict[tuple[str, str], list[Trajectory]] = defaultdict(list)
        for t in self.trajectories:
            if t.episode_id:
                out[(t.tenant, t.episode_id)].append(t)
        return dict(out)


def _utc(ts: dt.datetime) -> dt.datetime:
    # chdb gives DateTime64(3, 'UTC') back naive.
    return ts.replace(tzinfo=dt.timezone.utc) if ts.tzinfo is None else ts.astimezone(dt.timezone.utc)


def _naive(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _where(q: TrajectoryQuery, as_of: dt.datetime) -> tuple[str, dict[str, Any]]:
    clauses = ["ts <= {as_of:DateTime64(3)}"]
    params: dict[str, Any] = {"as_of": _naive(as_of)}
    if q.since is not None:
        clauses.append("ts >= {since:DateTime64(3)}")
        params["since"] = _naive(q.since)
    if q.tenant is not None:
        clauses.append("tenant = {tenant:String}")
        params["tenant"] = q.tenant
    return " AND ".join(clauses), params


def newest_event_ts(warehouse) -> dt.datetime | None:
    rows = warehouse.query("SELECT max(ts), count() FROM {db}.interactions")
    if not rows or not rows[0][1]:
        return None
    fb = warehouse.query("SELECT max(ts), count() FROM {db}.feedback")
    newest = rows[0][0]
    if fb and fb[0][1]:
        newest = max(newest, fb[0][0])
    return _utc(newest)


def _response_parts(response: dict[str, Any]) -> tuple[str, tuple[dict, ...], str]:
    choices = response.get("choices") or []
    if not choices:
        return "", (), ""
    first = choices[0]
    msg = first.get("message") or {}
    text = msg.get("content")
    if text is None:
        text = first.get("text") or ""
    calls = tuple(msg.get("tool_calls") or ())
    return str(text), calls, str(first.get("finish_reason") or "")


def load_trajectories(warehouse, query: TrajectoryQuery | None = None) -> TrajectorySet:
    """Read interactions and their feedback under the rules in the module docstring."""
    q = query or TrajectoryQuery()
    stats = LoadStats()
    as_of = q.as_of or newest_event_ts(warehouse)
    if as_of is None:
        return TrajectorySet([], stats, None)
    as_of = _utc(as_of)
    where, params = _where(q, as_of)
    model_clause = ""
    if q.public_model is not None:
        model_clause = " AND public_model = {model:String}"
        params["model"] = q.public_model

    stats.opted_out = int(warehouse.query(
        f"SELECT count() FROM {{db}}.interactions FINAL WHERE {where}{model_clause} AND train_opt_out", params)[0][0])
    rows = warehouse.query(
        "SELECT event_id, ts, interaction_id, endpoint, public_model, adapter_version, request, response, logprobs, "
        "episode_id, user_id, tenant, http_status, error, abandoned "
        f"FROM {{db}}.interactions FINAL WHERE {where}{model_clause} AND NOT train_opt_out "
        "ORDER BY ts, event_id", params)

    window = q.late_feedback_window
    seen: set[tuple[str, str]] = set()
    base: list[dict[str, Any]] = []
    for (event_id, ts, iid, endpoint, model, adapter, request, response, logprobs, episode, user, tenant,
         status, error, abandoned) in rows:
        key = (tenant, iid)
        if key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        if status != 200 or error:
            stats.skipped_error += 1
            continue
        if abandoned:
            # The user never saw the whole answer: its judgement (if any) is about something else.
            stats.skipped_abandoned += 1
            continue
        req = orjson.loads(request) if request else {}
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            stats.skipped_not_chat += 1
            continue
        text, calls, finish = _response_parts(orjson.loads(response) if response else {})
        base.append(dict(
            interaction_id=iid, event_id=event_id, ts=_utc(ts), tenant=tenant, user_id=user, episode_id=episode,
            public_model=model, adapter_version=adapter, endpoint=endpoint,
            messages=tuple(messages),
            request_kwargs={k: req[k] for k in REPLAY_FIELDS if k in req},
            response_text=text, tool_calls=calls, finish_reason=finish,
            logprobs=orjson.loads(logprobs) if logprobs else None,
        ))
    stats.interactions = len(base)

    by_interaction = {(b["tenant"], b["interaction_id"]): b for b in base}
    episode_last: dict[tuple[str, str], dt.datetime] = {}
    episode_members: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for b in base:
        if b["episode_id"]:
            k = (b["tenant"], b["episode_id"])
            episode_members[k].append(b)
            episode_last[k] = max(episode_last.get(k, b["ts"]), b["ts"])

    fb_where, fb_params = _where(q, as_of)
    fb_rows = warehouse.query(
        "SELECT event_id, ts, tenant, user_id, interaction_id, episode_id, kind, value, comment, correction, source, "
        f"weight FROM {{db}}.feedback FINAL WHERE {fb_where} ORDER BY ts, event_id", fb_params)
    stats.feedback_rows = len(fb_rows)
    # latest revision per (tenant, user, target, kind) among those inside the window
    latest: dict[tuple, tuple] = {}
    for row in fb_rows:
        event_id, ts, tenant, user, iid, episode, kind, value, comment, correction, source, weight = row
        ts = _utc(ts)
        if iid:
            target = by_interaction.get((tenant, iid))
            if target is None:
                stats.feedback_orphan += 1  # opted out, failed, another tenant's, or not loaded
                continue
            anchor = target["ts"]
        else:
            if (tenant, episode) not in episode_last:
                stats.feedback_orphan += 1
                continue
            anchor = episode_last[(tenant, episode)]
        if ts - anchor > window:
            stats.feedback_late += 1
            continue
        k = (tenant, user, iid, "" if iid else episode, kind)
        if k in latest:
            stats.feedback_superseded += 1
        latest[k] = row  # rows are in (ts, event_id) order: the last one wins, as in feedback_current

    attached: dict[tuple[str, str], list[FeedbackSignal]] = defaultdict(list)
    for (tenant, user, iid, episode, kind), row in latest.items():
        _, ts, _, _, _, _, _, value, comment, correction, source, weight = row
        corr = orjson.loads(correction) if correction else None
        if isinstance(corr, dict):
            corr = [corr]
        sig = FeedbackSignal(kind=kind, value=value, ts=_utc(ts), level="interaction" if iid else "episode",
                             user_id=user, weight=float(weight), source=source,
                             correction=tuple(corr) if corr else None, comment=comment or "")
        if iid:
            attached[(tenant, iid)].append(sig)
        else:
            for member in episode_members[(tenant, episode)]:
                attached[(tenant, member["interaction_id"])].append(sig)
        stats.feedback_joined += 1

    out = []
    for b in base:
        sigs = sorted(attached.get((b["tenant"], b["interaction_id"]), ()), key=lambda s: (s.ts, s.kind, s.user_id))
        out.append(Trajectory(**b, feedback=tuple(sigs), feedback_final=(as_of - b["ts"]) >= window))
    log.info("trajectories: %s", stats.as_dict())
    return TrajectorySet(out, stats, as_of)


def labelled(trajectories: Iterable[Trajectory]) -> list[Trajectory]:
    """Trajectories with at least one labelled judgement."""
    return [t for t in trajectories if t.label() is not None]


def group_by_prompt(trajectories: Iterable[Trajectory], family_of: dict[str, str] | None = None) -> list["TrajectoryGroup"]:
    """Trajectories that answered the same prompt (same messages and replay fields), in first-seen
    order: the groups a GRPO-style update compares within. ``family_of`` maps interaction ids to
    family ids (from ``discover_families``); without it the family is left empty."""
    from learner.environments.pools import prompt_key
    from learner.types import TrajectoryGroup

    groups: dict[tuple[str, str], list[Trajectory]] = defaultdict(list)
    for t in sorted(trajectories, key=lambda t: (t.ts, t.event_id)):
        groups[(t.tenant, prompt_key(t.messages, dict(t.request_kwargs)))].append(t)  # tenants apart
    return [TrajectoryGroup(f"p{k}", (family_of or {}).get(ts[0].interaction_id, ""), tuple(ts))
            for (_, k), ts in groups.items()]
