"""SFT vs SDFT vs SDFT+SFT on the same user corrections: what is learned, what is forgotten, at what cost.

    python bench/distill.py                                   # SmolLM2-135M-Instruct, 40 steps each
    python bench/distill.py --steps 20 --methods sft,sdft+sft --teacher-style turn

Every method starts from the same base (a fresh LoRA: B = 0, so step 0 is the base), the same seed,
the same corrections in the same order (``--batch`` per step), and the student samples of step k use
seed ``1000 + k``. Corrections come from the cold-start families (:mod:`learner.cold_start_tasks`:
app-like short answers SmolLM2 mostly gets wrong), ``--train`` prompts per family that are not held
out, each with its right answer as the demonstration; ``--heldout`` held-out prompts per family
(never trained on) measure what carried over. For the tiny model the corrections are the demo's
sums with a carry instead, and the suite is the demo's.

Columns: held-out true success before -> after (greedy, what a temperature-0 user sees, each
family's own ``max_tokens``); the forgetting suite's points lost (greedy, 24 new tokens as the gate
answers it: :func:`learner.forgetting.smollm2_forgetting_suite`), worst task and mean; the median
step time; the share of degenerate student samples (:func:`learner.trainer.looks_degenerate`) over
the last ten steps, and of degenerate held-out answers after training (for SFT too).

``--rehearsal N`` adds N demonstrations a step of the base's own greedy answers to general
questions (:data:`REHEARSAL_PROMPTS`, none of them a forgetting-suite skill), as the learning loop
rehearses its other families: without it every method forgets most of the suite's capitals and
addition. Measured on 2026-12-07, this machine (2 cores shared with other jobs, 1 thread),
``--steps 20`` (38 min) and ``--steps 20 --rehearsal 8`` (46 min):

    rehearsal  method    ticket_label  extract_json  iso_date  mean   lost worst  lost mean  step s
       -       base           0.0          10.0        25.0    11.7
       -       sft           75.0         100.0        70.0    81.7     82.0       48.0      11.1
       -       sdft          40.0         100.0        60.0    66.7     80.0       49.5      45.7
       -       sdft+sft      65.0         100.0        80.0    81.7     78.0       41.5      37.2
       8       sft           75.0          95.0        65.0    78.3     36.0       17.5      13.7
       8       sdft          40.0         100.0        50.0    63.3      2.0       -1.5      47.2
       8       sdft+sft      55.0         100.0        65.0    73.3     20.0        5.0      60.8

Step seconds there are under load; on a quiet machine a step of 8 corrections took 5.8 s (SFT),
21.5 s (SDFT) and 25 s (SDFT+SFT). Degenerate samples: at most 0.6% over the last ten steps.
The default ``--steps 40`` doubles the training time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class CorrectionFamily:
    """Corrections a user would send for one task: training prompts with their right answers, and
    held-out prompts of the same task scored by the hidden truth."""

    name: str
    train: tuple[dict, ...]
    heldout: tuple[dict, ...]
    answer: Callable[[dict], str]
    score: Callable[[dict, str], float]


def _distinct(task, n: int, want_heldout: bool, seed: int) -> list[dict]:
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(400 * n):
        request = task.requests(rng, 1)[0]
        key = request["messages"][-1]["content"]
        if bool(task.heldout(request)) == want_heldout and key not in seen:
            seen.add(key)
            out.append(request)
            if len(out) == n:
                return out
    raise SystemExit(f"{task.name}: only {len(out)} distinct prompts in {400 * n} draws; ask for fewer")


def cold_start_families(n_train: int, n_heldout: int, seed: int) -> list[CorrectionFamily]:
    from learner.cold_start_tasks import COLD_START_FAMILIES

    out = []
    for cls in COLD_START_FAMILIES:
        task = cls()
        out.append(CorrectionFamily(task.name, tuple(_distinct(task, n_train, False, seed)),
                                    tuple(_distinct(task, n_heldout, True, seed + 1)), task.answer, task.score))
    return out


def carry_families(n_train: int, n_heldout: int, seed: int) -> list[CorrectionFamily]:
    """The tiny model's corrections: sums with a carry (its base forgets the carry)."""
    from learner.demo_tasks import ArithmeticTask

    task = ArithmeticTask()
    carry = [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
              "max_tokens": 8} for a in range(10) for b in range(10) if a + b >= 10]
    random.Random(seed).shuffle(carry)
    return [CorrectionFamily("carry_sums", tuple(carry[:n_train]), tuple(carry[n_train:n_train + n_heldout]),
                             lambda r: str(task.answer(r)), task.score)]


