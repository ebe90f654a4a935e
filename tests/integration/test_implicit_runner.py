"""Implicit feedback is mined continuously and lands once, however often a window is mined."""

import datetime as dt
import threading
import uuid

import orjson

from streams.events import InteractionEvent
from streams.implicit_runner import ImplicitMiner
from streams.producer import EventProducer
from streams.settings import ProducerSettings, SinkSettings
from streams.sink import Sink

from .helpers import wait_until


def test_regenerate_and_abandon_become_implicit_feedback_once(kafka, warehouse, unique_group, tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    episode = f"ep-{uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": "What is 2 + 9?"}]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "10"}, "finish_reason": "stop"}]}
    first = InteractionEvent(ts=now - dt.timedelta(seconds=60), interaction_id=f"{episode}-1", episode_id=episode,
                             endpoint="/v1/chat/completions", public_model="m", request={"messages": messages},
                             response=answer)
    again = InteractionEvent(ts=now - dt.timedelta(seconds=50), interaction_id=f"{episode}-2", episode_id=episode,
                             endpoint="/v1/chat/completions", public_model="m", request={"messages": messages},
                             response=answer)
    dropped = InteractionEvent(ts=now - dt.timedelta(seconds=40), interaction_id=f"{episode}-3",
                               endpoint="/v1/chat/completions", public_model="m", request={"messages": messages},
                               stream=True, abandoned=True, http_status=200)
    warehouse.insert_events([(e, ("i", 0, i)) for i, e in enumerate([first, again, dropped])])
    producer = EventProducer(kafka, ProducerSettings(spool_dir=tmp_path / "spool"))
    stop = threading.Event()
    sink = Sink(kafka, warehouse, SinkSettings(group_id=unique_group, batch_max_wait_s=0.2), stop=stop)
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    try:
        miner = ImplicitMiner(warehouse, producer, settle_s=0)
        assert miner.mine_once() >= 2
        fresh = ImplicitMiner(warehouse, producer, settle_s=0)  # a restarted sink mines the same window again
        fresh.mine_once()
        assert producer.flush(60)

        def rows():
            return warehouse.query_dicts(
                "SELECT interaction_id, kind, value, source, weight FROM {db}.feedback FINAL "
                "WHERE interaction_id LIKE %(p)s ORDER BY interaction_id", {"p": f"{episode}-%"})

        wait_until(lambda: len(rows()) >= 2, 60, "implicit feedback to land")
        got = {(r["interaction_id"], r["kind"]): r for r in rows()}
        assert got[(first.interaction_id, "thumbs")]["value"] == -1
        assert got[(dropped.interaction_id, "outcome")]["value"] == 0
        assert all(r["source"] == "implicit" and r["weight"] < 1 for r in got.values())
        assert len(rows()) == len(got)  # mined twice, landed once
    finally:
        stop.set()
        thread.join(30)
        producer.close()
