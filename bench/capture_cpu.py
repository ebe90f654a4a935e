"""CPU per exchange of the capture worker, stage by stage, before and after, in one run.

One command: ``python bench/capture_cpu.py`` (``--baseline REV``, ``--rounds``, ``--records``).

What it measures, in-process, on realistic frames (the ones ``proxy.capture_worker.pack`` writes):
a ~2.5 KB chat request with a ~540-byte non-streaming response, and the same request with a
64-chunk SSE stream (the bench's upstream stand-in's shapes, vLLM's compact JSON). Per stage, the
median over rounds of the CPU time of the calling thread (``time.thread_time``) per call:

  unpack      ``unpack(meta, request, response)``: the frame back into an Exchange
  sse         ``assemble``: the stream into the response the client would have got (streams only)
  redact      ``Capture.build`` with the default regex redactor minus ``build`` with none: the
              redaction as the build runs it (the detectors over the joined strings, the precise
              patterns where they fire)
  build       ``Capture.build`` minus sse and redact: the event's fields, checks/validation
  serialize   ``build(ex).to_json()`` minus ``build(ex)``: the event's JSON bytes
  emit        ``EventProducer.emit_many`` over batches of ``BATCH`` records, as the worker hands
              over what one read of its pipe brought (``emit`` per event on code without it): the
              spool append, on the caller's thread
  sender      the producer's threads (spool reader, the Kafka client's sender, fsync) per record:
              process CPU minus the caller's over N records emitted and flushed to a real broker
              (tansu, embedded, in memory), emitted back to back as a busy worker does
  worker      measured whole: the worker's loop per frame (unpack + ``Capture.record_many`` in
              batches, or ``Capture.record``, to a null producer) + emit + sender; should be close
              to the sum of the stages

Baseline, same run: the code at ``--baseline`` (default: the commit before the optimization) is
exported with ``git archive`` (read-only, the working tree is not touched) and measured by the
same script in a child process with that export first on ``sys.path``; the current tree in another
child. Children alternate (baseline, current, baseline, current, ...), medians across them. The
sender is also measured for the producer's compression settings (lz4, none) on the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "5323bb2"  # main before the capture-CPU work (2026-11-26)
BATCH = 64  # frames per pipe read in the worker at ~10k requests/s (it reads every 5 ms)
STAGES = ("unpack", "sse", "redact", "build", "serialize", "emit", "sender", "worker")
KINDS = ("json", "sse")

SYSTEM = ("You are the support assistant of an online bookshop. Answer in two or three sentences, be polite, "
          "never invent order details, and ask for the order number when it is missing. ") * 7
TURNS = [
    ("user", "Hi! I ordered three books last week (order 58213) and only two arrived. The parcel was open. "
             "What can I do? I paid 42.50 EUR in total and would like the missing one sent again."),
    ("assistant", "I am sorry to hear that one book is missing from order 58213. I have opened a claim with the "
                  "carrier; a replacement will ship within two working days, at no cost to you."),
    ("user", "Thanks. Can you also tell me when the new edition of the atlas will be in stock? The listing says "
             "'coming soon' since October and I would like to pre-order it if that is possible at all."),
    ("assistant", "The new atlas edition is expected at the end of next month. Pre-orders open two weeks before "
                  "release; I can notify you by e-mail as soon as they do."),
    ("user", "Yes please, notify me. And one more thing: does the replacement ship to the same address as the "
             "original order, or do I have to confirm it somewhere in my account first? I moved recently."),
]


def make_request(stream: bool) -> dict:
    return {"model": "shop-assistant", "messages": [{"role": "system", "content": SYSTEM}]
            + [{"role": r, "content": c} for r, c in TURNS],
            "max_tokens": 256, "temperature": 0.7, "top_p": 0.95, "stream": stream, "user": "customer-7731"}


def make_frames() -> dict[str, bytes]:
    """One packed frame per kind, as the relay hands it over."""
    sys.path.append(str(REPO / "bench"))  # after the code under test: bench/proxy.py must not shadow proxy/
    import orjson
    from standin_upstream import _chat_body, _sse_events

    from proxy.capture import Exchange
    from proxy.capture_worker import pack

    frames = {}
    for kind in KINDS:
        stream = kind == "sse"
        req = make_request(stream)
        body = orjson.dumps(req)
        now = time.perf_counter()
        ex = Exchange(endpoint="/chat/completions", interaction_id="chatcmpl-op1.0a1b2c3d4e5f.9f8e7d6c",
                      public_model="shop-assistant",
                      request=req, t0=now - 0.2, upstream="http://127.0.0.1:8000/v1", upstream_model="shop-assistant-v0007",
                      adapter_version="shop-assistant-v0007", stream=stream, status=200, t_first=now - 0.15, t_end=now,
                      handed_at=time.time(), request_body=body, episode_id="ep-42", user_id="customer-7731")
        if stream:
            raw = b"".join(_sse_events(b"shop-assistant-v0007", 64))
            ex.chunks = [raw[i:i + 180] for i in range(0, len(raw), 180)]  # as relayed: upstream's read sizes
        else:
            ex.body = _chat_body(b"shop-assistant-v0007")
        frames[kind] = pack(ex, body)
    return frames


# -- the child: measures one code tree ----------------------------------------------------------
def child(root: str, bootstrap: str, rounds: int, n: int, records: int, variants: bool) -> dict:
    sys.path.insert(0, root)

    import proxy.capture as capture_mod
    from proxy.capture import Capture
    from proxy.capture_worker import FRAME, unpack
    from proxy.redaction import NoRedaction, RegexRedactor
    from proxy.sse import assemble
    from streams.producer import EventProducer
    from streams.settings import KafkaSettings, ProducerSettings

    assert capture_mod.__file__.startswith(root), (capture_mod.__file__, root)
    frames = make_frames()
    out: dict = {"root": root, "stages": {}, "sizes": {}}

    class Null:
        def emit(self, event):
            return True

        def emit_many(self, records):
            return len(records)

    def split(frame: bytes) -> tuple[bytes, bytes, bytes]:
        m, r, s = FRAME.unpack_from(frame, 0)
        a = FRAME.size
        return frame[a:a + m], frame[a + m:a + m + r], frame[a + m + r:]

    def per_call_us(fn, calls: int) -> float:
        t = time.thread_time_ns()
        for _ in range(calls):
            fn()
        return (time.thread_time_ns() - t) / calls / 1000

    cap = Capture(Null(), RegexRedactor())
    bare = Capture(Null(), NoRedaction())
    parts = {k: split(f) for k, f in frames.items()}
    exs = {k: unpack(*parts[k]) for k in KINDS}
    for k in KINDS:
        out["sizes"][k] = {"frame": len(frames[k]), "request": len(parts[k][1]), "response": len(parts[k][2]),
                           "event": len(cap.build(exs[k]).to_json())}
    samples: dict[str, dict[str, list[float]]] = {k: {s: [] for s in ("unpack", "sse", "redact", "build_raw", "build_json")}
                                                  for k in KINDS}
    for _ in range(rounds):
        for k in KINDS:
            ex, p = exs[k], parts[k]
            s = samples[k]
            s["unpack"].append(per_call_us(lambda: unpack(*p), n))
            s["sse"].append(per_call_us(lambda: assemble(ex.endpoint, ex.chunks[0]), n) if ex.chunks else 0.0)
            s["redact"].append(per_call_us(lambda: cap.build(ex), n) - per_call_us(lambda: bare.build(ex), n))
            s["build_raw"].append(per_call_us(lambda: cap.build(ex), n))
            s["build_json"].append(per_call_us(lambda: cap.build(ex).to_json(), n))
    for k in KINDS:
        med = {name: statistics.median(v) for name, v in samples[k].items()}
        out["stages"][k] = {"unpack": med["unpack"], "sse": med["sse"], "redact": med["redact"],
                            "build": med["build_raw"] - med["sse"] - med["redact"],
                            "serialize": med["build_json"] - med["build_raw"]}

    # emit + sender, against the real broker
    def producer_run(kind: str, compression: str, tmp: str) -> tuple[float, float]:
        settings = ProducerSettings(spool_dir=Path(tmp) / f"spool-{kind}-{compression}", compression_type=compression)
        producer = EventProducer(KafkaSettings(bootstrap_servers=bootstrap), settings)
        try:
            producer.emit(cap.build(exs[kind]))
            assert producer.flush(60), "the broker did not acknowledge the warm-up record"
            events = [cap.build(exs[kind]) for _ in range(records)]
            for e in events:  # serialized as Capture.record does before it emits (measured as "serialize")
                e.to_json()
            batched = hasattr(producer, "emit_many")
            if batched:
                from streams.producer import event_key
                from streams.topics import INTERACTIONS

                recs = [(INTERACTIONS.name, event_key(e), e.to_json()) for e in events]
            p0, m0 = time.process_time_ns(), time.thread_time_ns()
            if batched:
                for i in range(0, records, BATCH):
                    producer.emit_many(recs[i:i + BATCH])
            else:
                for e in events:
                    producer.emit(e)
            m1 = time.thread_time_ns()
            assert producer.flush(120), "the broker did not acknowledge every record"
            p1, m2 = time.process_time_ns(), time.thread_time_ns()
            emit_us = (m1 - m0) / records / 1000
            sender_us = ((p1 - p0) - (m2 - m0)) / records / 1000
            return emit_us, sender_us
        finally:
            producer.close(10)

    with tempfile.TemporaryDirectory() as tmp:
        for k in KINDS:
            emits, senders = zip(*(producer_run(k, "lz4", tmp) for _ in range(3)))
            # emit() calls to_json(): a model serializes again (already counted in "serialize"), a
            # CapturedEvent returns its bytes. Count only what emit adds: minus a repeated to_json().
            ev = cap.build(exs[k])
            ev.to_json()
            again = statistics.median(per_call_us(ev.to_json, n) for _ in range(rounds))
            out["stages"][k]["emit"] = statistics.median(emits) - again
            out["stages"][k]["sender"] = statistics.median(senders)
            # the worker's own loop per frame (unpack + record), the producer swapped for a null one
            rec = Capture(Null(), RegexRedactor())
            if hasattr(rec, "record_many"):
                def loop() -> None:
                    rec.record_many([unpack(*parts[k]) for _ in range(BATCH)])

                loop_us = statistics.median(per_call_us(loop, max(1, n // BATCH)) for _ in range(rounds)) / BATCH
            else:
                loop_us = statistics.median(per_call_us(lambda: rec.record(unpack(*parts[k])), n) for _ in range(rounds))
            out["stages"][k]["worker"] = loop_us + statistics.median(emits) + out["stages"][k]["sender"]
        if variants:
            out["sender_by_compression"] = {}
            for comp in ("lz4", "none"):
                out["sender_by_compression"][comp] = {k: statistics.median(producer_run(k, comp, tmp)[1] for _ in range(3))
                                                      for k in KINDS}
    return out


# -- the parent: broker, baseline export, alternating children, the table ------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="git revision measured as 'before' (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per stage in each child (median)")
    ap.add_argument("--calls", type=int, default=200, help="calls per round")
    ap.add_argument("--records", type=int, default=3000, help="records per producer run")
    ap.add_argument("--pairs", type=int, default=2, help="baseline/current child pairs, alternating")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bootstrap, args.rounds, args.calls, args.records, args.variants)))
        return 0

    sys.path.insert(0, str(REPO))
    from streams.embedded import EmbeddedBroker
    from streams.kafka_admin import ensure_topics
    from streams.settings import KafkaSettings

    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", rev, "proxy", "streams"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        broker = EmbeddedBroker(data_dir=Path(tmp) / "broker", durable=False).start()
        try:
            ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap_servers))
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(args.pairs):
                for label, root in (("before", base), ("after", REPO)):
                    cmd = [sys.executable, __file__, "--child", str(root), "--bootstrap", broker.bootstrap_servers,
                           "--rounds", str(args.rounds), "--calls", str(args.calls), "--records", str(args.records)]
                    if label == "after" and i == args.pairs - 1:
                        cmd.append("--variants")
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
                    if res.returncode:
                        print(res.stdout, res.stderr, file=sys.stderr)
                        return 1
                    runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
                    print(f"  [{label} #{i + 1} done]", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    load = os.getloadavg()
    print(f"capture worker CPU per exchange, us (median; before = {rev}, after = working tree); "
          f"{args.pairs} child pairs x {args.rounds} rounds x {args.calls} calls, {args.records} records per producer run; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    sizes = runs["after"][0]["sizes"]
    for kind in KINDS:
        sz = sizes[kind]
        title = "non-streaming" if kind == "json" else "64-chunk stream"
        print(f"\n{title}: request {sz['request']} B, response {sz['response']} B, event {sz['event']} B")
        print(f"  {'stage':<10} {'before':>9} {'after':>9} {'after/before':>13}")
        tot = {"before": 0.0, "after": 0.0}
        for stage in STAGES:
            b = statistics.median(r["stages"][kind][stage] for r in runs["before"])
            a = statistics.median(r["stages"][kind][stage] for r in runs["after"])
            if stage != "worker":
                tot["before"] += b
                tot["after"] += a
            ratio = f"{a / b:.2f}x" if b > 0.05 else "-"
            print(f"  {stage:<10} {b:>9.1f} {a:>9.1f} {ratio:>13}")
        print(f"  {'sum':<10} {tot['before']:>9.1f} {tot['after']:>9.1f} {tot['after'] / tot['before']:>12.2f}x")
    comp = runs["after"][-1].get("sender_by_compression")
    if comp:
        print("\nsender CPU per record by producer compression (after):")
        for c, v in comp.items():
            print(f"  {c:<5} " + "  ".join(f"{k} {v[k]:.1f} us" for k in KINDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
