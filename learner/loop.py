"""The continual learning loop (placeholder header; see below)."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any, Sequence

from learner.types import FeedbackSignal, Trajectory


def simulated_trajectories(task: Any, requests: Sequence[dict], texts: Sequence[str], rng: random.Random,
                           start: dt.datetime, *, tenant: str = "demo", step_s: float = 1.0,
                           id_prefix: str = "i") -> list[Trajectory]:
    """Trajectories as the warehouse would return them for ``texts`` served to ``requests``, judged by
    a demo task's simulated users (``task.feedback``). For demos, tests and the benchmark: the
    production path reads real interactions and feedback through ``learner.trajectories``."""
    out = []
    for i, (req, text) in enumerate(zip(requests, texts)):
        ts = start + dt.timedelta(seconds=i * step_s)
        fb = []
        for body in task.feedback(req, text, rng):
            corr = tuple(body["correction"]) if body.get("kind") == "correction" else None
            fb.append(FeedbackSignal(kind=body["kind"], value=body.get("value"), ts=ts, correction=corr))
        iid = f"{id_prefix}{i:07d}"
        out.append(Trajectory(
            interaction_id=iid, event_id="e" + iid, ts=ts, tenant=tenant, user_id=f"u{i % 50}", episode_id=iid,
            public_model="demo", adapter_version="", endpoint="chat.completions", messages=tuple(req["messages"]),
            request_kwargs={k: v for k, v in req.items() if k != "messages"}, response_text=text, feedback=tuple(fb)))
    return out
