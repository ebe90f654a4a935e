"""The single-machine stack (embedded defaults): broker, sink + warehouse, and -- as they land --
vLLM, the proxy and the learner. Started in dependency order, stopped in reverse.

State lives under one directory (``$ONPOLICY_HOME``, default ``~/.onpolicy``): the broker's log,
the warehouse, spools, models, logs, and ``stack.json`` with the ports, so running ``onpolicy up``
again resumes on the same ports with the data intact.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from streams.embedded import EmbeddedBroker, EmbeddedServiceError, free_port
from streams.settings import default_home

log = logging.getLogger(__name__)

# The demo model: the tiny model built offline from a seed, so learning shows within minutes on CPU.
DEMO_MODEL = "onpolicy-tiny"


@dataclass
class ManagedProcess:
    """A child process with a log file, a readiness check and an orderly stop."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], bool] | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.log_path, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while self.ready is not None and not self.ready():
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise EmbeddedServiceError(f"{self.name} exited with status {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"{self.name} not ready within {timeout_s:.0f}s (log: {self.log_path})")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except Exception:
            return False

    return check


@dataclass
class Stack:
    home: Path = field(default_factory=default_home)
    processes: list[ManagedProcess] = field(default_factory=list)
    broker: EmbeddedBroker | None = None
    ports: dict[str, int] = field(default_factory=dict)
    vllm: object | None = None
    learn: bool = True
    min_new_feedback: int = 1800  # the demo's defaults (deploy/demo_cli.py says why)
    steps_per_round: int = 200

    def _load_ports(self) -> None:
        state = self.home / "stack.json"
        if state.exists():
            self.ports = json.loads(state.read_text()).get("ports", {})
        for name in ("broker", "broker_store", "sink_metrics", "warehouse"):
            self.ports.setdefault(name, free_port())
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"ports": self.ports}, indent=2))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ONPOLICY_HOME=str(self.home),
            ONPOLICY_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{self.ports['broker']}",
            ONPOLICY_WAREHOUSE_URL=f"chdb://{self.home / 'warehouse'}",
        )
        return env

    def client_env(self) -> dict[str, str]:
        """Environment for every process other than the warehouse's owner (the sink)."""
        env = self.env()
        env["ONPOLICY_WAREHOUSE_URL"] = f"onpolicy+http://127.0.0.1:{self.ports['warehouse']}"
        return env

    def up(self, *, model: str | None = None, serve: bool = True) -> dict[str, str]:
        """Start everything in dependency order; return where each part is, for the summary."""
        from tqdm import tqdm

        from streams.kafka_admin import ensure_topics
        from streams.settings import KafkaSettings

        self._load_ports()
        steps = ["broker", "topics", "sink"] + (["model", "vLLM", "proxy"] if serve else [])
        where: dict[str, str] = {}
        with tqdm(total=len(steps), desc="starting onpolicy", unit="step", file=sys.stderr) as bar:
            def done(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update()

            self.broker = EmbeddedBroker(data_dir=self.home / "broker", durable=True, port=self.ports["broker"],
                                         s3_port=self.ports["broker_store"]).start()
            done("broker")
            ensure_topics(KafkaSettings(bootstrap_servers=self.broker.bootstrap_servers))
            done("topics")
            sink = ManagedProcess(
                "sink", [sys.executable, "-m", "deploy.cli", "sink", "--metrics-port", str(self.ports["sink_metrics"]),
                         "--warehouse-port", str(self.ports["warehouse"])],
                self.env(), self.home / "logs" / "sink.log",
                ready=http_ok(f"http://127.0.0.1:{self.ports['sink_metrics']}/metrics"))
            sink.start()
            self.processes.append(sink)
            done("sink")
            if serve:
                where.update(self._serve(model or DEMO_MODEL, done))
        return {
            **where,
            "kafka bootstrap servers": self.broker.bootstrap_servers,
            "warehouse": f"chdb://{self.home / 'warehouse'} (owned by the sink; others use "
                         f"ONPOLICY_WAREHOUSE_URL=onpolicy+http://127.0.0.1:{self.ports['warehouse']})",
            "sink metrics": f"http://127.0.0.1:{self.ports['sink_metrics']}/metrics",
            "logs": str(self.home / "logs"),
        }

    def _serve(self, model: str, done: Callable[[str], None]) -> dict[str, str]:
        """vLLM (CPU build) with the demo model, and the proxy in front of it."""
        from learner.models import ensure_model
        from learner.serving import ServingSettings, VllmServer

        built = ensure_model(model)
        done("model")
        for name in ("vllm", "proxy", "status"):
            self.ports.setdefault(name, free_port())
        (self.home / "stack.json").write_text(json.dumps({"ports": self.ports}, indent=2))
        self.vllm = VllmServer(built.path, built.served_name,
                               ServingSettings(port=self.ports["vllm"], log_dir=self.home / "logs"), name="vllm")
        self.vllm.start()
        done("vLLM")
        proxy_env = self.client_env()
        # Secrets of the local stack, created once (0600): the demo users' feedback API key (the
        # proxy gets only its hash) and the admin token.
        from proxy.admin import admin_token
        from proxy.api_keys import ensure_key_file
        from proxy.settings import ProxySettings

        secrets_dir = self.home / "secrets"
        entry = ensure_key_file(secrets_dir / "demo_api_key", tenant="", name="demo")
        keys_file = secrets_dir / "api_keys.json"
        keys_file.write_text(json.dumps([entry]))
        admin_token(ProxySettings(admin_token_file=secrets_dir / "admin_token"), create=True)
        proxy_env.update(ONPOLICY_PROXY_API_KEYS_FILE=str(keys_file),
                         ONPOLICY_PROXY_ADMIN_TOKEN_FILE=str(secrets_dir / "admin_token"))
        proxy_env.update(ONPOLICY_PROXY_PRODUCER__SPOOL_DIR=str(self.home / "spool" / "proxy"))
        proxy = ManagedProcess(
            "proxy", [sys.executable, "-m", "deploy.cli", "proxy", "--port", str(self.ports["proxy"]),
                      "--upstream-url", self.vllm.base_url],
            proxy_env, self.home / "logs" / "proxy.log", ready=http_ok(f"http://127.0.0.1:{self.ports['proxy']}/healthz"))
        proxy.start()
        self.processes.append(proxy)
        status = ManagedProcess(
            "status page", [sys.executable, "-m", "deploy.cli", "status-page", "--port", str(self.ports["status"])],
            self.client_env(), self.home / "logs" / "status.log",
            ready=http_ok(f"http://127.0.0.1:{self.ports['status']}/status.json"))
        status.start()
        self.processes.append(status)
        if self.learn:
            # The learner: trains on validated signal, gates, publishes to vLLM and routes the
            # public model to each version that passed the gate. Its log is JSON lines per step.
            # Canary settings sized for the demo's 2-4 requests/s: half the traffic to the candidate,
            # so a decision comes within ~5 minutes of traffic (release.py; docs/operations.md).
            self.ports.setdefault("learner_metrics", free_port())
            learner = ManagedProcess(
                "learner", [sys.executable, "-m", "deploy.cli", "learner", "run", "--model", model,
                            "--min-new-feedback", str(self.min_new_feedback),
                            "--steps", str(self.steps_per_round), "--publish-to", self.vllm.base_url,
                            "--public-model", built.served_name, "--canary-fraction", "0.5",
                            "--canary-max-seconds", "300", "--metrics-port", str(self.ports["learner_metrics"])],
                self.client_env(), self.home / "logs" / "learner.log")
            learner.start()
            self.processes.append(learner)
        done("proxy")
        return {
            "OpenAI base_url": f"http://127.0.0.1:{self.ports['proxy']}/v1",
            "model": built.served_name,
            "status page": f"http://127.0.0.1:{self.ports['status']}/status",
            "admin token": str(self.home / "secrets" / "admin_token") + "  (onpolicy admin versions)",
            "feedback API key": str(self.home / "secrets" / "demo_api_key"),
            "proxy metrics": f"http://127.0.0.1:{self.ports['proxy']}/metrics",
            "vLLM (direct)": self.vllm.base_url,
        }

    def demo_api_key(self) -> str | None:
        """The feedback API key the local stack's simulated users use (created on first start)."""
        path = self.home / "secrets" / "demo_api_key"
        return path.read_text().strip() if path.exists() else None

    def watch(self) -> str | None:
        """The name of a process that died, if any."""
        for p in self.processes:
            if not p.alive():
                return p.name
        return None

    def down(self) -> None:
        """Stop in reverse order of start: consumers drain and commit before the broker goes."""
        for p in reversed(self.processes):
            p.stop()
        if self.vllm is not None:
            self.vllm.stop()
        if self.broker is not None:
            self.broker.stop()
