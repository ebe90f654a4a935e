"""Benchmark: POST /v1/feedback against the same proxy's chat pass-through, in one run.

One command:  ``python bench/feedback.py``  (``--rounds``, ``--duration``, ``--conc``; default c=32).

Load from ``wrk`` (Debian; one thread, keep-alive connections) with Lua scripts: the feedback script
cycles through 1,000 bodies, each with a real signed interaction id (issued with the proxy's key) and
a thumbs value, authenticated with a real API key -- so every request is validated, signature-checked,
hashed-key-looked-up and emitted as a FeedbackEvent (no idempotency key: each is a new event, the
costly path). The baseline is a non-streaming chat completion through the SAME proxy process to the
upstream stand-in (``bench/standin_upstream.py``, answers at once), capture on.

Layout, as bench/proxy.py: the proxy (capture worker included) pinned to core 0; wrk, the stand-in
and the embedded Kafka broker (tansu, in memory) on core 1. Rounds interleave the two targets; the
table shows medians, and the load core's utilisation so a saturated load generator is visible.
Target (issue 4): feedback at least as fast as a pass-through request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.proxy import BODY, LOAD_CORE, SERVER_CORE, Cell, free_port, run_wrk, wait_port  # noqa: E402

SIGNING = "bench-feedback-signing-key-0123456789"
API_KEY = "op-bench-feedback-key-0000000000000000"


def main() -> int:
    ap = argparse.ArgumentParser(description="feedback API vs chat pass-through (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    ap.add_argument("--conc", default="32")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from proxy.api_keys import hash_key
    from proxy.interaction_ids import InteractionIds
    from streams.embedded import EmbeddedBroker
    from streams.kafka_admin import ensure_topics
    from streams.settings import KafkaSettings

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="onpolicy-bench-feedback-"))
    procs: list[subprocess.Popen] = []
    broker = None

    def spawn(cmd: list[str], core: str, name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "wb")
        p = subprocess.Popen(["taskset", "-c", core, *cmd], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, cwd=REPO, start_new_session=True)
        procs.append(p)
        return p

    try:
        up_port = free_port()
        spawn([py, str(REPO / "bench" / "standin_upstream.py"), "--port", str(up_port)], LOAD_CORE, "standin")
        wait_port(up_port, 10)
        broker = EmbeddedBroker(data_dir=tmp / "broker", durable=False).start()
        tansu = getattr(broker, "_tansu", None)
        if tansu is not None:
            os.sched_setaffinity(tansu.pid, {int(LOAD_CORE)})
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka)

        port = free_port()
        env = {"ONPOLICY_HOME": str(tmp / "home"), "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               "ONPOLICY_PROXY_INTERACTION_ID_KEY": SIGNING,
               "ONPOLICY_PROXY_API_KEYS": json.dumps([{"name": "bench", "tenant": "", "sha256": hash_key(API_KEY, None)}])}
        proxy = spawn([py, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port", str(port),
                       "--upstream-url", f"http://127.0.0.1:{up_port}/v1", "--no-follow-control"], SERVER_CORE, "proxy", env)
        wait_port(port, 30, proxy)
        base = f"http://127.0.0.1:{port}"

        ids = InteractionIds(SIGNING.encode())
        bodies = [json.dumps({"interaction_id": ids.issue("chatcmpl-"), "kind": "thumbs", "value": 1 if i % 3 else -1,
                              "user": f"u{i % 50}"}) for i in range(1000)]
        feedback_lua = tmp / "feedback.lua"
        feedback_lua.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n'
            "local bodies = {\n" + ",\n".join(f"  [[{b}]]" for b in bodies) + "\n}\n"
            "local i = 0\nrequest = function()\n  i = i % #bodies + 1\n"
            "  return wrk.format(nil, nil, nil, bodies[i])\nend\n")
        chat_lua = tmp / "chat.lua"
        chat_lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                            f"wrk.body = '{BODY % ''}'\n")
        targets = {"chat pass-through": (base + "/v1/chat/completions", chat_lua),
                   "feedback": (base + "/v1/feedback", feedback_lua)}
        for url, lua in targets.values():  # warm-up: pools, first-call imports, the API producer's spool
            run_wrk(url, lua, 4, 1)
        concs = [int(c) for c in args.conc.split(",")]
        cells: dict[tuple[str, int], Cell] = {}
        for rnd in range(args.rounds):
            for conc in concs:
                for name, (url, lua) in targets.items():
                    s = run_wrk(url, lua, conc, args.duration, proxy.pid)
                    cells.setdefault((name, conc), Cell()).samples.append(s)
                    print(f"\rround {rnd + 1}/{args.rounds} c={conc} {name:18} {s.rps:8.0f} req/s", end="", file=sys.stderr,
                          flush=True)
        print(file=sys.stderr)
        landed = _count_feedback(kafka)
        print(f"\nonpolicy feedback benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, wrk (1 thread), "
              f"{args.rounds} interleaved rounds x {args.duration:g}s, medians; proxy on core {SERVER_CORE}, wrk + stand-in "
              f"upstream + broker on core {LOAD_CORE}.\n")
        hdr = f"{'c':>4} {'target':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x chat':>7} {'cpu us/req':>10} {'errors':>6} {'load core':>9}"
        print(hdr)
        print("-" * len(hdr))
        for conc in concs:
            chat = cells[("chat pass-through", conc)]
            for name in targets:
                c = cells[(name, conc)]
                print(f"{conc:>4} {name:18} {c.med('rps'):9.0f} {c.med('p50'):8.3f} {c.med('p99'):8.3f} "
                      f"{c.med('rps') / chat.med('rps'):7.2f} {c.med('cpu_us'):10.0f} "
                      f"{sum(s.errors for s in c.samples):6d} {c.med('load_core_util'):8.0f}%")
        print(f"\nfeedback events on the feedback topic after the run: {landed} (every 202 is an event in the spool; "
              "the broker may still be catching up)")
        return 0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if broker is not None:
            broker.stop()


def _count_feedback(kafka) -> int:
    from kafka import KafkaConsumer, TopicPartition

    from streams.topics import FEEDBACK

    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    tps = [TopicPartition(FEEDBACK.name, p) for p in range(FEEDBACK.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    n, empty = 0, 0
    while empty < 5:
        got = sum(len(v) for v in consumer.poll(timeout_ms=300).values())
        n += got
        empty = 0 if got else empty + 1
    consumer.close()
    return n


if __name__ == "__main__":
    sys.exit(main())
