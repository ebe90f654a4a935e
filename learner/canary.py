"""Shadow, then canary: a gated candidate meets live traffic only gradually, and is promoted or rolled
back automatically on live feedback.

Shadow (:func:`shadow_check`)
    A sample of recent live requests is replayed to the candidate *off the user's path* (the learner
    sends them itself; the answers are never returned to anyone and cannot slow a user's request),
    and the candidate's and production's answers to the same requests are scored by the family's
    validated rewards. The candidate goes to canary only if the paired mean difference has a lower
    bound (bootstrap, one-sided) above ``-tolerance``.

Canary (:class:`CanaryController`)
    ``start`` re-points the public model's route: production keeps serving, a ``fraction`` of requests
    go to the candidate (a ``routing_changed`` control event the proxy follows). Every live
    interaction carries the adapter that served it; every feedback on it (thumbs, outcome, score,
    correction = rejected) is a Bernoulli observation for that arm. After each observation a Bayesian
    sequential test (run after each candidate observation) compares the arms (Beta(1, 1) priors, exact posterior probabilities by numerical
    integration):

    - ``P(p_candidate < p_production) >= rollback_prob`` (after ``min_rollback`` candidate
      observations) -> **rollback**: route back to production only;
    - ``P(p_candidate > p_production - promote_delta) >= promote_prob`` (after ``min_promote``) ->
      **promote**: route everything to the candidate;
    - the budget runs out (``max_observations`` candidate observations or ``max_seconds``) without a
      decision -> promote if ``P(p_candidate > p_production - promote_delta) >= budget_promote_prob``
      (the gate already showed it better offline), else rollback.

    Looking after every observation inflates a fixed-sample test's error rates; the thresholds here
    were set by simulation (tests/unit/test_canary_sequential.py states the measured rates: a planted
    bad adapter is rolled back within 200 feedback-carrying canary requests, an equal one is rarely
    rolled back).

Ordering: the decision's control event (``adapter_promoted`` / ``adapter_rolled_back``, with the
evidence) is emitted, then the ``routing_changed`` that carries it out; the registry records the
evidence before the status (``AdapterRegistry.record_evaluation``). A candidate whose registry status
is not routable (it failed the gate or the shadow) is refused by ``start`` before any event.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from streams.events import ControlEvent

_GRID = np.linspace(0.0, 1.0, 1001)
_LOGX = np.log(np.clip(_GRID, 1e-300, None))
_LOG1MX = np.log(np.clip(1.0 - _GRID, 1e-300, None))


def _beta_pdf_cdf(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Beta(a, b) density and CDF on the grid (numpy only: this runs after every canary observation).
    The density is normalised numerically, so the endpoints' singularities for a or b < 1 are not
    needed (priors here are Beta(1, 1), so a, b >= 1)."""
    logpdf = (a - 1) * _LOGX + (b - 1) * _LOG1MX
    pdf = np.exp(logpdf - logpdf.max())
    area = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) * np.diff(_GRID) / 2)])
    return pdf / area[-1], area / area[-1]


def prob_less(a1: float, b1: float, a2: float, b2: float) -> float:
    """P(X < Y) for X ~ Beta(a1, b1), Y ~ Beta(a2, b2): integral of f_X(x) (1 - F_Y(x)) dx."""
    fx, _ = _beta_pdf_cdf(a1, b1)
    _, cy = _beta_pdf_cdf(a2, b2)
    y = fx * (1.0 - cy)
    return float(np.clip(np.sum((y[1:] + y[:-1]) * np.diff(_GRID)) / 2, 0.0, 1.0))


