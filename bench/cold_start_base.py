"""How bad is the base model where the demo starts? SmolLM2-135M-Instruct's true success on the cold-start
families' held-out prompts, sampled as served and greedy.

    python bench/cold_start_base.py                 # every family in learner/cold_start_tasks.py, n=200 each
    python bench/cold_start_base.py --n 100 --family iso_date --show 5

"As served" is the model card's recommendation, which the SmolLM2 build writes into
generation_config.json for vLLM: temperature 0.2, top_p 0.9 (no top-k, as vLLM). Greedy is what
a temperature-0 client sees. The model is the cached build (``ensure_model``), loaded through the
trainer's ``LoraPolicy`` with a fresh adapter (its B matrices are zero, so it is the base).
Prompts are distinct held-out ones (``heldout``), the ones ``onpolicy eval`` asks; each line
gives the share right with a 95% Wilson interval. ``--show`` prints the commonest wrong answers.
Prefill of ~100-token chat prompts dominates: on two CPU cores shared with other jobs a family
took 10-15 minutes at n=200 (``--n 100 --family ...`` for a quicker look).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERVED_TEMPERATURE = 0.2
SERVED_TOP_P = 0.9


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: sensible at 0 successes, where the normal approximation says 0-0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def heldout_requests(task, n: int, seed: int) -> list[dict]:
    """``n`` distinct held-out prompts of ``task`` (never sent by the simulated users)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(200 * n):
        request = task.requests(rng, 1)[0]
        key = request["messages"][-1]["content"]
        if task.heldout(request) and key not in seen:
            seen.add(key)
            out.append(request)
            if len(out) == n:
                return out
    raise SystemExit(f"{task.name}: only {len(out)} distinct held-out prompts in {200 * n} draws; ask for fewer")


def sampled_texts(policy, requests: list[dict], *, seed: int, batch: int) -> list[str]:
    """One answer per request at the served temperature and nucleus (``LoraPolicy.sample`` samples at
    the trainer's temperature with top_p 1, which is not what users are served)."""
    import torch

    texts: list[str] = []
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        ids, attn = policy.encode_prompts([r["messages"] for r in chunk])
        torch.manual_seed(seed + i)
        with torch.no_grad():
            out = policy.model.generate(
                input_ids=ids, attention_mask=attn, do_sample=True, temperature=SERVED_TEMPERATURE,
                top_p=SERVED_TOP_P, top_k=0, max_new_tokens=max(r["max_tokens"] for r in chunk),
                eos_token_id=policy.eos_id, pad_token_id=policy.pad_id)
        texts += [t.strip() for t in policy.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    return texts


def greedy_texts(policy, requests: list[dict], *, batch: int) -> list[str]:
    texts: list[str] = []
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        texts += policy.sample([r["messages"] for r in chunk], 1, seed=0, greedy=True,
                               max_new_tokens=max(r["max_tokens"] for r in chunk)).texts
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="distinct held-out prompts per family")
    ap.add_argument("--family", action="append", default=None, help="only this family (by name; repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1_000_003, help="prompt draw (the eval's seed by default)")
    ap.add_argument("--show", type=int, default=0, help="print this many of the commonest wrong answers")
    ap.add_argument("--model-path", default=None, help="a built model directory instead of the cached SmolLM2")
    args = ap.parse_args()

    import torch

    from learner.cold_start_tasks import COLD_START_FAMILIES
    from learner.models import SMOLLM2, ensure_model
    from learner.trainer import LoraPolicy, TrainerSettings

    torch.set_num_threads(args.threads)
    families = [cls() for cls in COLD_START_FAMILIES]
    if args.family:
        unknown = set(args.family) - {f.name for f in families}
        if unknown:
            ap.error(f"unknown family {', '.join(sorted(unknown))}; known: {', '.join(f.name for f in families)}")
        families = [f for f in families if f.name in args.family]
    path = args.model_path or ensure_model(SMOLLM2).path
    policy = LoraPolicy(path, TrainerSettings(threads=args.threads))
    print(f"base model {path}; sampled = temperature {SERVED_TEMPERATURE}, top_p {SERVED_TOP_P}; "
          f"{args.n} distinct held-out prompts per family", flush=True)
    worst = 0.0
    for task in families:
        requests = heldout_requests(task, args.n, args.seed)
        t0 = time.perf_counter()
        results = {}
        for mode, texts in (("sampled", sampled_texts(policy, requests, seed=args.seed, batch=args.batch)),
                            ("greedy", greedy_texts(policy, requests, batch=args.batch))):
            scores = [task.score(r, t) for r, t in zip(requests, texts)]
            right = int(sum(scores))
            low, high = wilson(right, len(scores))
            results[mode] = f"{mode} {right / len(scores):6.1%} (95% CI {low:.1%}-{high:.1%})"
            if mode == "sampled":
                worst = max(worst, right / len(scores))
            if args.show:
                wrong = Counter(t for t, s in zip(texts, scores) if s < 1)
                for text, count in wrong.most_common(args.show):
                    print(f"    {task.name} {mode} wrong x{count}: {text!r}")
        print(f"{task.name:<14} n={len(requests)}  {results['sampled']}  {results['greedy']}  "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    print(f"worst family sampled: {worst:.1%} (a cold start wants <= 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
