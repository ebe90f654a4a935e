"""The continual learning loop: rounds of on-policy training that start when enough new validated
signal has arrived, with checkpoints that make a SIGKILL at any point lose nothing and train nothing
twice.

A round, in order:
  1. wait until the signal log holds ``min_new_feedback`` judged interactions past the committed
     offset (the round's window is ``[committed, end)``, fixed when the round starts);
  2. rebuild environments and rewards from every trajectory up to ``end``. Rewards are validated on
     held-out thumbs *and* held-out correction pairs (learner/rewards/preferences.py); a family with
     a validated reward (:class:`learner.trainer.ValidatedObjective`) is trained by GRPO. At a
     round's first step the *stored* active rewards (``RewardRegistry.revalidate``) are re-checked
     on the window's fresh feedback too, so the persisted reward table retires a reward that stopped
     agreeing with users;
  3. plan each family (:class:`learner.round_log.FamilyPlan`): GRPO, distillation of its
     corrections, or nothing -- and why, in numbers. No family trainable -> the round is recorded as
     skipped (with every family's reason) and the offsets still advance (the signal stays in later
     rebuilds);
  4. start from the production adapter (or the base) and take the planned steps: ``steps_per_round``
     GRPO steps on prompts from the train pools (families drawn evenly) and the distillation steps
     (corrections of the distilled families, families drawn evenly), interleaved evenly in one
     adapter; before each step the control state is read (pause/resume within one step);
  5. register the adapter (lineage: window, environment and reward versions, hyperparameters,
     metrics), run the gate against production (GRPO families on their validated reward, distilled
     families on their held-out corrections), record the round's decision in the round log, and hand
     a gated adapter to ``ship(version, context)`` -- publish, shadow, canary (learner/release.py);
     the loop waits for the canary's decision (release.py says why) so the next round starts from
     the decided production adapter;
  6. commit: the round's ``end`` becomes the committed offset.

How corrections and GRPO are mixed, and why
    A correction (a person typing the right answer) is the strongest signal a model that is mostly
    wrong gets, and at a cold start it is often the only one: thumbs up are too few to validate any
    reward. So corrections are trained on directly, by ``distill_method``: on SmolLM2 with rehearsal,
    SDFT was the only method that kept the forgetting suite within the gate's 2 points (SFT, the
    floor, learned more and lost 36); the tiny model's teacher cannot use a correction in context,
    so it uses SFT (``onpolicy learner run`` picks per model; docs/learning-curve.md has the table). Which
    families: by default (``DistillScope.COLD``) those served mostly wrong (success estimated from the
    window's thumbs, corrected for their measured noise, below ``cold_below``; with no thumbs at all,
    those without a validated reward). A family served better than that is trained by GRPO alone
    once a reward validates (until then it is rehearsed, not trained), whose rewards
    already carry its corrections (the reference reward and the answer memory are fitted from
    them): SFT moves shared weights towards its demonstrations and forgot sums without a carry on
    the tiny model (95% -> 40%, an earlier tests/unit/test_trainer_sdft.py), where the demo families
    are served 26-60% right. Below a fifth right (the cold-start families start at 0-12%), most of
    GRPO's groups are all wrong and carry no signal (at 8% right, 0.92^8 = 51% of groups of 8),
    while corrections are what such users send. The bar sits between the two with room for the
    estimate's noise. ``DistillScope.ALL`` distils every family beside GRPO; the gate's forgetting
    suite judges either. Only corrections before the build's split time are
    trained on; the later ones check the adapter at the gate (learner/corrections.py). Each user
    carries at most a capped share of a family's corrections, and corrections never cross tenants.
    Distillation moves weights every family shares: on the tiny model, 100 SFT steps on a new
    wording of sums took held-out success on it from 1% to 51% and cost 11 points on sums in the
    old wording; with 16 rehearsal examples a step (the other families' prompts answered as the
    starting weights answered them) 56% and nothing lost (``rehearsal_per_step``; measured by hand,
    tests/integration/test_learning_cold_start.py runs it through this loop). Traffic that is all
    cold has no other family to rehearse: a chat model then rehearses everyday requests
    (``general_rehearsal``, learner/rehearsal.py says what it measured without). The gate's
    forgetting suite judges the result either way.
    A distillation that collapses (the student's samples turn into a word repeated to the end)
    is stopped within the round by the degenerate-sample guard (``LoopSettings.degenerate_stop``);
    the gate is the second line, not the first.

Checkpoint promise (``Checkpointer``): after every ``checkpoint_every`` steps the adapter weights,
the optimizer state, the round's window, its environment/reward versions and the step count are
written to a new directory, fsynced, and made current by an atomic rename of the ``CURRENT``
pointer. Every random draw of step ``k`` of round ``r`` is seeded by ``(seed, r, k)``, so a process
killed after step ``k`` was checkpointed resumes at step ``k + 1`` with exactly the state an
uninterrupted run had: steps after the last checkpoint are recomputed (they were never committed),
none is applied twice, and the window is never re-consumed (tests/integration/test_learning_resume.py
compares the final adapter of a killed-and-resumed run with an uninterrupted one, byte for byte).
Registration is idempotent by checksum, so a kill between "registered" and "committed" does not make
a second version.

Logged traffic is used as environments (prompts re-sent to the current policy) and to fit and
validate rewards, never as off-policy gradient: see learner/trainer.py.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from learner.corrections import CorrectionSettings, FamilyCorrections, family_corrections, heldout_check
from learner.rewards.preferences import estimate_thumb_noise, estimated_success
from learner.round_log import FamilyPlan, ListRoundLog, Method, RoundLog, RoundRecord, RoundStatus, summarize
from learner.types import FeedbackSignal, Trajectory

log = logging.getLogger(__name__)


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


# -- inputs -------------------------------------------------------------------------------------

class SignalLog(Protocol):
    """Judged trajectories in a total order with integer offsets (the production implementation
    reads the warehouse's interactions joined with feedback in ingestion order)."""

    def end(self) -> int: ...

    def read(self, start: int, end: int) -> list[Trajectory]: ...


@dataclass
class ListSignalLog:
    """An in-memory signal log (tests, demos)."""

    items: list[Trajectory] = field(default_factory=list)

    def end(self) -> int:
        return len(self.items)

    def read(self, start: int, end: int) -> list[Trajectory]:
        return self.items[start:end]


@dataclass
class ControlState:
    """What the admin asked: ``paused`` (learning_paused / learning_resumed), ``pinned`` families
    (trained, never shipped). Applied from control events."""

    paused: bool = False
    pinned: set[str] = field(default_factory=set)

    def apply(self, event) -> None:
        if event.action == "learning_paused":
            if event.payload.get("family"):
                self.pinned.add(event.payload["family"])
            else:
                self.paused = True
        elif event.action == "learning_resumed":
            if event.payload.get("family"):
                self.pinned.discard(event.payload["family"])
            else:
                self.paused = False


class DistillScope(str, enum.Enum):
    """Which task families a round distils from their corrections (see the module docstring)."""

    COLD = "cold"  # families served mostly wrong (estimated success < cold_below; no thumbs and no validated reward)
    ALL = "all"  # every family with enough corrections, beside GRPO where it has a validated reward
    OFF = "off"  # GRPO only


@dataclass(frozen=True)
class LoopSettings:
    """``min_new_feedback``: judged interactions past the committed offset that start a round.
    ``steps_per_round``: GRPO steps (when any family has a validated reward). Distillation steps
    come on top: ``distill_epochs`` passes over the round's corrections, at most ``steps_per_round``,
    in batches of the trainer's ``prompts_per_step``, interleaved evenly with the GRPO steps.
    ``cold_below``: with ``DistillScope.COLD``, a family whose served success, estimated from its
    window's thumbs corrected for their measured noise, is below this is distilled, with GRPO beside
    it when it has a validated reward. ``degenerate_stop``: share of the student's samples that look degenerate (a word repeated over
    and over, no end) over the last ``guard_window`` distillation steps that stops distilling for the
    rest of the round and restores the last checkpoint's weights (the collapse guard).
    ``rehearsal_per_step``: examples added to each distillation batch from the round's other
    families (those not distilled): their train prompts answered greedily by the weights the round
    started from, up to ``rehearsal_prompts`` of them -- the adapter keeps doing what it did where
    nobody corrected it (module docstring: why). ``general_rehearsal``: also rehearse everyday
    requests (learner/rehearsal.py), for a chat model whose traffic may be all cold."""

    family: str = "demo"
    min_new_feedback: int = 500
    steps_per_round: int = 40
    checkpoint_every: int = 5
    poll_s: float = 1.0
    seed: int = 0
    distill_method: Method = Method.SFT
    distill_scope: DistillScope = DistillScope.COLD
    cold_below: float = 0.2
    distill_epochs: float = 2.0
    corrections: CorrectionSettings = field(default_factory=CorrectionSettings)
    degenerate_stop: float = 0.5
    guard_window: int = 3
    rehearsal_per_step: int = 16
    rehearsal_prompts: int = 128
    general_rehearsal: bool = False

    def __post_init__(self) -> None:
        if self.distill_method is Method.GRPO:
            raise ValueError(f"distill_method must be one of sft, sdft, sdft+sft; got {self.distill_method.value}")


# -- checkpoints --------------------------------------------------------------------------------

class Checkpointer:
    """Directories ``ckpt-<n>`` under ``root`` and a ``CURRENT`` file naming the latest complete one.

    Write order: files into ``.tmp-<n>``, fsync each, rename to ``ckpt-<n>``, then write
    ``CURRENT.tmp``, fsync, rename over ``CURRENT``. A crash at any point leaves ``CURRENT`` naming a
    complete checkpoint (or none); stale ``.tmp`` directories are removed on load.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[dict, Path | None]:
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        cur = self.root / "CURRENT"
        if not cur.exists():
            return {}, None
        d = self.root / cur.read_text().strip()
        return json.loads((d / "state.json").read_text()), d

    def save(self, state: dict, write_files: Callable[[Path], None]) -> Path:
        n = int(state.get("seq", 0)) + 1
        state = {**state, "seq": n}
        tmp = self.root / f".tmp-{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True, default=str))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        final = self.root / f"ckpt-{n}"
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        ptr = self.root / "CURRENT.tmp"
        ptr.write_text(final.name)
        with open(ptr, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(ptr, self.root / "CURRENT")
        for old in self.root.glob("ckpt-*"):  # keep the current and the one before it
            if old.name not in (final.name, f"ckpt-{n - 1}"):
                shutil.rmtree(old, ignore_errors=True)
        return final


# -- the loop -----------------------------------------------------------------------------------

@dataclass
class RoundResult:
    """What a round did. ``status``: a :class:`RoundStatus`; ``reason``: one line, in numbers;
    ``plans``: per task family, how it was trained or why not (the same record the round log keeps)."""

    round: int
    window: tuple[int, int]
    status: RoundStatus
    reason: str = ""
    adapter: str = ""
    gate: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    release: str | None = None  # what ship() made of the adapter: production, rolled_back, shadow_failed, ...
    plans: tuple[FamilyPlan, ...] = ()


@dataclass(frozen=True)
class _Plan:
    """What the round trains: GRPO objectives, distillation sets, and the step schedule."""

    objectives: dict
    corrections: dict[str, FamilyCorrections]
    families: tuple[FamilyPlan, ...]
    grpo_steps: int
    distill_steps: int
    rehearsal: tuple = ()  # (id, messages) rehearsed: other families' prompts, everyday requests

    def distills(self, step: int) -> bool:
        """True when ``step`` (0-based) is a distillation step: they are spread evenly among GRPO's."""
        total = self.grpo_steps + self.distill_steps
        return math.floor((step + 1) * self.distill_steps / total) > math.floor(step * self.distill_steps / total)


class LearningLoop:
    """Runs rounds forever (``run``) or one at a time (``run_round``). See the module docstring."""

    def __init__(self, base_path: str | Path, log_: SignalLog, registry, checkpoint_dir: str | Path,
                 trainer_settings=None, settings: LoopSettings | None = None,
                 control: Callable[[], ControlState] = ControlState,
                 gate: Callable[..., Any] | None = None, ship: Callable[[Any], None] | None = None,
                 env_settings=None, reward_settings=None, on_step: Callable[[dict], None] | None = None,
                 round_log: RoundLog | None = None):
        from learner.trainer import TrainerSettings

        self.base_path = str(base_path)
        self.log = log_
        self.registry = registry
        self.ckpt = Checkpointer(checkpoint_dir)
        self.ts = trainer_settings or TrainerSettings()
        self.settings = settings or LoopSettings()
        self.control = control
        self.gate = gate
        self.ship = ship
        self.env_settings = env_settings
        self.reward_settings = reward_settings
        self.on_step = on_step
        self.round_log = round_log if round_log is not None else ListRoundLog()
        self.state, self.ckpt_dir = self.ckpt.load()
        self.state.setdefault("committed", 0)
        self.state.setdefault("round", 0)
        self.metrics: list[dict] = []
        self._round_trajectories: list[Trajectory] = []

    def ready(self) -> bool:
        return self.log.end() - self.state["committed"] >= self.settings.min_new_feedback or "window" in self.state

    def run(self, max_rounds: int | None = None, stop: Callable[[], bool] = lambda: False) -> list[RoundResult]:
        out = []
        while not stop() and (max_rounds is None or len(out) < max_rounds):
            if self.ready() and not self.control().paused:
                out.append(self.run_round())
            else:
                time.sleep(self.settings.poll_s)
        return out

    def _objectives(self, end: int):
        from learner.environments.build import build_environments
        from learner.rewards.build import build_rewards
        from learner.trainer import ValidatedObjective

        trajs = self.log.read(0, end)
        envs = build_environments(trajs, self.env_settings)
        rewards = build_rewards(envs, trajs, self.reward_settings)
        objs = {fid: ValidatedObjective(fr.combined, fr.reports) for fid, fr in rewards.items() if fr.trainable}
        self._round_trajectories = trajs
        return envs, rewards, objs

    def _plan(self, envs, rewards, objs, rnd: int, start: int) -> _Plan:
        """Per family: GRPO on a validated reward, distillation of its corrections, or neither (and why)."""
        s = self.settings
        by_family = envs.family_trajectories(self._round_trajectories)
        window = envs.family_trajectories(self._round_trajectories[start:])
        plans, corrections = [], {}
        for fid, env in sorted(envs.environments.items()):
            label = env.family.label
            fc = family_corrections(fid, env.family.tenant, by_family.get(fid, []), envs.split_time, s.corrections)
            grpo = fid in objs
            success = estimated_success(window.get(fid, []), estimate_thumb_noise(by_family.get(fid, [])))
            # cold: served mostly wrong, or nothing but corrections to go by
            cold = success[0] < s.cold_below if success is not None else not grpo
            wants_distill = s.distill_scope is DistillScope.ALL or (s.distill_scope is DistillScope.COLD and cold)
            distill_why = ""
            if wants_distill:
                if len(fc.train) < s.corrections.min_train:
                    distill_why = f"{len(fc.train)} of {s.corrections.min_train} corrections needed to distil"
                elif len(fc.heldout) < s.corrections.min_heldout:
                    distill_why = (f"{len(fc.heldout)} of {s.corrections.min_heldout} held-out corrections needed "
                                   "to check a distilled adapter")
                else:
                    corrections[fid] = fc
            served = (f"served success ~{success[0]:.0%} (from {success[1]} thumbs, noise-corrected)"
                      if success else "served success unknown (no thumbs in the window)")
            if grpo:
                reason = f"validated reward {objs[fid].version} ({len(env.train)} train prompts); {served}"
                methods: tuple[Method, ...] = (Method.GRPO,)
                if fid in corrections:
                    reason += f"; {s.distill_method.value}: {fc.describe()}"
                    methods += (s.distill_method,)
                elif distill_why:
                    reason += f"; not distilled: {distill_why}"
                plans.append(FamilyPlan(fid, label, methods, reason, len(env.train)))
            elif fid in corrections:
                plans.append(FamilyPlan(fid, label, (s.distill_method,), f"{fc.describe()}; {served}; "
                                        + rewards[fid].why_not_trainable(), len(fc.train)))
            else:
                why = rewards[fid].why_not_trainable() if fid in rewards else "no rewards built"
                if distill_why:
                    why = f"{why}; {served}; {distill_why}"
                elif s.distill_scope is DistillScope.OFF:
                    why = f"{why}; distillation is off"
                elif not wants_distill:
                    why = (f"{why}; {served}, not cold (< {s.cold_below:.0%}): waits for a validated reward "
                           "rather than moving shared weights towards its corrections")
                plans.append(FamilyPlan(fid, label, (), why))
        batch = max(1, self.ts.prompts_per_step)
        n_demos = sum(len(fc.train) for fc in corrections.values())
        distill_steps = min(s.steps_per_round, math.ceil(s.distill_epochs * n_demos / batch)) if corrections else 0
        rehearsal: list = []
        if corrections and s.rehearsal_per_step > 0:
            pool = sorted((p.prompt_id, tuple(p.messages)) for fid, env in envs.environments.items()
                          if fid not in corrections for p in env.train)
            random.Random(f"{s.seed}-rehearsal-{rnd}").shuffle(pool)
            rehearsal = pool[:s.rehearsal_prompts]
            if s.general_rehearsal:
                from learner.rehearsal import general_requests

                rehearsal += [(f"general-{i}", m) for i, m in enumerate(general_requests())]
        return _Plan(objs, corrections, tuple(plans), s.steps_per_round if objs else 0, distill_steps,
                     tuple(rehearsal))

    def _revalidate_stored(self, envs, start: int, end: int) -> list:
        """Re-validate the *stored* active rewards (``RewardRegistry``, what ``onpolicy rewards`` and the
        admin show) on the round's new feedback, retiring those that no longer agree with users. The
        round itself trains on rewards rebuilt and validated from all feedback up to ``end``, so this
        keeps the persisted table honest; it does not change what this round trains on."""
        wh = getattr(self.registry, "wh", None)
        if wh is None:
            return []
        from learner.rewards.registry import RewardRegistry

        active = {r[0] for r in wh.query("SELECT DISTINCT family_id FROM {db}.rewards FINAL WHERE status = 'active'")}
        fresh = envs.family_trajectories(self._round_trajectories[start:end])
        reg, reports = RewardRegistry(wh), []
        for fid in sorted(active & set(fresh)):
            reports += reg.revalidate(fid, fresh[fid])
        return reports

    def _decide(self, result: RoundResult) -> RoundResult:
        """Record the round's decision where the operator looks (the round log), then return it."""
        self.round_log.record(RoundRecord(self.settings.family, result.round, result.status, result.window,
                                          result.reason, result.plans, result.adapter, result.metrics))
        log.info("round %d %s: %s", result.round, result.status.value, result.reason)
        return result

    def run_round(self) -> RoundResult:
        import torch

        from learner.trainer import DistillMethod, DistillTrainer, GRPOTrainer, LoraPolicy

        st = self.state
        if "window" not in st:  # a new round: fix its window now
            st = {**st, "round": st["round"] + 1, "window": [st["committed"], self.log.end()], "step": 0}
        rnd, (start, end) = st["round"], st["window"]
        t_round = time.perf_counter()
        envs, rewards, objs = self._objectives(end)
        if st.get("step", 0) == 0:
            self._revalidate_stored(envs, start, end)
        env_versions = sorted(e.version for e in envs.environments.values())
        reward_versions = sorted(o.version for o in objs.values())
        if st.get("env_versions") not in (None, env_versions):
            raise RuntimeError(f"round {rnd}: environments rebuilt from the same window differ from the checkpoint "
                               "(nondeterministic build); refusing to mix them")
        plan = self._plan(envs, rewards, objs, rnd, start)
        timings = {"rebuild_s": time.perf_counter() - t_round}
        total_steps = plan.grpo_steps + plan.distill_steps
        if total_steps == 0:
            self._commit(rnd, end)
            return self._decide(RoundResult(rnd, (start, end), RoundStatus.SKIPPED, summarize(plan.families),
                                            plans=plan.families))
        if st.get("schedule") not in (None, [plan.grpo_steps, plan.distill_steps]):
            raise RuntimeError(f"round {rnd}: the step schedule rebuilt from the same window differs from the "
                               "checkpoint (nondeterministic build); refusing to mix them")
        prod = self.registry.production(self.settings.family)
        parent_dir = prod.path if prod else None
        policy = LoraPolicy(self.base_path, self.ts, adapter_dir=parent_dir)
        # rehearsal targets come from the weights the round starts from, before any checkpoint is
        # loaded, so a resumed round rehearses exactly what an uninterrupted one did (greedy: deterministic)
        rehearsal = self._rehearsal(policy, plan.rehearsal) if plan.distill_steps else []
        # SDFT's teacher is frozen at the round's starting weights, also when the round resumes
        start_state = policy.adapter_state() if plan.distill_steps else None
        opt_state = distill_opt_state = None
        resumed = self.ckpt_dir is not None and st.get("step", 0) > 0
        if resumed and (self.ckpt_dir / "adapter.pt").exists():
            policy.load_adapter_state(torch.load(self.ckpt_dir / "adapter.pt"))
            if (self.ckpt_dir / "optimizer.pt").exists():
                opt_state = torch.load(self.ckpt_dir / "optimizer.pt")
            if (self.ckpt_dir / "distill_optimizer.pt").exists():
                distill_opt_state = torch.load(self.ckpt_dir / "distill_optimizer.pt")
        grpo = GRPOTrainer(policy, objs, opt_state) if plan.grpo_steps else None
        distill = DistillTrainer(policy, distill_opt_state, teacher_state=start_state) if plan.distill_steps else None
        method = DistillMethod(self.settings.distill_method.value)
        grpo_fams = sorted(objs)
        demos = {fid: fc.train for fid, fc in sorted(plan.corrections.items())}
        distill_fams = sorted(demos)
        st = {**st, "env_versions": env_versions, "reward_versions": reward_versions,
              "schedule": [plan.grpo_steps, plan.distill_steps]}
        history: list[dict] = list(st.get("history", []))
        guard: dict[str, Any] = dict(st.get("guard", {}))
        healthy = policy.adapter_state()  # the weights the collapse guard falls back to
        step = st.get("step", 0)
        while step < total_steps:
            while self.control().paused:  # obeyed before the next step
                time.sleep(self.settings.poll_s)
            rng = random.Random(f"{self.settings.seed}-{rnd}-{step}")
            distilling = plan.distills(step)
            if distilling and guard.get("stopped_at") is not None:
                step += 1  # distillation was stopped by the guard: its remaining slots stay empty
                continue
            if not distilling:
                batch = []
                for _ in range(self.ts.prompts_per_step):
                    pool = envs.environments[grpo_fams[rng.randrange(len(grpo_fams))]].train
                    batch.append(pool[rng.randrange(len(pool))])
                m = grpo.step(batch, step_seed=rnd * 100_000 + step)
                rec = {"round": rnd, "step": step + 1, "method": Method.GRPO.value, "reward": m.reward_mean,
                       "kl": m.kl, "loss": m.loss, "rollout_tok_s": m.rollout_tok_s, "skipped": m.skipped}
            else:
                batch = []
                for _ in range(self.ts.prompts_per_step):  # families evenly, then a correction of the family
                    pool = demos[distill_fams[rng.randrange(len(distill_fams))]]
                    batch.append(pool[rng.randrange(len(pool))])
                if rehearsal:
                    batch += [rehearsal[rng.randrange(len(rehearsal))] for _ in range(self.settings.rehearsal_per_step)]
                dm = distill.step(batch, method, seed=rnd * 100_000 + step)
                rec = {"round": rnd, "step": step + 1, "method": method.value, "reward": None, "kl": dm.kl,
                       "loss": dm.loss, "sft_loss": dm.sft_loss, "degenerate": dm.degenerate,
                       "rollout_tok_s": 0.0, "skipped": ""}
                recent = [h["degenerate"] for h in history if h.get("method") == method.value][-(self.settings.guard_window - 1):]
                recent.append(dm.degenerate)
                if len(recent) >= self.settings.guard_window and \
                        sum(recent) / len(recent) >= self.settings.degenerate_stop:
                    policy.load_adapter_state(healthy)
                    guard = {"stopped_at": step + 1, "degenerate": sum(recent) / len(recent),
                             "reason": f"distillation stopped at step {step + 1}: {sum(recent) / len(recent):.0%} of "
                                       f"the student's samples degenerate over the last {len(recent)} steps "
                                       f"(stop at {self.settings.degenerate_stop:.0%}); weights restored to the "
                                       "last healthy checkpoint"}
                    log.warning("round %d: %s", rnd, guard["reason"])
            step += 1
            history.append(rec)
            self.metrics.append(rec)
            if self.on_step:
                self.on_step(rec)
            if step % self.settings.checkpoint_every == 0 or step == total_steps or guard.get("stopped_at") == step:
                st = {**st, "step": step, "history": history, "guard": guard}
                self._checkpoint(st, policy, grpo, distill)
                if not guard:
                    healthy = policy.adapter_state()
        timings["train_s"] = time.perf_counter() - t_round - timings["rebuild_s"]
        return self._finish_round(rnd, start, end, st, plan, policy, prod, envs, env_versions, reward_versions,
                                  history, guard, timings)

    def _rehearsal(self, policy, prompts) -> list:
        """The starting weights' own greedy answers to ``prompts``, as demonstrations: only answers that
        ended within the token limit (a cut answer would teach stopping mid-sentence, bench/distill.py)."""
        from learner.types import Demonstration

        out = []
        for i in range(0, len(prompts), 64):
            chunk = prompts[i:i + 64]
            ro = policy.sample([m for _, m in chunk], 1, seed=i, greedy=True, max_new_tokens=48)
            ended = (ro.ids[:, ro.prompt_len:] == policy.eos_id).any(dim=1).tolist()
            out += [Demonstration(tuple(m), t, 1.0, "rehearsal", pid)
                    for (pid, m), t, done in zip(chunk, ro.texts, ended) if done and t.strip()]
        return out

    def _finish_round(self, rnd, start, end, st, plan: _Plan, policy, prod, envs, env_versions, reward_versions,
                      history, guard, timings: dict[str, float]) -> RoundResult:
        """Register (idempotent by checksum), gate, ship, record the decision, then commit the window.
        ``timings``: seconds per stage (rebuild, train, register, gate, ship), kept in the round's metrics."""
        t0 = time.perf_counter()
        out_dir = self.ckpt.root / f"adapter-round-{rnd}"
        shutil.rmtree(out_dir, ignore_errors=True)
        policy.save_adapter(out_dir)
        from learner.registry import Lineage

        steps = {m: sum(1 for h in history if h.get("method") == m) for m in {h.get("method") for h in history}}
        grpo_rewards = [h["reward"] for h in history if h.get("method") == Method.GRPO.value]
        version = self.registry.register(self.settings.family, out_dir, Lineage(
            parent=prod.name if prod else "", base_model=self.base_path,
            data_window={"start": start, "end": end, "round": rnd}, env_versions=env_versions,
            reward_versions=reward_versions, hyperparams={**self.ts.to_dict(), "distill_method":
                                                          self.settings.distill_method.value},
            metrics={"reward_last": grpo_rewards[-1] if grpo_rewards else None, "steps": len(history),
                     "steps_by_method": steps,
                     "corrections": {fid: len(fc.train) for fid, fc in plan.corrections.items()},
                     "guard": guard}))
        timings["register_s"] = time.perf_counter() - t0
        metrics = {"steps": len(history), "steps_by_method": steps, "timings": timings,
                   **({"guard": guard} if guard else {})}
        reason = summarize(plan.families) + (f"; {guard['reason']}" if guard else "")
        result = RoundResult(rnd, (start, end), RoundStatus.TRAINED, reason, version.name, metrics=metrics,
                             plans=plan.families)
        if self.gate is not None and version.status == "candidate":
            checks = dict(plan.objectives)
            for fid, fc in plan.corrections.items():
                if fid not in checks and (check := heldout_check(fc)) is not None:
                    checks[fid] = check
            t0 = time.perf_counter()
            g = self.gate(policy, prod, envs, checks)
            timings["gate_s"] = time.perf_counter() - t0
            from learner.gate import record

            version = record(self.registry, version.name, prod.name if prod else "", g)
            result.gate = g.reason
            result.status = RoundStatus.GATED if g.passed else RoundStatus.GATE_FAILED
            result.reason = f"{reason}; gate {g.reason}"
        self._decide(result)
        if self.ship is not None and version.routable and self.settings.family not in self.control().pinned:
            from learner.release import RoundContext

            fam_settings = self.env_settings.families if self.env_settings is not None else None
            t0 = time.perf_counter()
            result.release = self.ship(version, RoundContext(envs, plan.objectives, self._round_trajectories,
                                                             fam_settings))
            timings["ship_s"] = time.perf_counter() - t0
        self._commit(rnd, end)
        return result

    def _checkpoint(self, st: dict, policy, grpo, distill) -> None:
        import torch

        def files(d: Path) -> None:
            torch.save(policy.adapter_state(), d / "adapter.pt")
            if grpo is not None:
                torch.save(grpo.optimizer.state_dict(), d / "optimizer.pt")
            if distill is not None:
                torch.save(distill.optimizer.state_dict(), d / "distill_optimizer.pt")

        self.ckpt_dir = self.ckpt.save(st, files)
        self.state = json.loads((self.ckpt_dir / "state.json").read_text())

    def _commit(self, rnd: int, end: int) -> None:
        st = {"committed": end, "round": rnd, "seq": self.state.get("seq", 0),
              "rounds_done": self.state.get("rounds_done", 0) + 1}
        self.ckpt_dir = self.ckpt.save(st, lambda d: None)
        self.state = json.loads((self.ckpt_dir / "state.json").read_text())


class WarehouseSignalLog:
    """Judged trajectories from the warehouse (``learner.trajectories``), ordered by (interaction time,
    event id). The offset is the number of judged trajectories; it decides *when* a round starts and
    is recorded as the adapter's data window. Late feedback on an old interaction is not lost: every
    round rebuilds environments and rewards from all trajectories up to its end, not from the window
    alone."""

    def __init__(self, warehouse, query=None):
        self.wh = warehouse
        self.query = query
        self._cache: list[Trajectory] = []
        self._fingerprint: tuple | None = None

    def _data_fingerprint(self) -> tuple:
        # Two one-row aggregates: the loop polls end() every second while it waits, and rebuilding
        # every trajectory (a join of both tables) is only worth it when something landed.
        return tuple(self.wh.query(
            "SELECT (SELECT count(), max(landed_at) FROM {db}.interactions), "
            "(SELECT count(), max(landed_at) FROM {db}.feedback)")[0])

    def _load(self) -> list[Trajectory]:
        from learner.trajectories import load_trajectories

        fingerprint = self._data_fingerprint()
        trajs = [t for t in load_trajectories(self.wh, self.query).trajectories if t.label() is not None]
        self._cache = sorted(trajs, key=lambda t: (t.ts, t.event_id))
        self._fingerprint = fingerprint
        return self._cache

    def end(self) -> int:
        if self._fingerprint is not None and self._data_fingerprint() == self._fingerprint:
            return len(self._cache)
        return len(self._load())

    def read(self, start: int, end: int) -> list[Trajectory]:
        return (self._cache if len(self._cache) >= end else self._load())[start:end]