def prob_greater_minus(a1: float, b1: float, a2: float, b2: float, delta: float) -> float:
    """P(X > Y - delta) for X ~ Beta(a1, b1), Y ~ Beta(a2, b2): integral of f_Y(y) (1 - F_X(y - delta)) dy."""
    fy, _ = _beta_pdf_cdf(a2, b2)
    _, cx = _beta_pdf_cdf(a1, b1)
    cx_shifted = np.interp(_GRID - delta, _GRID, cx, left=0.0, right=1.0)
    y = fy * (1.0 - cx_shifted)
    return float(np.clip(np.sum((y[1:] + y[:-1]) * np.diff(_GRID)) / 2, 0.0, 1.0))


@dataclass(frozen=True)
class CanarySettings:
    """How much traffic a canary gets, for how long, and how sure each decision must be."""

    fraction: float = 0.1
    max_observations: int = 200
    max_seconds: float = 3600.0
    min_rollback: int = 10
    min_promote: int = 60
    rollback_prob: float = 0.99
    promote_prob: float = 0.95
    promote_delta: float = 0.05
    budget_promote_prob: float = 0.8


@dataclass
class Arm:
    good: float = 0.0
    bad: float = 0.0

    @property
    def n(self) -> float:
        return self.good + self.bad

    def add(self, label: float) -> None:
        self.good += label
        self.bad += 1.0 - label


@dataclass
class CanaryDecision:
    """``decision``: "continue", "promote" or "rollback", with the figures that led to it."""

    decision: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


