"""Registry (immutable names, lineage, checksums, read-only files) and the gate (paired lower bound,
forgetting suite); a candidate that fails the gate is never routed."""

from __future__ import annotations

import os
import stat

import pytest

from learner.canary import CanaryController
from learner.gate import ForgettingTask, GateSettings, decide, evaluate, gate_prompts, record
from learner.registry import AdapterRegistry, Lineage, NotRoutable, RegistryError


class Events:
    def __init__(self):
        self.events = []

    def emit(self, e) -> bool:
        self.events.append(e)
        return True


@pytest.fixture
def adapters(tiny_model, make_adapter):
    return [make_adapter(tiny_model.path, seed, rank=4) for seed in (1, 2)]


def test_register_names_lineage_checksums(warehouse, tmp_path, adapters):
    reg = AdapterRegistry(warehouse, tmp_path / "store")
    lin = Lineage(base_model="onpolicy-tiny", data_window={"offsets": {"feedback:0": 10}}, env_versions=("f1-e1",),
                  reward_versions=("c1",), hyperparams={"lr": 1e-3}, metrics={"reward": 0.5})
    v1 = reg.register("demo", adapters[0], lin)
    assert (v1.name, v1.version, v1.status) == ("demo-v0001", 1, "candidate")
    assert v1.data_window == {"offsets": {"feedback:0": 10}} and v1.env_versions == ("f1-e1",)
    # the same bytes again (a retried round) -> the same version, not a new one
    assert reg.register("demo", adapters[0], lin).name == "demo-v0001"
    v2 = reg.register("demo", adapters[1], Lineage(parent="demo-v0001"))
    assert (v2.name, v2.parent) == ("demo-v0002", "demo-v0001")
    # files are read-only and checked against the recorded digest
    f = v1.path / "adapter_model.safetensors"
    assert not os.stat(f).st_mode & stat.S_IWUSR
    reg.verify_files("demo-v0001")
    f.chmod(0o644)
    with open(f, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\0\0\0\1")
    with pytest.raises(RegistryError, match="hash to"):
        reg.verify_files("demo-v0001")
    # a directory left by a crash with other bytes is not silently adopted under its name
    (tmp_path / "store" / "demo-v0003").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "store" / "demo-v0003" / name).write_bytes((v2.path / name).read_bytes()[:-1] + b"x")
    third = tmp_path / "third"
    third.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (third / name).write_bytes((adapters[1] / name).read_bytes() + (b" " if name.endswith(".json") else b""))
    with pytest.raises(RegistryError, match="immutable"):
        reg.register("demo", third, Lineage())


def test_gate_decisions_by_hand():
    s = GateSettings(n_boot=500)
    better = decide({"f": ([1.0] * 40 + [0.0] * 10, [1.0] * 20 + [0.0] * 30)}, {"base": ([1.0] * 50, [1.0] * 50)}, s)
    assert better.passed, better.reason
    assert better.heldout["f"]["gain"] == pytest.approx(0.4)
    same = decide({"f": ([1.0, 0.0] * 25, [1.0, 0.0] * 25)}, {}, s)
    assert not same.passed and "lower bound" in same.reason
    # better on held-out, but 3 points lost on a base skill (2 allowed)
    forgets = decide({"f": ([1.0] * 50, [0.0] * 50)}, {"base": ([1.0] * 97 + [0.0] * 3, [1.0] * 100)}, s)
    assert not forgets.passed and "forgets 3.0 points on base" in forgets.reason
    ok_forget = decide({"f": ([1.0] * 50, [0.0] * 50)}, {"base": ([1.0] * 98 + [0.0] * 2, [1.0] * 100)}, s)
    assert ok_forget.passed
    assert not decide({}, {}, s).passed  # nothing scored: nothing shows it is better


def test_gate_prompts_top_up_a_small_heldout_pool_with_train_prompts():
    from types import SimpleNamespace

    env = SimpleNamespace(heldout=["h1"], train=[f"t{i}" for i in range(10)])
    assert gate_prompts(env, 4) == (["h1", "t0", "t1", "t2"], "heldout (1) + train (3): too few held-out prompts")
    env = SimpleNamespace(heldout=[f"h{i}" for i in range(6)], train=["t0"])
    assert gate_prompts(env, 4) == (["h0", "h1", "h2", "h3"], "heldout")
    assert gate_prompts(SimpleNamespace(heldout=[], train=["t0", "t1"]), 4) == (
        ["t0", "t1"], "train (family has no held-out prompts)")


def test_the_forgetting_suite_uses_its_own_answerers():
    """make_loop_gate samples held-out answers but answers the forgetting suite greedily: evaluate
    must use the forgetting answerers for the suite and only there."""
    suite = [ForgettingTask("sums", ({"messages": [{"role": "user", "content": "1+1"}]},) * 10,
                            lambda r, t: float(t == "2"))]
    wrong, right = (lambda msgs: ["3"] * len(msgs)), (lambda msgs: ["2"] * len(msgs))
    same = evaluate(wrong, right, {}, {}, suite, GateSettings(n_boot=100))
    assert same.forgetting["sums"]["drop_points"] == 100.0
    own = evaluate(wrong, right, {}, {}, suite, GateSettings(n_boot=100), forgetting_answerers=(right, right))
    assert own.forgetting["sums"]["drop_points"] == 0.0


def test_candidate_failing_the_gate_is_never_routed(warehouse, tmp_path, adapters):
    reg = AdapterRegistry(warehouse, tmp_path / "store")
    cand = reg.register("demo", adapters[0], Lineage())
    result = decide({"f": ([0.0] * 30, [1.0] * 30)}, {}, GateSettings(n_boot=200))
    v = record(reg, cand.name, "", result)
    assert v.status == "gate_failed" and not v.routable
    evidence = reg.evaluations(cand.name)
    assert [e["stage"] for e in evidence] == ["gate"] and not evidence[0]["passed"]
    sink = Events()
    canary = CanaryController(sink, "demo", "onpolicy-tiny", cand.name, None, registry=reg)
    with pytest.raises(NotRoutable, match="gate_failed"):
        canary.start()
    assert sink.events == []  # no routing change was ever announced
    # the same path with a passing gate routes it
    good = reg.register("demo", adapters[1], Lineage())
    record(reg, good.name, "", decide({"f": ([1.0] * 30, [0.0] * 30)}, {}, GateSettings(n_boot=200)))
    CanaryController(sink, "demo", "onpolicy-tiny", good.name, None, registry=reg).start()
    assert sink.events[-1].action == "routing_changed"
    assert reg.get(good.name).status == "canary"
