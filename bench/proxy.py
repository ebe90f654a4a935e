"""Benchmark: the onpolicy proxy against a direct call, the Python relay floor and LiteLLM's proxy.

One command, one run:  ``python bench/proxy.py``  (``--help`` for rounds, duration, concurrency).

Layout (2 cores): the server under test is pinned to core 0; the load generator (wrk, with a Lua
script for the POST body), the upstream stand-in and the Kafka broker share core 1. So req/s means
"what one core of this server does"; the load core's utilisation is measured from /proc/stat during
every run and printed, so a saturated load generator is visible.

Upstream: ``bench/standin_upstream.py``, a STAND-IN for vLLM (raw uvloop protocol, answers at once:
~500-byte JSON, or 64 SSE chunks), so the numbers measure the proxies and nothing else.

Contenders, measured in interleaved rounds (each round runs every contender once per cell), medians:
  direct        wrk -> stand-in
  relay         bench/minimal_relay.py: uvloop + aiohttp server + pooled ClientSession, bytes only
  proxy-off     onpolicy proxy, capture off
  proxy-on      onpolicy proxy, capture on, to a real broker (tansu, embedded, in memory); its capture
                worker process on the same core (core 0: "one core does everything")
  proxy-on-w1   the same, with the capture worker process pinned to core 1 (beside the load)
  litellm       LiteLLM's proxy (``litellm --config``, same upstream, no DB, no callbacks) when its
                venv exists (``--litellm-venv``; litellm[proxy]==1.106.12)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BODY = ('{"model":"standin-model","messages":[{"role":"system","content":"You are terse."},'
        '{"role":"user","content":"Say hello in one short sentence, please."}],"max_tokens":64,"temperature":0%s}')
LITELLM_VENV = Path.home() / ".onpolicy" / "venvs" / "litellm-proxy-1.106.12"
SERVER_CORE, LOAD_CORE = "0", "1"
# LiteLLM's proxy refuses to start without a master key; every target gets the same bearer token.
BENCH_KEY = "sk-bench-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[:3]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s}s")


def cpu_times(core: str) -> tuple[int, int]:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith(f"cpu{core} "):
                vals = [int(v) for v in line.split()[1:]]
                idle = vals[3] + vals[4]
                return sum(vals), idle
    return 0, 0


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants (the capture
    worker counts as the proxy's). Unlike req/s, this hardly moves when other work shares the core."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / _TICK
        todo.extend(children.get(p, ()))
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


@dataclass
class Sample:
    rps: float
    p50: float
    p99: float
    errors: int
    load_core_util: float
    cpu_us: float = float("nan")  # server CPU per request (process tree), microseconds


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)

    def med(self, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples]
        return statistics.median(vals) if vals else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


_CAPTURE_COUNTS = {"handed": "onpolicy_proxy_capture_emitted", "dropped": "onpolicy_proxy_capture_dropped",
                   "failed": "onpolicy_proxy_capture_failed", "accepted": "onpolicy_producer_events_accepted",
                   "sent": "onpolicy_producer_events_sent", "worker_dropped": "onpolicy_producer_events_dropped"}


def capture_counts(base: str) -> dict[str, float]:
    """The proxy's capture counters from its /metrics: exchanges handed to the worker, and what the
    worker's producer accepted (built and spooled) and sent (delivered to the broker)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return {key: samples.get(f"{name}_total", float("nan")) for key, name in _CAPTURE_COUNTS.items()}


def settle_capture(base: str, timeout_s: float = 30.0) -> tuple[dict[str, float], float]:
    """Wait until the capture worker has built and delivered every exchange handed to it, so the CPU
    it spends catching up after a run is counted in that run. Returns the counts and the seconds
    waited (the worker's stats reach /metrics once a second, so ~1 s is the floor)."""
    t0 = time.monotonic()
    while True:
        c = capture_counts(base)
        done = c["accepted"] + c["worker_dropped"] + c["failed"] >= c["handed"] and c["sent"] >= c["accepted"]
        if done or time.monotonic() - t0 > timeout_s:
            return c, time.monotonic() - t0
        time.sleep(0.1)


