"""The tiny demo model: a small Llama with its own byte-level BPE tokenizer, pretrained from a fixed
seed on the synthetic answers of the shipped demo task families (``learner/demo_tasks.py``).

Why it exists: SmolLM2-135M learns visibly in minutes on two cores, the tiny model in seconds, which
is what a demo and CI need. It is *partly* competent by construction (it imitates the families'
``synthetic_answer``), so its served base gets some requests right and has room to learn.

Reproducibility promise: with the same inputs (this file, demo_tasks.py, the pinned torch /
transformers / tokenizers) and one thread, the build writes the same bytes (the unit test builds it
twice at a small size and compares checksums). Sources of nondeterminism are closed: fixed seeds,
one torch thread, deterministic algorithms, one tokenizers thread, data order from a seeded RNG.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SERVED_NAME = "onpolicy-tiny"
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters; all of them are part of the cache key."""

    seed: int = 1234
    vocab_size: int = 384
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2  # head_dim 64: a size every vLLM CPU attention backend supports
    max_position_embeddings: int = 256
    examples: int = 24000
    tokenizer_examples: int = 4000
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50


def _families():
    from learner.demo_tasks import DEMO_FAMILIES

    return [cls() for cls in DEMO_FAMILIES]


def synthetic_conversations(n: int, seed: int) -> list[tuple[list[dict], str]]:
    """(messages, answer) pairs drawn from the demo families' requests and synthetic answers."""
    rng = random.Random(seed)
    families = _families()
    out = []
    for _ in range(n):
        family = families[rng.randrange(len(families))]
        request = family.requests(rng, 1)[0]
        out.append((request["messages"], family.synthetic_answer(request, rng)))
    return out


def render(messages: list[dict], answer: str | None = None) -> str:
    """The chat template, in Python (the Jinja template above says the same)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    text += "<|im_start|>assistant\n"
    if answer is not None:
        text += f"{answer}<|im_end|>"
    return text


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build(out_dir: Path, config: TinyConfig = TinyConfig(), progress: bool = True) -> dict:
    """Train the tokenizer and the model; save a transformers checkpoint to ``out_dir``. Returns stats."""
    # One tokenizers thread: its BPE trainer merges in parallel otherwise.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(config.seed)
        torch.use_deterministic_algorithms(True)
        data = synthetic_conversations(config.examples, config.seed)
        texts = [render(m, a) for m, a in data]
        raw_tok = train_tokenizer(texts[: config.tokenizer_examples], config.vocab_size)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw_tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
            unk_token=None, chat_template=CHAT_TEMPLATE, model_max_length=config.max_position_embeddings,
        )
        pad_id = tokenizer.convert_tokens_to_ids("<|pad|>")
        eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

        # Loss only on the answer and its end token: the prompt is the user's, not the model's.
        sequences, masks = [], []
        for messages, answer in data:
            prompt_ids = raw_tok.encode(render(messages)).ids
            full_ids = raw_tok.encode(render(messages, answer)).ids
            sequences.append(full_ids)
            masks.append([0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)))
        max_len = max(len(s) for s in sequences)
        if max_len > config.max_position_embeddings:
            raise ValueError(f"a training example has {max_len} tokens > {config.max_position_embeddings}")
        ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(sequences), max_len), dtype=torch.bool)
        attn = torch.zeros((len(sequences), max_len), dtype=torch.long)
        for i, (seq, mask) in enumerate(zip(sequences, masks)):
            ids[i, : len(seq)] = torch.tensor(seq)
            loss_mask[i, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
            attn[i, : len(seq)] = 1

        model_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
        )
        model = LlamaForCausalLM(model_config).float()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / config.warmup) * max(0.05, 1 - s / config.steps),
        )
        order = torch.Generator().manual_seed(config.seed)
        bar = tqdm(range(config.steps), desc="tiny model: pretraining", unit="step", file=sys.stderr, disable=not progress,
                   mininterval=1.0)
        loss_value = float("nan")
        for step in bar:
            batch = torch.randint(0, len(sequences), (config.batch_size,), generator=order)
            length = int(attn[batch].sum(1).max())
            x, m, a = ids[batch, :length], loss_mask[batch, :length], attn[batch, :length]
            logits = model(input_ids=x, attention_mask=a).logits[:, :-1]
            target = x[:, 1:].masked_fill(~m[:, 1:], -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 20 == 0 or step == config.steps - 1:
                loss_value = float(loss.detach())
                bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        model.eval()
        model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return {"final_loss": loss_value, "params": sum(p.numel() for p in model.parameters()), **asdict(config)}
    finally:
        # Leave the caller's process as it was (a trainer may run in it next).
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
