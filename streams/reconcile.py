"""Reconciliation: the product counts what it served and checks that it all landed.

Two halves, joined only through events (so it works with any number of proxy replicas):

- **Each proxy replica** keeps a ``Tally``: per UTC minute, the requests it handed to capture (counted
  at the hand-over, before any queue that could drop them) and the feedback events its API accepted.
  The hot path is a dict look-up and an integer increment. A thread reports the minutes that changed
  every ``interval_s`` as ``TallyEvent``s through the replica's spool-backed producer (durable, like
  any event), with counts cumulative within the minute.
- **The sink** (which owns the warehouse) runs a ``Reconciler`` every ``interval_s``: for each minute
  of ``[now - lookback, now - settle)`` it compares the replicas' counts (largest report per replica
  and minute, summed over replicas) with the distinct events landed in that minute, and exports
  ``onpolicy_reconcile_missing_{interactions,feedback}``: the sum over minutes of served minus landed
  where positive -- events that were served but never landed. ``settle`` leaves time for the last
  minutes' events to travel (spool, broker, sink batch); a minute is judged only once it is older.

Both sides bucket by the same clock: an interaction event's ``ts`` is the moment the proxy handed
it to capture (``Exchange.handed_at``), and a feedback event's ``ts`` is the minute the API counted.

What it cannot see: counts a replica had not reported yet when it was SIGKILLed (at most
``interval_s`` of traffic). Those events land without a count and show as
``onpolicy_reconcile_untallied_*`` (landed minus served where positive), never as missing. And when
nothing lands at all (the sink stuck, the broker unreadable) the tallies stop landing too and the gap
reads 0: ``onpolicy_reconcile_latest_tally_timestamp_seconds`` going stale is the signal then.
Feedback landed is compared for ``source = 'explicit'`` (only the feedback API writes those).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.events import TallyEvent

log = logging.getLogger(__name__)


def new_reporter_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Tally:
    """One replica's per-minute counts. ``served``/``feedback_accepted`` run on the event loop (cheap);
    ``flush`` runs on the reporter thread and emits what changed since it last reported."""

    def __init__(self, emit: Callable[[TallyEvent], bool], *, reporter: str | None = None, interval_s: float = 5.0):
        self.emit = emit
        self.reporter = reporter or new_reporter_id()
        self.interval_s = interval_s
        self._counts: dict[int, list[int]] = {}  # minute number (unix seconds // 60) -> [interactions, feedback]
        self._reported: dict[int, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reports = 0
        self.report_failures = 0

    # -- the hot path (event loop) -----------------------------------------------------------
    def served(self, ex) -> None:
        """One finished exchange handed to capture: stamp it with the hand-over time and count it."""
        now = time.time()
        ex.handed_at = now
        m = int(now) // 60
        c = self._counts.get(m)
        if c is None:
            c = self._counts[m] = [0, 0]
        c[0] += 1

    def feedback_accepted(self, ts: dt.datetime) -> None:
        m = int(ts.timestamp()) // 60
        c = self._counts.get(m)
        if c is None:
            c = self._counts[m] = [0, 0]
        c[1] += 1

    # -- reporting (its own thread) ----------------------------------------------------------
    def flush(self) -> int:
        """Report every minute whose counts changed; forget minutes reported in full. Returns reports sent."""
        sent = 0
        current = int(time.time()) // 60
        for m, c in list(self._counts.items()):
            now = (c[0], c[1])
            if self._reported.get(m) != now:
                event = TallyEvent(reporter=self.reporter, minute=dt.datetime.fromtimestamp(m * 60, dt.timezone.utc),
                                   interactions=now[0], feedback=now[1])
                if self.emit(event):
                    self._reported[m] = now
                    sent += 1
                else:
                    self.report_failures += 1
            elif m < current - 1:
                # Reported as it finally stands and nothing can be counted in it any more.
                self._counts.pop(m, None)
                self._reported.pop(m, None)
        self.reports += sent
        return sent

    def start(self) -> "Tally":
        self._thread = threading.Thread(target=self._run, name="reconcile-tally", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:
                log.exception("could not report this replica's tally; retrying in %.0fs", self.interval_s)

    def close(self) -> None:
        """Stop the reporter and report what is left (call before the producer closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.flush()
        except Exception:
            log.exception("could not report this replica's last tally")


@dataclass
class Reconciliation:
    """One comparison of served and landed counts over complete minutes ``[start, end)``."""

    start: dt.datetime
    end: dt.datetime
    served_interactions: int = 0
    landed_interactions: int = 0
    missing_interactions: int = 0
    untallied_interactions: int = 0
    accepted_feedback: int = 0
    landed_feedback: int = 0
    missing_feedback: int = 0
    untallied_feedback: int = 0
    worst: list[tuple[dt.datetime, int, int]] = field(default_factory=list)  # (minute, served, landed) with a gap
    latest_tally: dt.datetime | None = None  # newest minute any replica reported (all time)


def reconcile(warehouse, start: dt.datetime, end: dt.datetime) -> Reconciliation:
    """Compare per-minute tallies with landed events in ``[start, end)`` (whole minutes)."""
    lo, hi = int(start.timestamp()) // 60 * 60, int(end.timestamp()) // 60 * 60
    served = {m: (int(i), int(f)) for m, i, f in warehouse.query(
        "SELECT m, sum(i), sum(f) FROM (SELECT reporter, intDiv(toUnixTimestamp(minute), 60) AS m, "
        "max(interactions) AS i, max(feedback) AS f FROM {db}.tallies "
        f"WHERE minute >= toDateTime({lo}, 'UTC') AND minute < toDateTime({hi}, 'UTC') GROUP BY reporter, m) GROUP BY m")}
    landed_i = {m: int(n) for m, n in warehouse.query(
        "SELECT intDiv(toUnixTimestamp(ts), 60) AS m, uniqExact(event_id) FROM {db}.interactions "
        f"WHERE ts >= toDateTime64({lo}, 3, 'UTC') AND ts < toDateTime64({hi}, 3, 'UTC') GROUP BY m")}
    landed_f = {m: int(n) for m, n in warehouse.query(
        "SELECT intDiv(toUnixTimestamp(ts), 60) AS m, uniqExact(event_id) FROM {db}.feedback "
        f"WHERE source = 'explicit' AND ts >= toDateTime64({lo}, 3, 'UTC') AND ts < toDateTime64({hi}, 3, 'UTC') GROUP BY m")}
    r = Reconciliation(dt.datetime.fromtimestamp(lo, dt.timezone.utc), dt.datetime.fromtimestamp(hi, dt.timezone.utc))
    # When nothing lands at all, tallies stop landing too and every minute looks balanced: the age of
    # the newest tally is what shows that (alert on it).
    latest = warehouse.query("SELECT max(toUnixTimestamp(minute)), count() FROM {db}.tallies")[0]
    if latest[1]:
        r.latest_tally = dt.datetime.fromtimestamp(int(latest[0]), dt.timezone.utc)
    for m in sorted(set(served) | set(landed_i) | set(landed_f)):
        si, sf = served.get(m, (0, 0))
        li, lf = landed_i.get(m, 0), landed_f.get(m, 0)
        r.served_interactions += si
        r.landed_interactions += li
        r.missing_interactions += max(0, si - li)
        r.untallied_interactions += max(0, li - si)
        r.accepted_feedback += sf
        r.landed_feedback += lf
        r.missing_feedback += max(0, sf - lf)
        r.untallied_feedback += max(0, lf - sf)
        if si > li or sf > lf:
            r.worst.append((dt.datetime.fromtimestamp(m * 60, dt.timezone.utc), si, li))
    return r


class Reconciler:
    """Runs ``reconcile`` every ``interval_s`` over ``[now - lookback_s, now - settle_s)`` in the sink process."""

    def __init__(self, warehouse, *, interval_s: float = 30.0, lookback_s: float = 900.0, settle_s: float = 120.0,
                 stop: threading.Event | None = None):
        self.warehouse = warehouse
        self.interval_s = interval_s
        self.lookback_s = lookback_s
        self.settle_s = settle_s
        self.stop = stop or threading.Event()
        self.last: Reconciliation | None = None
        self.last_success_ts = 0.0
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> "Reconciler":
        self.thread.start()
        return self

    def run_once(self, now: dt.datetime | None = None) -> Reconciliation:
        now = now or dt.datetime.now(dt.timezone.utc)
        end = now - dt.timedelta(seconds=self.settle_s)
        r = reconcile(self.warehouse, end - dt.timedelta(seconds=self.lookback_s), end)
        self.last, self.last_success_ts = r, time.time()
        if r.missing_interactions or r.missing_feedback:
            log.warning("reconciliation %s..%s: %d interactions and %d feedback served but not landed (minutes: %s)",
                        r.start, r.end, r.missing_interactions, r.missing_feedback,
                        ", ".join(f"{m:%H:%M} served {s} landed {n}" for m, s, n in r.worst[:5]))
        return r

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # the warehouse may be briefly unavailable: keep the last figures
                self.failures += 1
                log.warning("reconciliation failed (%s: %s); retrying in %.0fs", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", self.interval_s)


class ReconcileCollector(Collector):
    """The reconciler's last figures as Prometheus gauges (absent until the first run)."""

    def __init__(self, reconciler: Reconciler):
        self.reconciler = reconciler

    def collect(self):
        r = self.reconciler.last
        if r is not None:
            window = f"the window [now - {self.reconciler.lookback_s:.0f}s, now - {self.reconciler.settle_s:.0f}s)"
            for name, value, help_ in (
                ("missing_interactions", r.missing_interactions,
                 f"Requests the proxies handed to capture but whose interaction event has not landed, over {window}."),
                ("missing_feedback", r.missing_feedback,
                 f"Feedback the API accepted that has not landed, over {window}."),
                ("untallied_interactions", r.untallied_interactions,
                 "Interaction events landed in minutes where no replica reported them (a replica died before reporting)."),
                ("untallied_feedback", r.untallied_feedback, "Explicit feedback landed that no replica reported."),
                ("served_interactions", r.served_interactions, f"Requests handed to capture over {window}."),
                ("landed_interactions", r.landed_interactions, f"Distinct interaction events landed over {window}."),
                ("accepted_feedback", r.accepted_feedback, f"Feedback events accepted over {window}."),
                ("landed_feedback", r.landed_feedback, f"Distinct explicit feedback events landed over {window}."),
                ("window_end_timestamp_seconds", r.end.timestamp(), "End (exclusive) of the minutes last reconciled."),
                ("latest_tally_timestamp_seconds", r.latest_tally.timestamp() if r.latest_tally else 0.0,
                 "Newest minute any proxy replica's tally landed for: stale while nothing lands (the gap is blind then)."),
            ):
                g = GaugeMetricFamily(f"onpolicy_reconcile_{name}", help_)
                g.add_metric([], value)
                yield g
        g = GaugeMetricFamily("onpolicy_reconcile_last_success_timestamp_seconds", "When reconciliation last ran to the end.")
        g.add_metric([], self.reconciler.last_success_ts)
        yield g
        c = CounterMetricFamily("onpolicy_reconcile_failures", "Reconciliation runs that failed (warehouse unavailable).")
        c.add_metric([], self.reconciler.failures)
        yield c
