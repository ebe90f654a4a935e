"""Families, pools and variants without a warehouse: near-duplicates, the time split, leakage,
synthetic labelling, stable ids and determinism."""

import datetime as dt
import itertools

from learner.environments import EnvironmentSettings, build_environments
from learner.environments.embedding import HashingEncoder
from learner.environments.families import discover_families, template
from learner.environments.pools import build_pool, jaccard, near_duplicate_groups, prompt_text, shingles
from learner.environments.synth import slot_fill_variants
from learner.types import Trajectory

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def traj(i, user, system=None, kwargs=None, tenant="acme", history=()):
    msgs = ([{"role": "system", "content": system}] if system else []) + list(history) + [{"role": "user", "content": user}]
    return Trajectory(f"i{i}", f"e{i:06d}", T0 + dt.timedelta(minutes=i), tenant, "u", "", "demo", "", "/v1/chat/completions",
                      tuple(msgs), kwargs or {}, "ok")


def test_near_duplicates_are_rewordings_not_different_problems():
    texts = [
        "Please summarise the following meeting notes for the sales team in three short bullet points",
        "Please summarise the following meeting notes for the sales team in three short bullet points!",
        "please  summarise the following meeting notes for the sales team in three short bullet point",
        "What is 13 plus 4?",
        "What is 13 plus 5?",
    ]
    groups = near_duplicate_groups(texts)
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3


def test_time_split_keeps_near_duplicate_groups_on_one_side():
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(400)]
    distinct = [" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(200)]
    trajs = []
    for i in range(200):
        user = distinct[i]
        if i >= 160 and i % 4 == 0:
            # after the split: a rewording (one word changed) of a prompt first seen in the train period
            words = distinct[i - 150].split()
            words[7] = "changed"
            user = " ".join(words)
        trajs.append(traj(i, user))
    split = trajs[159].ts
    train, heldout = build_pool("f", trajs, split)
    assert len(heldout) == 30  # 40 prompts after the split, 10 of them rewordings of train prompts
    assert all(p.first_seen > split for p in heldout)
    train_sh = [shingles(prompt_text(p.messages)) for p in train]
    for h in heldout:
        hs = shingles(prompt_text(h.messages))
        assert max(jaccard(hs, t) for t in train_sh) < 0.8, h.messages
    reworded = [p for p in train if p.first_seen > split]
    assert len(reworded) == 10 and all(p.near_dup_group != p.prompt_id for p in reworded)
    assert {p.near_dup_group for p in train}.isdisjoint({p.near_dup_group for p in heldout})


def test_duplicates_collapse_and_multi_turn_replays_as_prefix():
    history = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    trajs = [traj(i, "And of Spain?", history=history) for i in range(3)] + [traj(3, "Capital of France?")]
    train, heldout = build_pool("f", trajs, T0 + dt.timedelta(days=1))
    assert len(train) == 2 and not heldout
    multi = next(p for p in train if len(p.messages) == 3)
    assert multi.n_seen == 3 and multi.to_request()["messages"][-1] == {"role": "user", "content": "And of Spain?"}
    assert multi.to_request()["messages"][:2] == history


def test_families_by_structure_and_by_embedding_with_stable_ids():
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object", "properties": {"a": {}}}}}
    trajs = []
    for i in range(240):
        k = i % 3
        if k == 0:
            trajs.append(traj(i, f"Capital of country {i}?", system="You are a quiz bot. Reply with one word."))
        elif k == 1:
            trajs.append(traj(i, f"Person {i} lives in Oslo.", system="Extract.", kwargs={"response_format": rf}))
        else:
            trajs.append(traj(i, f"What is {i} plus {i + 1}?" if i % 2 else f"Translate the word '{i}' into French please"))
    a = discover_families(trajs, HashingEncoder())
    fam_of_kind = {k: {a.family_of[t.interaction_id] for t in trajs[k::3]} for k in range(3)}
    assert len(fam_of_kind[0]) == 1 and len(fam_of_kind[1]) == 1
    assert len(fam_of_kind[2]) == 2  # bare prompts: two clusters (arithmetic, translation)
    labels = {a.families[f].label for f in itertools.chain(*fam_of_kind.values())}
    assert any("json_schema:person" in lab for lab in labels) and any("quiz bot" in lab for lab in labels)
    # appending later traffic keeps every id (the leader is the earliest template)
    # (early enough that each cluster already has min_family_size=20 members; smaller ones fold into a neighbour)
    early = discover_families(trajs[:150], HashingEncoder())
    assert set(early.families) <= set(a.families)
    assert all(early.family_of[t.interaction_id] == a.family_of[t.interaction_id] for t in trajs[:150])
    # tenants apart: the same traffic under another tenant is another family
    other = discover_families([traj(i + 1000, t.last_user_text, t.system_prompt or None, dict(t.request_kwargs), tenant="globex")
                               for i, t in enumerate(trajs)], HashingEncoder())
    assert set(other.families).isdisjoint(a.families)


def test_template_masks_numbers_and_quotes():
    assert template("What is  12 plus 3.5?") == "what is <num> plus <num>?"
    assert template("Translate 'hello' now") == "translate <str> now"


def test_slot_fill_variants_are_synthetic_train_only_and_never_copy_heldout():
    trajs = [traj(i, f"What is {i % 9 + 1} plus {i % 7 + 1}?") for i in range(100)]
    train, heldout = build_pool("f", trajs, trajs[79].ts)
    variants = slot_fill_variants(train, heldout, seed=1)
    assert variants
    held_texts = {prompt_text(p.messages) for p in heldout}
    train_ids = {p.prompt_id for p in train}
    for v in variants:
        assert v.synthetic and v.origin == "slot_fill" and v.split == "train" and v.parent_id in train_ids
        assert prompt_text(v.messages) not in held_texts
    assert slot_fill_variants(train, heldout, seed=1) == variants  # deterministic for a seed


def test_build_is_deterministic_and_heldout_has_no_synthetic():
    trajs = [traj(i, f"Person {['Ann', 'Bo', 'Cy', 'Di'][i % 4]} is {20 + i % 50} years old and lives in "
                     f"{['Oslo', 'Lima', 'Rome'][i % 3]}.", system="Extract the person.") for i in range(300)]
    s = EnvironmentSettings(seed=7)
    a = build_environments(trajs, s, HashingEncoder())
    b = build_environments(list(reversed(trajs)), s, HashingEncoder())
    assert a.manifest == b.manifest and a.build_id == b.build_id
    for env in a.environments.values():
        assert env.heldout and not any(p.synthetic for p in env.heldout)
        assert any(p.synthetic for p in env.train)
    c = build_environments(trajs, EnvironmentSettings(seed=8), HashingEncoder())
    assert c.build_id != a.build_id  # the seed changes the variants, hence the version
