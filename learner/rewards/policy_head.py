"""A scalar head on the policy model itself: the classic RLHF reward model, in its cheapest form.

The policy (any transformers causal LM directory: the served base model, e.g. SmolLM2 or the tiny
demo model) reads the conversation plus the answer; its final hidden state at the last token is
the representation, and a logistic-regression head on it (standardised, Platt-calibrated like
``LearnedRewardModel``) predicts approval. The backbone stays frozen: on 2 CPU cores fine-tuning it
per rebuild is out of budget, and a frozen probe is what tells us whether the policy's own features
know more about approval than cheap text features do. ``build`` fits both and keeps whichever
validates better.

torch and transformers are imported only when this reward is fitted or scores.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from learner.rewards.base import Completion, PromptLike, Reward, RewardError
from learner.rewards.model import _pack, _unpack
from learner.types import Trajectory

_MODELS: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def _load(path: str):
    with _LOCK:
        if path not in _MODELS:
            import torch  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
            _MODELS[path] = (tok, model)
        return _MODELS[path]


def _render(tok, messages: Sequence[dict], answer: str) -> str:
    convo = [dict(m) for m in messages] + [{"role": "assistant", "content": answer}]
    if getattr(tok, "chat_template", None):
        try:
            return tok.apply_chat_template(convo, tokenize=False)
        except Exception:
            pass  # a template that rejects some roles: fall back to plain text below
    return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in convo)


def policy_features(path: str, prompts: Sequence[PromptLike], completions: Sequence[Completion],
                    batch_size: int = 32, max_length: int = 256) -> np.ndarray:
    """Final-layer hidden state at the last real token of each (prompt, answer)."""
    import torch

    tok, model = _load(path)
    texts = [_render(tok, p.messages, c.text or "") for p, c in zip(prompts, completions)]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            # keep the end of long conversations: the answer is what is being judged
            tok.truncation_side = "left"
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            last = enc["attention_mask"].sum(1) - 1
            out.append(hidden[torch.arange(hidden.shape[0]), last].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)


class PolicyHeadRewardModel(Reward):
    kind = "policy_head"

    def __init__(self, family_id: str, model_path: str, coef: np.ndarray, intercept: float, mean: np.ndarray,
                 scale: np.ndarray, platt: tuple[float, float], name: str | None = None,
                 train_stats: dict[str, float] | None = None):
        super().__init__(family_id, name or "policy_head")
        self.model_path = model_path
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.platt = (float(platt[0]), float(platt[1]))
        self.train_stats = train_stats or {}

    @classmethod
    def fit(cls, family_id: str, trajectories: Sequence[Trajectory], model_path: str, C: float = 0.1,
            max_pairs: int = 4000, seed: int = 0) -> "PolicyHeadRewardModel":
        from sklearn.linear_model import LogisticRegression

        judged = [t for t in trajectories if t.label() is not None and t.label() != 0.5]
        if len(judged) > max_pairs:  # the newest judgements: the policy drifts, old ones say less
            judged = judged[-max_pairs:]
        y = np.array([t.label() > 0.5 for t in judged])
        if y.sum() < 10 or (~y).sum() < 10:
            raise RewardError(f"{family_id}: {int(y.sum())} approved / {int((~y).sum())} rejected answers; "
                              "a policy head needs at least 10 of each")
        x = policy_features(model_path, judged, [Completion.of(t) for t in judged])
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / scale
        folds = np.arange(len(y)) % 3
        oof = np.zeros(len(y))
        for k in range(3):
            tr, te = folds != k, folds == k
            if y[tr].all() or (~y[tr]).all():
                continue
            oof[te] = LogisticRegression(C=C, max_iter=2000).fit(z[tr], y[tr]).decision_function(z[te])
        platt = LogisticRegression(C=1e4).fit(oof[:, None], y)
        head = LogisticRegression(C=C, max_iter=2000).fit(z, y)
        return cls(family_id, model_path, head.coef_[0], float(head.intercept_[0]), mean, scale,
                   (float(platt.coef_[0][0]), float(platt.intercept_[0])),
                   train_stats={"n": int(len(y)), "n_pos": int(y.sum())})

    def score_many(self, prompts, completions) -> list[float | None]:
        if not prompts:
            return []
        x = policy_features(self.model_path, prompts, completions)
        if x.shape[1] != len(self.coef):
            raise RewardError(f"{self.name}: the model at {self.model_path} has width {x.shape[1]}, "
                              f"the head was trained for {len(self.coef)}")
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        a, b = self.platt
        return (1 / (1 + np.exp(-(a * z + b)))).tolist()

    def score(self, prompt: PromptLike, completion: Completion) -> float | None:
        return self.score_many([prompt], [completion])[0]

    def params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "coef": _pack(self.coef), "intercept": round(self.intercept, 6),
                "mean": _pack(self.mean), "scale": _pack(self.scale),
                "platt": [round(self.platt[0], 6), round(self.platt[1], 6)], "train": self.train_stats}

    @classmethod
    def from_params(cls, family_id: str, name: str, params: dict[str, Any]) -> "PolicyHeadRewardModel":
        return cls(family_id, params["model_path"], _unpack(params["coef"]), params["intercept"],
                   _unpack(params["mean"]), _unpack(params["scale"]), tuple(params["platt"]), name,
                   params.get("train"))
