"""CPU per request of each process in the chaos stack (tests/chaos/stack.py) under steady SDK load.

    python bench/stack_cpu.py --rate 100 --duration 30
    ONPOLICY_PRODUCER_LINGER_MS=20 python bench/stack_cpu.py --rate 100   # another producer setting

Starts the chaos suite's stack (durable broker on s3rver, sink + chdb, proxy with its capture worker,
``bench/standin_upstream.py`` -- a STAND-IN for vLLM that answers at once), runs ``tests.chaos.load``
(the unmodified OpenAI SDK) at ``--rate`` for ``--duration`` seconds, and prints each process's share
of a core and CPU microseconds per answered request, from /proc/<pid>/stat before and after. Settings
from the environment (``ONPOLICY_*``) reach every process of the stack.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--duration", type=float, default=30)
    args = ap.parse_args()
    from tests.chaos.stack import ChaosStack

    home = Path(tempfile.mkdtemp(prefix="onpolicy-stack-cpu-"))
    stack = ChaosStack(home)
    stack.up()
    try:
        pids = {"proxy": stack.proxy.proc.pid, "capture worker": stack.capture_worker_pid(),
                "sink": stack.sink.proc.pid, "broker": stack.broker._tansu.pid, "stand-in": stack.standin.pid}
        store = subprocess.run(["pgrep", "-f", str(home) + ".*s3rver|s3rver.*" + str(home)], capture_output=True,
                               text=True).stdout.split()
        if store:
            pids["store (s3rver)"] = int(store[0])
        out = home / "load.jsonl"
        before = {k: cpu_s(p) for k, p in pids.items()}
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "tests.chaos.load", "--base-url", stack.base_url, "--rate",
                        str(args.rate), "--duration", str(args.duration), "--api-key", stack.api_key, "--out", str(out),
                        "--model", "standin-model"], cwd=REPO, check=True)
        wall = time.time() - t0
        after = {k: cpu_s(p) for k, p in pids.items()}
        load = resource.getrusage(resource.RUSAGE_CHILDREN)
        chats = [r for r in map(json.loads, out.read_text().splitlines()) if r["kind"] == "chat"]
        ok = sum(r["ok"] for r in chats)
        lat = sorted(r["lat"] for r in chats)
        print(f"{len(chats)} chat requests in {wall:.1f} s, {ok} ok ({ok / args.duration:.0f} req/s); "
              f"latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")
        used = {k: after[k] - before[k] for k in pids}
        used["load generator (SDK)"] = load.ru_utime + load.ru_stime
        for k, s in used.items():
            print(f"  {k:22s} {100 * s / wall:5.1f}% of a core, {1e6 * s / max(ok, 1):6.0f} us per request")
    finally:
        stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
