"""Synthesized variants of real prompts: more training prompts of the same task.

Every variant is labelled ``synthetic=True`` with its ``origin`` and ``parent_id``, is placed in the
train pool only, and is dropped if it is a near-duplicate of any held-out prompt (a variant must not
leak the held-out set into training).

- **Slot-filling**: numbers are replaced by other numbers of the same number of digits; entities
  (capitalised words that vary across the family's prompts: rare in the family, so not template
  words like "JSON") are swapped for other entities seen in the family.
- **Paraphrase** by the served model through any OpenAI-compatible endpoint (the proxy, vLLM, a
  hosted model). Optional: without a ``base_url`` it is skipped, and a failing endpoint is recorded
  in the manifest instead of stopping the build.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from learner.environments.pools import MinHashLSH, jaccard, near_duplicate_groups, prompt_key, prompt_text, shingles
from learner.types import PromptRecord

log = logging.getLogger(__name__)

_NUM = re.compile(r"(?<![A-Za-z\d])\d+(?![\d])")
_CAP = re.compile(r"(?<=[a-z,;:] )[A-Z][a-z]+")  # capitalised, not at the start of a sentence


@dataclass(frozen=True)
class SynthSettings:
    variants_per_prompt: int = 1
    max_variants: int = 2000
    entity_max_doc_freq: float = 0.3
    near_dup_jaccard: float = 0.8


def entity_lexicon(prompts: Sequence[PromptRecord], max_doc_freq: float = 0.3) -> list[str]:
    """Capitalised words that vary across the family's prompts (slot values, not template words)."""
    df: Counter[str] = Counter()
    for p in prompts:
        df.update(set(_CAP.findall(_last_user(p))))
    n = max(1, len(prompts))
    return sorted(w for w, c in df.items() if c / n <= max_doc_freq and c >= 1) if len(df) >= 3 else []


def _last_user(p: PromptRecord) -> str:
    for m in reversed(p.messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def slot_fill(text: str, rng: random.Random, lexicon: Sequence[str]) -> str:
    def num(m: re.Match) -> str:
        digits = len(m.group(0))
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return str(rng.randint(lo, 10 ** digits - 1))

    out = _NUM.sub(num, text)
    if lexicon:
        lex = set(lexicon)
        out = _CAP.sub(lambda m: rng.choice(lexicon) if m.group(0) in lex else m.group(0), out)
    return out


def _with_user_text(p: PromptRecord, text: str) -> tuple[dict, ...]:
    msgs = [dict(m) for m in p.messages]
    for m in reversed(msgs):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] = text
            break
    return tuple(msgs)


class _HeldoutGuard:
    """Rejects candidates that are exact or near duplicates of a held-out prompt, or already known.

    Near-duplicates are looked up through the same MinHash LSH banding as the pools' grouping, then
    confirmed by exact Jaccard, so a check costs a few hash lookups however large the held-out set is.
    """

    def __init__(self, heldout: Sequence[PromptRecord], known: Sequence[PromptRecord], threshold: float):
        self.threshold = threshold
        self.lsh = MinHashLSH()
        self.heldout = [shingles(prompt_text(p.messages)) for p in heldout]
        self.buckets: dict[bytes, list[int]] = {}
        for i, sh in enumerate(self.heldout):
            for key in self.lsh.band_keys(self.lsh.signature(sh)):
                self.buckets.setdefault(key, []).append(i)
        self.seen = {prompt_key(p.messages, dict(p.request_kwargs)) for p in (*heldout, *known)}

    def ok(self, messages, kwargs) -> bool:
        key = prompt_key(messages, dict(kwargs))
        if key in self.seen:
            return False
        sh = shingles(prompt_text(messages))
        checked: set[int] = set()
        for band in self.lsh.band_keys(self.lsh.signature(sh)):
            # A template-heavy family fills buckets with look-alikes; checking the first 64 per band
            # bounds the cost. Exact duplicates are always caught above; recall of near-duplicates is
            # LSH's (~98% at Jaccard 0.8 with 8 bands of 4).
            for i in self.buckets.get(band, ())[:64]:
                if i not in checked:
                    checked.add(i)
                    if jaccard(self.heldout[i], sh) >= self.threshold:
                        return False
        self.seen.add(key)
        return True