def run_wrk(url: str, lua: Path, conc: int, duration: float, pid: int | None = None, settle=None) -> Sample:
    cpu0 = tree_cpu_s(pid) if pid else 0.0
    before = cpu_times(LOAD_CORE)
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{duration:g}s", "--latency", "-s", str(lua),
                          url], capture_output=True, text=True, timeout=duration + 60).stdout
    after = cpu_times(LOAD_CORE)
    total, idle = after[0] - before[0], after[1] - before[1]
    util = 100.0 * (1 - idle / total) if total else float("nan")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) if "Requests/sec" in out else 0.0
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += int(m.group(1)) + int(m.group(3)) + int(m.group(4))
    if settle is not None:
        settle()  # the capture worker's catch-up belongs to this run's CPU
    cpu_us = float("nan")
    m = re.search(r"(\d+) requests in", out)
    if pid and m and int(m.group(1)):
        cpu_us = (tree_cpu_s(pid) - cpu0) * 1e6 / int(m.group(1))
    return Sample(rps, _ms(lat.get("50", "nan")), _ms(lat.get("99", "nan")), errors, util, cpu_us)


def main() -> int:
    ap = argparse.ArgumentParser(description="onpolicy proxy benchmark (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    ap.add_argument("--conc", default="1,32,128")
    ap.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated contenders to run (default: all)")
    args = ap.parse_args()
    # SIGTERM must run the clean-up below (it stops every process this run started).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    concs = [int(c) for c in args.conc.split(",")]
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="onpolicy-bench-"))
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

        from streams.embedded import EmbeddedBroker
        from streams.kafka_admin import ensure_topics
        from streams.settings import KafkaSettings

        broker = EmbeddedBroker(data_dir=tmp / "broker", durable=False).start()
        tansu = getattr(broker, "_tansu", None)
        if tansu is not None:
            os.sched_setaffinity(tansu.pid, {int(LOAD_CORE)})
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka)

        targets: dict[str, tuple[str, subprocess.Popen | None]] = {"direct": (f"http://127.0.0.1:{up_port}", None)}
        port = free_port()
        p = spawn([py, str(REPO / "bench" / "minimal_relay.py"), "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}"],
                  SERVER_CORE, "relay")
        wait_port(port, 20, p)
        targets["relay"] = (f"http://127.0.0.1:{port}", p)
        for name, capture in (("proxy-off", False), ("proxy-on", True), ("proxy-on-w1", True)):
            port = free_port()
            env = {"ONPOLICY_HOME": str(tmp / name), "ONPOLICY_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                   "ONPOLICY_PROXY_INTERACTION_ID_KEY": "bench-key-0123456789abcdef"}
            if name == "proxy-on-w1":  # the capture worker process moved to the load core
                env["ONPOLICY_PROXY_CAPTURE_WORKER_CPUS"] = LOAD_CORE
            cmd = [py, "-m", "deploy.cli", "--log-level", "WARNING", "proxy", "--port", str(port),
                   "--upstream-url", f"http://127.0.0.1:{up_port}/v1"]
            if not capture:
                cmd += ["--no-capture", "--no-follow-control"]
            p = spawn(cmd, SERVER_CORE, name, env)
            wait_port(port, 30, p)
            targets[name] = (f"http://127.0.0.1:{port}", p)
        litellm_bin = args.litellm_venv / "bin" / "litellm"
        if not args.skip_litellm and litellm_bin.exists():
            port = free_port()
            cfg = tmp / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: standin-model\n    litellm_params:\n      model: openai/standin-model\n"
                f"      api_base: http://127.0.0.1:{up_port}/v1\n      api_key: unused\n"
                "litellm_settings:\n  telemetry: false\n  drop_params: true\n")
            p = spawn([str(litellm_bin), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                      SERVER_CORE, "litellm", {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": BENCH_KEY,
                                               "DISABLE_SCHEMA_UPDATE": "true"})
            try:
                wait_port(port, 240, p)
                targets["litellm"] = (f"http://127.0.0.1:{port}", p)
            except RuntimeError as exc:
                tail = (tmp / "litellm.log").read_text(errors="replace")[-1500:]
                print(f"(LiteLLM's proxy did not start: {exc}; its log ends:\n{tail})")
        elif not args.skip_litellm:
            print(f"(LiteLLM's proxy skipped: no {litellm_bin}; python3.11 -m venv {args.litellm_venv} && "
                  f"{args.litellm_venv}/bin/pip install 'litellm[proxy]==1.106.12')")
        if args.only:
            keep = set(args.only.split(",")) | {"direct"}
            targets = {k: v for k, v in targets.items() if k in keep}

        luas = {}
        for mode, extra in (("json", ""), ("stream", ',"stream":true')):
            lua = tmp / f"{mode}.lua"
            body = BODY % extra
            lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                           f'wrk.headers["Authorization"] = "Bearer {BENCH_KEY}"\n'
                           f"wrk.body = '{body}'\n")
            luas[mode] = lua
        # warm up every target once (connection pools, first-call imports)
        for name, (base, _) in targets.items():
            for mode in luas:
                run_wrk(base + "/v1/chat/completions", luas[mode], 4, 1)

        capture_targets = [n for n in ("proxy-on", "proxy-on-w1") if n in targets]
        waits: dict[str, list[float]] = {n: [] for n in capture_targets}

        def settler(name: str):
            def settle() -> None:
                waits[name].append(settle_capture(targets[name][0])[1])
            return settle

        for name in capture_targets:  # the warm-up's events built before the first measured run
            settle_capture(targets[name][0])
        cells: dict[tuple[str, str, int], Cell] = {}
        total_runs = args.rounds * len(luas) * len(concs) * len(targets)
        done = 0
        for rnd in range(args.rounds):
            for mode, lua in luas.items():
                for conc in concs:
                    for name, (base, proc) in targets.items():
                        s = run_wrk(base + "/v1/chat/completions", lua, conc, args.duration, proc.pid if proc else None,
                                    settler(name) if name in waits else None)
                        cells.setdefault((name, mode, conc), Cell()).samples.append(s)
                        done += 1
                        print(f"\r[{done}/{total_runs}] round {rnd + 1} {mode:6} c={conc:<3} {name:9} {s.rps:9.0f} req/s "
                              f"p50 {s.p50:7.3f} ms", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

        print(f"\nonpolicy proxy benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.rounds} interleaved "
              f"rounds x {args.duration:g}s per cell, medians; server on core {SERVER_CORE}, wrk + stand-in upstream + broker "
              f"on core {LOAD_CORE}. Shared machine: expect noise, compare ratios within this run.\n")
        hdr = f"{'mode':6} {'c':>4} {'target':11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} " \
              f"{'x relay':>8} {'x litellm':>9} {'cpu us/req':>10} {'errors':>6} {'load core':>9}"
        print(hdr)
        print("-" * len(hdr))
        for mode in luas:
            for conc in concs:
                d = cells.get(("direct", mode, conc))
                relay = cells.get(("relay", mode, conc))
                lite = cells.get(("litellm", mode, conc))
                for name in targets:
                    c = cells[(name, mode, conc)]
                    add50 = c.med("p50") - d.med("p50") if d else float("nan")
                    add99 = c.med("p99") - d.med("p99") if d else float("nan")
                    xr = _ratio(c.med("rps"), relay.med("rps")) if relay and name != "direct" else float("nan")
                    xl = _ratio(c.med("rps"), lite.med("rps")) if lite and name != "direct" else float("nan")
                    errs = sum(s.errors for s in c.samples)
                    util = max(s.load_core_util for s in c.samples)
                    print(f"{mode:6} {conc:>4} {name:11} {c.med('rps'):9.0f} {c.med('p50'):8.3f} {c.med('p99'):8.3f} "
                          f"{add50:8.3f} {add99:8.3f} {xr:8.2f} {xl:9.1f} {c.med('cpu_us'):10.0f} {errs:6d} {util:8.0f}%")
                print()
        print("Targets (capture on):")
        for on_name in ("proxy-on", "proxy-on-w1"):
            for mode in luas:
                on, off, relay = (cells.get((n, mode, 32)) for n in (on_name, "proxy-off", "relay"))
                d1, on1 = cells.get(("direct", mode, 1)), cells.get((on_name, mode, 1))
                tag = f"{on_name:11} {mode:6}"
                if on1 and d1:
                    print(f"  {tag} c=1 p50 added over direct: {on1.med('p50') - d1.med('p50'):.3f} ms (target <= 0.5)")
                if on and relay:
                    print(f"  {tag} c=32 throughput vs relay: {_ratio(on.med('rps'), relay.med('rps')):.2f}x (target >= 0.95)")
                if on and off:
                    print(f"  {tag} c=32 capture on vs off: {_ratio(on.med('rps'), off.med('rps')):.2f}x (target >= 0.90); "
                          f"CPU per request {on.med('cpu_us'):.0f} vs {off.med('cpu_us'):.0f} us "
                          f"({_ratio(off.med('cpu_us'), on.med('cpu_us')):.2f}x, the noise-resistant view)")
                if on and relay:
                    print(f"  {tag} c=32 CPU per request vs relay: {on.med('cpu_us'):.0f} vs {relay.med('cpu_us'):.0f} us "
                          f"(throughput per core {_ratio(relay.med('cpu_us'), on.med('cpu_us')):.2f}x the relay's)")
                lite = cells.get(("litellm", mode, 32))
                if on and lite:
                    print(f"  {tag} c=32 vs LiteLLM's proxy: {_ratio(on.med('rps'), lite.med('rps')):.1f}x (target >= 50)")
        served = sum(s.rps * args.duration for (n, _, _), c in cells.items() if n == "proxy-on" for s in c.samples)
        on_proc = targets.get("proxy-on", (None, None))[1]
        if on_proc is not None:
            print(f"  proxy-on RSS after ~{served / 1000:.0f}k requests (c up to {max(concs)}): {rss_mb(on_proc.pid):.0f} MB "
                  "(target <= 150 MB after 100k at c=128)")
        for name in capture_targets:  # capture on is only worth its req/s if every exchange became an event
            c, _ = settle_capture(targets[name][0])
            w = waits[name]
            complete = c["accepted"] == c["handed"] and c["sent"] >= c["accepted"] and not (c["dropped"] or c["failed"] or c["worker_dropped"])
            print(f"  {name} capture: {c['handed']:.0f} exchanges handed to the worker, {c['accepted']:.0f} built and spooled, "
                  f"{c['sent']:.0f} delivered to the broker; dropped {c['dropped'] + c['worker_dropped']:.0f}, failed {c['failed']:.0f} "
                  f"({'complete' if complete else 'INCOMPLETE'}); after each run the worker caught up within "
                  f"{max(w, default=float('nan')):.1f} s (median {statistics.median(w) if w else float('nan'):.1f} s), "
                  "its CPU meanwhile counted in that run")
        # "direct" always saturates the load core (wrk against an instant upstream): that is its job.
        maxutil = max((s.load_core_util for (n, _, _), c in cells.items() if n != "direct" for s in c.samples),
                      default=float("nan"))
        print(f"  load-generator core peak utilisation, the direct runs aside: {maxutil:.0f}% "
              f"({'saturated: req/s of the fastest targets may be capped by the load core' if maxutil > 95 else 'not saturated'})")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
