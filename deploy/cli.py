"""The ``onpolicy`` command. Each component registers its own subcommands; imports stay lazy so
``onpolicy proxy`` never pays for torch and ``onpolicy --help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module exposes ``register(subparsers)`` adding its subcommands with ``set_defaults(func=...)``.
# ``func(args) -> int | None`` is the exit status. Modules must not import torch at import time.
COMMAND_MODULES = (
    "deploy.stack_cli",
    "deploy.demo_cli",
    "deploy.status_page",
    "deploy.admin_cli",
    "streams.cli",
    "proxy.cli",
    "learner.cli",
    "learner.rewards_cli",
    "learner.loop_cli",
)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onpolicy", description="Self-hosted LLMs that keep learning from their own traffic.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a component not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every connection at INFO; keep its warnings and errors only.
    for noisy in ("kafka", "httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pydantic import ValidationError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"onpolicy: invalid setting {where}: {err['msg']}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Known, user-fixable errors carry a message that says what to do: print one line.
        from streams.errors import is_user_error

        if is_user_error(exc):
            print(f"onpolicy: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