# General questions for rehearsal (``--rehearsal``), answered by the starting weights themselves, as the
# learning loop rehearses other families' prompts. None of them is a forgetting-suite item or skill.
REHEARSAL_PROMPTS = (
    "What is the largest planet in our solar system?", "How many days are in a week?", "What do bees make?",
    "Name a primary color.", "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "What gas do plants absorb from the air?", "How many continents are there?", "What is the freezing point of water?",
    "Name a mammal that lives in the ocean.", "What is the chemical symbol for gold?", "How many hours are in a day?",
    "What language is spoken in Brazil?", "Which animal is known as the king of the jungle?", "What shape has three sides?",
    "What is the tallest animal?", "How many legs does an insect have?", "What do you call a baby cat?",
    "What is H2O?", "Which season comes after winter?", "What instrument has 88 keys?", "What is the sun?",
    "Name a fruit that is yellow.", "What do caterpillars turn into?", "How many minutes are in an hour?",
    "What is the main ingredient in bread?", "Which planet is known as the red planet?", "What do cows drink?",
    "What is the hardest natural substance?", "How many sides does a square have?", "Give me a synonym for happy.",
    "What is a group of wolves called?", "Name a vegetable that is orange.", "What does a thermometer measure?",
    "Which ocean is the largest?", "What do we call frozen water?", "What color are most leaves in summer?",
    "Translate 'hello' into Spanish.", "What is 10 times 10?", "Name a bird that cannot fly.",
)


def rehearsal_demos(policy, max_new_tokens: int = 32) -> list:
    """The starting weights' own greedy answers to :data:`REHEARSAL_PROMPTS`, as demonstrations
    (only answers that ended within ``max_new_tokens``: a cut answer would teach stopping mid-sentence)."""
    from learner.trainer import Demonstration

    msgs = [({"role": "user", "content": q},) for q in REHEARSAL_PROMPTS]
    ro = policy.sample([list(m) for m in msgs], 1, seed=0, greedy=True, max_new_tokens=max_new_tokens)
    finished = (ro.ids[:, ro.prompt_len:] == policy.eos_id).any(dim=1).tolist()
    return [Demonstration(m, t) for m, t, f in zip(msgs, ro.texts, finished) if f and t.strip()]


def answers(policy, requests: list[dict], max_new_tokens: int, batch: int = 64) -> list[tuple[str, bool]]:
    """Greedy answers and whether each ended with an end token within ``max_new_tokens``."""
    out = []
    for i in range(0, len(requests), batch):
        ro = policy.sample([r["messages"] for r in requests[i:i + batch]], 1, seed=0, greedy=True,
                           max_new_tokens=max_new_tokens)
        finished = (ro.ids[:, ro.prompt_len:] == policy.eos_id).any(dim=1).tolist()
        out += list(zip(ro.texts, finished))
    return out


