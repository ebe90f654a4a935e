"""Every round's decision reaches the operator: the round log in the real (embedded) warehouse, read
back by ``onpolicy learner status``, the status page and the demo's ``[learning]`` lines."""

from __future__ import annotations

import datetime as dt
import time

from deploy.demo_cli import LearningWatcher
from deploy.status_page import collect, render
from learner.round_log import (FamilyPlan, Method, RoundRecord, RoundStatus, WarehouseRoundLog, read_rounds,
                               summarize)

SKIP_WHY = ("no validated reward: 4 approved / 37 rejected held-out answers (needs 15 / 15); 12 held-out correction "
            "pairs (needs 15); 61 corrections to fit from; thumb noise 11% [6%, 18%]")


def _skipped(round_: int) -> RoundRecord:
    plans = (FamilyPlan("f1", "[demo] capitals", (), SKIP_WHY + "; 61 of 8 corrections, 4 of 10 held-out corrections "
                        "needed to check a distilled adapter"),
             FamilyPlan("f2", "[demo] labels", (Method.SFT,), "80 corrections from 40 users to learn from", 80))
    return RoundRecord("demo", round_, RoundStatus.SKIPPED, (0, 600), summarize(plans[:1]), plans[:1])


def test_round_decisions_round_trip_through_the_warehouse(warehouse):
    warehouse.migrate()
    log = WarehouseRoundLog(warehouse)
    log.record(_skipped(1))
    trained = RoundRecord("demo", 2, RoundStatus.GATED, (600, 1200), "trained sft on [demo] labels; gate passed: ...",
                          (FamilyPlan("f2", "[demo] labels", (Method.GRPO, Method.SFT), "both", 80),), "demo-v0001",
                          {"steps": 40})
    log.record(trained)
    got = read_rounds(warehouse, "demo")
    assert [r.round for r in got] == [2, 1]  # newest first
    assert got[0].plans[0].methods == (Method.GRPO, Method.SFT) and got[0].adapter == "demo-v0001"
    assert got[1].status is RoundStatus.SKIPPED and "4 approved / 37 rejected" in got[1].plans[0].reason
    assert got[1].reason.startswith("nothing to train")
    # a resumed learner deciding round 2 again replaces it, never duplicates it
    log.record(RoundRecord("demo", 2, RoundStatus.GATE_FAILED, (600, 1200), "gate failed: forgets 3 points", (),
                           "demo-v0001"))
    again = read_rounds(warehouse, "demo")
    assert [(r.round, r.status) for r in again] == [(2, RoundStatus.GATE_FAILED), (1, RoundStatus.SKIPPED)]


def test_the_demo_prints_each_round_once_and_the_status_page_shows_why(warehouse, tmp_path):
    warehouse.migrate()
    watcher = LearningWatcher(warehouse, since=time.time() - 5)
    WarehouseRoundLog(warehouse).record(_skipped(1))
    lines = watcher.poll()
    text = "\n".join(lines)
    assert "[learning] round 1 skipped: nothing to train" in text
    assert "[learning]   [demo] capitals: not trained: no validated reward: 4 approved / 37 rejected" in text
    assert not [x for x in watcher.poll() if "round" in x]  # printed once
    page = render(collect(warehouse, home=tmp_path))
    assert "Learning rounds" in page and "4 approved / 37 rejected held-out answers" in page


def test_read_rounds_before_any_learner_migrated_is_empty(warehouse):
    assert read_rounds(warehouse) == []
    assert RoundRecord("demo", 1, RoundStatus.SKIPPED, (0, 1), "x").decided_at <= dt.datetime.now(dt.timezone.utc)
