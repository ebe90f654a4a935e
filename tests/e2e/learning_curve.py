"""The learning curve of a demo run, as markdown tables (used for docs/learning-curve.md).

    python tests/e2e/learning_curve.py $ONPOLICY_HOME [--bucket 120]

Reads what the run left under ``$ONPOLICY_HOME``: ``demo/truth.jsonl`` (the simulated users' hidden
truth of every answer, with the adapter version that served it) and, if the stack is still up,
the registry and control events through the status page's ``/status.json`` (port from
``stack.json``); otherwise pass ``--status-json FILE`` saved while it ran.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import urllib.request
from collections import defaultdict
from pathlib import Path


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def truth_rows(home: Path) -> list[dict]:
    rows = []
    for line in (home / "demo" / "truth.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def over_time(rows: list[dict], bucket_s: int) -> str:
    """True success per time bucket: overall, per task, and which versions served it."""
    t0 = min(r["ts"] for r in rows)
    buckets: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        buckets[int((r["ts"] - t0) // bucket_s)].append(r)
    tasks = sorted({r["task"] for r in rows})
    out = [f"| minutes | n | true success | {' | '.join(tasks)} | served by (share) |",
           "|---|---|---|" + "---|" * len(tasks) + "---|"]
    for b in sorted(buckets):
        rs = buckets[b]
        per_task = [_mean([r["truth"] for r in rs if r["task"] == t]) for t in tasks]
        served: dict[str, int] = defaultdict(int)
        for r in rs:
            served[r.get("adapter_version") or "base"] += 1
        share = ", ".join(f"{v} {n / len(rs):.0%}" for v, n in sorted(served.items(), key=lambda kv: -kv[1]))
        out.append(f"| {b * bucket_s / 60:.0f}-{(b + 1) * bucket_s / 60:.0f} | {len(rs)} | "
                   f"{_mean([r['truth'] for r in rs]):.2f} | " + " | ".join(f"{x:.2f}" for x in per_task)
                   + f" | {share} |")
    return "\n".join(out)


def per_version(rows: list[dict]) -> str:
    """True success of everything each version served, in the order versions first served."""
    t0 = min(r["ts"] for r in rows)
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r.get("adapter_version") or "base"].append(r)
    tasks = sorted({r["task"] for r in rows})
    out = [f"| version | first served (min) | n | true success | {' | '.join(tasks)} |",
           "|---|---|---|---|" + "---|" * len(tasks)]
    for v, rs in sorted(by.items(), key=lambda kv: min(r["ts"] for r in kv[1])):
        per_task = [_mean([r["truth"] for r in rs if r["task"] == t]) for t in tasks]
        out.append(f"| {v} | {(min(r['ts'] for r in rs) - t0) / 60:.1f} | {len(rs)} | "
                   f"{_mean([r['truth'] for r in rs]):.2f} | " + " | ".join(f"{x:.2f}" for x in per_task) + " |")
    return "\n".join(out)


def decisions(status: dict, t0: float) -> str:
    """The registry (every version, its status and reason) and the routing decisions, timed from t0."""
    def minutes(ts: str) -> str:
        t = dt.datetime.fromisoformat(ts)
        return f"{((t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp() - t0) / 60:.1f}"

    out = ["| version | status | since (min) | reason |", "|---|---|---|---|"]
    for v in status.get("versions", []):
        out.append(f"| {v['name']} | {v['status']} | {minutes(v['updated_at'])} | "
                   f"{(v['reason'] or '').replace('|', '/')[:140]} |")
    out += ["", "| minutes | decision | version | actor |", "|---|---|---|---|"]
    for c in sorted(status.get("control", []), key=lambda c: c["ts"]):
        out.append(f"| {minutes(c['ts'])} | {c['action']} | {c['adapter_version'] or ''} | {c['actor']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home", type=Path)
    ap.add_argument("--bucket", type=int, default=120, help="seconds per row of the over-time table")
    ap.add_argument("--status-json", type=Path, default=None)
    args = ap.parse_args()
    rows = truth_rows(args.home)
    if args.status_json:
        status = json.loads(args.status_json.read_text())
    else:
        port = json.loads((args.home / "stack.json").read_text())["ports"]["status"]
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=60).read())
    t0 = min(r["ts"] for r in rows)
    print("## True success over time\n\n" + over_time(rows, args.bucket))
    print("\n## True success per adapter version\n\n" + per_version(rows))
    print("\n## What the learner decided\n\n" + decisions(status, t0))


if __name__ == "__main__":
    main()