def evaluate(policy, families: list[CorrectionFamily], suite, *, with_forgetting: bool) -> dict[str, Any]:
    from learner.trainer import looks_degenerate

    res: dict[str, Any] = {"heldout": {}, "forgetting": {}, "examples": {}}
    flags = []
    for fam in families:
        got = answers(policy, list(fam.heldout), max(r.get("max_tokens", 16) for r in fam.heldout))
        res["heldout"][fam.name] = 100 * statistics.mean(fam.score(r, t) for r, (t, _) in zip(fam.heldout, got))
        res["examples"][fam.name] = [t for t, _ in got[:3]]
        flags += [looks_degenerate(t, f) for t, f in got]
    res["heldout_mean"] = statistics.mean(res["heldout"].values())
    res["degenerate_answers"] = 100 * statistics.mean(flags)
    if with_forgetting:
        for task in suite:
            got = answers(policy, list(task.requests), 24)
            res["forgetting"][task.name] = 100 * statistics.mean(task.score(r, t) for r, (t, _) in zip(task.requests, got))
            res["examples"][task.name] = [t for t, _ in got[:3]]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", choices=("smollm2-135m-instruct", "onpolicy-tiny"))
    ap.add_argument("--methods", default="sft,sdft,sdft+sft", help="comma-separated DistillMethod values")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="corrections per step")
    ap.add_argument("--samples", type=int, default=2, help="student samples per correction (SDFT)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", type=int, default=16, help="corrected prompts per family")
    ap.add_argument("--heldout", type=int, default=20, help="held-out prompts per family")
    ap.add_argument("--forgetting-n", type=int, default=50, help="requests per forgetting task (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 was 9x slower on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="student sampling temperature (SDFT)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="student sample limit (SDFT)")
    ap.add_argument("--teacher-style", default=None)
    ap.add_argument("--teacher-ema", type=float, default=None)
    ap.add_argument("--sft-weight", type=float, default=None, help="SFT anchor weight in sdft+sft")
    ap.add_argument("--keep-unfinished", action="store_true", help="train SDFT on samples without an end token too")
    ap.add_argument("--rehearsal", type=int, default=0,
                    help="add this many rehearsal demonstrations (the base's own answers to general questions) per step")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    from learner.forgetting import smollm2_forgetting_suite
    from learner.gate import demo_forgetting_suite
    from learner.models import SMOLLM2, ensure_model
    from learner.trainer import Demonstration, DistillMethod, DistillTrainer, LoraPolicy, TrainerSettings

    torch.set_num_threads(args.threads)
    methods = [DistillMethod(m.strip()) for m in args.methods.split(",") if m.strip()]
    model = ensure_model(args.model)
    if args.model == SMOLLM2:
        families = cold_start_families(args.train, args.heldout, args.seed)
        suite = smollm2_forgetting_suite(args.forgetting_n) if args.forgetting_n else []
    else:
        families = carry_families(args.train, args.heldout, args.seed)
        suite = demo_forgetting_suite(args.forgetting_n) if args.forgetting_n else []
    overrides = {k: v for k, v in {
        "distill_temperature": args.temperature, "distill_top_p": args.top_p,
        "distill_max_new_tokens": args.max_new_tokens, "sdft_teacher_style": args.teacher_style,
        "sdft_teacher_ema": args.teacher_ema, "sdft_sft_weight": args.sft_weight}.items() if v is not None}
    if args.keep_unfinished:
        overrides["sdft_drop_unfinished"] = False
    max_tokens = max(r.get("max_tokens", 16) for f in families for r in f.train)
    settings = TrainerSettings(seed=args.seed, threads=args.threads, lr=args.lr, max_new_tokens=max_tokens, **overrides)
    demos = [Demonstration(tuple(r["messages"]), f.answer(r)) for f in families for r in f.train]
    random.Random(args.seed).shuffle(demos)
    batches = [[demos[(k * args.batch + i) % len(demos)] for i in range(args.batch)] for k in range(args.steps)]
    print(f"{args.model}: {len(demos)} corrections ({', '.join(f.name for f in families)}), {args.steps} steps of "
          f"{args.batch}, lr {args.lr}, {args.samples} samples each (SDFT); settings {settings.to_dict()}", flush=True)

    t0 = time.perf_counter()
    base_policy = LoraPolicy(model.path, settings)
    if args.rehearsal:
        pool = rehearsal_demos(base_policy)
        rng = random.Random(args.seed + 1)
        batches = [b + [pool[rng.randrange(len(pool))] for _ in range(args.rehearsal)] for b in batches]
        print(f"rehearsal: {args.rehearsal} a step from {len(pool)} of the base's own answers, e.g. "
              f"{[d.text for d in pool[:3]]}", flush=True)
    base = evaluate(base_policy, families, suite, with_forgetting=bool(suite))
    print(f"base: held-out {base['heldout']}  forgetting suite {base['forgetting']}  [{time.perf_counter() - t0:.0f}s]"
          f"\n  answers: {base['examples']}", flush=True)
    results: dict[str, Any] = {"base": base, "settings": settings.to_dict(), "args": {k: str(v) for k, v in vars(args).items()}}
    for method in methods:
        policy = LoraPolicy(model.path, settings)
        trainer = DistillTrainer(policy)
        metrics = []
        bar = tqdm(batches, desc=method.value, unit="step", file=sys.stderr)
        for k, batch in enumerate(bar):
            m = trainer.step(batch, method, seed=1000 + k, samples_per_prompt=args.samples)
            metrics.append(m)
            bar.set_postfix(loss=f"{m.loss:.3f}", kl=f"{m.kl:.3f}" if m.kl is not None else "-", deg=f"{m.degenerate:.2f}")
        after = evaluate(policy, families, suite, with_forgetting=bool(suite))
        lost = {k: base["forgetting"][k] - after["forgetting"][k] for k in after["forgetting"]}
        results[method.value] = {
            **after, "forgetting_lost": lost,
            "step_s_median": statistics.median(m.seconds for m in metrics),
            "degenerate_samples_last10": 100 * statistics.mean(m.degenerate for m in metrics[-10:]),
            "loss": [round(m.loss, 4) for m in metrics], "kl": [None if m.kl is None else round(m.kl, 4) for m in metrics],
            "skipped": sum(1 for m in metrics if m.skipped)}
        print(f"{method.value}: held-out {after['heldout']}  forgetting {after['forgetting']}  "
              f"lost {lost}\n  answers: {after['examples']}", flush=True)

    print(f"\n{args.model}, {args.steps} steps x {args.batch} corrections, lr {args.lr}; held-out true success (%), "
          f"forgetting-suite points lost (worst task / mean), median step, degenerate share (%)")
    names = [f.name for f in families]
    head = (f"{'method':<10}" + "".join(f"{n[:12]:>14}" for n in names) + f"{'mean':>14}{'lost worst':>11}{'lost mean':>10}"
            f"{'step s':>8}{'deg smp':>8}{'deg ans':>8}")
    print(head)
    print(f"{'base':<10}" + "".join(f"{base['heldout'][n]:>14.1f}" for n in names) + f"{base['heldout_mean']:>14.1f}"
          f"{'':>11}{'':>10}{'':>8}{'':>8}{base['degenerate_answers']:>8.1f}")
    for method in methods:
        r = results[method.value]
        lost = list(r["forgetting_lost"].values())
        worst = f"{max(lost):>11.1f}" if lost else f"{'-':>11}"
        mean_lost = f"{statistics.mean(lost):>10.1f}" if lost else f"{'-':>10}"
        deg = "-" if method is DistillMethod.SFT else f"{r['degenerate_samples_last10']:.1f}"
        print(f"{method.value:<10}" + "".join(f"{base['heldout'][n]:>5.1f} -> {r['heldout'][n]:>5.1f}" for n in names)
              + f"{base['heldout_mean']:>5.1f} -> {r['heldout_mean']:>5.1f}" + worst + mean_lost
              + f"{r['step_s_median']:>8.1f}{deg:>8}{r['degenerate_answers']:>8.1f}")
    if suite:
        print("forgetting suite, base %: " + ", ".join(f"{k} {v:.0f}" for k, v in base["forgetting"].items()))
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
