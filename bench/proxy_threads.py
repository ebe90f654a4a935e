"""Where the proxy's CPU goes under load, thread by thread: the relay's event loop, the capture
worker's main and sender threads, librdkafka's threads.

One command: ``python bench/proxy_threads.py [--stream] [--capture off|same-core|core1] [--seconds S]``

Same layout as ``bench/proxy.py`` (proxy on core 0; wrk, the upstream stand-in and the broker on
core 1; the capture worker on core 0 unless ``--capture core1``). After a 3 s warm-up, wrk runs for
``--seconds`` at ``--conc``; each thread's CPU time (``/proc/<pid>/task/<tid>/stat``, user + system)
over that window is divided by the requests wrk completed. ``bench/proxy.py`` gives the whole
process tree's figure; this one says which thread it is. Expect a few us of noise run to run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: its proxy.py would shadow the proxy package

from bench.proxy import BENCH_KEY, BODY, LOAD_CORE, SERVER_CORE, free_port, wait_port  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[tuple[int, int, str], float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[(pid, int(tid), name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream", action="store_true", help="64-chunk SSE responses instead of ~500-byte JSON")
    ap.add_argument("--capture", choices=("off", "same-core", "core1"), default="same-core")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--conc", type=int, default=32)
    args = ap.parse_args()

    from streams.embedded import EmbeddedBroker
    from streams.kafka_admin import ensure_topics
    from streams.settings import KafkaSettings

    tmp = Path(tempfile.mkdtemp(prefix="onpolicy-threads-"))
    procs: list[subprocess.Popen] = []
    broker = None

    def spawn(cmd: list[str], core: str, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen(["taskset", "-c", core, *cmd], stdout=open(tmp / f"{len(procs)}.log", "wb"),
                             stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO, start_new_session=True)
        procs.append(p)
        return p

    try:
        up = free_port()
        spawn([sys.executable, str(REPO / "bench" / "standin_upstream.py"), "--port", str(up)], LOAD_CORE)
        wait_port(up, 10)
        broker = EmbeddedBroker(data_dir=tmp / "broker", durable=False).start()
        tansu = getattr(broker, "_tansu", None)
        if tansu is not None:
            os.sched_setaffinity(tansu.pid, {int(LOAD_CORE)})
        ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap_servers))
        port = free_port()
        env = {"ONPOLICY_HOME": str(tmp / "proxy"), "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               "ONPOLICY_PROXY_INTERACTION_ID_KEY": "bench-key-0123456789abcdef"}
        cmd = [sys.executable, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port", str(port),
               "--upstream-url", f"http://127.0.0.1:{up}/v1"]
        if args.capture == "off":
            cmd += ["--no-capture", "--no-follow-control"]
        elif args.capture == "core1":
            env["ONPOLICY_PROXY_CAPTURE_WORKER_CPUS"] = LOAD_CORE
        proxy = spawn(cmd, SERVER_CORE, env)
        wait_port(port, 30, proxy)
        lua = tmp / "post.lua"
        body = BODY % (',"stream":true' if args.stream else "")
        lua.write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\nwrk.headers["Content-Type"] = "application/json"\n'
                       f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n')
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def wrk(seconds: float) -> str:
            return subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{args.conc}", f"-d{seconds:g}s", "-s", str(lua),
                                   url], capture_output=True, text=True, timeout=seconds + 60).stdout

        wrk(3)
        time.sleep(1)
        pids = [proxy.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(proxy.pid)], capture_output=True,
                                                               text=True).stdout.split()]
        before = {k: v for pid in pids for k, v in thread_cpu(pid).items()}
        out = wrk(args.seconds)
        after = {k: v for pid in pids for k, v in thread_cpu(pid).items()}
        n = int(re.search(r"(\d+) requests in", out).group(1))
        print(f"{'stream' if args.stream else 'json'}, capture {args.capture}, c={args.conc}: {n / args.seconds:.0f} req/s; "
              f"CPU us per request by thread (pid {proxy.pid} is the proxy, the other its capture worker):")
        total = 0.0
        for key in sorted(after, key=lambda k: before.get(k, 0) - after[k]):
            us = (after[key] - before.get(key, 0)) * 1e6 / n
            total += us
            if us >= 0.05:
                print(f"  pid {key[0]:<7} tid {key[1]:<7} {key[2]:<18} {us:7.1f}")
        print(f"  total {total:.1f}")
        return 0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
                p.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
