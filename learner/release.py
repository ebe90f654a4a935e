"""Releasing a gated adapter: publish (loaded, not routed) -> shadow -> canary on live feedback ->
promote or roll back. The :class:`Releaser` is the loop's ``ship`` callback.

Order for one candidate, each step recorded before the next begins:
  1. **publish** to every vLLM replica (``learner.publisher``): the adapter is loadable everywhere, but
     no route points at it yet;
  2. **shadow** (``learner.shadow``): mirrored recent live requests replayed to candidate and
     production on a replica, scored by the families' validated rewards. The result is an
     ``adapter_evaluations`` row (stage ``shadow``); a failure sets status ``shadow_failed``, which
     ``AdapterRegistry.assert_routable`` refuses forever, and the candidate is unloaded -- never routed;
  3. **canary** (``learner.canary.CanaryController``): ``routing_changed`` with a canary split, then
     every judged request of the public model since the start is read back from the warehouse
     (:class:`WarehouseCanaryFeed`) and fed to the sequential test until it promotes, rolls back, or
     spends its budget. Each decision is a control event carrying its evidence, then the
     ``routing_changed`` that carries it out; the registry records evidence, then status.

The loop waits for the canary instead of training the next round beside it, because (a) the next
round must start from the *decided* production adapter -- a round trained from the old production
while a canary runs would be gated against a parent that may be replaced under it; (b) on a small
machine training takes the CPU that serves the canary's requests, which skews the very latency and
answers the canary is judging; (c) one release in flight keeps restart semantics simple. The cost is
no training during a canary, bounded by its time budget (``--canary-max-seconds``).

Restarts: the canary's state is a pure function of the warehouse (every judged interaction of the
public model since the start, with the adapter that served it) and of its start time, which the
registry recorded with the ``canary`` evaluation. So a learner SIGKILLed mid-canary **resumes** it on
restart (:meth:`Releaser.recover`, run before the loop): the candidate is published again
(idempotent: a restarted replica reloads it), the controller is rebuilt with the original start time,
and every observation since is re-read. Where that is impossible (no start record, or the adapter's
files fail to publish) the canary is **concluded safely**: rolled back, with the route returned to
production. A round killed after its canary decided is not re-canaried: the version's status
(``production`` / ``rolled_back``) tells the re-run round what to do.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from learner import metrics
from learner.canary import CanaryController, CanaryDecision, CanarySettings
from learner.shadow import ShadowSettings, family_resolver, recent_requests, run_shadow

log = logging.getLogger(__name__)


class WarehouseCanaryFeed:
    """New judged requests of ``public_model`` since ``since_unix``: ``poll() -> [(adapter, label)]``.

    One observation per request (a request with a thumb and an outcome is one observation, labelled by
    ``Trajectory.label``, the weighted mean of its judgements), taken once the request is ``settle_s``
    old so that feedback sent together lands together. ``adapter`` is "" for the base. Only
    train-allowed traffic is read (the same rule as everything the learner reads)."""

    def __init__(self, warehouse, public_model: str, since_unix: float, settle_s: float = 3.0):
        self.wh = warehouse
        self.public_model = public_model
        self.since = dt.datetime.fromtimestamp(since_unix, dt.timezone.utc)
        self.settle_s = settle_s
        self.observed: set[str] = set()

    def poll(self) -> list[tuple[str, float]]:
        from learner.trajectories import TrajectoryQuery, load_trajectories

        now = dt.datetime.now(dt.timezone.utc)
        trajs = load_trajectories(self.wh, TrajectoryQuery(public_model=self.public_model, since=self.since)).trajectories
        out = []
        for t in trajs:
            if t.interaction_id in self.observed or t.ts < self.since:
                continue
            label = t.label()
            if label is None or (now - t.ts).total_seconds() < self.settle_s:
                continue
            self.observed.add(t.interaction_id)
            out.append((t.adapter_version or "", float(label)))
        return out


def run_canary(controller: CanaryController, feed: WarehouseCanaryFeed, poll_s: float = 2.0,
               stop: Callable[[], bool] = lambda: False,
               on_poll: Callable[[dict], None] | None = None) -> CanaryDecision | None:
    """Feed ``controller`` from ``feed`` until it decides (or ``stop()``: returns None, the canary stays
    as it is and a restart resumes it)."""
    prod = controller.production or ""
    while controller.decided is None and not stop():
        for adapter, label in feed.poll():
            arm = "candidate" if adapter == controller.candidate else "production" if adapter == prod else None
            if arm is not None:
                controller.observe(arm, label)
            if controller.decided is not None:
                break
        controller.check_budget()
        ev = controller.evidence()
        metrics.record_canary(ev)
        if on_poll is not None:
            on_poll(ev)
        if controller.decided is None:
            time.sleep(poll_s)
    return controller.decided


@dataclass(frozen=True)
class ReleaseSettings:
    """``public_model``: the name users call; ``base``: the served base model's name.
    ``shadow=None`` skips the shadow stage (tests of the canary itself; not for production)."""

    public_model: str
    base: str
    family: str
    shadow: ShadowSettings | None = field(default_factory=ShadowSettings)
    canary: CanarySettings = field(default_factory=CanarySettings)
    poll_s: float = 2.0
    settle_s: float = 3.0
    progress_s: float = 30.0


@dataclass
class RoundContext:
    """What the round knew when it gated the candidate: environments (family assignment), validated
    objectives per family, and the trajectories it was built from."""

    envs: Any = None
    objectives: dict[str, Any] = field(default_factory=dict)
    trajectories: list = field(default_factory=list)
    family_settings: Any = None


class Releaser:
    """The loop's ``ship(version, context)``: publish, shadow, canary (see the module docstring)."""

    def __init__(self, publisher, producer, registry, warehouse, settings: ReleaseSettings,
                 stop: Callable[[], bool] = lambda: False, report: Callable[[dict], None] | None = None):
        self.publisher = publisher
        self.producer = producer
        self.registry = registry
        self.wh = warehouse
        self.settings = settings
        self.stop = stop
        self.report = report or (lambda rec: print(json.dumps(rec, default=str), flush=True))
        self.replica = publisher.replicas[0]

    # -- helpers -------------------------------------------------------------------------------
    def _production(self) -> str | None:
        prod = self.registry.production(self.settings.family)
        return prod.name if prod else None

    def _controller(self, candidate: str, production: str | None) -> CanaryController:
        s = self.settings
        return CanaryController(self.producer, s.public_model, s.base, candidate, production, s.canary,
                                registry=self.registry, clock=time.time)

    def _route_to(self, adapter: str | None, reason: str) -> None:
        from streams.events import ControlEvent

        if not self.producer.emit(ControlEvent(
                action="routing_changed", actor="learner", public_model=self.settings.public_model,
                adapter_version=adapter, reason=reason[:500],
                payload={"routing_version": 1, "route": {"base": self.settings.base, "adapter": adapter,
                                                         "canary": None}})):
            raise RuntimeError(f"routing_changed to {adapter or 'the base'} was not accepted (spool full)")
        self._flush()

    def _flush(self) -> None:
        """Wait (bounded) until emitted control events are on the broker or in the spool."""
        flush = getattr(self.producer, "flush", None)
        if flush is not None:
            flush(30)

    def _publish(self, version) -> None:
        self.publisher.publish(version.name, version.path, expected_sha256=version.sha256,
                               public_model=self.settings.public_model)

    # -- the stages ----------------------------------------------------------------------------
    def __call__(self, version, context: RoundContext | None = None) -> str:
        """Release ``version`` (a routable registry row); returns its final status. A version the
        registry does not consider routable (it failed the gate) is refused before anything happens."""
        version = self.registry.assert_routable(version.name)
        if version.status == "production":  # a re-run round whose canary already promoted it
            self._route_to(version.name, f"{version.name} is production (re-applied after a restart)")
            return "production"
        if version.status == "canary":
            return self._resume(version)
        production = self._production()
        self._publish(version)
        self.report({"published": version.name, "routed": False})
        if self.settings.shadow is not None:
            metrics.CANARY_STATE.set(1)
            result = self.shadow(version, production, context or RoundContext())
            if not result.passed:
                metrics.CANARY_STATE.set(0)
                try:
                    self.publisher.retire(version.name, reason="shadow failed")
                except Exception as exc:  # noqa: BLE001 - unloading is housekeeping; never routed either way
                    log.warning("could not unload %s after its shadow failed: %s", version.name, exc)
                return "shadow_failed"
        return self.canary(version, production)

    def shadow(self, version, production: str | None, context: RoundContext):
        s = self.settings
        sample = recent_requests(self.wh, s.public_model, s.shadow.sample, s.shadow.max_age_s)
        family_of = family_resolver(context.envs, context.trajectories, context.family_settings)(sample)
        result = run_shadow(self.replica, version.name, production or s.base, sample, family_of, context.objectives,
                            s.shadow)
        metrics.SHADOW.labels("passed" if result.passed else "failed").inc()
        self.registry.record_evaluation(version.name, "shadow", production or "", result.passed,
                                        "pass" if result.passed else "fail", dict(result.evidence), result.reason,
                                        status=None if result.passed else "shadow_failed")
        self.report({"shadow": version.name, "passed": result.passed, "reason": result.reason})
        return result

    def canary(self, version, production: str | None) -> str:
        c = self._controller(version.name, production)
        c.start()
        self._flush()
        self.report({"canary": version.name, "against": production or self.settings.base,
                     "fraction": self.settings.canary.fraction})
        return self._drive(c)

    def _drive(self, c: CanaryController) -> str:
        metrics.CANARY_STATE.set(2)
        feed = WarehouseCanaryFeed(self.wh, self.settings.public_model, c.started_at_unix, self.settings.settle_s)
        last = [0.0]

        def progress(ev: dict) -> None:  # one line every progress_s: what the canary has seen so far
            if time.monotonic() - last[0] >= self.settings.progress_s:
                last[0] = time.monotonic()
                self.report({"canary_progress": c.candidate, "candidate_n": ev["candidate"]["n"],
                             "candidate_rate": ev["candidate"]["rate"], "production_n": ev["production"]["n"],
                             "production_rate": ev["production"]["rate"],
                             "p_candidate_worse": round(ev["p_candidate_worse"], 4),
                             "elapsed_s": round(ev["elapsed_s"], 1)})

        d = run_canary(c, feed, self.settings.poll_s, self.stop, progress)
        self._flush()
        metrics.CANARY_STATE.set(0)
        if d is None:
            return "canary"
        metrics.CANARY_DECISIONS.labels(d.decision).inc()
        self.report({"canary_decision": d.decision, "candidate": c.candidate, "reason": d.reason,
                     "candidate_n": d.evidence["candidate"]["n"], "production_n": d.evidence["production"]["n"]})
        if d.decision == "rollback":
            try:
                self.publisher.retire(c.candidate, reason="rolled back by the canary")
            except Exception as exc:  # noqa: BLE001 - the route already points away; unloading is housekeeping
                log.warning("could not unload %s after its rollback: %s", c.candidate, exc)
        return "production" if d.decision == "promote" else "rolled_back"

    # -- restarts ------------------------------------------------------------------------------
    def _resume(self, version) -> str:
        """A canary this family had in flight when the learner stopped: resume it, or conclude it safely."""
        starts = [e for e in self.registry.evaluations(version.name) if e["stage"] == "canary"
                  and e["decision"] == "continue"]
        started = json.loads(starts[-1]["evidence"]).get("started_at_unix") if starts else None
        production = starts[-1]["against"] or None if starts else self._production()
        c = self._controller(version.name, production)
        try:
            if started is None:
                raise RuntimeError("no canary start recorded")
            self._publish(version)  # idempotent; reloads it on a replica that restarted meanwhile
        except Exception as exc:  # noqa: BLE001 - any doubt ends the canary on the safe side
            d = CanaryDecision("rollback", f"learner restarted during the canary and could not resume it ({exc}); "
                                           "concluded safely: routed back to production", c.evidence())
            c._act(d)
            self._flush()
            metrics.CANARY_DECISIONS.labels("rollback").inc()
            self.report({"canary_decision": "rollback", "candidate": version.name, "reason": d.reason})
            return "rolled_back"
        c.resume(float(started))
        self.report({"canary_resumed": version.name, "started_at_unix": started})
        return self._drive(c)

    def recover(self) -> list[tuple[str, str]]:
        """Before the loop starts: finish every canary of the family that a previous process left running."""
        out = []
        for v in self.registry.versions(self.settings.family):
            if v.status == "canary":
                out.append((v.name, self._resume(v)))
        return out
