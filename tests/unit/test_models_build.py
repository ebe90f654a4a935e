"""Offline models: the demo task contract, the tiny model's reproducible build, the checksum cache."""

from __future__ import annotations

import random

import pytest

from learner.demo_tasks import DEMO_FAMILIES, ArithmeticTask, FormatTask
from learner.models import cache


@pytest.mark.parametrize("family_cls", DEMO_FAMILIES)
def test_demo_families_follow_the_task_plugin_contract(family_cls):
    family = family_cls()
    assert isinstance(family.name, str) and family.name
    requests = family.requests(random.Random(0), 50)
    assert len(requests) == 50 and requests == family.requests(random.Random(0), 50)
    rng = random.Random(1)
    for request in requests:
        assert "model" not in request and request["messages"][-1]["role"] == "user" and request["max_tokens"] > 0
        for text in ("", "4", "I like red.", '{"name": "cat", "legs": 4}', family.synthetic_answer(request, rng)):
            assert 0.0 <= family.score(request, text) <= 1.0
            for body in family.feedback(request, text, rng):
                assert body["kind"] in {"thumbs", "score", "outcome", "comment", "correction"}


def test_demo_scores_check_the_answer_not_just_the_format():
    arithmetic, fmt = ArithmeticTask(), FormatTask()
    req = {"messages": [{"role": "user", "content": "What is 7 + 5? Reply with the number only."}]}
    assert arithmetic.score(req, "12") == 1.0 and arithmetic.score(req, " 12.") == 1.0
    assert arithmetic.score(req, "2") == 0.0 and arithmetic.score(req, "The answer is 12.") == 0.0
    word = {"messages": [{"role": "user", "content": "Name a color. Reply with one word."}]}
    assert fmt.score(word, "red") == 1.0 and fmt.score(word, "cat") == 0.0 and fmt.score(word, "I like red.") == 0.0
    js = {"messages": [{"role": "user", "content": 'Describe a spider as JSON with keys "name" and "legs".'}]}
    assert fmt.score(js, '{"name": "spider", "legs": 8}') == 1.0
    assert fmt.score(js, '{"name": "spider"}') == 0.0 and fmt.score(js, '{"name": "spider", "legs": 6}') == 0.0


def test_synthetic_answers_are_partly_right_so_the_tiny_model_has_room_to_learn():
    rng = random.Random(0)
    for family in (ArithmeticTask(), FormatTask()):
        requests = family.requests(rng, 2000)
        rate = sum(family.score(r, family.synthetic_answer(r, rng)) for r in requests) / len(requests)
        assert 0.2 < rate < 0.8, (family.name, rate)


def test_tiny_model_build_is_bit_for_bit_reproducible(tmp_path):
    """Two builds at a small size give identical files (the full build differs only in sizes)."""
    pytest.importorskip("torch")
    from learner.models import tiny

    config = tiny.TinyConfig(examples=400, tokenizer_examples=200, steps=8, batch_size=16)
    digests = []
    for i in range(2):
        out = tmp_path / f"b{i}"
        out.mkdir()
        tiny.build(out, config, progress=False)
        digests.append(cache.write_checksums(out))
    assert digests[0] == digests[1]
    assert {"model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"} <= set(digests[0])


def test_tiny_model_chat_template_matches_the_training_format(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from learner.models import tiny

    out = tmp_path / "t"
    out.mkdir()
    tiny.build(out, tiny.TinyConfig(examples=200, tokenizer_examples=200, steps=1, batch_size=4), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is 1 + 2? Reply with the number only."}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == tiny.render(messages)
    assert tokenizer.decode(tokenizer.encode("héllo {json} 12")) == "héllo {json} 12"  # byte-level: any text round-trips


def test_cache_checksums_detect_a_changed_file(tmp_path):
    build = tmp_path / "m"
    staging = cache.staging_dir(build)
    (staging / "weights.bin").write_bytes(b"abc")
    cache.commit(staging, build)
    assert cache.is_complete(build) and cache.verify(build) == {"weights.bin": cache.sha256_file(build / "weights.bin")}
    (build / "weights.bin").write_bytes(b"abd")
    with pytest.raises(cache.ChecksumMismatch, match="weights.bin"):
        cache.verify(build)


def test_cache_commit_keeps_an_existing_complete_build(tmp_path):
    build = tmp_path / "m"
    first = cache.staging_dir(build)
    (first / "f").write_text("1")
    cache.commit(first, build)
    second = cache.staging_dir(build)
    (second / "f").write_text("1")
    cache.commit(second, build)  # a concurrent identical build: the first one stays, the second is dropped
    assert (build / "f").read_text() == "1" and not second.exists()
