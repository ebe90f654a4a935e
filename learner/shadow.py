"""The shadow stage: a published but unrouted candidate answers a mirrored sample of recent live
requests, off the user's path, and must hold up against production on the family's validated rewards
before any user sees it.

What is replayed: the newest ``sample`` interactions of the public model in the warehouse
(train-allowed ones only: ``learner.trajectories`` filters opted-out traffic in SQL), each request
re-sent as the user sent it (messages plus the fields that change what a good answer is,
``trajectories.REPLAY_FIELDS``), **directly to a vLLM replica** -- never through the proxy -- once
through the candidate adapter and once through production (the routed adapter, or the base). Both
policies get the same per-request ``seed``, so the comparison is paired. Nobody waits on these
answers and nobody sees them: the learner sends them itself, so a user's request is never slowed by
the shadow beyond the replica's shared load.

How it is scored: each mirrored request is assigned to its task family (the round's family
assignment; requests newer than the round are assigned by re-running family discovery on the round's
trajectories plus the sample -- family ids are stable under appends) and both answers are scored by
that family's :class:`learner.trainer.ValidatedObjective` -- the same validated rewards the gate uses.
Where no validated reward applies to either answer the pair is dropped; where it applies to only one,
the other scores 0 (``ShadowSettings.unvouched_as_zero`` says why); :func:`learner.canary.shadow_check`
decides (a paired lower bound above ``-tolerance``, at least ``min_pairs`` scored pairs).

Why a separate stage from the gate: the gate compares the policies in the learner's own process on
the environment pools; the shadow checks what vLLM actually serves from the *published* files, on
live traffic's real mix -- a bad publish (wrong files, a serving bug) or a pool that no longer looks
like traffic shows up here and not in the gate.
"""

from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from learner.canary import ShadowResult, shadow_check
from learner.serving import http_json
from learner.types import Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowSettings:
    """``sample``: mirrored requests replayed to each policy. ``max_age_s``: only requests newer than
    this are mirrored. ``tolerance``/``confidence``/``min_pairs``: see ``canary.shadow_check``.
    ``concurrency``: replays in flight to the replica at once (vLLM batches them).
    ``unvouched_as_zero``: where one policy's answer is scored by a validated reward and the other's
    is not (no grounded reward recognises it: not a remembered answer, not near a correction, no
    verifier applies), the unrecognised one scores 0 for that pair instead of dropping the pair. The
    rewards are grounded in what users judged; an answer outside all of it has no evidence of being
    good, and a policy that drifts there (a broken adapter answering garbage) must not pass by
    making its pairs disappear. Answers neither policy's reward recognises still drop the pair."""

    sample: int = 48
    max_age_s: float = 3600.0
    tolerance: float = 0.02
    confidence: float = 0.95
    min_pairs: int = 20
    concurrency: int = 4
    timeout_s: float = 120.0
    seed: int = 0
    unvouched_as_zero: bool = True


def recent_requests(warehouse, public_model: str, n: int, max_age_s: float,
                    now: dt.datetime | None = None) -> list[Trajectory]:
    """The newest ``n`` train-allowed chat interactions of ``public_model`` (judged or not)."""
    from learner.trajectories import TrajectoryQuery, load_trajectories

    now = now or dt.datetime.now(dt.timezone.utc)
    trajs = load_trajectories(warehouse, TrajectoryQuery(public_model=public_model,
                                                         since=now - dt.timedelta(seconds=max_age_s))).trajectories
    return sorted(trajs, key=lambda t: (t.ts, t.event_id))[-n:] if n > 0 else []


