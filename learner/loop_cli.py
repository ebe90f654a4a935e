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
    run.add_argument("--steps", type=int, default=40, help="GRPO steps per round")
    run.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest under load on 2 cores)")
    run.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: forever)")
    run.add_argument("--publish-to", action="append", default=None, metavar="VLLM_BASE_URL",
                     help="vLLM replica(s) (…/v1) to publish gated adapters to; repeat for several")
    run.add_argument("--public-model", default=None,
                     help="with --publish-to: route this public model name to each published adapter")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="adapter versions with lineage and status, and the loop's checkpoint")
    _common(status)
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


def _shipper(args, base_served_name: str):
    """Publish a gated adapter to every vLLM replica, then route the public model to it.

    The sequential canary (learner/canary.py) is not yet fed from live feedback here: a version that
    passed the gate is routed directly, and an operator can roll it back (onpolicy admin rollback).
    """
    from learner.publisher import Publisher
    from learner.serving import onpolicy_home
    from streams.events import ControlEvent
    from streams.producer import EventProducer
    from streams.settings import KafkaSettings, ProducerSettings

    producer = EventProducer(KafkaSettings(), ProducerSettings(spool_dir=onpolicy_home() / "spool" / "learner"))
    routed: list[str] = []
    publisher = Publisher(args.publish_to, args.dir / "published", producer, routed=lambda: list(routed))
    public = args.public_model or base_served_name

    def ship(version) -> None:
        publisher.publish(version.name, version.path, expected_sha256=version.sha256, public_model=public)
        producer.emit(ControlEvent(
            action="routing_changed", actor="learner", reason=f"passed the gate: {version.reason}"[:500],
            public_model=public, adapter_version=version.name,
            payload={"routing_version": 1, "route": {"base": base_served_name, "adapter": version.name}}))
        routed[:] = [version.name]
        producer.flush(30)
        print(json.dumps({"published": version.name, "routed": public}), flush=True)

    return ship


def _run(args) -> int:
    from learner.gate import demo_forgetting_suite, make_loop_gate
    from learner.loop import LearningLoop, LoopSettings, WarehouseSignalLog
    from learner.models import ensure_model
    from learner.registry import AdapterRegistry
    from learner.trainer import TrainerSettings

    wh = _warehouse()
    built = ensure_model(args.model)
    base = built.path
    ship = _shipper(args, built.served_name) if args.publish_to else None
    ts = TrainerSettings(threads=args.threads)
    loop = LearningLoop(base, WarehouseSignalLog(wh), AdapterRegistry(wh, args.dir / "adapters"), args.dir / "ckpt", ts,
                        LoopSettings(family=args.family, min_new_feedback=args.min_new_feedback,
                                     steps_per_round=args.steps),
                        gate=make_loop_gate(base, ts, demo_forgetting_suite() if args.model == "onpolicy-tiny" else []),
                        ship=ship, on_step=lambda rec: print(json.dumps(rec), flush=True))
    for r in loop.run(max_rounds=args.rounds):
        print(json.dumps({"round": r.round, "window": r.window, "status": r.status, "adapter": r.adapter,
                          "gate": r.gate}), flush=True)
    return 0


def _status(args) -> int:
    from learner.loop import Checkpointer
    from learner.registry import AdapterRegistry

    reg = AdapterRegistry(_warehouse(), args.dir / "adapters")
    print(f"{'name':24s} {'status':14s} {'parent':18s} window      reason")
    for v in reg.versions(args.family):
        w = v.data_window
        print(f"{v.name:24s} {v.status:14s} {v.parent or '(base)':18s} {w.get('start', '')}-{w.get('end', '')}  "
              f"{v.reason[:80]}")
    state, where = Checkpointer(args.dir / "ckpt").load()
    print(f"checkpoint: {where or 'none'} {json.dumps({k: v for k, v in state.items() if k != 'history'})}")
    return 0
