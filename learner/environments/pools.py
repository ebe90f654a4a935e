"""Replayable prompt pools: deduplicated, grouped into near-duplicates, split train/held-out by time.

- A prompt is its messages (the conversation prefix up to the assistant turn that was answered:
  multi-turn episodes replay as their prefix) plus the request fields that change what a good
  answer is (tools, response_format, max_tokens, ...). Identical prompts collapse into one record
  that remembers when it was first seen and how often.
- **Near-duplicates** (the same question with a word changed, different spacing or case) are found
  with MinHash over word uni+bigrams and LSH banding; a candidate pair joins a group only if its
  exact Jaccard similarity is >= ``near_dup_jaccard``. Word shingles, not characters, on purpose:
  "What is 13 plus 4?" and "What is 13 plus 5?" are different problems, not near-duplicates.
- **Split by time, per near-duplicate group**: a group is held out only if it was first seen
  after ``split_time``. So a later rewording of a training prompt lands in train, and nothing in
  a held-out pool has a near-duplicate in the train pool.
"""

from __future__ import annotations

import datetime as dt
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from learner.types import PromptRecord, Trajectory, messages_key, stable_hash

_TOKEN = re.compile(r"[a-z0-9]+")


def prompt_text(messages: Sequence[dict]) -> str:
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return "\n".join(parts)


def prompt_key(messages: Sequence[dict], request_kwargs: dict) -> str:
    """Identity of a replayable prompt, independent of the family it was put in."""
    return stable_hash(messages_key(messages), {k: request_kwargs[k] for k in sorted(request_kwargs)}, length=20)


def shingles(text: str) -> set[str]:
    words = _TOKEN.findall(text.lower())
    return set(words) | {a + " " + b for a, b in zip(words, words[1:])}


class MinHashLSH:
    """MinHash signatures (``bands`` x ``rows`` hashes) with LSH buckets; deterministic (crc32 +
    fixed-seed permutations), so the same prompts always make the same groups."""

    def __init__(self, bands: int = 8, rows: int = 4, seed: int = 7):
        self.bands, self.rows = bands, rows
        rng = np.random.default_rng(seed)
        n = bands * rows
        # multiply-shift hashing: (a*x + b) mod 2^64, top 32 bits; a odd. uint64 arrays wrap silently.
        self.a = rng.integers(0, 1 << 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=n, dtype=np.uint64)

    def signature(self, sh: set[str]) -> np.ndarray:
        if not sh:
            return np.zeros(self.bands * self.rows, dtype=np.uint64)
        x = np.fromiter((zlib.crc32(s.encode()) for s in sh), dtype=np.uint64, count=len(sh))
        h = (self.a[:, None] * x[None, :] + self.b[:, None]) >> np.uint64(32)
        return h.min(axis=1)

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [bytes([i]) + sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index (earlier prompt) stays the root
            if rj < ri:
                ri, rj = rj, ri
            self.parent[rj] = ri


def near_duplicate_groups(texts: Sequence[str], threshold: float = 0.8, lsh: MinHashLSH | None = None) -> list[int]:
    """For each text (in the caller's order, earliest first), the index of its group's first member."""
    lsh = lsh or MinHashLSH()
    sh = [shingles(t) for t in texts]
    uf = _UnionFind(len(texts))
    exact: dict[frozenset, int] = {}
    buckets: dict[bytes, int] = {}
    for i, s in enumerate(sh):
        fs = frozenset(s)
        if fs in exact:  # same words in the same pairs: a near-duplicate by definition
            uf.union(exact[fs], i)
            continue
        exact[fs] = i
        for key in lsh.band_keys(lsh.signature(s)):
            j = buckets.setdefault(key, i)
            # Compare with the bucket's first member only: linear in the number of prompts even when
            # a template fills a bucket, at the cost of missing a few chains (kept conservative by
            # the Jaccard check).
            if j != i and jaccard(sh[j], s) >= threshold:
                uf.union(j, i)
    return [uf.find(i) for i in range(len(texts))]


@dataclass(frozen=True)
class PoolSettings:
    near_dup_jaccard: float = 0.8
    max_source_interactions: int = 20


def build_pool(family_id: str, trajectories: Iterable[Trajectory], split_time: dt.datetime,
               settings: PoolSettings | None = None) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Deduplicated train and held-out prompt records of one family (real prompts only)."""
    s = settings or PoolSettings()
    by_key: dict[str, list[Trajectory]] = defaultdict(list)
    for t in sorted(trajectories, key=lambda t: (t.ts, t.event_id)):
        by_key[prompt_key(t.messages, dict(t.request_kwargs))].append(t)
    keys = sorted(by_key, key=lambda k: (by_key[k][0].ts, by_key[k][0].event_id))
    texts = [prompt_text(by_key[k][0].messages) for k in keys]
    roots = near_duplicate_groups(texts, s.near_dup_jaccard)
    group_first = {}
    for k, r in zip(keys, roots):
        group_first.setdefault(r, by_key[k][0].ts)  # keys are time-ordered: the first member is earliest
    train, heldout = [], []
    for k, r in zip(keys, roots):
        ts = by_key[k]
        first = ts[0]
        split = "heldout" if group_first[r] > split_time else "train"
        rec = PromptRecord(
            prompt_id=f"p{k}", family_id=family_id, messages=tuple(first.messages),
            request_kwargs=dict(first.request_kwargs), first_seen=first.ts, split=split,
            near_dup_group=f"p{keys[r]}", n_seen=len(ts),
            source_interactions=tuple(t.interaction_id for t in ts[: s.max_source_interactions]))
        (heldout if split == "heldout" else train).append(rec)
    return train, heldout