def family_resolver(envs, history: Sequence[Trajectory], family_settings=None) -> Callable[[Sequence[Trajectory]], dict[str, str]]:
    """``resolve(sample) -> {interaction_id: family_id}``: the round's assignment where it knows the
    interaction, else discovery re-run on ``history`` + the unknown ones (ids are stable under appends)."""

    def resolve(sample: Sequence[Trajectory]) -> dict[str, str]:
        known = dict(envs.assignment.family_of) if envs is not None else {}
        out = {t.interaction_id: known[t.interaction_id] for t in sample if t.interaction_id in known}
        unknown = [t for t in sample if t.interaction_id not in known]
        if unknown:
            from learner.environments.families import discover_families

            seen = {t.interaction_id for t in history}
            assignment = discover_families(list(history) + [t for t in unknown if t.interaction_id not in seen],
                                           None, family_settings)
            for t in unknown:
                if t.interaction_id in assignment.family_of:
                    out[t.interaction_id] = assignment.family_of[t.interaction_id]
        return out

    return resolve


def replay(replica: str, model: str, requests: Sequence[Trajectory], settings: ShadowSettings) -> list[str | None]:
    """Answers of ``model`` on a vLLM replica (``…/v1``) to each request; None where the replay failed."""

    def one(i_t: tuple[int, Trajectory]) -> str | None:
        i, t = i_t
        body: dict[str, Any] = {**dict(t.request_kwargs), "messages": [dict(m) for m in t.messages], "model": model,
                                "seed": settings.seed + i, "n": 1, "stream": False}
        status, resp = http_json("POST", f"{replica.rstrip('/')}/chat/completions", body, settings.timeout_s)
        if status != 200 or not isinstance(resp, dict) or not resp.get("choices"):
            log.warning("shadow replay to %s on %s failed: HTTP %s %s", model, replica, status, str(resp)[:200])
            return None
        return (resp["choices"][0].get("message") or {}).get("content") or ""

    with ThreadPoolExecutor(max(1, settings.concurrency), thread_name_prefix="shadow") as pool:
        return list(pool.map(one, enumerate(requests)))


def run_shadow(replica: str, candidate: str, production: str, sample: Sequence[Trajectory],
               family_of: Mapping[str, str], objectives: Mapping[str, Any],
               settings: ShadowSettings | None = None) -> ShadowResult:
    """Replay ``sample`` to both models on ``replica``, score with the families' validated objectives,
    decide with :func:`shadow_check`. The evidence says how many requests were mirrored, assigned to a
    family with a validated reward, answered and scored, per family."""
    s = settings or ShadowSettings()
    scorable = [t for t in sample if family_of.get(t.interaction_id) in objectives]
    cand = replay(replica, candidate, scorable, s)
    prod = replay(replica, production, scorable, s)
    c_scores: list[float | None] = []
    p_scores: list[float | None] = []
    per_family: dict[str, dict[str, float]] = {}
    unvouched = {"candidate": 0, "production": 0}
    for t, c, p in zip(scorable, cand, prod):
        fid = family_of[t.interaction_id]
        if c is None or p is None:
            c_scores.append(None)
            p_scores.append(None)
            continue
        cs, ps = objectives[fid].score([t, t], [c, p])
        if s.unvouched_as_zero and (cs is None) != (ps is None):
            unvouched["candidate" if cs is None else "production"] += 1
            cs, ps = (0.0 if cs is None else cs), (0.0 if ps is None else ps)
        c_scores.append(cs)
        p_scores.append(ps)
        f = per_family.setdefault(fid, {"n": 0, "candidate": 0.0, "production": 0.0})
        if cs is not None and ps is not None:
            f["n"] += 1
            f["candidate"] += cs
            f["production"] += ps
    for f in per_family.values():
        if f["n"]:
            f["candidate"] /= f["n"]
            f["production"] /= f["n"]
    result = shadow_check(c_scores, p_scores, s.tolerance, s.confidence, s.min_pairs, s.seed)
    evidence = {**result.evidence, "mirrored": len(sample), "with_validated_reward": len(scorable),
                "replay_failed": sum(c is None or p is None for c, p in zip(cand, prod)),
                "unvouched_scored_zero": unvouched,
                "families": per_family, "replica": replica, "candidate_model": candidate,
                "production_model": production, "settings": s.__dict__}
    return ShadowResult(result.passed, result.reason, evidence)