def slot_fill_variants(train: Sequence[PromptRecord], heldout: Sequence[PromptRecord], seed: int,
                       settings: SynthSettings | None = None) -> list[PromptRecord]:
    s = settings or SynthSettings()
    rng = random.Random(seed)
    lexicon = entity_lexicon(train, s.entity_max_doc_freq)
    guard = _HeldoutGuard(heldout, train, s.near_dup_jaccard)
    out: list[PromptRecord] = []
    for p in train:
        if p.synthetic:
            continue
        text = _last_user(p)
        if not _NUM.search(text) and not (lexicon and any(w in lexicon for w in _CAP.findall(text))):
            continue
        for _ in range(s.variants_per_prompt):
            new = slot_fill(text, rng, lexicon)
            if new == text:
                continue
            msgs = _with_user_text(p, new)
            if not guard.ok(msgs, p.request_kwargs):
                continue
            out.append(replace(p, prompt_id=f"s{prompt_key(msgs, dict(p.request_kwargs))}", messages=msgs,
                               origin="slot_fill", synthetic=True, parent_id=p.prompt_id, split="train",
                               near_dup_group=p.near_dup_group, n_seen=0, source_interactions=()))
            if len(out) >= s.max_variants:
                return out
    return out


@dataclass(frozen=True)
class ParaphraseSettings:
    base_url: str | None = None
    model: str = "default"
    api_key: str = "onpolicy"
    max_prompts: int = 50
    timeout_s: float = 30.0
    instruction: str = ("Rewrite the following request so that it asks for exactly the same thing in different "
                        "words. Keep every number, name and constraint. Reply with the rewritten request only.")


class Paraphraser:
    """Paraphrases prompts with a model behind an OpenAI-compatible ``base_url``."""

    def __init__(self, settings: ParaphraseSettings):
        if not settings.base_url:
            raise ValueError("paraphrasing needs a base_url (an OpenAI-compatible endpoint, e.g. the proxy's /v1)")
        self.settings = settings
        from openai import OpenAI  # lazy: only when paraphrasing is configured

        self.client = OpenAI(base_url=settings.base_url, api_key=settings.api_key, timeout=settings.timeout_s,
                             max_retries=1)

    def paraphrase(self, text: str, seed: int = 0) -> str:
        resp = self.client.chat.completions.create(
            model=self.settings.model, temperature=0.7, seed=seed, max_tokens=256,
            messages=[{"role": "system", "content": self.settings.instruction}, {"role": "user", "content": text}])
        out = (resp.choices[0].message.content or "").strip()
        if not out:
            raise RuntimeError("the paraphrase model returned an empty answer")
        return out

    def variants(self, train: Sequence[PromptRecord], heldout: Sequence[PromptRecord], seed: int,
                 near_dup_jaccard: float = 0.8) -> list[PromptRecord]:
        rng = random.Random(seed)
        real = [p for p in train if not p.synthetic]
        picked = rng.sample(real, min(len(real), self.settings.max_prompts))
        guard = _HeldoutGuard(heldout, train, near_dup_jaccard)
        out = []
        for i, p in enumerate(picked):
            new = self.paraphrase(_last_user(p), seed=seed + i)
            msgs = _with_user_text(p, new)
            if guard.ok(msgs, p.request_kwargs):
                out.append(replace(p, prompt_id=f"s{prompt_key(msgs, dict(p.request_kwargs))}", messages=msgs,
                                   origin="paraphrase", synthetic=True, parent_id=p.prompt_id, split="train",
                                   n_seen=0, source_interactions=()))
        return out


__all__ = ["SynthSettings", "slot_fill_variants", "ParaphraseSettings", "Paraphraser", "entity_lexicon",
           "near_duplicate_groups"]
