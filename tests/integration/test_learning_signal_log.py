"""The learner's signal log over a real warehouse: counts judged trajectories, reloads only on new data."""

from learner.loop import WarehouseSignalLog
from streams.events import FeedbackEvent, InteractionEvent


def _interaction(i: int) -> InteractionEvent:
    return InteractionEvent(interaction_id=f"i{i}", endpoint="/v1/chat/completions", public_model="m",
                            request={"messages": [{"role": "user", "content": f"What is {i} + 1?"}]},
                            response={"choices": [{"index": 0, "message": {"role": "assistant", "content": str(i + 1)},
                                                   "finish_reason": "stop"}]})


def test_end_counts_judged_trajectories_and_skips_reloads_when_nothing_landed(warehouse, monkeypatch):
    warehouse.insert_events([(_interaction(i), ("i", 0, i)) for i in range(6)])
    warehouse.insert_events([(FeedbackEvent(interaction_id=f"i{i}", kind="thumbs", value=1), ("f", 0, i)) for i in range(3)])
    log = WarehouseSignalLog(warehouse)
    assert log.end() == 3
    loads = []
    real_load = log._load
    monkeypatch.setattr(log, "_load", lambda: loads.append(1) or real_load())
    assert log.end() == 3 and loads == []  # nothing new: no rebuild
    warehouse.insert_events([(FeedbackEvent(interaction_id="i4", kind="thumbs", value=-1), ("f", 0, 9))])
    assert log.end() == 4 and loads == [1]
