"""``onpolicy serve`` and ``onpolicy models build``. Imports stay lazy: no torch until a command runs."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the vLLM inference server (CPU build) with runtime LoRA loading")
    serve.add_argument("--model", default="smollm2-135m-instruct", choices=("smollm2-135m-instruct", "onpolicy-tiny"),
                       help="which offline model to serve (built first if needed)")
    serve.add_argument("--host", default=None, help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    serve.set_defaults(func=_serve)

    models = subparsers.add_parser("models", help="build and check the offline models")
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    build = models_sub.add_parser("build", help="build (or reuse) the offline models under $ONPOLICY_HOME/models")
    build.add_argument("--only", choices=("smollm2-135m-instruct", "onpolicy-tiny"), action="append",
                       help="build only this model (repeatable)")
    build.add_argument("--force", action="store_true", help="rebuild even if a build for the same inputs exists")
    build.add_argument("--verify", action="store_true", help="re-hash every cached file against its checksum")
    build.add_argument("--prune", action="store_true", help="remove cached builds of older inputs")
    build.set_defaults(func=_models_build)


def _serve(args: argparse.Namespace) -> int:
    from learner.serving import ServingSettings, serve_forever

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return serve_forever(args.model, ServingSettings(**overrides))


def _models_build(args: argparse.Namespace) -> int:
    from learner.models import MODEL_NAMES, ensure_model, prune

    built = []
    for name in args.only or MODEL_NAMES:
        model = ensure_model(name, force=args.force, verify=args.verify)
        built.append(model)
        print(f"{model.name}\t{model.path}\tsha256:{model.digest}", flush=True)
    if args.prune:
        for path in prune([m.name for m in built], {m.path for m in built}):
            print(f"removed {path}", file=sys.stderr)
    return 0
