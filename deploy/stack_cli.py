"""``onpolicy up``: the whole stack on one machine with embedded defaults."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the local stack (embedded defaults) and wait for traffic; Ctrl-C stops it")
    p.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")
    p.add_argument("--model", default=None, help="model to serve (default: the tiny demo model; or smollm2-135m-instruct)")
    p.add_argument("--no-serve", action="store_true", help="only the data plane: broker, sink, warehouse")
    p.add_argument("--no-learn", action="store_true", help="serve and capture, but do not run the learner")
    p.set_defaults(func=run_up)


def run_up(args) -> int:
    from deploy.local.stack import Stack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(learn=not args.no_learn)
    try:
        where = stack.up(model=args.model, serve=not args.no_serve)
        width = max(len(k) for k in where)
        print("\nonpolicy is up:")
        for k, v in where.items():
            print(f"  {k:<{width}}  {v}")
        print("Ctrl-C stops everything (data is kept; run again to resume).", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.wait(1.0):
            dead = stack.watch()
            if dead:
                print(f"onpolicy: {dead} exited unexpectedly; see {stack.home / 'logs'}", file=sys.stderr)
                return 1
            if deadline and time.monotonic() > deadline:
                break
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stack.down()
    return 0
