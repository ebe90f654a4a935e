"""The CPU LoRA bug (vllm-project/vllm PRs #48421, #49656) and onpolicy's plugin that fixes it; the
tiny demo model in vLLM against transformers + peft.

Two real vLLM servers serve the tiny model with ``--max-loras 1`` (the only adapter slot is the
last one, so every mixed batch hits the bug): one without any vLLM plugin (``VLLM_PLUGINS=""``),
one with the onpolicy plugin. A base request sent together with an adapter request must produce
what it produces alone.

``test_bug_reproduces_without_the_plugin`` fails on purpose the day vLLM fixes the bug upstream:
then delete ``deploy/vllm/onpolicy_vllm/cpu_lora_fix.py`` and this test.
"""

from __future__ import annotations

import random
import threading

import pytest

from tests.vllm_fixtures import chat_ids, load_adapter

# The first test builds the tiny model (~2.5 min idle, much longer on a busy machine) and starts
# two servers: more than the default per-test timeout allows on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_servers(tiny_model, vllm_settings, tmp_path_factory):
    """(fixed, unfixed): the tiny model with and without the plugin, started in parallel."""
    from learner.serving import ServingSettings, VllmServer

    settings = ServingSettings(**{**vllm_settings.model_dump(), "max_loras": 1, "kv_cache_gib": 1,
                                  "max_model_len": 256, "tool_calling": False})
    fixed = VllmServer(tiny_model.path, tiny_model.served_name, settings, name="vllm-tiny-plugin")
    unfixed = VllmServer(tiny_model.path, tiny_model.served_name, settings, name="vllm-tiny-noplugin",
                         extra_env={"VLLM_PLUGINS": ""})  # an allow-list naming no plugin: none load
    errors = []

    def start(server):
        try:
            server.start()
        except Exception as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in (fixed, unfixed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield fixed, unfixed
    finally:
        fixed.stop()
        unfixed.stop()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, make_adapter):
    return make_adapter(tiny_model.path, seed=11, scale=30.0)


@pytest.fixture(scope="module")
def chats():
    from learner.demo_tasks import ArithmeticTask, FormatTask

    rng = random.Random(3)
    return [r["messages"] for r in ArithmeticTask().requests(rng, 3) + FormatTask().requests(rng, 3)]


@pytest.fixture(scope="module")
def loaded(tiny_servers, tiny_adapter):
    for server in tiny_servers:
        load_adapter(server.base_url, "tiny-a1-v0001", tiny_adapter)
    return "tiny-a1-v0001"


def test_plugin_runs_in_every_vllm_process(tiny_servers):
    fixed, unfixed = tiny_servers
    import re

    pids = set(re.findall(r"onpolicy: CPU LoRA fix applied.*\(pid (\d+)\)", fixed.log_path.read_text()))
    # The API server and the engine core (which runs the model on CPU) each apply it.
    assert len(pids) >= 2, f"plugin applied in processes {pids}; expected the API server and the engine process"
    assert "CPU LoRA fix applied" not in unfixed.log_path.read_text()


def test_tiny_model_base_matches_transformers(tiny_servers, tiny_model, chats):
    from learner.models.reference import greedy_chats

    expected = greedy_chats(tiny_model.path, chats, MAX_TOKENS)
    got = [chat_ids(tiny_servers[0].base_url, tiny_model.served_name, c, MAX_TOKENS) for c in chats]
    assert got == expected


def test_tiny_model_adapter_matches_transformers_peft(tiny_servers, tiny_model, tiny_adapter, loaded, chats):
    from learner.models.reference import greedy_chats

    base = greedy_chats(tiny_model.path, chats, MAX_TOKENS)
    expected = greedy_chats(tiny_model.path, chats, MAX_TOKENS, adapter_path=tiny_adapter)
    assert expected != base, "the test adapter must change the output, or this test proves nothing"
    got = [chat_ids(tiny_servers[0].base_url, loaded, c, MAX_TOKENS) for c in chats]
    assert got == expected


def _base_beside_long_adapter(server, base_model: str, adapter: str, base_chat, adapter_chat) -> list[int] | None:
    """The base request's output while an adapter request decodes beside it for its whole life, or None
    when the adapter request ended first (the two did not share every batch: try again).

    The adapter request streams, and the base request is sent once its first token has arrived, so it
    is decoding then. A fixed sleep was not enough: on a busy 2-core machine the tiny model decoded all
    200 tokens before the base request got through the API server, three tries in a row (a CI run at
    b31fcd6: "only 4 of 6 base requests ran beside an adapter request"; here, with two `yes` CPU hogs, 3 of 6 on
    the old code, and 6 of 6 on this one, also with three hogs)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    stream = client.chat.completions.create(model=adapter, messages=adapter_chat, max_tokens=200, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    done = threading.Event()
    try:
        while not any(c.delta.content for c in next(chunks).choices):  # the role chunk, then the first token
            pass
    except StopIteration:
        return None

    def drain() -> None:
        try:
            for _ in chunks:
                pass
        finally:
            done.set()

    t = threading.Thread(target=drain)
    t.start()
    out = chat_ids(server.base_url, base_model, base_chat, MAX_TOKENS)
    overlapped = not done.is_set()
    t.join()
    return out if overlapped else None


def _mixed_batch_mismatches(server, base_model: str, adapter: str, chats) -> tuple[int, int]:
    """(base outputs that differ from their solo output, base requests checked) with an adapter request
    decoding beside each. Two requests merely sent together were not enough: on a quiet machine the
    short base request could finish in batches of its own (CI saw 0 of 6 mismatches without the
    plugin once), so each base request now runs entirely inside a 200-token adapter request."""
    solo = [chat_ids(server.base_url, base_model, c, MAX_TOKENS) for c in chats]
    wrong = checked = 0
    for i, c in enumerate(chats):
        for _ in range(5):
            out = _base_beside_long_adapter(server, base_model, adapter, c, chats[(i + 1) % len(chats)])
            if out is not None:
                checked += 1
                wrong += out != solo[i]
                break
    return wrong, checked


def test_bug_reproduces_without_the_plugin(tiny_servers, tiny_model, loaded, chats):
    wrong, checked = _mixed_batch_mismatches(tiny_servers[1], tiny_model.served_name, loaded, chats)
    assert checked == len(chats), f"only {checked} of {len(chats)} base requests ran beside an adapter request"
    assert wrong > 0, (
        "base requests batched with an adapter request now match their solo output WITHOUT the plugin: "
        "vLLM fixed the CPU LoRA bug upstream (PRs #48421/#49656). Remove deploy/vllm/onpolicy_vllm/cpu_lora_fix.py "
        "and this test."
    )


def test_plugin_fixes_mixed_batches(tiny_servers, tiny_model, loaded, chats):
    wrong, checked = _mixed_batch_mismatches(tiny_servers[0], tiny_model.served_name, loaded, chats)
    assert checked == len(chats), f"only {checked} of {len(chats)} base requests ran beside an adapter request"
    assert wrong == 0, f"{wrong} of {checked} base requests changed beside an adapter request, with the plugin"
