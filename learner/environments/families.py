"""Task families discovered from traffic.

Two passes:

1. **Structure.** An application that sets its own system prompt, declares tools or asks for a
   response_format has told us where one task ends and the next begins. Trajectories are grouped by
   (tenant, system-prompt template, tool names, response_format shape). Numbers in system prompts
   are masked so a date or a counter injected per request does not split a family.
2. **Embeddings**, only inside groups that carry no such structure (bare user messages, or a
   system prompt on ``generic_system_prompts``): the last user message, numbers and quoted strings
   masked, is embedded once per unique template; templates are clustered by leader clustering in
   first-seen order (a template joins the most similar cluster centroid at cosine >= ``threshold``,
   else starts one), and clusters smaller than ``min_family_size`` trajectories are folded into
   their nearest large cluster. First-seen order makes the result deterministic for a log and
   stable when traffic is appended: earlier templates never change cluster.

Family ids hash the structural key and, for embedding clusters, the cluster's leader (its earliest
template): the same id across rebuilds while the traffic that defined it exists.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from learner.environments.embedding import Encoder, HashingEncoder
from learner.types import TaskFamily, Trajectory, stable_hash

log = logging.getLogger(__name__)

_NUM = re.compile(r"(?<![A-Za-z])[-+]?\d+(?:[.,]\d+)*")
_QUOTED = re.compile(r"\"[^\"\n]{1,200}\"|'[^'\n]{1,200}'")
_WS = re.compile(r"\s+")
STOPWORDS = frozenset(
    "a an the of to in on for and or is are was be with as at by it this that what which who how do does "
    "you your me my i we our please can could would should will from into about than then so if not no yes "
    "reply answer only just one word give tell name".split())


def template(text: str) -> str:
    """Lower-cased text with numbers and quoted strings masked and whitespace collapsed."""
    t = _QUOTED.sub("<str>", text)
    t = _NUM.sub("<num>", t)
    return _WS.sub(" ", t).strip().lower()


def response_format_shape(rf: dict[str, Any] | None) -> str:
    if not rf:
        return ""
    kind = rf.get("type", "")
    if kind == "json_schema":
        js = rf.get("json_schema") or {}
        props = sorted(((js.get("schema") or {}).get("properties") or {}).keys())
        return f"json_schema:{js.get('name', '')}:{','.join(props)}"
    return str(kind)


def tool_names(tools: list[dict[str, Any]] | None) -> str:
    if not tools:
        return ""
    names = [(t.get("function") or {}).get("name") or t.get("name") or "?" for t in tools]
    return ",".join(sorted(names))


@dataclass(frozen=True)
class FamilySettings:
    """How families are found. ``threshold`` is a cosine on the encoder's space (0.5 separates
    unrelated tasks and keeps paraphrased templates together with all-MiniLM-L6-v2)."""

    threshold: float = 0.5
    min_family_size: int = 20
    max_embedded_templates: int = 3000
    generic_system_prompts: tuple[str, ...] = ("you are a helpful assistant.", "you are a helpful assistant")


@dataclass
class FamilyAssignment:
    families: dict[str, TaskFamily]
    family_of: dict[str, str]  # interaction_id -> family_id (tenant is in the family)


def _structural_key(t: Trajectory, settings: FamilySettings) -> tuple[str, str, str, str]:
    system = template(t.system_prompt)
    if system in settings.generic_system_prompts:
        system = ""
    return (t.tenant, system, tool_names(t.tools), response_format_shape(t.response_format))


def _keywords(texts: Sequence[str], k: int = 3) -> list[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update({w for w in re.findall(r"[a-z][a-z]+", text.lower()) if w not in STOPWORDS and w not in ("num", "str")})
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _label(key: tuple[str, str, str, str], texts: Sequence[str]) -> str:
    tenant, system, tools, rf = key
    parts = []
    if rf:
        parts.append(rf.rstrip(":"))
    if tools:
        parts.append(f"tools:{tools}")
    if system:
        words = system.split()
        parts.append("system: " + " ".join(words[:8]) + ("…" if len(words) > 8 else ""))
    kw = _keywords(texts)
    if kw:
        parts.append("about: " + ", ".join(kw))
    return f"[{tenant or '-'}] " + " · ".join(parts)


def _leader_clusters(vectors: np.ndarray, counts: np.ndarray, threshold: float) -> np.ndarray:
    """Leader clustering in row order against running (weighted) centroids."""
    assign = np.empty(len(vectors), dtype=np.int64)
    sums: list[np.ndarray] = []
    cents = np.zeros((0, vectors.shape[1]), dtype=np.float32)
    for i, v in enumerate(vectors):
        if len(sums):
            sims = cents @ v
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                assign[i] = j
                sums[j] = sums[j] + v * counts[i]
                n = np.linalg.norm(sums[j])
                cents[j] = sums[j] / (n if n else 1.0)
                continue
        assign[i] = len(sums)
        sums.append(v * counts[i])
        cents = np.vstack([cents, v[None, :]])
    return assign


def discover_families(trajectories: Sequence[Trajectory], encoder: Encoder | None = None,
                      settings: FamilySettings | None = None) -> FamilyAssignment:
    """Assign every trajectory to a family (see the module docstring). Input order does not matter."""
    s = settings or FamilySettings()
    encoder = encoder or HashingEncoder()
    trajs = sorted(trajectories, key=lambda t: (t.ts, t.event_id))
    groups: dict[tuple, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        groups[_structural_key(t, s)].append(t)

    families: dict[str, TaskFamily] = {}
    family_of: dict[str, str] = {}
    for key in sorted(groups, key=lambda k: (groups[k][0].ts, groups[k][0].event_id)):
        members = groups[key]
        tenant, system, tools, rf = key
        if system or tools or rf:
            fid = "f" + stable_hash("structural", key, length=10)
            families[fid] = TaskFamily(fid, _label(key, [template(t.last_user_text) for t in members[:500]]),
                                       tenant, {"system": system, "tools": tools, "response_format": rf,
                                                "by": "structure"}, len(members))
            for t in members:
                family_of[t.interaction_id] = fid
            continue
        for fid, fam, ids in _cluster_group(key, members, encoder, s):
            families[fid] = fam
            for iid in ids:
                family_of[iid] = fid
    return FamilyAssignment(families, family_of)


def _cluster_group(key, members: Sequence[Trajectory], encoder: Encoder, s: FamilySettings):
    tmpl_of = [template(t.last_user_text) for t in members]
    order: dict[str, int] = {}
    for tm in tmpl_of:  # first-seen order (members are time-ordered)
        order.setdefault(tm, len(order))
    uniq = list(order)
    counts = Counter(tmpl_of)
    embedded = uniq[: s.max_embedded_templates]
    vecs = encoder.encode(embedded)
    assign = _leader_clusters(vecs, np.array([counts[u] for u in embedded], dtype=np.float32), s.threshold)
    cluster_of = dict(zip(embedded, assign.tolist()))
    if len(uniq) > len(embedded):
        # Past the embedding budget: place each remaining template next to the embedded template it
        # is closest to in the cheap hashed space (consistent space on both sides).
        cheap = HashingEncoder()
        known = cheap.encode(embedded)
        rest = uniq[len(embedded):]
        for i in range(0, len(rest), 2048):
            chunk = rest[i:i + 2048]
            nearest = np.argmax(cheap.encode(chunk) @ known.T, axis=1)
            for tm, j in zip(chunk, nearest.tolist()):
                cluster_of[tm] = cluster_of[embedded[j]]
    sizes = Counter(cluster_of[tm] for tm in tmpl_of)
    big = [c for c in sorted(sizes) if sizes[c] >= s.min_family_size] or [max(sizes, key=lambda c: (sizes[c], -c))]
    # centroids of the big clusters, to fold small ones into
    emb_index = {u: i for i, u in enumerate(embedded)}
    cent = {}
    for c in big:
        rows = [emb_index[u] for u in embedded if cluster_of[u] == c]
        v = vecs[rows].sum(0)
        cent[c] = v / (np.linalg.norm(v) or 1.0)
    remap = {}
    for c in sizes:
        if c in cent:
            remap[c] = c
            continue
        rows = [emb_index[u] for u in embedded if cluster_of[u] == c]
        v = vecs[rows].sum(0) if rows else np.zeros(vecs.shape[1], dtype=np.float32)
        remap[c] = max(big, key=lambda b: (float(cent[b] @ v), -b))
    leader = {c: next(u for u in uniq if remap[cluster_of[u]] == c) for c in big}
    out = []
    for c in big:
        ids = [t.interaction_id for t, tm in zip(members, tmpl_of) if remap[cluster_of[tm]] == c]
        texts = [tm for tm in tmpl_of if remap[cluster_of[tm]] == c][:500]
        fid = "f" + stable_hash("cluster", key, leader[c], length=10)
        fam = TaskFamily(fid, _label(key, texts), key[0],
                         {"system": key[1], "tools": key[2], "response_format": key[3], "by": "embedding",
                          "encoder": encoder.name, "leader": leader[c]}, len(ids))
        out.append((fid, fam, ids))
    return out
