"""Corrections as training data: which ones a round may learn from, and how much each counts.

A correction is the strongest signal a mostly-wrong model gets (the answer a person typed in), so a
round trains on it (learner/loop.py says how it is mixed with GRPO). Three guards:

- **Held out stays held out.** Only corrections on trajectories up to the environment build's split
  time are trained on; the ones after it check the adapter (the gate's held-out correction check,
  :func:`heldout_check`) and validate rewards (preference pairs). A gate that scored an adapter on
  corrections it was trained on would measure memory.
- **No user dominates.** Each user's corrections in a family carry at most ``max_user_share`` of
  the family's total weight (a water-filling cap: users under the cap keep weight 1 per correction,
  the rest are scaled down evenly). One keen or hostile user cannot steer what a family learns.
  With fewer than ``1 / max_user_share`` users the cap cannot hold; then every user carries an
  equal share.
- **Never across tenants.** A family belongs to one tenant (its id hashes the tenant); a
  trajectory of another tenant is dropped here even if an upstream bug put it in the family.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from learner.rewards.preferences import PreferencePair, preference_pairs
from learner.rewards.reference import ReferenceReward
from learner.types import Demonstration, Trajectory


@dataclass(frozen=True)
class CorrectionSettings:
    """``max_user_share``: the most of a family's correction weight one user may carry.
    ``min_train``: corrections (before the split) a family needs before a round distils it.
    ``min_heldout``: held-out corrections needed to check the result (the gate's held-out check)."""

    max_user_share: float = 0.2
    min_train: int = 8
    min_heldout: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.max_user_share <= 1.0:
            raise ValueError(f"max_user_share must be in (0, 1], got {self.max_user_share}")


@dataclass(frozen=True)
class FamilyCorrections:
    """A family's corrections, split by the build's split time, with per-user weights applied."""

    family_id: str
    tenant: str
    train: tuple[Demonstration, ...]
    heldout: tuple[PreferencePair, ...]
    users: int
    capped_users: int
    dropped_other_tenant: int

    def describe(self) -> str:
        capped = f", {self.capped_users} users capped" if self.capped_users else ""
        return (f"{len(self.train)} corrections from {self.users} users to learn from{capped}; "
                f"{len(self.heldout)} held-out corrections to check against")


def user_cap(counts: Sequence[float], share: float) -> float:
    """The largest per-user weight ``c`` with ``c <= share * sum(min(n_u, c))`` (fixed point from above;
    with too few users for ``share``, the equal share ``1 / users`` is used instead)."""
    if not counts:
        return 0.0
    share = max(share, 1.0 / len(counts))
    c = float(max(counts))
    for _ in range(200):
        nxt = share * sum(min(n, c) for n in counts)
        if nxt >= c - 1e-9:
            break
        c = nxt
    return c


def family_corrections(family_id: str, tenant: str, trajectories: Sequence[Trajectory], split_time: dt.datetime,
                       settings: CorrectionSettings | None = None) -> FamilyCorrections:
    s = settings or CorrectionSettings()
    own = [t for t in trajectories if t.tenant == tenant]
    dropped = len(trajectories) - len(own)
    raw: list[tuple[str, Demonstration]] = []
    for t in own:
        if t.ts > split_time:
            continue
        for fb in t.feedback:
            text = fb.correction_text()
            if text:
                user = fb.user_id or t.user_id
                raw.append((user, Demonstration(t.messages, text, 1.0, user, t.interaction_id)))
    per_user: dict[str, int] = defaultdict(int)
    for user, _ in raw:
        per_user[user] += 1
    cap = user_cap(list(per_user.values()), s.max_user_share)
    weights = {u: min(1.0, cap / n) for u, n in per_user.items()}
    train = tuple(Demonstration(d.messages, d.text, weights[u], d.user_id, d.interaction_id) for u, d in raw)
    heldout = tuple(preference_pairs([t for t in own if t.ts > split_time]))
    return FamilyCorrections(family_id, tenant, train, heldout, len(per_user),
                             sum(1 for w in weights.values() if w < 1.0), dropped)


class HeldoutCorrectionCheck:
    """The gate's held-out check for a family trained on corrections: candidate and production answer
    the held-out corrected prompts, each answer scored against the corrections people gave for that
    prompt (exact match for short answers, token F1 otherwise: ``ReferenceReward``). Duck-types the
    part of ``ValidatedObjective`` the gate uses (``family_id``, ``score``) and brings its own prompts."""

    def __init__(self, family_id: str, heldout: Sequence[PreferencePair], max_prompts: int = 64):
        seen: dict[str, PreferencePair] = {}
        for p in heldout:
            seen.setdefault(str(p.messages), p)
        self.family_id = family_id
        self.prompts = list(seen.values())[:max_prompts]
        self.reward = ReferenceReward.fit(family_id, [_as_trajectory(p) for p in heldout])
        self.source = f"held-out corrections ({len(self.prompts)} prompts)"

    def score(self, prompts, texts) -> list[float | None]:
        from learner.rewards.base import Completion

        return self.reward.score_many(prompts, [Completion(t) for t in texts])


def _as_trajectory(p: PreferencePair) -> Trajectory:
    from learner.types import FeedbackSignal

    ts = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    fb = FeedbackSignal("correction", None, ts, user_id=p.user_id,
                        correction=({"role": "assistant", "content": p.chosen},))
    return Trajectory(p.interaction_id, "e" + p.interaction_id, ts, "", p.user_id, p.interaction_id, "", "",
                      "chat.completions", p.messages, p.request_kwargs, p.rejected, feedback=(fb,))


def heldout_check(fc: FamilyCorrections) -> HeldoutCorrectionCheck | None:
    return HeldoutCorrectionCheck(fc.family_id, fc.heldout) if fc.heldout else None
