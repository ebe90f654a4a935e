"""Adapter versions with their lineage: files in a content-checked store, rows in the warehouse.

Names are immutable: version 7 of family ``arith`` is ``arith-v0007`` forever (``publisher.adapter_name``);
a new version is a new name. Files live in ``<root>/<name>/`` (read-only after registration) with
``lineage.json`` beside the adapter; ``sha256`` is ``publisher.adapter_sha256`` of the adapter files,
so the publisher can verify exactly the bytes the registry recorded.

Durability order of :meth:`AdapterRegistry.register`: files are written to a staging directory, then
renamed into place (atomic on one filesystem), then the row is inserted. A crash between the two
leaves a directory without a row; registering the same bytes again adopts it (checksum match), and
different bytes under that name are refused. Status changes and evaluations: the evidence row
(``adapter_evaluations``) is written before the status row that cites it, so a reader never sees a
status without its evidence.

Statuses: ``candidate`` (trained) -> ``gate_failed`` | ``gated`` -> ``shadow_failed`` | ``canary`` ->
``production`` | ``rolled_back``; ``retired`` when unloaded. Only :data:`ROUTABLE` statuses may
ever be routed (``assert_routable``): a candidate that failed the gate is never routed.
One learner process writes a family at a time (the loop); version numbers come from the table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from learner.publisher import ADAPTER_FILES, adapter_name, adapter_sha256
from learner.types import stable_hash

STATUSES = ("candidate", "gate_failed", "gated", "shadow_failed", "canary", "production", "rolled_back", "retired")
ROUTABLE = ("gated", "canary", "production")
COLUMNS = ("name", "family", "version", "parent", "base_model", "path", "sha256", "status", "data_window",
           "env_versions", "reward_versions", "hyperparams", "metrics", "reason", "created_at", "updated_at")
EVAL_COLUMNS = ("eval_id", "name", "family", "stage", "against", "passed", "decision", "evidence", "reason",
                "evaluated_at")


class RegistryError(RuntimeError):
    """A registry operation that would break an invariant (immutable names, routability)."""


class NotRoutable(RegistryError):
    """An adapter whose status forbids routing (it failed the gate, was rolled back, ...)."""


@dataclass(frozen=True)
class Lineage:
    """Where an adapter came from: what it was trained on, with which rewards and settings."""

    parent: str = ""
    base_model: str = ""
    data_window: Mapping[str, Any] = field(default_factory=dict)
    env_versions: Sequence[str] = ()
    reward_versions: Sequence[str] = ()
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterVersion:
    """One row of the registry (its latest status)."""

    name: str
    family: str
    version: int
    parent: str
    base_model: str
    path: Path
    sha256: str
    status: str
    data_window: dict[str, Any]
    env_versions: tuple[str, ...]
    reward_versions: tuple[str, ...]
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    reason: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def routable(self) -> bool:
        return self.status in ROUTABLE


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _read_only(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


class AdapterRegistry:
    """Adapter versions of every family in ``warehouse`` (migration 0004) and files under ``root``."""

    def __init__(self, warehouse, root: str | Path):
        self.wh = warehouse
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reads ----------------------------------------------------------------------------------
    def _rows(self, where: str, params: dict[str, Any] | None = None) -> list[AdapterVersion]:
        rows = self.wh.query_dicts(
            f"SELECT {', '.join(COLUMNS)} FROM {{db}}.adapter_versions FINAL {where} ORDER BY family, version", params)
        return [AdapterVersion(
            name=r["name"], family=r["family"], version=int(r["version"]), parent=r["parent"],
            base_model=r["base_model"], path=Path(r["path"]), sha256=r["sha256"], status=r["status"],
            data_window=orjson.loads(r["data_window"] or "{}"), env_versions=tuple(r["env_versions"]),
            reward_versions=tuple(r["reward_versions"]), hyperparams=orjson.loads(r["hyperparams"] or "{}"),
            metrics=orjson.loads(r["metrics"] or "{}"), reason=r["reason"], created_at=r["created_at"],
            updated_at=r["updated_at"]) for r in rows]

    def get(self, name: str) -> AdapterVersion:
        rows = self._rows("WHERE name = {n:String}", {"n": name})
        if not rows:
            raise RegistryError(f"no adapter named {name!r} in the registry")
        return rows[0]

    def versions(self, family: str | None = None) -> list[AdapterVersion]:
        if family is None:
            return self._rows("")
        return self._rows("WHERE family = {f:String}", {"f": family})

    def production(self, family: str) -> AdapterVersion | None:
        """The family's production adapter (the newest one in production), or None: the base serves."""
        prod = [v for v in self.versions(family) if v.status == "production"]
        return prod[-1] if prod else None

    def evaluations(self, name: str) -> list[dict[str, Any]]:
        return self.wh.query_dicts(
            f"SELECT {', '.join(EVAL_COLUMNS)} FROM {{db}}.adapter_evaluations FINAL WHERE name = {{n:String}} "
            "ORDER BY evaluated_at, eval_id", {"n": name})

    # -- writes ---------------------------------------------------------------------------------
    def register(self, family: str, source_dir: str | Path, lineage: Lineage) -> AdapterVersion:
        """Copy the adapter files in under the family's next immutable name and record its lineage."""
        source = Path(source_dir)
        for f in ADAPTER_FILES:
            if not (source / f).is_file():
                raise RegistryError(f"{source} has no {f}: save the adapter with peft's save_pretrained")
        digest = adapter_sha256(source)
        existing = self.versions(family)
        same = [v for v in existing if v.sha256 == digest]
        if same:
            return same[0]  # the same bytes registered before (a retried round): one version, not two
        version = max((v.version for v in existing), default=0) + 1
        name = adapter_name(family, version)
        final = self.root / name
        if final.exists():
            # a crash after the rename and before the row: adopt the directory only if it holds these bytes
            if adapter_sha256(final) != digest:
                raise RegistryError(f"{final} exists with other bytes and no registry row; names are immutable: "
                                    "move it aside (it is an orphan of an interrupted registration)")
        else:
            staging = self.root / f".staging-{name}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for f in ADAPTER_FILES:
                shutil.copyfile(source / f, staging / f)
            (staging / "lineage.json").write_text(json.dumps(
                {"name": name, "family": family, "sha256": digest, "parent": lineage.parent,
                 "base_model": lineage.base_model, "data_window": dict(lineage.data_window),
                 "env_versions": list(lineage.env_versions), "reward_versions": list(lineage.reward_versions),
                 "hyperparams": dict(lineage.hyperparams)}, indent=2, sort_keys=True, default=str))
            with open(staging / "adapter_model.safetensors", "rb") as fh:
                os.fsync(fh.fileno())
            _read_only(staging)
            os.rename(staging, final)
        now = _now()
        self.wh.insert("adapter_versions", [[
            name, family, version, lineage.parent, lineage.base_model, str(final), digest, "candidate",
            orjson.dumps(dict(lineage.data_window), default=str).decode(), list(lineage.env_versions),
            list(lineage.reward_versions), orjson.dumps(dict(lineage.hyperparams), default=str).decode(),
            orjson.dumps(dict(lineage.metrics), default=str).decode(), "trained", now, now]], COLUMNS)
        return self.get(name)

    def set_status(self, name: str, status: str, reason: str) -> AdapterVersion:
        """A new row for the version with ``status`` and a strictly later ``updated_at``."""
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        cur = self.get(name)
        now = max(_now(), cur.updated_at + dt.timedelta(milliseconds=1))
        self.wh.insert("adapter_versions", [[
            cur.name, cur.family, cur.version, cur.parent, cur.base_model, str(cur.path), cur.sha256, status,
            orjson.dumps(cur.data_window).decode(), list(cur.env_versions), list(cur.reward_versions),
            orjson.dumps(cur.hyperparams).decode(), orjson.dumps(cur.metrics).decode(), reason, cur.created_at, now]],
            COLUMNS)
        return self.get(name)

    def record_evaluation(self, name: str, stage: str, against: str, passed: bool, decision: str,
                          evidence: Mapping[str, Any], reason: str, status: str | None = None) -> AdapterVersion:
        """Write the evidence, then (``status``) the status it justifies -- in that order."""
        cur = self.get(name)
        at = _now()
        eval_id = "x" + stable_hash(name, stage, against, at.isoformat(), length=16)
        self.wh.insert("adapter_evaluations", [[eval_id, name, cur.family, stage, against, passed, decision,
                                                orjson.dumps(dict(evidence), default=str).decode(), reason, at]],
                       EVAL_COLUMNS)
        return self.set_status(name, status, reason) if status else cur

    def verify_files(self, name: str) -> AdapterVersion:
        """Re-hash the stored files; raise if they no longer match the recorded checksum."""
        v = self.get(name)
        got = adapter_sha256(v.path)
        if got != v.sha256:
            raise RegistryError(f"adapter {name}: files at {v.path} hash to {got}, registry says {v.sha256}")
        return v

    def assert_routable(self, name: str) -> AdapterVersion:
        """The version, if its status allows routing; raises :class:`NotRoutable` otherwise."""
        v = self.get(name)
        if not v.routable:
            raise NotRoutable(f"adapter {name} is {v.status} ({v.reason}); only {', '.join(ROUTABLE)} adapters "
                              "are ever routed")
        return v
