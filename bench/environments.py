"""Rebuild environments + rewards from 100k interactions and ~20k feedback events; time per stage.

    python bench/environments.py [--interactions 100000] [--feedback-rate 0.21] [--encoder auto]

The simulated users are the test fixture families (capitals / JSON person / arithmetic, with a
hidden truth) plus the demo families of ``learner/demo_tasks.py`` when that module is present.
Events are inserted into a fresh embedded warehouse in a temporary directory (setup, timed
separately), then the learner's rebuild runs exactly as ``onpolicy rewards build`` does. Target:
the rebuild (everything after the insert) in <= 60 s on 2 CPU cores. The baseline printed beside it
is a plain read of the same rows in the same process, so the ratio says what the learner adds over
just scanning the data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=100_000)
    ap.add_argument("--feedback-rate", type=float, default=0.21,
                    help="chance an interaction gets any feedback (0.21 gives ~20k events per 100k)")
    ap.add_argument("--encoder", default="auto", choices=("auto", "minilm", "hashing"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=60.0)
    args = ap.parse_args(argv)

    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse
    from tests.unit.learner_fixtures import TASKS, simulate

    tasks = [t() for t in TASKS]
    try:
        from learner import demo_tasks

        tasks += [t() for t in demo_tasks.DEMO_FAMILIES]
    except ImportError:
        pass

    t0 = time.perf_counter()
    events, _ = simulate(args.interactions, seed=args.seed, tasks=tasks, tenants=("acme", "globex"),
                         opt_out_rate=0.02, feedback_rate=args.feedback_rate, multi_turn_rate=0.05, late_rate=0.01,
                         step_s=3.0)
    n_fb = sum(1 for e, _ in events if e.event_type == "feedback")
    n_int = len(events) - n_fb
    gen_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(WarehouseSettings(url=f"chdb://{tmp}", database="bench"))
        wh.migrate()
        t0 = time.perf_counter()
        for i in range(0, len(events), 20000):
            wh.insert_events(events[i:i + 20000])
        insert_s = time.perf_counter() - t0
        del events

        # baseline: scan the same rows, no join, no parsing
        t0 = time.perf_counter()
        wh.query("SELECT event_id, ts, request, response, tenant FROM {db}.interactions FINAL")
        wh.query("SELECT event_id, ts, interaction_id, kind, value FROM {db}.feedback FINAL")
        scan_s = time.perf_counter() - t0

        from learner.environments.embedding import default_encoder
        from learner.rewards.build import rebuild_from_warehouse

        t0 = time.perf_counter()
        encoder = default_encoder(args.encoder)
        result = rebuild_from_warehouse(wh, encoder=encoder)
        total = time.perf_counter() - t0
        timings = dict(result.timings)
        timings["imports+model load (rest)"] = total - sum(timings.values())

        print(f"simulated {n_int} interactions + {n_fb} feedback events in {gen_s:.1f}s (setup); "
              f"inserted in {insert_s:.1f}s (setup)")
        print(f"encoder: {encoder.name}; families: {len(result.environments.environments)}; "
              f"trajectories: {len(result.trajectories.trajectories)}; stats: {result.trajectories.stats.as_dict()}")
        print(f"{'stage':32s} {'seconds':>8s} {'share':>6s}")
        for k, v in timings.items():
            print(f"{k:32s} {v:8.2f} {v / total:6.0%}")
        print(f"{'rebuild total':32s} {total:8.2f}   (budget {args.budget_s:.0f}s: {'OK' if total <= args.budget_s else 'OVER'})")
        print(f"baseline: plain scan of the same rows {scan_s:.2f}s; rebuild / scan = {total / scan_s:.1f}x")
        print()
        from learner.rewards.registry import RewardRegistry
        from learner.rewards_cli import render_table

        print(render_table(RewardRegistry(wh).table()))
        return 0 if total <= args.budget_s else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
