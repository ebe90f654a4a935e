"""``onpolicy demo`` (the stack + the learner + simulated users) and ``onpolicy eval``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from deploy.simulated_users import DEFAULT_TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="bring up the whole stack and drive it with simulated users; watch the model learn")
    p.add_argument("--task", action="append", default=None,
                   help=f"task family package.module:Class (repeatable; default: {', '.join(DEFAULT_TASKS)})")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument("--rate", type=float, default=2.0, help="simulated requests per second")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model to serve (default: the tiny demo model)")
    p.add_argument("--base-url", default=None,
                   help="drive an already running proxy (…/v1) instead of starting the stack")
    p.add_argument("--api-key", default=None, help="feedback API key (default: the local stack's demo key)")
    p.add_argument("--min-new-feedback", type=int, default=300, help="judged interactions that start a learning round")
    p.set_defaults(func=run_demo)

    p = sub.add_parser("eval", help="true success rate of what the proxy serves for a model, on held-out prompts")
    p.add_argument("--task", required=True, help="package.module:Class")
    p.add_argument("--model", required=True, help="public model name")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from deploy.simulated_users import evaluate, load_task

    task = load_task(args.task)
    mean, low, high, failed = evaluate(task, args.base_url, args.model, args.n, api_key=args.api_key)
    print(f"{task.name} on {args.model}: true success {mean:.3f} (95% CI {low:.3f}-{high:.3f}), n={args.n}, "
          f"failed requests {failed}")
    return 0 if failed == 0 else 1


def run_demo(args) -> int:
    from deploy.simulated_users import SimulatedUsers, load_task

    tasks = [load_task(spec) for spec in (args.task or DEFAULT_TASKS)]
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

            stack = Stack(min_new_feedback=args.min_new_feedback)
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
        users = SimulatedUsers(tasks, base_url, model, api_key=api_key, rate=args.rate, concurrency=args.concurrency,
                               seed=args.seed, truth_log=str(default_home() / "demo" / "truth.jsonl"))
        users.stop = stop
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
            if stack is not None and stack.watch():
                print(f"onpolicy: {stack.watch()} exited unexpectedly; see {stack.home / 'logs'}", file=sys.stderr)
                return 1
        stop.set()
        thread.join(30)
    finally:
        if stack is not None:
            print("stopping...", file=sys.stderr, flush=True)
            stack.down()
    return 0