class CanaryController:
    """One canary of ``candidate`` against ``production`` (None = the base) for ``public_model``.

    ``producer.emit(ControlEvent)`` carries routing changes and decisions; ``registry`` (optional)
    checks routability and records the evidence and the new status.
    """

    def __init__(self, producer, public_model: str, base: str, candidate: str, production: str | None,
                 settings: CanarySettings | None = None, registry=None, clock: Callable[[], float] = time.monotonic):
        self.producer = producer
        self.public_model = public_model
        self.base = base
        self.candidate = candidate
        self.production = production
        self.settings = settings or CanarySettings()
        self.registry = registry
        self.clock = clock
        self.arms = {"candidate": Arm(), "production": Arm()}
        self.started_at: float | None = None
        self.started_at_unix: float | None = None
        self.decided: CanaryDecision | None = None
        self._served_by: dict[str, str] = {}

    # -- routing -----------------------------------------------------------------------------
    def _route(self, adapter: str | None, canary: str | None, fraction: float) -> dict[str, Any]:
        return {"routing_version": 1, "route": {
            "base": self.base, "adapter": adapter,
            "canary": {"adapter": canary, "fraction": fraction} if canary else None}}

    def _emit(self, event: ControlEvent) -> None:
        if not self.producer.emit(event):
            raise RuntimeError(f"control event {event.action} for {self.candidate} was not accepted (spool full); "
                               "the canary state did not change")

    def start(self) -> None:
        """Route ``fraction`` of the public model's traffic to the candidate. Refuses a candidate the
        registry does not consider routable (it failed the gate or the shadow)."""
        if self.registry is not None:
            self.registry.assert_routable(self.candidate)
        s = self.settings
        self._emit(ControlEvent(
            action="routing_changed", actor="canary", public_model=self.public_model, adapter_version=self.candidate,
            reason=f"canary: {s.fraction:.0%} of traffic to {self.candidate}",
            payload={**self._route(self.production, self.candidate, s.fraction), "canary_settings": asdict(s)}))
        self.started_at = self.clock()
        self.started_at_unix = time.time()
        if self.registry is not None:
            self.registry.record_evaluation(self.candidate, "canary", self.production or "", True, "continue",
                                            {"settings": asdict(s), "started_at_unix": self.started_at_unix,
                                             "public_model": self.public_model, "base": self.base},
                                            "canary started", status="canary")

    def resume(self, started_at_unix: float) -> None:
        """Continue a canary that ``start`` began (in an earlier process) at wall time ``started_at_unix``:
        no event is emitted (the route is already split); the time budget counts from the original
        start. The caller re-feeds every observation since then (they are in the warehouse)."""
        self.started_at_unix = float(started_at_unix)
        self.started_at = self.clock() - max(0.0, time.time() - self.started_at_unix)

    def check_budget(self) -> CanaryDecision | None:
        """Decide on the time budget even when no observation arrives (quiet traffic)."""
        if self.decided is None and self.started_at is not None and \
                self.clock() - self.started_at >= self.settings.max_seconds:
            return self.step()
        return None

    # -- observations ------------------------------------------------------------------------
    def served(self, interaction_id: str, adapter_version: str | None) -> None:
        """An interaction of the public model and the adapter that served it (None = base)."""
        if adapter_version == self.candidate:
            self._served_by[interaction_id] = "candidate"
        elif adapter_version == self.production:
            self._served_by[interaction_id] = "production"

    def feedback(self, interaction_id: str, label: float | None) -> CanaryDecision | None:
        """A judgement (in [0, 1]; None = carries no label) of an interaction. Returns the decision
        when this observation made one."""
        arm = self._served_by.get(interaction_id)
        if arm is None or label is None or self.decided is not None:
            return None
        self.arms[arm].add(float(label))
        return self.step() if arm == "candidate" else self._budget_check()

    def observe(self, arm: str, label: float) -> CanaryDecision | None:
        """One labelled observation of ``arm`` ("candidate" / "production") directly."""
        if self.decided is not None:
            return None
        self.arms[arm].add(float(label))
        return self.step() if arm == "candidate" else self._budget_check()

    def _budget_check(self) -> CanaryDecision | None:
        # the test runs after each *candidate* observation (production's rate moves slowly with ~9x
        # the traffic); only the time budget is checked on production observations
        if self.started_at is not None and self.clock() - self.started_at >= self.settings.max_seconds:
            return self.step()
        return None

    def consume(self, events: Sequence[Any]) -> CanaryDecision | None:
        """Interaction and feedback events (streams.events) in log order."""
        from learner.types import FeedbackSignal

        out = None
        for e in events:
            if e.event_type == "interaction" and e.public_model == self.public_model:
                self.served(e.interaction_id, e.adapter_version)
            elif e.event_type == "feedback" and e.interaction_id:
                sig = FeedbackSignal(kind=e.kind, value=e.value, ts=e.ts,
                                     correction=tuple(e.correction) if e.correction else None)
                out = self.feedback(e.interaction_id, sig.label()) or out
        return out

    # -- the sequential test -----------------------------------------------------------------
    def evidence(self) -> dict[str, Any]:
        c, p = self.arms["candidate"], self.arms["production"]
        s = self.settings
        return {
            "candidate": {"n": c.n, "good": c.good, "rate": c.good / c.n if c.n else None},
            "production": {"n": p.n, "good": p.good, "rate": p.good / p.n if p.n else None},
            "p_candidate_worse": prob_less(1 + c.good, 1 + c.bad, 1 + p.good, 1 + p.bad),
            "p_candidate_not_worse": prob_greater_minus(1 + c.good, 1 + c.bad, 1 + p.good, 1 + p.bad, s.promote_delta),
            "elapsed_s": (self.clock() - self.started_at) if self.started_at is not None else 0.0,
        }

    def step(self) -> CanaryDecision | None:
        """Apply the sequential test to the observations so far; act on a decision."""
        s = self.settings
        ev = self.evidence()
        n = self.arms["candidate"].n
        decision = None
        if n >= s.min_rollback and ev["p_candidate_worse"] >= s.rollback_prob:
            decision = CanaryDecision("rollback", f"P(candidate worse) = {ev['p_candidate_worse']:.3f} >= "
                                      f"{s.rollback_prob} after {n:.0f} judged canary requests", ev)
        elif n >= s.min_promote and ev["p_candidate_not_worse"] >= s.promote_prob:
            decision = CanaryDecision("promote", f"P(candidate > production - {s.promote_delta}) = "
                                      f"{ev['p_candidate_not_worse']:.3f} >= {s.promote_prob} after {n:.0f} judged "
                                      "canary requests", ev)
        elif n >= s.max_observations or ev["elapsed_s"] >= s.max_seconds:
            # Budget spent without a confident decision: the gate already showed the candidate better
            # offline, so it stays if it is probably not worse by more than the delta; otherwise out.
            keep = ev["p_candidate_not_worse"] >= s.budget_promote_prob
            decision = CanaryDecision("promote" if keep else "rollback",
                                      f"budget spent ({n:.0f} judged canary requests, {ev['elapsed_s']:.0f} s): "
                                      f"P(candidate > production - {s.promote_delta}) = "
                                      f"{ev['p_candidate_not_worse']:.3f} {'>=' if keep else '<'} "
                                      f"{s.budget_promote_prob}", ev)
        if decision is not None:
            self._act(decision)
        return decision

    def _act(self, d: CanaryDecision) -> None:
        self.decided = d
        if d.decision == "rollback":
            self._emit(ControlEvent(action="adapter_rolled_back", actor="canary", public_model=self.public_model,
                                    adapter_version=self.candidate, reason=d.reason, payload={"evidence": d.evidence,
                                                                                              "restored": self.production}))
            self._emit(ControlEvent(action="routing_changed", actor="canary", public_model=self.public_model,
                                    adapter_version=self.production, reason=f"rollback of {self.candidate}",
                                    payload=self._route(self.production, None, 0.0)))
            status = "rolled_back"
        else:
            self._emit(ControlEvent(action="adapter_promoted", actor="canary", public_model=self.public_model,
                                    adapter_version=self.candidate, reason=d.reason,
                                    payload={"evidence": d.evidence, "replaced": self.production}))
            self._emit(ControlEvent(action="routing_changed", actor="canary", public_model=self.public_model,
                                    adapter_version=self.candidate, reason=f"promotion of {self.candidate}",
                                    payload=self._route(self.candidate, None, 0.0)))
            status = "production"
        if self.registry is not None:
            self.registry.record_evaluation(self.candidate, "canary", self.production or "", d.decision == "promote",
                                            d.decision, d.evidence, d.reason, status=status)
            if d.decision == "promote" and self.production:
                self.registry.set_status(self.production, "retired", f"replaced by {self.candidate}")


