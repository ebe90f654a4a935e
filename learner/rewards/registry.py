"""Rewards, their versions and validation figures in the warehouse (migration 0003), and re-validation
with automatic retirement.

Statuses: ``active`` (validated, carries weight), ``logged`` (validated but superseded, weight 0),
``rejected`` (failed validation), ``insufficient`` (too little held-out feedback, or could not be
fitted), ``retired`` (was active, then failed on fresher feedback). Only ``active`` rewards are
ever loaded for training.

Write order: validation rows first, then the reward row that cites them, so a reader never sees a
status without its evidence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

import orjson

from learner.rewards.base import Reward, RewardError
from learner.rewards.combiner import CombinedReward, Component
from learner.types import Trajectory, ValidationReport, stable_hash

REWARD_COLUMNS = ("family_id", "name", "reward_version", "kind", "tenant", "env_version", "status", "weight", "params",
                  "reason", "created_at", "updated_at")
VALIDATION_COLUMNS = ("validation_id", "family_id", "name", "reward_version", "n", "n_pos", "n_neg", "coverage", "auc",
                      "ci_low", "ci_high", "agreement", "bar", "passed", "reason", "purpose", "validated_at")


def _naive(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(dt.timezone.utc).replace(tzinfo=None)


def load_reward(kind: str, family_id: str, name: str, params: dict[str, Any]) -> Reward:
    """Rebuild a reward from its stored kind and parameters."""
    from learner.rewards import judge, memory, model, reference, verifiers

    if kind == "answer_memory":
        return memory.AnswerMemory.from_params(family_id, name, params)
    if kind == "learned_rm":
        return model.LearnedRewardModel.from_params(family_id, name, params)
    if kind == "policy_head":
        from learner.rewards.policy_head import PolicyHeadRewardModel

        return PolicyHeadRewardModel.from_params(family_id, name, params)
    if kind == "reference":
        return reference.ReferenceReward.from_params(family_id, name, params)
    if kind == "json_schema":
        return verifiers.JsonSchemaVerifier(family_id, params["schema"], name)
    if kind == "json_parse":
        return verifiers.JsonParseVerifier(family_id, params["object_only"], name)
    if kind == "tool_calls":
        return verifiers.ToolCallVerifier(family_id, params["tools"], name)
    if kind == "format":
        return verifiers.FormatVerifier(family_id, params["constraints"], name)
    if kind == "refusal":
        return verifiers.RefusalReward(family_id, name)
    if kind == "length":
        return verifiers.LengthReward(family_id, params["scale"], name)
    if kind == "llm_judge":
        return judge.LLMJudge(family_id, judge.JudgeSettings(base_url=params["base_url"], model=params["model"],
                                                             rubric=params["rubric"]), name)
    raise RewardError(f"unknown reward kind {kind!r}; this learner knows answer_memory, learned_rm, reference, "
                      "json_schema, json_parse, tool_calls, format, refusal, length, llm_judge, policy_head")


@dataclass
class RewardRow:
    reward: Reward
    status: str
    weight: float
    reason: str


class RewardRegistry:
    def __init__(self, warehouse):
        self.wh = warehouse

    def save_validations(self, reports: Sequence[ValidationReport], purpose: str = "initial") -> None:
        rows = []
        for r in reports:
            vid = "v" + stable_hash(r.family_id, r.reward, r.reward_version, r.validated_at.isoformat(), purpose, length=16)
            rows.append([vid, r.family_id, r.reward, r.reward_version, r.n, r.n_pos, r.n_neg, r.coverage, r.auc,
                         r.ci_low, r.ci_high, r.agreement, r.bar, r.passed, r.reason, purpose, _naive(r.validated_at)])
        self.wh.insert("reward_validations", rows, VALIDATION_COLUMNS)

    def save_rewards(self, family_id: str, tenant: str, env_version: str, rows: Sequence[RewardRow],
                     now: dt.datetime | None = None) -> None:
        now = now or dt.datetime.now(dt.timezone.utc)
        out = []
        for r in rows:
            out.append([family_id, r.reward.name, r.reward.version, r.reward.kind, tenant, env_version, r.status,
                        float(r.weight), orjson.dumps(r.reward.params()).decode(), r.reason, _naive(now), _naive(now)])
        self.wh.insert("rewards", out, REWARD_COLUMNS)

    def set_status(self, family_id: str, name: str, version: str, status: str, reason: str,
                   weight: float = 0.0, now: dt.datetime | None = None) -> None:
        """A new row for the same key with a later ``updated_at``: the status history stays in the parts
        until merged; FINAL reads see the latest."""
        now = now or dt.datetime.now(dt.timezone.utc)
        self.wh.command(
            "INSERT INTO {db}.rewards (family_id, name, reward_version, kind, tenant, env_version, status, weight, "
            "params, reason, created_at, updated_at) SELECT family_id, name, reward_version, kind, tenant, env_version, "
            f"'{status}', {float(weight)}, params, {_sql_str(reason)}, created_at, "
            f"toDateTime64('{_naive(now).isoformat(sep=' ', timespec='milliseconds')}', 3, 'UTC') "
            f"FROM {{db}}.rewards FINAL WHERE family_id = {_sql_str(family_id)} AND name = {_sql_str(name)} "
            f"AND reward_version = {_sql_str(version)}")

    def table(self, family_id: str | None = None, include_history: bool = False) -> list[dict[str, Any]]:
        """One row per reward (latest version per family and name unless ``include_history``), with its
        latest validation figures."""
        where = "WHERE family_id = {f:String}" if family_id else ""
        rewards = self.wh.query_dicts(
            "SELECT family_id, name, reward_version, kind, tenant, env_version, status, weight, reason, created_at, "
            f"updated_at FROM {{db}}.rewards FINAL {where} ORDER BY family_id, name, created_at, updated_at",
            {"f": family_id} if family_id else None)
        if not include_history:
            latest: dict[tuple, dict] = {}
            for r in rewards:
                latest[(r["family_id"], r["name"])] = r
            rewards = list(latest.values())
        vals = self.wh.query_dicts(
            "SELECT family_id, name, reward_version, argMax(auc, validated_at) AS auc, argMax(ci_low, validated_at) AS ci_low, "
            "argMax(ci_high, validated_at) AS ci_high, argMax(n, validated_at) AS n, argMax(coverage, validated_at) AS coverage, "
            "argMax(agreement, validated_at) AS agreement, argMax(purpose, validated_at) AS purpose, max(validated_at) AS last_validated "
            "FROM {db}.reward_validations FINAL GROUP BY family_id, name, reward_version")
        by = {(v["family_id"], v["name"], v["reward_version"]): v for v in vals}
        labels = {r["family_id"]: r["label"] for r in self.wh.query_dicts(
            "SELECT family_id, argMax(label, created_at) AS label FROM {db}.environments FINAL GROUP BY family_id")}
        out = []
        for r in sorted(rewards, key=lambda r: (r["family_id"], -r["weight"], r["name"])):
            v = by.get((r["family_id"], r["name"], r["reward_version"]), {})
            out.append({**r, "label": labels.get(r["family_id"], ""), **{k: v.get(k) for k in
                        ("auc", "ci_low", "ci_high", "n", "coverage", "agreement", "last_validated", "purpose")}})
        return out

    def load_combined(self, family_id: str) -> CombinedReward:
        """The family's combiner from stored rows: active rewards with their weights, plus the others
        at weight 0 (logged only). Retired and rejected rewards are logged, never weighted."""
        rows = self.wh.query_dicts(
            "SELECT name, kind, reward_version, status, weight, params, updated_at FROM {db}.rewards FINAL "
            "WHERE family_id = {f:String} ORDER BY name, created_at, updated_at", {"f": family_id})
        latest: dict[str, dict] = {}
        for r in rows:
            latest[r["name"]] = r
        comps = []
        for name, r in sorted(latest.items()):
            if r["status"] == "insufficient" and orjson.loads(r["params"]).get("unfitted"):
                continue  # a candidate that was never fitted: nothing to load
            reward = load_reward(r["kind"], family_id, name, orjson.loads(r["params"]))
            comps.append(Component(reward, float(r["weight"]) if r["status"] == "active" else 0.0))
        return CombinedReward(family_id, comps)

    def revalidate(self, family_id: str, fresh: Sequence[Trajectory], settings=None,
                   now: dt.datetime | None = None) -> list[ValidationReport]:
        """Validate every active reward of the family on ``fresh`` judged trajectories (feedback that
        arrived after the rewards were built) and retire those that fall below the bar. A reward with
        too little fresh feedback keeps its status: silence is not disagreement."""
        from learner.rewards.validation import validate

        now = now or dt.datetime.now(dt.timezone.utc)
        combined = self.load_combined(family_id)
        weights = {c.reward.name: c.weight for c in combined.components}
        reports = []
        for c in combined.components:
            if weights[c.reward.name] <= 0:
                continue
            rep = validate(c.reward, fresh, settings, now)
            reports.append(rep)
            if not rep.passed and rep.auc is not None:
                self.set_status(family_id, c.reward.name, c.reward.version, "retired",
                                f"retired on re-validation: {rep.reason}", 0.0, now)
        self.save_validations(reports, "revalidation")
        return reports


def _sql_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
