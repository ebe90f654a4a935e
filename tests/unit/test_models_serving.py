"""learner.serving / learner.publisher / learner.cli: flags, import cost, adapter verification (no vLLM needed)."""

from __future__ import annotations

import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from learner.publisher import InvalidAdapter, adapter_name, adapter_sha256, verify_adapter
from learner.serving import ServingSettings, server_args, server_env

REPO = Path(__file__).resolve().parents[2]


def _readme_command(section: str) -> tuple[dict[str, str], list[str]]:
    text = (REPO / "deploy/vllm/README.md").read_text()
    body = text.split(f"## {section}", 1)[1]
    block = re.search(r"```sh\n(.*?)```", body, re.S).group(1).replace("\\\n", " ")
    words = shlex.split(block)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    rest = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    start = rest.index("serve") + 1
    return env, rest[start:]


def test_readme_cpu_and_gpu_commands_are_the_code_flags_apart_from_the_device():
    settings = ServingSettings(omp_threads_bind="0-1")
    expected_args = server_args("/models/smollm2-135m-instruct", "smollm2-135m-instruct", settings, host="0.0.0.0", port=8000)
    cpu_env, cpu_args = _readme_command("CPU")
    gpu_env, gpu_args = _readme_command("GPU")
    assert cpu_args == expected_args
    assert gpu_args == expected_args
    assert cpu_env == server_env(settings, cpu=True)
    assert gpu_env == server_env(settings, cpu=False)
    assert set(cpu_env) - set(gpu_env) == {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"}


def test_serving_flags_enable_runtime_lora_and_tools():
    args = server_args("/m", "m", ServingSettings(), host="127.0.0.1", port=1)
    for flag in ("--enable-lora", "--enable-auto-tool-choice"):
        assert flag in args
    assert args[args.index("--max-loras") + 1] == "4" and args[args.index("--max-lora-rank") + 1] == "8"
    assert args[args.index("--dtype") + 1] == "float32"
    assert server_env(ServingSettings())["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_serving_publisher_and_cli_do_not_import_torch():
    code = ("import sys, learner.serving, learner.publisher, learner.cli, learner.models, learner.demo_tasks; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_registers_serve_and_models_build():
    import argparse

    from learner.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "build", "--only", "onpolicy-tiny", "--verify"])
    assert args.only == ["onpolicy-tiny"] and args.verify and callable(args.func)
    assert callable(parser.parse_args(["serve", "--model", "onpolicy-tiny"]).func)


def _fake_adapter(directory: Path, rank: int = 8, peft_type: str = "LORA", a_rank: int | None = None) -> Path:
    """A peft-format adapter written by hand (safetensors header + zero bytes): no torch needed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": peft_type, "r": rank, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "m"}))
    r = a_rank or rank
    header = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [r, 4], "data_offsets": [0, 16 * r]},
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": {"dtype": "F32", "shape": [4, r], "data_offsets": [16 * r, 32 * r]},
    }
    raw = json.dumps(header).encode()
    (directory / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32 * r))
    return directory


def test_verify_adapter_accepts_peft_lora_and_reports_rank_and_digest(tmp_path):
    adapter = _fake_adapter(tmp_path / "a")
    verified = verify_adapter(adapter, max_rank=8)
    assert verified.rank == 8 and verified.target_modules == ("q_proj", "v_proj")
    assert verified.sha256 == adapter_sha256(adapter)
    assert verify_adapter(adapter, max_rank=8, expected_sha256=verified.sha256).sha256 == verified.sha256


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 16}, "rank 16 exceeds the server's --max-lora-rank 8"),
    ({"rank": 8, "a_rank": 16}, "has rank 16 > --max-lora-rank 8"),
    ({"peft_type": "IA3"}, "only peft LORA adapters"),
])
def test_verify_adapter_refuses_what_vllm_would_reject(tmp_path, kwargs, message):
    with pytest.raises(InvalidAdapter, match=re.escape(message)):
        verify_adapter(_fake_adapter(tmp_path / "a", **kwargs), max_rank=8)


def test_verify_adapter_refuses_changed_files_and_missing_files(tmp_path):
    adapter = _fake_adapter(tmp_path / "a")
    digest = adapter_sha256(adapter)
    (adapter / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes() + b"x")
    with pytest.raises(InvalidAdapter, match="the files changed after training"):
        verify_adapter(adapter, max_rank=8, expected_sha256=digest)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="no adapter_config.json"):
        verify_adapter(adapter, max_rank=8)


def test_adapter_names_are_family_and_zero_padded_version():
    assert adapter_name("arithmetic", 7) == "arithmetic-v0007"
    assert adapter_name("format-json", 12345) == "format-json-v12345"
    with pytest.raises(InvalidAdapter):
        adapter_name("Bad Family", 1)
