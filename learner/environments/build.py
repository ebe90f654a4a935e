"""Environments built from trajectories: families -> deduplicated pools split by time -> variants.

``build_environments`` is a pure function of (trajectories, settings, encoder): for a fixed event
log and seed it returns the same families, pools and versions, which is what lets an adapter name
exactly the environment version it learned from.

The train/held-out boundary ``split_time`` is one instant for the whole build, the
``heldout_fraction`` quantile of the (time-ordered) trajectories. Rewards are fitted on feedback
before it and validated on feedback after it, so pools and reward validation agree on what
"held out" means.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from learner.environments.embedding import Encoder, HashingEncoder
from learner.environments.families import FamilyAssignment, FamilySettings, discover_families
from learner.environments.pools import PoolSettings, build_pool
from learner.environments.synth import ParaphraseSettings, Paraphraser, SynthSettings, slot_fill_variants
from learner.types import Environment, PromptRecord, Trajectory, stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvironmentSettings:
    """How environments are built. ``heldout_fraction``: the newest share of traffic whose prompts
    (and feedback) are held out; ``seed`` drives every random choice (variants)."""

    seed: int = 0
    heldout_fraction: float = 0.2
    families: FamilySettings = field(default_factory=FamilySettings)
    pools: PoolSettings = field(default_factory=PoolSettings)
    synth: SynthSettings = field(default_factory=SynthSettings)
    paraphrase: ParaphraseSettings = field(default_factory=ParaphraseSettings)
    # A family with a handful of distinct prompts asked thousands of times is still worth replaying.
    min_prompts: int = 1


@dataclass
class EnvironmentSet:
    """Every family's environment from one build, with the assignment of trajectories to families."""

    build_id: str
    split_time: dt.datetime
    environments: dict[str, Environment]
    assignment: FamilyAssignment
    manifest: dict[str, Any]

    def family_trajectories(self, trajectories: Sequence[Trajectory]) -> dict[str, list[Trajectory]]:
        out: dict[str, list[Trajectory]] = defaultdict(list)
        for t in trajectories:
            fid = self.assignment.family_of.get(t.interaction_id)
            if fid is not None:
                out[fid].append(t)
        return dict(out)


def split_time_for(trajectories: Sequence[Trajectory], heldout_fraction: float) -> dt.datetime:
    ts = sorted(t.ts for t in trajectories)
    if not ts:
        return dt.datetime.now(dt.timezone.utc)
    idx = min(len(ts) - 1, max(0, int(len(ts) * (1 - heldout_fraction)) - 1))
    return ts[idx]


def env_version(family_id: str, train: Sequence[PromptRecord], heldout: Sequence[PromptRecord]) -> str:
    digest = stable_hash(family_id, [(p.prompt_id, p.split, p.origin) for p in (*train, *heldout)], length=10)
    return f"{family_id}-e{digest}"


def build_environments(trajectories: Sequence[Trajectory], settings: EnvironmentSettings | None = None,
                       encoder: Encoder | None = None, timings: dict[str, float] | None = None) -> EnvironmentSet:
    """Families, pools and variants from trajectories (already free of opted-out traffic)."""
    import time

    s = settings or EnvironmentSettings()
    encoder = encoder or HashingEncoder()
    timings = timings if timings is not None else {}
    trajs = sorted(trajectories, key=lambda t: (t.ts, t.event_id))

    t0 = time.perf_counter()
    assignment = discover_families(trajs, encoder, s.families)
    timings["families"] = time.perf_counter() - t0

    split_time = split_time_for(trajs, s.heldout_fraction)
    by_family: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_family[assignment.family_of[t.interaction_id]].append(t)

    t0 = time.perf_counter()
    pools = {fid: build_pool(fid, members, split_time, s.pools) for fid, members in by_family.items()}
    timings["pools"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    paraphraser = None
    paraphrase_status = "off (no base_url)"
    if s.paraphrase.base_url:
        try:
            paraphraser = Paraphraser(s.paraphrase)
            paraphrase_status = "on"
        except Exception as exc:  # the client itself could not be built: say so in the manifest
            paraphrase_status = f"failed: {exc}"
    envs: dict[str, Environment] = {}
    for fid in sorted(pools):
        train, heldout = pools[fid]
        if len(train) + len(heldout) < s.min_prompts:
            continue
        family_seed = int(stable_hash(s.seed, fid, length=8), 16)
        variants = slot_fill_variants(train, heldout, family_seed, s.synth)
        para_status = paraphrase_status
        if paraphraser is not None:
            try:
                variants += paraphraser.variants(train, heldout, family_seed, s.synth.near_dup_jaccard)
            except Exception as exc:
                # Paraphrases are optional; a broken endpoint must not stop learning, but it is recorded.
                para_status = f"failed: {type(exc).__name__}: {exc}"
                log.warning("paraphrasing %s failed: %s", fid, exc)
        train_all = tuple(train) + tuple(variants)
        version = env_version(fid, train_all, heldout)
        family = assignment.families[fid]
        manifest = {
            "family_id": fid, "label": family.label, "env_version": version, "seed": s.seed,
            "split_time": split_time.isoformat(),
            "data_window": [by_family[fid][0].ts.isoformat(), by_family[fid][-1].ts.isoformat()],
            "n_trajectories": len(by_family[fid]),
            "n_train_real": len(train), "n_heldout": len(heldout),
            "n_slot_fill": sum(v.origin == "slot_fill" for v in variants),
            "n_paraphrase": sum(v.origin == "paraphrase" for v in variants),
            "paraphrase": para_status, "encoder": encoder.name,
            "near_dup_groups": len({p.near_dup_group for p in (*train, *heldout)}),
        }
        envs[fid] = Environment(family, train_all, tuple(heldout), version, manifest)
    timings["variants"] = time.perf_counter() - t0
    build_id = "b" + stable_hash(sorted(e.version for e in envs.values()), length=12)
    manifest = {"build_id": build_id, "split_time": split_time.isoformat(), "seed": s.seed,
                "families": {fid: e.manifest for fid, e in envs.items()}}
    return EnvironmentSet(build_id, split_time, envs, assignment, manifest)