@dataclass(frozen=True)
class ShadowResult:
    passed: bool
    reason: str
    evidence: Mapping[str, Any]


def shadow_check(candidate_scores: Sequence[float | None], production_scores: Sequence[float | None],
                 tolerance: float = 0.02, confidence: float = 0.95, min_pairs: int = 20, seed: int = 0) -> ShadowResult:
    """Decide the shadow stage from validated-reward scores of both policies on the same mirrored requests."""
    from learner.gate import paired_lower_bound

    pairs = [(c, p) for c, p in zip(candidate_scores, production_scores) if c is not None and p is not None]
    if len(pairs) < min_pairs:
        means = (f"; on those, candidate {np.mean([c for c, _ in pairs]):.2f} vs production "
                 f"{np.mean([p for _, p in pairs]):.2f}") if pairs else ""
        return ShadowResult(False, f"only {len(pairs)} mirrored requests scored by a validated reward "
                                   f"(needs {min_pairs}){means}", {"n": len(pairs)})
    m, lo = paired_lower_bound([c - p for c, p in pairs], confidence, 2000, seed)
    ev = {"n": len(pairs), "candidate": float(np.mean([c for c, _ in pairs])),
          "production": float(np.mean([p for _, p in pairs])), "gain": m, "gain_lower": lo}
    if lo >= -tolerance:
        return ShadowResult(True, f"shadow passed: gain {m:+.3f}, lower bound {lo:+.3f} >= {-tolerance:+.3f}", ev)
    return ShadowResult(False, f"shadow failed: gain {m:+.3f}, lower bound {lo:+.3f} < {-tolerance:+.3f}", ev)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
