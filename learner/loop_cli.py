"""``onpolicy learner``: run the learning loop, and show the adapter registry and the loop's state.

Imports stay lazy: ``onpolicy --help`` must not pay for torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("learner", help="the continual learning loop (train, gate, register)")
    sub = p.add_subparsers(dest="learner_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="run rounds forever: train when enough new validated signal arrived")
    _common(run)
    run.add_argument("--model", default="onpolicy-tiny", help="base model: onpolicy-tiny or smollm2-135m-instruct")
    run.add_argument("--min-new-feedback", type=int, default=500, help="judged interactions that start a round")
    run.add_argument("--steps", type=int, default=200, help="GRPO steps per round (docs/learning-curve.md)")
    run.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest under load on 2 cores)")
    # lr 2e-3 / beta 0.02 (the trainer's defaults) failed the gate's forgetting suite in most demo rounds
    # (22-45 points lost on arithmetic, docs/learning-curve.md); 1e-3 / 0.05 is what the trajectory-level
    # learning test (tests/integration/test_learning_e2e.py) learns with inside the 2-point bound.
    run.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    run.add_argument("--kl-beta", type=float, default=0.05, help="weight of the KL guard to the base")
    run.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: forever)")
    run.add_argument("--distill", default=None, choices=("sft", "sdft", "sdft+sft"),
                     help="how corrections are trained on (default: sft for the tiny model, whose teacher cannot use "
                          "a correction in context; sdft for a chat model: the only method that kept SmolLM2's "
                          "forgetting suite within the gate's 2 points; docs/learning-curve.md compares them)")
    run.add_argument("--distill-scope", default="cold", choices=("cold", "all", "off"),
                     help="which families are distilled from their corrections: cold (default: no validated reward, "
                          "or served mostly wrong), all, or none (learner/loop.py says why)")
    run.add_argument("--publish-to", action="append", default=None, metavar="VLLM_BASE_URL",
                     help="vLLM replica(s) (…/v1) to publish gated adapters to; repeat for several")
    run.add_argument("--public-model", default=None,
                     help="with --publish-to: the public model name the canary routes (default: the base's name)")
    run.add_argument("--canary-fraction", type=float, default=0.1,
                     help="share of the public model's requests the candidate serves during its canary")
    run.add_argument("--canary-max-requests", type=int, default=200,
                     help="canary budget: judged requests served by the candidate before a budget decision")
    run.add_argument("--canary-max-seconds", type=float, default=3600.0,
                     help="canary budget: seconds before a budget decision")
    run.add_argument("--shadow-requests", type=int, default=48,
                     help="mirrored live requests replayed to candidate and production in the shadow stage")
    run.add_argument("--shadow-min-pairs", type=int, default=20,
                     help="scored request pairs the shadow needs to pass (fewer: the candidate is not routed)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics on 127.0.0.1:PORT (default: off; 0 picks a free port)")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="adapter versions with lineage and status, every round's decision (skipped "
                                           "ones with why), and the loop's checkpoint")
    _common(status)
    status.add_argument("--rounds", type=int, default=20, help="how many recent rounds to show")
    status.set_defaults(func=_status)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _common(p: argparse.ArgumentParser) -> None:
    from learner.serving import onpolicy_home

    p.add_argument("--dir", type=Path, default=onpolicy_home() / "learner",
                   help="checkpoints and adapter store (default $ONPOLICY_HOME/learner)")
    p.add_argument("--family", default="demo", help="adapter family name (adapters are <family>-v0007)")


def _warehouse():
    # chdb:// opens the data path here; onpolicy+http:// goes through the process that owns it (the
    # local stack's sink), http(s):// is a ClickHouse server. Same interface either way.
    from streams.warehouse_server import open_warehouse

    wh = open_warehouse()
    wh.migrate()
    return wh


def _releaser(args, base_served_name: str, wh, registry):
    """Publish, shadow and canary each gated adapter (learner/release.py); resume or conclude a canary
    a previous learner process left running."""
    from learner.canary import CanarySettings
    from learner.publisher import Publisher
    from learner.release import Releaser, ReleaseSettings
    from learner.serving import onpolicy_home
    from learner.shadow import ShadowSettings
    from streams.producer import EventProducer
    from streams.settings import KafkaSettings, ProducerSettings

    producer = EventProducer(KafkaSettings(), ProducerSettings(spool_dir=onpolicy_home() / "spool" / "learner"))
    routed = lambda: [v.name for v in registry.versions(args.family) if v.status in ("canary", "production")]  # noqa: E731
    publisher = Publisher(args.publish_to, args.dir / "published", producer, routed=routed)
    canary = CanarySettings(fraction=args.canary_fraction, max_observations=args.canary_max_requests,
                            max_seconds=args.canary_max_seconds)
    shadow = ShadowSettings(sample=args.shadow_requests, min_pairs=args.shadow_min_pairs)
    return Releaser(publisher, producer, registry, wh, ReleaseSettings(
        public_model=args.public_model or base_served_name, base=base_served_name, family=args.family,
        shadow=shadow, canary=canary))


def _run(args) -> int:
    from learner.gate import make_loop_gate
    from learner.round_log import RoundStatus
    from learner.loop import DistillScope, LearningLoop, LoopSettings, WarehouseSignalLog
    from learner.round_log import Method, WarehouseRoundLog
    from learner.models import ensure_model
    from learner.registry import AdapterRegistry
    from learner.trainer import TrainerSettings

    from learner import metrics
    from streams.errors import OnpolicyUserError

    if not 0.0 < args.canary_fraction <= 1.0:
        raise OnpolicyUserError(f"--canary-fraction must be in (0, 1], got {args.canary_fraction}")
    if args.canary_max_requests < 1 or args.canary_max_seconds <= 0:
        raise OnpolicyUserError("--canary-max-requests and --canary-max-seconds must be positive")
    if args.shadow_requests < args.shadow_min_pairs:
        raise OnpolicyUserError(f"--shadow-requests ({args.shadow_requests}) must be at least --shadow-min-pairs "
                                f"({args.shadow_min_pairs}): the shadow could never pass")
    if args.metrics_port is not None:
        port = metrics.serve(args.metrics_port)
        print(json.dumps({"metrics": f"http://127.0.0.1:{port}/metrics"}), flush=True)
    wh = _warehouse()
    built = ensure_model(args.model)
    base = built.path
    registry = AdapterRegistry(wh, args.dir / "adapters")
    ship = _releaser(args, built.served_name, wh, registry) if args.publish_to else None
    if ship is not None:
        for name, outcome in ship.recover():  # a canary left running by a killed learner
            print(json.dumps({"recovered_canary": name, "outcome": outcome}), flush=True)
    temperature, top_p = served_sampling(base)
    ts = TrainerSettings(threads=args.threads, lr=args.lr, beta=args.kl_beta, temperature=temperature, top_p=top_p,
                         max_new_tokens=16 if args.model == "onpolicy-tiny" else 24)

    def on_step(rec: dict) -> None:
        metrics.record_step(rec)
        print(json.dumps(rec), flush=True)

    loop = LearningLoop(base, WarehouseSignalLog(wh), registry, args.dir / "ckpt", ts,
                        LoopSettings(family=args.family, min_new_feedback=args.min_new_feedback,
                                     steps_per_round=args.steps, distill_method=Method(args.distill or ("sft" if args.model == "onpolicy-tiny"
                                                                             else "sdft")),
                                     distill_scope=DistillScope(args.distill_scope),
                                     # a chat model rehearses everyday requests (learner/rehearsal.py); the
                                     # tiny model knows only its demo families, which its traffic carries
                                     general_rehearsal=args.model != "onpolicy-tiny"),
                        gate=make_loop_gate(base, ts, _forgetting_suite(args.model)),
                        ship=ship, on_step=on_step, round_log=WarehouseRoundLog(wh))
    for r in loop.run(max_rounds=args.rounds):
        metrics.ROUNDS.labels(r.status.value).inc()
        if r.gate:
            metrics.GATE.labels("passed" if r.status is RoundStatus.GATED else "failed").inc()
        print(json.dumps({"round": r.round, "window": r.window, "status": r.status.value, "reason": r.reason,
                          "adapter": r.adapter, "gate": r.gate, "release": r.release,
                          "families": [p.line() for p in r.plans]}), flush=True)
    return 0


def served_sampling(model_dir) -> tuple[float, float]:
    """(temperature, top_p) the model is served with when a request sends none: its
    generation_config.json, as vLLM reads it, else vLLM's neutral 1.0 / 1.0. GRPO's rollouts and the
    gate's sampled answers use them, so the learner trains and judges the policy users are served."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return 1.0, 1.0
    cfg = json.loads(path.read_text())
    if cfg.get("do_sample") is False:
        return 1.0, 1.0
    return float(cfg.get("temperature", 1.0)), float(cfg.get("top_p", 1.0))


