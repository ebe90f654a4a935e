"""Implicit feedback (streams.implicit) mined from interactions in a real embedded warehouse:
regenerate -> thumbs -1, edit -> correction, abandonment -> outcome 0; all implicit, lower weight,
idempotent ids; nothing inferred across episodes or users."""

from __future__ import annotations

import datetime as dt

from streams.events import InteractionEvent
from streams.implicit import WEIGHTS, mine

T0 = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
Q = [{"role": "user", "content": "Capital of France?"}]


def ev(iid: str, seconds: float, messages, answer: str, *, episode: str | None = "ep1", user: str | None = "u1",
       abandoned: bool = False) -> InteractionEvent:
    return InteractionEvent(
        interaction_id=iid, ts=T0 + dt.timedelta(seconds=seconds), endpoint="/v1/chat/completions", public_model="m",
        request={"model": "m", "messages": messages},
        response={"choices": [{"message": {"role": "assistant", "content": answer}}]}, episode_id=episode, user_id=user,
        tenant="acme", abandoned=abandoned, stream=abandoned)


def test_regenerate_edit_and_abandonment_become_implicit_feedback(warehouse):
    events = [
        ev("i1", 0, Q, "Lyon."),
        ev("i2", 5, Q, "Paris."),  # same prompt again in the episode: i1 was regenerated
        # the client continued, but with i2's answer edited: i2 gets a correction
        ev("i3", 10, Q + [{"role": "assistant", "content": "Paris, on the Seine."}, {"role": "user", "content": "Population?"}],
           "About 2 million."),
        # continued with the answer as served: no signal for i3
        ev("i4", 15, Q + [{"role": "assistant", "content": "Paris, on the Seine."}, {"role": "user", "content": "Population?"},
                          {"role": "assistant", "content": "About 2 million."}, {"role": "user", "content": "Thanks"}], "!"),
        ev("i5", 20, Q, "Par", abandoned=True),
        # the same prompt from another user / episode / no episode: never a regenerate
        ev("o1", 1, Q, "Lyon.", user="u2"),
        ev("o2", 2, Q, "Lyon.", episode="ep2"),
        ev("o3", 3, Q, "Lyon.", episode=None),
        ev("o4", 4, Q, "Lyon.", episode=None),
    ]
    warehouse.insert_events([(e, ("onpolicy.interactions", 0, i)) for i, e in enumerate(events)])
    got = {(e.interaction_id, e.metadata["signal"]): e for e in mine(warehouse, T0 - dt.timedelta(seconds=1))}
    assert set(got) == {("i1", "regenerate"), ("i2", "edit"), ("i5", "abandoned")}
    regen, edit, gone = got[("i1", "regenerate")], got[("i2", "edit")], got[("i5", "abandoned")]
    assert (regen.kind, regen.value, regen.metadata["by"]) == ("thumbs", -1.0, "i2")
    assert edit.kind == "correction" and edit.correction == [{"role": "assistant", "content": "Paris, on the Seine."}]
    assert (gone.kind, gone.value) == ("outcome", 0.0)
    for e in got.values():
        assert e.source == "implicit" and e.weight == WEIGHTS[e.metadata["signal"]] < 1.0
        assert (e.tenant, e.episode_id) == ("acme", "ep1")
    # mining the window again gives the same ids: the sink lands each signal once
    again = {e.event_id for e in mine(warehouse, T0 - dt.timedelta(seconds=1))}
    assert again == {e.event_id for e in got.values()}
    # a window that starts after i1 still pairs i1 with i2 (episodes are read whole)
    late = {(e.interaction_id, e.metadata["signal"]) for e in mine(warehouse, T0 + dt.timedelta(seconds=4))}
    assert ("i1", "regenerate") in late
