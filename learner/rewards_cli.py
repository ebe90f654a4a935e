"""``onpolicy rewards``: the rewards of every task family, their status and validation figures.

    onpolicy rewards                 # table of the latest rewards (from the warehouse)
    onpolicy rewards --history       # every version
    onpolicy rewards build           # rebuild environments + rewards from the warehouse and validate
    onpolicy rewards revalidate      # re-check active rewards on feedback newer than the last build

Imports stay lazy: the table needs no numpy, sklearn or torch.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rewards", help="list, rebuild or re-validate the rewards learned from traffic")
    p.add_argument("action", nargs="?", default="list", choices=("list", "build", "revalidate"),
                   help="list (default): show the table; build: rebuild from the warehouse; revalidate: check actives on fresh feedback")
    p.add_argument("--family", default=None, help="only this family id")
    p.add_argument("--history", action="store_true", help="list: every reward version, not only the latest")
    p.add_argument("--json", action="store_true", help="list: one JSON object per line instead of a table")
    p.add_argument("--tenant", default=None, help="build: only this tenant's traffic")
    p.add_argument("--seed", type=int, default=0, help="build: seed for variants (same log + seed = same versions)")
    p.add_argument("--bar", type=float, default=0.65, help="lower bound of the AUC interval a reward must clear")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="build: newest share of traffic held out")
    p.add_argument("--encoder", default="auto", choices=("auto", "minilm", "hashing"),
                   help="build: prompt embeddings for family discovery (auto: MiniLM when installed)")
    p.add_argument("--export", default=None, help="build: also write each environment as files under this directory")
    p.add_argument("--since", default=None, help="revalidate: ISO time; feedback on traffic after it (default: the end of the last build's data)")
    p.set_defaults(func=_run)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def render_table(rows: list[dict]) -> str:
    header = ["family", "label", "reward", "kind", "status", "weight", "AUC", "95% CI", "n", "coverage", "reason"]
    lines = [header]
    for r in rows:
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r.get("ci_low") is not None else "-"
        reason = r.get("reason") or ""
        lines.append([r["family_id"], (r.get("label") or "")[:38], r["name"], r["kind"], r["status"],
                      f"{r['weight']:.2f}", _fmt(r.get("auc")), ci, str(r.get("n") or 0),
                      "-" if r.get("coverage") is None else f"{r['coverage']:.0%}",
                      reason if len(reason) <= 90 else reason[:89] + "…"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    out = []
    for row in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(out)


def _run(args: argparse.Namespace) -> int:
    # open_warehouse, not Warehouse: the local stack's sink holds the embedded chdb path (one process
    # per path), so with the stack up this reads through it; list, build and revalidate use only the
    # methods Warehouse and RemoteWarehouse share (query, query_dicts, command, insert, migrate).
    from streams.warehouse_server import open_warehouse

    wh = open_warehouse()
    wh.migrate()
    if args.action == "build":
        _build(wh, args)
    elif args.action == "revalidate":
        _revalidate(wh, args)
    from learner.rewards.registry import RewardRegistry

    rows = RewardRegistry(wh).table(args.family, args.history)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
    elif not rows:
        print("no rewards yet: run `onpolicy rewards build` once traffic and feedback have landed", file=sys.stderr)
    else:
        print(render_table(rows))
    return 0


def _build(wh, args) -> None:
    from learner.environments import EnvironmentSettings
    from learner.environments.embedding import default_encoder
    from learner.rewards.build import RewardSettings, rebuild_from_warehouse
    from learner.rewards.validation import ValidationSettings
    from learner.trajectories import TrajectoryQuery

    result = rebuild_from_warehouse(
        wh, TrajectoryQuery(tenant=args.tenant),
        EnvironmentSettings(seed=args.seed, heldout_fraction=args.heldout_fraction),
        RewardSettings(validation=ValidationSettings(bar=args.bar)), default_encoder(args.encoder))
    if args.export:
        from pathlib import Path

        from learner.environments.store import export_environment

        for env in result.environments.environments.values():
            export_environment(env, Path(args.export))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"built {len(result.environments.environments)} environments from {len(result.trajectories.trajectories)} "
          f"trajectories ({stages})", file=sys.stderr)


def _revalidate(wh, args) -> None:
    """Fresh = trajectories newer than the newest data the last build saw (``--since`` overrides).
    Families are re-discovered with the same rules: their ids are stable, so fresh traffic lands in
    the family whose rewards it checks."""
    import datetime as dt

    import orjson

    from learner.environments.embedding import default_encoder
    from learner.environments.families import discover_families
    from learner.rewards.registry import RewardRegistry
    from learner.rewards.validation import ValidationSettings
    from learner.trajectories import TrajectoryQuery, load_trajectories

    manifests = [orjson.loads(m) for (m,) in wh.query("SELECT manifest FROM {db}.environments FINAL")]
    if not manifests:
        print("nothing to re-validate: no environments built yet (run `onpolicy rewards build`)", file=sys.stderr)
        return
    since = dt.datetime.fromisoformat(args.since) if getattr(args, "since", None) else \
        max(dt.datetime.fromisoformat(m["data_window"][1]) for m in manifests)
    everything = load_trajectories(wh, TrajectoryQuery(tenant=args.tenant)).trajectories
    assignment = discover_families(everything, default_encoder(args.encoder))
    by_family: dict[str, list] = {}
    for t in everything:
        if t.ts > since:
            by_family.setdefault(assignment.family_of[t.interaction_id], []).append(t)
    reg = RewardRegistry(wh)
    for fid, trajs in sorted(by_family.items()):
        if args.family and fid != args.family:
            continue
        for rep in reg.revalidate(fid, trajs, ValidationSettings(bar=args.bar)):
            print(f"{fid} {rep.reward}: {rep.reason}", file=sys.stderr)
