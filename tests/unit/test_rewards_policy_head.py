"""The scalar head on the policy model: fitted on a (tiny, random, built here) causal LM, validated
like every reward, stored and reloaded, and kept only when it validates better than the cheap model."""

from __future__ import annotations

import datetime as dt

import pytest

from learner.rewards.base import Completion
from learner.types import FeedbackSignal, Trajectory
from tests.unit.learner_fixtures import CapitalsTask, JsonPersonTask, simulate


def _trajectories(n: int, seed: int) -> list[Trajectory]:
    """Simulated traffic as trajectories, without a warehouse (the join is tested elsewhere)."""
    events, _ = simulate(n, seed=seed, tasks=[CapitalsTask, JsonPersonTask])
    fb: dict[str, list[FeedbackSignal]] = {}
    for e, _ in events:
        if e.event_type == "feedback":
            corr = tuple(e.correction) if e.correction else None
            fb.setdefault(e.interaction_id, []).append(FeedbackSignal(e.kind, e.value, e.ts, correction=corr))
    out = []
    for e, _ in events:
        if e.event_type == "interaction":
            out.append(Trajectory(e.interaction_id, e.event_id, e.ts, "acme", e.user_id or "", "", "demo", "", e.endpoint,
                                  tuple(e.request["messages"]),
                                  {k: v for k, v in e.request.items() if k in ("response_format", "max_tokens")},
                                  e.response["choices"][0]["message"]["content"], feedback=tuple(fb.get(e.interaction_id, ()))))
    return out


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [m["content"] for t in _trajectories(300, 0) for m in t.messages] + [t.response_text for t in _trajectories(300, 0)]
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts + ["user: system: assistant:"], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny_policy")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_policy_head_fits_validates_and_round_trips(tiny_policy):
    from learner.rewards.policy_head import PolicyHeadRewardModel
    from learner.rewards.registry import load_reward
    from learner.rewards.validation import validate

    trajs = [t for t in _trajectories(1600, 3) if t.response_format]  # the JSON family
    split = trajs[int(len(trajs) * 0.75)].ts
    head = PolicyHeadRewardModel.fit("fjson", [t for t in trajs if t.ts <= split], tiny_policy, max_pairs=800)
    held = [t for t in trajs if t.ts > split]
    rep = validate(head, held)
    assert rep.auc is not None and rep.n >= 100  # validated like any reward; pass or fail is its own
    scores = head.score_many(held[:20], [Completion.of(t) for t in held[:20]])
    assert all(0.0 <= s <= 1.0 for s in scores)
    again = load_reward(head.kind, "fjson", head.name, head.params())
    assert again.score_many(held[:20], [Completion.of(t) for t in held[:20]]) == pytest.approx(scores, abs=1e-6)


def test_build_keeps_the_better_validating_reward_model(tiny_policy):
    from learner.rewards.build import EMBEDDING_MARGIN, RewardSettings, build_family_rewards
    from learner.types import TaskFamily

    trajs = [t for t in _trajectories(2400, 4) if not t.response_format]  # capitals
    split = trajs[int(len(trajs) * 0.75)].ts
    fam = TaskFamily("fcap", "capitals", "acme", {})
    fr = build_family_rewards(fam, "fcap-e1", trajs, split, RewardSettings(policy_head_model=tiny_policy,
                                                                         policy_head_max_pairs=600))
    status = {r.reward.name: r.status for r in fr.rows}
    cheap, head = fr.reports["learned_rm"], fr.reports["policy_head"]
    assert cheap.passed
    if head.passed and head.ci_low > cheap.ci_low + EMBEDDING_MARGIN:
        assert status == {**status, "policy_head": "active", "learned_rm": "logged"}
    else:
        assert status["learned_rm"] == "active" and status["policy_head"] in ("logged", "rejected")
    weights = {c.reward.name: c.weight for c in fr.combined.components}
    assert (weights["learned_rm"] > 0) != (weights["policy_head"] > 0)  # exactly one reward model carries weight
