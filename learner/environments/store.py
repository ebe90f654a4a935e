"""Environments stored in the warehouse (tables ``environments`` and ``prompt_pools``, migration
0003) and, optionally, as files with a manifest.

Versions are content hashes, so saving the same build twice writes identical rows (the
ReplacingMergeTree keys collapse them) and a version, once written, never changes meaning.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import orjson

from learner.environments.build import EnvironmentSet
from learner.types import Environment, PromptRecord, TaskFamily

ENV_COLUMNS = ("env_version", "family_id", "tenant", "label", "signature", "build_id", "seed", "split_time",
               "n_train", "n_heldout", "n_synthetic", "manifest")
POOL_COLUMNS = ("env_version", "family_id", "prompt_id", "split", "origin", "synthetic", "parent_id",
                "near_dup_group", "messages", "request_kwargs", "first_seen", "n_seen", "source_interactions")


def _naive(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts.replace(tzinfo=dt.timezone.utc) if ts.tzinfo is None else ts


def save_environments(warehouse, envset: EnvironmentSet) -> list[str]:
    """Write every environment of the build and its pools; returns the versions written."""
    env_rows, pool_rows = [], []
    for env in envset.environments.values():
        f = env.family
        env_rows.append([
            env.version, f.family_id, f.tenant, f.label, orjson.dumps(dict(f.signature)).decode(), envset.build_id,
            int(env.manifest.get("seed", 0)), _naive(envset.split_time), len(env.train), len(env.heldout),
            sum(p.synthetic for p in env.train), orjson.dumps(env.manifest).decode()])
        for p in (*env.train, *env.heldout):
            pool_rows.append([
                env.version, f.family_id, p.prompt_id, p.split, p.origin, p.synthetic, p.parent_id, p.near_dup_group,
                orjson.dumps(list(p.messages)).decode(), orjson.dumps(dict(p.request_kwargs)).decode(),
                _naive(p.first_seen), p.n_seen, list(p.source_interactions)])
    warehouse.insert("environments", env_rows, ENV_COLUMNS)
    for i in range(0, len(pool_rows), 20000):
        warehouse.insert("prompt_pools", pool_rows[i:i + 20000], POOL_COLUMNS)
    return [r[0] for r in env_rows]


def load_environment(warehouse, env_version: str) -> Environment:
    """Read one stored environment back, exactly as it was built."""
    rows = warehouse.query_dicts(
        "SELECT * FROM {db}.environments FINAL WHERE env_version = {v:String}", {"v": env_version})
    if not rows:
        raise KeyError(f"no environment version {env_version!r} in the warehouse")
    r = rows[0]
    family = TaskFamily(r["family_id"], r["label"], r["tenant"], orjson.loads(r["signature"]))
    prompts = warehouse.query_dicts(
        "SELECT * FROM {db}.prompt_pools FINAL WHERE env_version = {v:String} ORDER BY first_seen, prompt_id",
        {"v": env_version})
    recs = [PromptRecord(
        prompt_id=p["prompt_id"], family_id=p["family_id"], messages=tuple(orjson.loads(p["messages"])),
        request_kwargs=orjson.loads(p["request_kwargs"]), first_seen=_utc(p["first_seen"]), split=p["split"],
        origin=p["origin"], synthetic=bool(p["synthetic"]), parent_id=p["parent_id"],
        near_dup_group=p["near_dup_group"], n_seen=int(p["n_seen"]),
        source_interactions=tuple(p["source_interactions"])) for p in prompts]
    return Environment(family, tuple(p for p in recs if p.split == "train"),
                       tuple(p for p in recs if p.split == "heldout"), env_version, orjson.loads(r["manifest"]))


def latest_environments(warehouse) -> list[dict]:
    """The newest environment version of each family (for the CLI and the trainer)."""
    return warehouse.query_dicts(
        "SELECT family_id, argMax(env_version, created_at) AS env_version, argMax(label, created_at) AS label, "
        "argMax(n_train, created_at) AS n_train, argMax(n_heldout, created_at) AS n_heldout, "
        "argMax(n_synthetic, created_at) AS n_synthetic, max(created_at) AS created_at "
        "FROM {db}.environments FINAL GROUP BY family_id ORDER BY family_id")


def export_environment(env: Environment, directory: Path) -> Path:
    """Write ``<dir>/<env_version>/{manifest.json,train.jsonl,heldout.jsonl}`` (for people and tools)."""
    out = Path(directory) / env.version
    out.mkdir(parents=True, exist_ok=True)
    for name, pool in (("train", env.train), ("heldout", env.heldout)):
        with open(out / f"{name}.jsonl", "wb") as fh:
            for p in pool:
                fh.write(orjson.dumps({"prompt_id": p.prompt_id, "origin": p.origin, "synthetic": p.synthetic,
                                       "parent_id": p.parent_id, "request": p.to_request()}) + b"\n")
    (out / "manifest.json").write_text(json.dumps(dict(env.manifest), indent=2, sort_keys=True))
    return out
