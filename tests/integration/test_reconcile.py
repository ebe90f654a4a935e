"""Reconciliation (streams/reconcile.py): replicas' per-minute tallies against events landed in chdb."""

import datetime as dt

from proxy.capture import Exchange
from streams.events import FeedbackEvent, InteractionEvent, TallyEvent, decode
from streams.reconcile import Reconciler, Tally, reconcile

T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)


def _interaction(ts: dt.datetime) -> InteractionEvent:
    return InteractionEvent(ts=ts, interaction_id="x", endpoint="/v1/chat/completions", public_model="m", request={})


def _land(wh, events):
    wh.insert_events([(e, ("t", 0, i)) for i, e in enumerate(events)])


def test_missing_counts_served_but_not_landed_per_minute_across_replicas(warehouse):
    minute2 = T0 + dt.timedelta(minutes=1)
    _land(warehouse, [
        # replica a reports minute 0 twice (cumulative): the larger report counts; b reports once
        TallyEvent(reporter="a", minute=T0, interactions=3, feedback=1),
        TallyEvent(reporter="a", minute=T0, interactions=5, feedback=2),
        TallyEvent(reporter="a", minute=T0, interactions=5, feedback=2),  # a repeated report changes nothing
        TallyEvent(reporter="b", minute=T0, interactions=2),
        TallyEvent(reporter="a", minute=minute2, interactions=4),
    ])
    landed = [_interaction(T0 + dt.timedelta(seconds=s)) for s in range(6)]  # 6 of 7 served in minute 0
    landed += [_interaction(minute2 + dt.timedelta(seconds=s)) for s in range(5)]  # 5 landed, 4 reported
    landed.append(landed[0])  # a redelivered event counts once
    landed += [FeedbackEvent(ts=T0, interaction_id="x", kind="thumbs", value=1) for _ in range(2)]
    landed.append(FeedbackEvent(ts=T0, interaction_id="x", kind="thumbs", value=1, source="implicit"))
    _land(warehouse, landed)
    r = reconcile(warehouse, T0, T0 + dt.timedelta(minutes=2))
    assert (r.served_interactions, r.landed_interactions) == (11, 11)
    assert r.missing_interactions == 1  # minute 0: 7 served, 6 landed -- not hidden by minute 1's surplus
    assert r.untallied_interactions == 1  # minute 1: landed without a report (a replica died before reporting)
    assert (r.accepted_feedback, r.landed_feedback, r.missing_feedback) == (2, 2, 0)
    assert r.latest_tally == minute2  # the newest minute reported, for the staleness alert
    # outside the window: nothing
    later = reconcile(warehouse, T0 + dt.timedelta(minutes=5), T0 + dt.timedelta(minutes=10))
    assert later.served_interactions == later.landed_interactions == 0


def test_tally_reports_what_changed_and_stamps_the_exchange():
    sent: list[TallyEvent] = []
    tally = Tally(lambda e: sent.append(decode(e.to_json())) or True, reporter="r1")
    ex = Exchange(endpoint="/v1/chat/completions", interaction_id="i", public_model="m", request={}, t0=0.0, upstream="u")
    for _ in range(3):
        tally.served(ex)
    tally.feedback_accepted(dt.datetime.now(dt.timezone.utc))
    assert ex.handed_at is not None
    assert tally.flush() == 1 and (sent[-1].interactions, sent[-1].feedback, sent[-1].reporter) == (3, 1, "r1")
    assert tally.flush() == 0  # nothing changed: nothing reported
    tally.served(ex)
    assert tally.flush() == 1 and sent[-1].interactions == 4


def test_reconciler_excludes_the_minutes_still_travelling(warehouse):
    now = dt.datetime.now(dt.timezone.utc)
    _land(warehouse, [TallyEvent(reporter="a", minute=now, interactions=1)])
    rec = Reconciler(warehouse, lookback_s=600, settle_s=120)
    assert rec.run_once(now).missing_interactions == 0  # this minute is not judged yet
    assert rec.run_once(now + dt.timedelta(minutes=3)).missing_interactions == 1
