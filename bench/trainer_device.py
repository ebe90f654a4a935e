"""The trainer on a GPU, measured once against the same machine's CPU (bench/learn.py --curve's data).

    python bench/trainer_device.py --device cuda --steps 200 --short 10 --json out.json
    python bench/trainer_device.py --device cpu --steps 2 --short 2 --cpu-threads 1   # a smoke run anywhere

What it runs, in one process:
1. the data of ``bench/learn.py --curve`` (3,000 simulated judged interactions answered by the
   policy on ``--device``, environments, validated rewards), then the curve itself: ``--steps`` GRPO
   steps on ``--device`` with true success on held-out prompts every 20 steps, seconds per step and
   rollout tokens/s;
2. ``--short`` GRPO steps on the same data and batches from a fresh policy: twice on ``--device``
   (same seed: are the two adapters identical?) and once per ``--cpu-threads`` on the CPU, for a
   same-machine ratio;
3. ``--sdft`` SDFT and SFT steps (tests/unit/test_trainer_sdft.py's carry corrections) on
   ``--device`` and on the CPU with the most threads asked.

``--model-path``: a built model directory (default: the cached tiny model, built if missing).
``--check-original FILE``: a copy of an earlier learner/trainer.py; one GRPO step with it on
``--device`` shows whether that version ran there (the exception is printed, not raised).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learn  # noqa: E402  (bench/learn.py: the curve's data and loop)


def say(*a) -> None:
    print(*a, flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    from importlib.metadata import version

    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for d in ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy"):
        try:
            env[d] = version(d)
        except Exception as e:  # noqa: BLE001
            env[d] = f"missing ({e})"
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def timed_steps(path, data, batches, device: str, threads: int, settings_kw: dict) -> dict:
    """Fresh policy on ``device``, the given GRPO batches; per-step seconds (first step reported apart)."""
    import torch

    from learner.trainer import GRPOTrainer, LoraPolicy, TrainerSettings

    pol = LoraPolicy(path, TrainerSettings(threads=threads, device=device, **settings_kw))
    tr = GRPOTrainer(pol, data["objs"])
    step_s, roll_s, upd_s, tok = [], [], [], []
    for b in batches:
        sync(device)
        t = time.perf_counter()
        m = tr.step(b)
        sync(device)
        step_s.append(time.perf_counter() - t)
        roll_s.append(m.rollout_s)
        upd_s.append(m.update_s)
        tok.append(m.answer_tokens)
    rest = slice(1, None) if len(batches) > 1 else slice(None)
    out = {"device": device, "threads": threads, "steps": len(batches), "first_step_s": step_s[0],
           "step_s_median": statistics.median(step_s[rest]), "step_s_mean": statistics.mean(step_s[rest]),
           "rollout_tok_s": sum(tok[rest]) / sum(roll_s[rest]), "update_s_mean": statistics.mean(upd_s[rest]),
           "torch_threads": torch.get_num_threads()}
    out["_adapter"] = {k: v.detach().float().cpu() for k, v in pol.adapter_state().items()}
    return out


def adapter_diff(a: dict, b: dict) -> dict:
    import torch

    same = all(torch.equal(a[k], b[k]) for k in a)
    return {"bitwise_identical": same, "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "max_abs_value": max(float(a[k].abs().max()) for k in a)}


def check_original(file: str, path, data, batch, device: str, settings_kw: dict) -> str:
    spec = importlib.util.spec_from_file_location("trainer_original", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trainer_original"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    pol = mod.LoraPolicy(path, mod.TrainerSettings(threads=1, device=device, **settings_kw))
    objs = {k: mod.ValidatedObjective(o.combined, o.reports) for k, o in data["objs"].items()}
    try:
        m = mod.GRPOTrainer(pol, objs).step(batch)
        return f"ran: loss {m.loss:.4f} skipped={m.skipped!r}"
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(tb)
                      if f.filename.endswith(Path(file).name)), "?")
        return f"FAILED: {type(e).__name__}: {e} (at {where})"


def sdft_steps(path, device: str, threads: int, n: int) -> dict:
    from learner.demo_tasks import ArithmeticTask
    from learner.trainer import DistillTrainer, LoraPolicy, TrainerSettings

    carry = [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]}
             for a in range(10) for b in range(10) if a + b >= 10]
    random.Random(0).shuffle(carry)
    ex = [(c["messages"], str(ArithmeticTask().answer(c))) for c in carry[:30]]
    out = {"device": device, "threads": threads}
    for method in ("sdft", "sft"):
        pol = LoraPolicy(path, TrainerSettings(lr=1e-3, max_new_tokens=8, threads=threads, device=device))
        tr = DistillTrainer(pol)
        secs, losses = [], []
        for step in range(n):
            batch = [ex[(step * 8 + i) % len(ex)] for i in range(8)]
            sync(device)
            t = time.perf_counter()
            r = tr.sft_step(batch) if method == "sft" else tr.sdft_step(batch, 4)
            sync(device)
            secs.append(time.perf_counter() - t)
            losses.append(r["loss"])
        rest = secs[1:] if n > 1 else secs
        out[method] = {"steps": n, "first_step_s": secs[0], "step_s_median": statistics.median(rest),
                       "loss_first": losses[0], "loss_last": losses[-1],
                       "finite": all(x == x and abs(x) != float("inf") for x in losses)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--cpu-threads", default="1,16")
    ap.add_argument("--sdft", type=int, default=5)
    ap.add_argument("--check-original", default=None)
    ap.add_argument("--curve-budget-s", type=float, default=None, help="stop the curve at the first evaluation after this")
    ap.add_argument("--label", default="tiny")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from learner.trainer import LoraPolicy, TrainerSettings

    res: dict = {"label": args.label, "argv": sys.argv[1:], "env": environment(args.device)}
    say("environment:", json.dumps(res["env"]))

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))

    if args.model_path:
        path = Path(args.model_path)
    else:
        from learner.models import TINY, ensure_model

        path = ensure_model(TINY).path
    kw = {"lr": 1e-3, "beta": 0.05}  # bench/learn.py --curve's settings
    t0 = time.perf_counter()
    pol = LoraPolicy(path, TrainerSettings(threads=1, device=args.device, **kw))
    data = learn.curve_data(pol)
    res["data_s"] = time.perf_counter() - t0
    say(f"[{args.label}] data + rewards on {args.device}: {res['data_s']:.1f} s; "
        f"families with a validated reward: {len(data['objs'])}")
    if not data["objs"]:
        # seen with SmolLM2-135M: its answers left no family with a validated reward; GRPO has nothing to optimise
        say(f"[{args.label}] no family has a validated reward: no GRPO curve or GRPO timings")
        args.steps, args.short, args.check_original = -1, 0, None
    batches = learn.curve_batches(data, max(args.short, 1), pol.settings.prompts_per_step) if data["objs"] else []

    if args.check_original:
        res["original_trainer"] = check_original(args.check_original, path, data, batches[0], args.device, kw)
        say(f"[{args.label}] earlier learner/trainer.py, one GRPO step on {args.device}: {res['original_trainer']}")
        save()

    st = []
    if args.steps >= 0:
        say(f"[{args.label}] curve: {args.steps} GRPO steps on {args.device}")
        t = time.perf_counter()
        cur = learn.curve_run(pol, data, args.steps, out=say, budget_s=args.curve_budget_s)
        st = cur["steps"]
        res["curve"] = {"rows": cur["rows"], "wall_s": time.perf_counter() - t}
    if st:
        body = st[1:] or st
        res["curve"].update(
            step_s_median=statistics.median(s["step_s"] for s in body),
            step_s_mean=statistics.mean(s["step_s"] for s in body),
            rollout_s_mean=statistics.mean(s["rollout_s"] for s in body),
            update_s_mean=statistics.mean(s["update_s"] for s in body),
            rollout_tok_s=sum(s["answer_tokens"] for s in body) / sum(s["rollout_s"] for s in body),
            skipped=sum(1 for s in st if s["skipped"]))
        c = res["curve"]
        say(f"[{args.label}] curve on {args.device}: {len(st)} steps, {c['step_s_median']:.3f} s/step median "
            f"({c['step_s_mean']:.3f} mean; rollout {c['rollout_s_mean']:.3f} s + update {c['update_s_mean']:.3f} s), "
            f"rollout {c['rollout_tok_s']:.0f} tok/s, {c['skipped']} steps skipped; wall {c['wall_s']:.1f} s with evals")
    save()

    if args.short:
        runs = []
        for rep in (1, 2):
            r = timed_steps(path, data, batches, args.device, 1, kw)
            r["run"] = f"{args.device} #{rep}"
            runs.append(r)
        d = adapter_diff(runs[0]["_adapter"], runs[1]["_adapter"])
        res["determinism"] = {"device": args.device, "steps": args.short, **d}
        say(f"[{args.label}] determinism on {args.device}, two runs of {args.short} steps, same seed: {d}")
        for th in [int(x) for x in args.cpu_threads.split(",") if x]:
            r = timed_steps(path, data, batches, "cpu", th, kw)
            r["run"] = f"cpu {th} threads"
            runs.append(r)
        if args.device != "cpu":
            cpu_runs = [r for r in runs if r["device"] == "cpu"]
            for r in cpu_runs:
                r["adapter_vs_device_run"] = adapter_diff(runs[0]["_adapter"], r["_adapter"])
        base = runs[0]["step_s_median"]
        for r in runs:
            r.pop("_adapter")
            say(f"[{args.label}] {r['run']:>16}: {r['step_s_median']:.3f} s/step median over steps 2-{args.short} "
                f"(first {r['first_step_s']:.2f} s), rollout {r['rollout_tok_s']:.0f} tok/s, update "
                f"{r['update_s_mean']:.3f} s; x{r['step_s_median'] / base:.2f} the {args.device} step time")
        res["short"] = runs
        save()

    if args.sdft:
        th = max([int(x) for x in args.cpu_threads.split(",") if x] or [1])
        res["sdft"] = []
        for dev, threads in ([(args.device, 1)] + ([("cpu", th)] if args.device != "cpu" else [])):
            try:
                r = sdft_steps(path, dev, threads, args.sdft)
            except Exception as e:  # noqa: BLE001
                r = {"device": dev, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            res["sdft"].append(r)
            say(f"[{args.label}] SDFT/SFT on {dev} ({threads} thr): {json.dumps(r)}")
        save()
    say(f"[{args.label}] done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
