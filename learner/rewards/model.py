"""A reward model learned from thumbs / scores / outcomes on (prompt, response): cheap features,
optionally sentence embeddings, a logistic regression, Platt-calibrated.

Features (all computed per pair in microseconds, no model):
- shape of the answer: length, words, lines, one word, number only, empty, ends with punctuation;
- format: parses as JSON, contains a JSON object, matches the request's JSON Schema, share of the
  schema's required keys present; tool calls present;
- grounding: share of the prompt's numbers / capitalised words the answer repeats, share of the
  answer's numbers that come from the prompt; hedging and refusal phrases;
- hashed response word uni/bigrams, and hashed (prompt word x response word) pairs, which let a
  linear model learn associations such as "France" -> "Paris" from enough judgements.
With an ``encoder`` the response embedding and the prompt-response cosine are appended.

Calibration: decision values from 3-fold cross-fitting on the training data are mapped to
probabilities by a 1-D logistic fit (Platt), so a score of 0.8 means about 80% of people approve.

Why not a scalar head on the policy: on these 2 CPU cores a forward pass of SmolLM2-135M over 20k
judged pairs costs minutes per rebuild, and the trainer owns that model; the head is left to the
trainer issue (see the report) and this model is what validation compares against.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any, Sequence

import numpy as np

from learner.rewards.base import Completion, PromptLike, Reward, RewardError
from learner.rewards.verifiers import REFUSAL, json_schema_of
from learner.types import Trajectory

DIM = 1 << 15
N_DENSE = 24
_TOK = re.compile(r"[a-z0-9]+")
_NUMS = re.compile(r"-?\d+(?:\.\d+)?")
_CAPS = re.compile(r"\b[A-Z][a-z]+\b")
_HEDGE = re.compile(r"\b(maybe|might|perhaps|not sure|i think|i believe|probably)\b", re.I)
_STOP = frozenset("the a an of to in is are and or what which who how for on with as by at it this that be".split())


def _h(s: str) -> int:
    return N_DENSE + zlib.crc32(s.encode()) % (DIM - N_DENSE)


def _last_user(messages) -> str:
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return ""


def _dense(prompt: PromptLike, c: Completion, user: str, validator) -> list[float]:
    text = c.text or ""
    stripped = text.strip()
    words = stripped.split()
    parsed: Any = None
    parses = 0.0
    if stripped[:1] in "{[":
        try:
            parsed = json.loads(stripped)
            parses = 1.0
        except ValueError:
            pass
    has_obj = 1.0 if re.search(r"\{.*\}", text, re.S) else 0.0
    schema_ok = keys_share = 0.0
    if validator is not None and parsed is not None:
        schema_ok = 1.0 if validator.is_valid(parsed) else 0.0
        req = validator.schema.get("required") or []
        if req and isinstance(parsed, dict):
            keys_share = sum(k in parsed for k in req) / len(req)
    p_nums, r_nums = set(_NUMS.findall(user)), _NUMS.findall(text)
    p_caps = set(_CAPS.findall(user))
    low = text.lower()
    return [
        np.log1p(len(text)), np.log1p(len(words)), min(text.count("\n"), 20) / 10, parses, has_obj, schema_ok,
        keys_share, 1.0 if REFUSAL.search(text) else 0.0,
        (sum(n in p_nums for n in r_nums) / len(r_nums)) if r_nums else 0.0,
        (sum(n in text for n in p_nums) / len(p_nums)) if p_nums else 0.0,
        (sum(w.lower() in low for w in p_caps) / len(p_caps)) if p_caps else 0.0,
        1.0 if stripped[:1].isupper() else 0.0, 1.0 if stripped[-1:] in ".!?" else 0.0,
        1.0 if len(words) == 1 else 0.0, 1.0 if _NUMS.fullmatch(stripped or "x") else 0.0,
        1.0 if c.tool_calls else 0.0, 1.0 if not stripped else 0.0, 1.0 if _HEDGE.search(text) else 0.0,
        1.0 if not r_nums else 0.0, min(len(r_nums), 10) / 10,
    ]


def _sparse(user: str, text: str) -> list[int]:
    rt = _TOK.findall(text.lower())[:64]
    pt = [w for w in _TOK.findall(user.lower()) if w not in _STOP][:16]
    idx = [_h("r:" + w) for w in rt] + [_h("b:" + a + " " + b) for a, b in zip(rt, rt[1:])]
    first = list(dict.fromkeys(rt))[:12]
    idx += [_h("x:" + p + "|" + r) for p in pt for r in first]
    return idx


class _Featurizer:
    def __init__(self, encoder=None):
        self.encoder = encoder
        self._validators: dict[str, Any] = {}

    def _validator(self, prompt: PromptLike):
        schema = json_schema_of(prompt.request_kwargs.get("response_format"))
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        if key not in self._validators:
            import jsonschema

            cls = jsonschema.validators.validator_for(schema)
            self._validators[key] = cls(schema)
        return self._validators[key]

    def matrix(self, prompts: Sequence[PromptLike], completions: Sequence[Completion]):
        from scipy import sparse

        rows, cols, vals = [], [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            user = _last_user(p.messages)
            for j, v in enumerate(_dense(p, c, user, self._validator(p))):
                if v:
                    rows.append(i), cols.append(j), vals.append(float(v))
            sp = _sparse(user, c.text or "")
            rows.extend([i] * len(sp)), cols.extend(sp), vals.extend([1.0] * len(sp))
        x = sparse.csr_matrix((vals, (rows, cols)), shape=(len(prompts), DIM), dtype=np.float32)
        x.sum_duplicates()
        if self.encoder is None:
            return x
        texts = [c.text or "" for c in completions]
        users = [_last_user(p.messages) for p in prompts]
        er = self.encoder.encode(texts)
        eu = self.encoder.encode(users)
        cos = (er * eu).sum(1, keepdims=True)
        return sparse.hstack([x, sparse.csr_matrix(np.hstack([er, cos]).astype(np.float32))], format="csr")


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.asarray(a, dtype=np.float32).tobytes(), 6)).decode()


def _unpack(s: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), dtype=np.float32).astype(np.float64)


class LearnedRewardModel(Reward):
    """Logistic regression on the features above; ``score`` is the calibrated approval probability."""

    kind = "learned_rm"

    def __init__(self, family_id: str, coef: np.ndarray, intercept: float, platt: tuple[float, float],
                 encoder_name: str | None = None, encoder=None, name: str | None = None,
                 train_stats: dict[str, float] | None = None):
        super().__init__(family_id, name or ("learned_rm_emb" if encoder_name else "learned_rm"))
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.platt = (float(platt[0]), float(platt[1]))
        self.encoder_name = encoder_name
        self.train_stats = train_stats or {}
        if encoder_name and encoder is None:
            from learner.environments.embedding import default_encoder

            encoder = default_encoder("minilm" if encoder_name.startswith("all-MiniLM") else "hashing")
        self._feat = _Featurizer(encoder)

    @classmethod
    def fit(cls, family_id: str, trajectories: Sequence[Trajectory], C: float = 1.0, encoder=None,
            seed: int = 0) -> "LearnedRewardModel":
        """Fit on judged trajectories (and corrections as approved answers). Raises RewardError when
        there are too few judgements of either kind to learn anything."""
        from sklearn.linear_model import LogisticRegression

        prompts, comps, y = [], [], []
        for t in trajectories:
            lab = t.label()
            if lab is not None and lab != 0.5:
                prompts.append(t), comps.append(Completion.of(t)), y.append(lab > 0.5)
            for corr in t.corrections():
                prompts.append(t), comps.append(Completion(corr)), y.append(True)
        y_arr = np.array(y, dtype=bool)
        if y_arr.sum() < 10 or (~y_arr).sum() < 10:
            raise RewardError(f"{family_id}: {int(y_arr.sum())} approved / {int((~y_arr).sum())} rejected answers; "
                              "a reward model needs at least 10 of each")
        feat = _Featurizer(encoder)
        x = feat.matrix(prompts, comps)
        # Platt calibration on out-of-fold decision values (3 folds in order; data is time-ordered).
        folds = np.arange(len(y_arr)) % 3
        oof = np.zeros(len(y_arr))
        for k in range(3):
            tr, te = folds != k, folds == k
            if y_arr[tr].all() or (~y_arr[tr]).all():
                continue
            m = LogisticRegression(C=C, solver="liblinear", dual=True, max_iter=1000, random_state=seed).fit(x[tr], y_arr[tr])
            oof[te] = m.decision_function(x[te])
        platt_model = LogisticRegression(C=1e4, solver="lbfgs").fit(oof[:, None], y_arr)
        full = LogisticRegression(C=C, solver="liblinear", dual=True, max_iter=1000, random_state=seed).fit(x, y_arr)
        coef = full.coef_[0]
        return cls(family_id, coef, float(full.intercept_[0]),
                   (float(platt_model.coef_[0][0]), float(platt_model.intercept_[0])),
                   getattr(encoder, "name", None), encoder,
                   train_stats={"n": int(len(y_arr)), "n_pos": int(y_arr.sum())})

    def score_many(self, prompts, completions) -> list[float | None]:
        if not prompts:
            return []
        x = self._feat.matrix(prompts, completions)
        if x.shape[1] != len(self.coef):
            raise RewardError(f"{self.name}: feature width {x.shape[1]} != model width {len(self.coef)} "
                              "(the encoder differs from the one it was trained with)")
        z = x @ self.coef + self.intercept
        a, b = self.platt
        return (1 / (1 + np.exp(-(a * z + b)))).tolist()

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        return self.score_many([prompt], [completion])[0]

    def params(self) -> dict[str, Any]:
        return {"coef": _pack(self.coef), "intercept": round(self.intercept, 6),
                "platt": [round(self.platt[0], 6), round(self.platt[1], 6)], "encoder": self.encoder_name,
                "dim": int(len(self.coef)), "train": self.train_stats}

    @classmethod
    def from_params(cls, family_id: str, name: str, params: dict[str, Any]) -> "LearnedRewardModel":
        return cls(family_id, _unpack(params["coef"]), params["intercept"], tuple(params["platt"]),
                   params.get("encoder"), name=name, train_stats=params.get("train"))
