"""Learning-loop benchmark on the tiny model (2 CPU cores): rollout tokens/s in-process (transformers
``generate``) vs through vLLM-CPU, trainer tokens/s, and the time from the feedback event that
completes a round's data to the new adapter being routable (round + registry + gate + publish).

    python bench/learn.py            # everything, vLLM included (starts one vLLM-CPU server, ~40 s)
    python bench/learn.py --no-vllm  # in-process figures only
    python bench/learn.py --curve    # learning curve: true success on held-out prompts every 20 GRPO steps
    python bench/learn.py --curve --device cuda   # the same on a GPU (bench/trainer_device.py: GPU vs CPU)
    python bench/learn.py --smollm2  # SmolLM2 from a cold start: feedback -> routable per round, step times

``--smollm2`` runs the real-model cold start: simulated users of the cold-start families
(learner/cold_start_tasks.py) judge what SmolLM2-135M-Instruct serves (sampled as served), and the
learning loop runs ``--rounds`` rounds on fresh windows of that traffic (distillation of the
corrections, GRPO where a reward validates, the gate with SmolLM2's forgetting suite), each adapter
published to a vLLM-CPU server. It prints the median time from the feedback event that completes a
round's window to the adapter being routable, the stages that time goes to, and the median step
time of SFT, SDFT and GRPO on SmolLM2 with GRPO's rollout / reference / update breakdown.

Rollout shape = the trainer's: 8 prompts x 8 samples, up to 16 new tokens, temperature 1. vLLM
gets the same 64 sequences as 8 concurrent requests with n=8 (its best case for this shape).
Ratios are against the in-process baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--device", default="cpu", help="--curve: the trainer's device (cpu, cuda)")
    ap.add_argument("--model-path", default=None, help="--curve: a built model directory instead of the cached tiny model")
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2 cold-start figures (see the docstring)")
    ap.add_argument("--rounds", type=int, default=3, help="--smollm2: rounds whose feedback->routable time is timed")
    ap.add_argument("--window", type=int, default=450, help="--smollm2: judged interactions per round")
    args = ap.parse_args()
    if args.curve:
        return curve(args)
    if args.smollm2:
        return smollm2(args)

    from learner.demo_tasks import ArithmeticTask, FormatTask
    from learner.models import TINY, ensure_model
    from learner.trainer import LoraPolicy, TrainerSettings

    model = ensure_model(TINY)
    ts = TrainerSettings(threads=args.threads, lr=1e-3, beta=0.05)
    pol = LoraPolicy(model.path, ts)
    rng = random.Random(0)
    prompts = [r["messages"] for r in ArithmeticTask().requests(rng, 4) + FormatTask().requests(rng, 4)]
    pol.sample(prompts, 8, seed=0)  # warm-up
    tok, sec = 0, 0.0
    for i in range(args.repeats):
        ro = pol.sample(prompts, 8, seed=i)
        tok += ro.answer_tokens
        sec += ro.seconds
    inproc = tok / sec
    print(f"rollouts in-process (transformers generate, 64 seqs, {args.threads} thread): {inproc:.0f} tok/s")
    results = {"rollout_inprocess_tok_s": inproc}

    # one full round: simulated judged traffic -> rewards -> GRPO -> register -> gate
    from learner.gate import ForgettingTask, make_loop_gate
    from learner.loop import LearningLoop, ListSignalLog, LoopSettings, simulated_trajectories
    from learner.registry import AdapterRegistry
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    tmp = Path(tempfile.mkdtemp(prefix="bench-learn-"))
    tasks = [ArithmeticTask(), FormatTask()]
    reqs = [(t, r) for t in tasks for r in t.requests(rng, 1000)]
    rng.shuffle(reqs)
    texts = []
    for i in range(0, len(reqs), 256):
        texts += pol.sample([r["messages"] for _, r in reqs[i:i + 256]], 1, seed=i).texts
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    frng = random.Random(1)
    log = ListSignalLog([simulated_trajectories(t, [r], [x], frng, start + dt.timedelta(seconds=k), id_prefix=f"i{k}-")[0]
                         for k, ((t, r), x) in enumerate(zip(reqs, texts))])
    wh = Warehouse(WarehouseSettings(url=f"chdb://{tmp}/wh", database="bench"))
    wh.migrate()
    reg = AdapterRegistry(wh, tmp / "adapters")
    nocarry = tuple({"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]}
                    for a in range(10) for b in range(10) if a + b < 10)
    steps = []
    loop = LearningLoop(model.path, log, reg, tmp / "ckpt", ts,
                        LoopSettings(min_new_feedback=1000, steps_per_round=args.steps, checkpoint_every=10),
                        gate=make_loop_gate(model.path, ts, [ForgettingTask("nocarry", nocarry, tasks[0].score)]),
                        on_step=steps.append)
    t0 = time.perf_counter()
    r = loop.run_round()
    round_s = time.perf_counter() - t0
    results.update(round_s=round_s, steps=args.steps, adapter=r.adapter, gate=r.gate,
                   rollout_tok_s_in_training=sum(s["rollout_tok_s"] for s in steps) / len(steps))
    print(f"round ({args.steps} GRPO steps, rewards rebuilt, registered, gated): {round_s:.1f} s; gate: {r.gate}")

    if not args.no_vllm:
        from learner.publisher import Publisher
        from learner.serving import ServingSettings, VllmServer, http_json

        class Sink:
            def emit(self, e):
                return True

        server = VllmServer(model.path, model.served_name, ServingSettings(max_model_len=256, log_dir=tmp), name="bench")
        server.start()
        try:
            def one(msgs):
                t = time.perf_counter()
                status, body = http_json("POST", server.base_url + "/chat/completions", {
                    "model": model.served_name, "messages": msgs, "n": 8, "max_tokens": 16, "temperature": 1.0}, timeout=300)
                assert status == 200, body
                return body["usage"]["completion_tokens"], time.perf_counter() - t

            with ThreadPoolExecutor(8) as ex:
                list(ex.map(one, prompts))  # warm-up
                tok, t = 0, time.perf_counter()
                for _ in range(args.repeats):
                    tok += sum(n for n, _ in ex.map(one, prompts))
                vllm_rate = tok / (time.perf_counter() - t)
            print(f"rollouts through vLLM-CPU (8 concurrent x n=8): {vllm_rate:.0f} tok/s "
                  f"= {vllm_rate / inproc:.2f}x in-process")
            pub = Publisher([server.base_url], tmp / "store", Sink(), max_lora_rank=8)
            v = reg.get(r.adapter)
            t = time.perf_counter()
            pub.publish(v.name, v.path, expected_sha256=v.sha256)
            publish_s = time.perf_counter() - t
            results.update(rollout_vllm_tok_s=vllm_rate, publish_s=publish_s,
                           feedback_to_routable_s=round_s + publish_s)
            # published here whatever the gate said, to time the path; the loop never publishes a
            # gate_failed adapter (registry.assert_routable)
            print(f"publish: {publish_s:.2f} s; feedback event -> routable adapter: {round_s + publish_s:.1f} s "
                  f"(gate {'passed' if reg.get(r.adapter).routable else 'FAILED: the loop would not publish it'})")
        finally:
            server.stop()
    print(json.dumps(results, default=str))
    return 0


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else float("nan")


def smollm2(args) -> int:
    """See the module docstring (``--smollm2``)."""
    from tqdm import tqdm

    from learner.cold_start_tasks import COLD_START_FAMILIES
    from learner.forgetting import smollm2_forgetting_suite
    from learner.gate import make_loop_gate
    from learner.loop import LearningLoop, ListSignalLog, LoopSettings, simulated_trajectories
    from learner.models import ensure_model
    from learner.publisher import Publisher
    from learner.registry import AdapterRegistry
    from learner.round_log import ListRoundLog
    from learner.serving import ServingSettings, VllmServer
    from learner.trainer import (Demonstration, DistillMethod, DistillTrainer, LoraPolicy, TrainerSettings)
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    built = ensure_model("smollm2-135m-instruct")
    ts = TrainerSettings(threads=args.threads, lr=1e-3, beta=0.05, max_new_tokens=24, temperature=0.2, top_p=0.9)
    tasks = [cls() for cls in COLD_START_FAMILIES]
    tmp = Path(tempfile.mkdtemp(prefix="bench-learn-smollm2-"))
    base = LoraPolicy(built.path, ts)
    rng, frng = random.Random(0), random.Random(1)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    n = args.window * args.rounds
    reqs = [(t, r) for t in tasks for r in t.requests(rng, 4 * n // len(tasks)) if not t.heldout(r)]
    rng.shuffle(reqs)
    reqs = reqs[:int(n * 1.6)]  # about 60% of requests get a judgement
    texts: list[str] = []
    for i in tqdm(range(0, len(reqs), 64), desc="base answers (as served)", unit="batch", file=sys.stderr):
        texts += base.sample([r["messages"] for _, r in reqs[i:i + 64]], 1, seed=i).texts
    trajs = []
    for j, task in enumerate(tasks):  # each family over the same time span, as mixed traffic
        mine = [(r, x) for (t, r), x in zip(reqs, texts) if t is task]
        trajs += simulated_trajectories(task, [r for r, _ in mine], [x for _, x in mine], frng,
                                        start + dt.timedelta(seconds=j / len(tasks)),
                                        step_s=len(reqs) / max(1, len(mine)), id_prefix=f"{task.name}-")
    judged = sorted((t for t in trajs if t.label() is not None), key=lambda t: (t.ts, t.event_id))
    wh = Warehouse(WarehouseSettings(url=f"chdb://{tmp}/wh", database="bench"))
    wh.migrate()
    reg = AdapterRegistry(wh, tmp / "adapters")
    rounds = ListRoundLog()
    log = ListSignalLog([])
    loop = LearningLoop(built.path, log, reg, tmp / "ckpt", ts,
                        LoopSettings(min_new_feedback=args.window, steps_per_round=args.steps, checkpoint_every=10,
                                     general_rehearsal=True),
                        gate=make_loop_gate(built.path, ts, smollm2_forgetting_suite()), round_log=rounds)
    server = VllmServer(built.path, built.served_name, ServingSettings(log_dir=tmp), name="bench-smollm2")
    server.start()

    class Sink:
        def emit(self, e):
            return True

    totals, stages = [], []
    try:
        pub = Publisher([server.base_url], tmp / "store", Sink(), max_lora_rank=8)
        for r in range(args.rounds):
            log.items.extend(judged[r * args.window:(r + 1) * args.window])  # the feedback completing the window
            t0 = time.perf_counter()
            res = loop.run_round()
            round_s = time.perf_counter() - t0
            publish_s = float("nan")
            if res.adapter:
                v = reg.get(res.adapter)
                t = time.perf_counter()
                pub.publish(v.name, v.path, expected_sha256=v.sha256)
                publish_s = time.perf_counter() - t
            total = round_s + (publish_s if publish_s == publish_s else 0.0)
            totals.append(total)
            stages.append({**res.metrics.get("timings", {}), "publish_s": publish_s})
            print(f"round {res.round}: {res.status.value} in {round_s:.0f} s + publish {publish_s:.1f} s: {res.reason}")
            for line in rounds.records[-1].lines()[1:]:
                print(line)
    finally:
        server.stop()
    print(f"feedback completing a round -> adapter routable: median {_median(totals):.0f} s over {len(totals)} rounds "
          f"(published whatever the gate said, to time the path; the loop publishes only gated adapters)")
    for key in ("rebuild_s", "train_s", "register_s", "gate_s", "publish_s"):
        vals = [st[key] for st in stages if key in st and st[key] == st[key]]
        print(f"  {key[:-2]:9s} median {_median(vals):6.1f} s")

    # step times on SmolLM2: SFT, SDFT, SDFT+SFT (8 corrections), GRPO's parts (8 prompts x 8 samples)
    pol = LoraPolicy(built.path, ts)
    demos = [Demonstration(tuple(t.messages), c, 1.0) for t in judged for c in t.corrections()][:64]
    distill = DistillTrainer(pol)
    for method in (DistillMethod.SFT, DistillMethod.SDFT, DistillMethod.SDFT_SFT):
        secs = []
        for i in range(args.repeats):
            t = time.perf_counter()
            distill.step(demos[8 * i % len(demos):][:8], method, seed=i)
            secs.append(time.perf_counter() - t)
        print(f"{method.value:9s} step (8 corrections): median {_median(secs):.1f} s")
    import torch

    prompts = [r["messages"] for _, r in reqs[:8]]
    parts = {"rollout": [], "reference": [], "update": []}
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=ts.lr)
    for i in range(args.repeats):
        t = time.perf_counter()
        ro = pol.sample(prompts, ts.group_size, seed=i)
        parts["rollout"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pol.answer_logps(ro, "base")
        parts["reference"].append(time.perf_counter() - t)
        t = time.perf_counter()
        loss = -(pol.answer_logps(ro, "policy") * ro.answer_mask).sum() / ro.answer_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts["update"].append(time.perf_counter() - t)
    grpo_total = sum(_median(v) for v in parts.values())
    print(f"GRPO step (8 prompts x {ts.group_size} samples, {ts.max_new_tokens} new tokens): median {grpo_total:.1f} s = "
          + ", ".join(f"{k} {_median(v):.1f} s" for k, v in parts.items()))
    print(json.dumps({"feedback_to_routable_median_s": _median(totals), "stages": stages}, default=str))
    return 0


def curve_data(pol, out=print) -> dict:
    """The curve's data: 3,000 simulated judged interactions answered by ``pol`` (held-out arithmetic
    pairs left out), the environments and validated rewards built from them, and the held-out
    evaluation prompts."""
    from learner.demo_tasks import ArithmeticTask, FormatTask
    from learner.environments.build import build_environments
    from learner.loop import simulated_trajectories
    from learner.rewards.build import build_rewards
    from learner.trainer import ValidatedObjective

    ar, fm = ArithmeticTask(), FormatTask()
    held = ar.heldout
    rng = random.Random(0)
    reqs = [(t, r) for t in (ar, fm) for r in t.requests(rng, 1500) if t is not ar or not held(r)]
    rng.shuffle(reqs)
    texts = []
    for i in range(0, len(reqs), 256):
        texts += pol.sample([r["messages"] for _, r in reqs[i:i + 256]], 1, seed=i).texts
    frng, start = random.Random(1), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    trajs = [simulated_trajectories(t, [r], [x], frng, start + dt.timedelta(seconds=k), id_prefix=f"i{k}-")[0]
             for k, ((t, r), x) in enumerate(zip(reqs, texts))]
    envs = build_environments(trajs)
    objs = {fid: ValidatedObjective(f.combined, f.reports) for fid, f in build_rewards(envs, trajs).items() if f.trainable}
    erng = random.Random(99)
    ev_a = [r for r in ar.requests(erng, 300) if held(r)][:60]
    ev_f = fm.requests(erng, 60)
    return {"envs": envs, "objs": objs, "ev_a": ev_a, "ev_f": ev_f, "ar": ar, "fm": fm}


def curve_batches(data: dict, steps: int, prompts_per_step: int, seed: int = 5) -> list[list]:
    """The prompts of each GRPO step: a family at random, then a prompt of its pool (as the curve draws them)."""
    envs, fams = data["envs"], sorted(data["objs"])
    srng = random.Random(seed)
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(prompts_per_step):
            pool = envs.environments[fams[srng.randrange(len(fams))]].train
            batch.append(pool[srng.randrange(len(pool))])
        out.append(batch)
    return out


def curve_run(pol, data: dict, steps: int, every: int = 20, out=print, budget_s: float | None = None) -> dict:
    """GRPO steps on ``pol`` with true success on the held-out prompts every ``every`` steps.
    Returns the printed rows and every step's metrics. ``budget_s``: stop at the first evaluation
    after this many seconds of training."""
    from learner.trainer import GRPOTrainer, evaluate_success, mean

    ar, fm, ev_a, ev_f = data["ar"], data["fm"], data["ev_a"], data["ev_f"]
    trainer = GRPOTrainer(pol, data["objs"])
    batches = curve_batches(data, steps, pol.settings.prompts_per_step)
    rows, metrics, m = [], [], None
    t_train = time.perf_counter()
    out("step  train_s  reward  KL      arithmetic%  format%  mean%")
    for step in range(0, steps + 1):
        if step % every == 0 or step == steps:
            a = 100 * mean(evaluate_success(pol, ev_a * 4, ar.score, greedy=False, seed=11))
            f = 100 * mean(evaluate_success(pol, ev_f * 4, fm.score, greedy=False, seed=12))
            row = {"step": step, "train_s": time.perf_counter() - t_train,
                   "reward": m.reward_mean if m else float("nan"), "kl": m.kl if m else float("nan"),
                   "arithmetic": a, "format": f, "mean": (a + f) / 2}
            rows.append(row)
            out(f"{step:4d} {row['train_s']:8.1f}  {row['reward']:6.2f}  {row['kl']:6.3f}  {a:11.1f}  {f:7.1f}  "
                f"{row['mean']:5.1f}")
        if step == steps:
            break
        if budget_s is not None and step % every == 0 and time.perf_counter() - t_train > budget_s:
            out(f"stopped at step {step}: time budget of {budget_s:.0f} s spent")
            break
        t = time.perf_counter()
        m = trainer.step(batches[step])
        metrics.append({"step_s": time.perf_counter() - t, "rollout_s": m.rollout_s, "update_s": m.update_s,
                        "answer_tokens": m.answer_tokens, "skipped": m.skipped})
    return {"rows": rows, "steps": metrics}


def curve(args) -> int:
    """True success (hidden truth, sampled answers at temperature 1, as served) on held-out prompts --
    arithmetic pairs never seen in traffic, format requests drawn with another seed -- every 20 GRPO
    steps of one round trained on validated rewards from 3,000 simulated judged interactions."""
    from learner.models import TINY, ensure_model
    from learner.trainer import LoraPolicy, TrainerSettings

    t0 = time.perf_counter()
    path = args.model_path or ensure_model(TINY).path
    ts = TrainerSettings(threads=args.threads, lr=1e-3, beta=0.05, device=args.device)
    pol = LoraPolicy(path, ts)
    data = curve_data(pol)
    print(f"data + rewards: {time.perf_counter() - t0:.0f} s; families with a validated reward: {len(data['objs'])}")
    curve_run(pol, data, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
