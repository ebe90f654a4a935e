"""Reference generation with plain transformers (+ peft), and random LoRA adapters for tests/benchmarks.

The exact-match tests and ``bench/publish.py`` compare vLLM against this: the same checkpoint, the
same chat template, greedy decoding, float32, one request at a time (no padding, so nothing in the
batch can change the numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def load(model_path: str | Path, adapter_path: str | Path | None = None):
    """(model, tokenizer) in float32 eval mode, with the peft adapter applied when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    return model, tokenizer


def greedy_chat(model, tokenizer, messages: list[dict[str, Any]], max_new_tokens: int) -> list[int]:
    """Greedy completion token ids for one chat, without the end-of-sequence token."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    input_ids = torch.tensor([prompt["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    ids = out[0, input_ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def greedy_chats(model_path: str | Path, chats: Sequence[list[dict[str, Any]]], max_new_tokens: int,
                 adapter_path: str | Path | None = None) -> list[list[int]]:
    model, tokenizer = load(model_path, adapter_path)
    return [greedy_chat(model, tokenizer, messages, max_new_tokens) for messages in chats]


def make_random_lora(model_path: str | Path, out_dir: str | Path, *, seed: int, rank: int = 8,
                     target_modules: Sequence[str] = ("q_proj", "v_proj"), scale: float = 1.0) -> Path:
    """A real peft LoRA adapter with random A and B (peft's default B is zero, which changes nothing).

    ``scale`` multiplies B: large enough that greedy outputs differ from the base model, small enough
    that they stay far from ties (so two correct runtimes agree token for token).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
