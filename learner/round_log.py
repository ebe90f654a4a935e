"""Every learning round's decision as a typed record, kept where the operator looks.

A round the learner skips is as much a decision as one it trains, and the person running it needs
the reason in numbers ("capitals: 4 of 15 approved held-out answers; 37 correction pairs, ...").
:class:`RoundRecord` carries the round's status, one line of reason and a :class:`FamilyPlan` per
task family (how it was trained, or why not). :class:`WarehouseRoundLog` writes it to the
``learner_rounds`` table (migration 0007), which the demo's ``[learning]`` lines, the status page
and ``onpolicy learner status`` read. No torch here: the status page imports it.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence


class RoundStatus(str, enum.Enum):
    SKIPPED = "skipped"  # nothing to train: no family has a validated reward or enough corrections
    TRAINED = "trained"  # an adapter was registered (no gate configured)
    GATED = "gated"  # ... and passed the gate
    GATE_FAILED = "gate_failed"  # ... and failed it: never routed


class Method(str, enum.Enum):
    """How a task family's signal trained the round's adapter."""

    GRPO = "grpo"  # on-policy RL on the family's validated reward
    SFT = "sft"  # cross-entropy on the corrections
    SDFT = "sdft"  # self-distillation: the model with the correction in context teaches itself
    SDFT_SFT = "sdft+sft"  # SDFT anchored by SFT on the same corrections


@dataclass(frozen=True)
class FamilyPlan:
    """How one task family trained this round: ``methods`` (GRPO, a distillation method, or both in
    one adapter; empty = not trained) and why, in numbers."""

    family_id: str
    label: str
    methods: tuple[Method, ...]
    reason: str
    examples: int = 0  # corrections (distillation) or train prompts (GRPO)

    @property
    def trained(self) -> bool:
        return bool(self.methods)

    def describe_methods(self) -> str:
        return " + ".join(m.value for m in self.methods) if self.methods else "not trained"

    def line(self) -> str:
        return f"{self.label or self.family_id}: {self.describe_methods()}: {self.reason}"


@dataclass(frozen=True)
class RoundRecord:
    family: str
    round: int
    status: RoundStatus
    window: tuple[int, int]
    reason: str
    plans: tuple[FamilyPlan, ...] = ()
    adapter: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    decided_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def lines(self) -> list[str]:
        """What a person reads: the round, then one line per family."""
        head = f"round {self.round} {self.status.value}" + (f" -> {self.adapter}" if self.adapter else "")
        return [f"{head}: {self.reason}"] + [f"  {p.line()}" for p in self.plans]


class RoundLog(Protocol):
    def record(self, rec: RoundRecord) -> None: ...


@dataclass
class ListRoundLog:
    """In memory (tests, benches)."""

    records: list[RoundRecord] = field(default_factory=list)

    def record(self, rec: RoundRecord) -> None:
        self.records.append(rec)


COLUMNS = ["family", "round", "status", "window_start", "window_end", "adapter", "reason", "plans", "metrics",
           "decided_at"]


class WarehouseRoundLog:
    """``learner_rounds`` in the warehouse (a ``Warehouse`` or ``RemoteWarehouse``)."""

    def __init__(self, warehouse):
        self.wh = warehouse

    def record(self, rec: RoundRecord) -> None:
        plans = json.dumps([{**asdict(p), "methods": [m.value for m in p.methods]} for p in rec.plans])
        self.wh.insert("learner_rounds", [[
            rec.family, rec.round, rec.status.value, rec.window[0], rec.window[1], rec.adapter, rec.reason, plans,
            json.dumps(rec.metrics, default=str), rec.decided_at.astimezone(dt.timezone.utc).replace(tzinfo=None)]],
            COLUMNS)


def read_rounds(warehouse, family: str | None = None, limit: int = 50) -> list[RoundRecord]:
    """The latest ``limit`` rounds, newest first (empty when no learner has migrated the table yet)."""
    where = "WHERE family = {f:String}" if family else ""
    try:
        rows = warehouse.query_dicts(
            f"SELECT family, round, status, window_start, window_end, adapter, reason, plans, metrics, decided_at "
            f"FROM {{db}}.learner_rounds FINAL {where} ORDER BY decided_at DESC LIMIT {int(limit)}",
            {"f": family} if family else None)
    except Exception:  # table absent: nothing decided yet
        return []
    return [_from_row(r) for r in rows]


def _from_row(r: dict) -> RoundRecord:
    at = r["decided_at"]
    if isinstance(at, str):
        at = dt.datetime.fromisoformat(at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    plans = tuple(FamilyPlan(p["family_id"], p.get("label", ""), tuple(Method(m) for m in p["methods"]), p["reason"],
                             int(p.get("examples", 0))) for p in json.loads(r["plans"] or "[]"))
    return RoundRecord(r["family"], int(r["round"]), RoundStatus(r["status"]), (int(r["window_start"]),
                       int(r["window_end"])), r["reason"], plans, r["adapter"], json.loads(r["metrics"] or "{}"), at)


def summarize(plans: Sequence[FamilyPlan]) -> str:
    """The round's one-line reason from its family plans."""
    trained = [p for p in plans if p.trained]
    if not trained:
        return "nothing to train: no family has a validated reward or enough corrections (per family below)"
    by: dict[str, list[str]] = {}
    for p in trained:
        for m in p.methods:
            by.setdefault(m.value, []).append(p.label or p.family_id)
    return "trained " + "; ".join(f"{m} on {', '.join(f)}" for m, f in sorted(by.items()))