def _forgetting_suite(model: str) -> list:
    """Fixed base skills the gate holds every adapter to (learner/gate.py): the demo families for the
    tiny model, general skills for SmolLM2 (learner/forgetting.py); none known for other models."""
    from learner.gate import demo_forgetting_suite

    if model == "onpolicy-tiny":
        return demo_forgetting_suite()
    if model == "smollm2-135m-instruct":
        from learner.forgetting import smollm2_forgetting_suite

        return smollm2_forgetting_suite()
    return []


def _status(args) -> int:
    from learner.loop import Checkpointer
    from learner.registry import AdapterRegistry
    from learner.round_log import read_rounds

    wh = _warehouse()
    reg = AdapterRegistry(wh, args.dir / "adapters")
    print(f"{'name':24s} {'status':14s} {'parent':18s} window      reason")
    for v in reg.versions(args.family):
        w = v.data_window
        print(f"{v.name:24s} {v.status:14s} {v.parent or '(base)':18s} {w.get('start', '')}-{w.get('end', '')}  "
              f"{v.reason[:80]}")
    rounds = read_rounds(wh, args.family, limit=args.rounds)
    print(f"\nlearning rounds (newest first, {len(rounds)} shown):" if rounds else "\nno learning round decided yet")
    for rec in rounds:
        for line in rec.lines():
            print(f"  {line}")
    state, where = Checkpointer(args.dir / "ckpt").load()
    print(f"checkpoint: {where or 'none'} {json.dumps({k: v for k, v in state.items() if k != 'history'})}")
    return 0
