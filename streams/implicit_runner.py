"""Runs the implicit-feedback miner (``streams.implicit``) continuously next to the warehouse.

The sink owns the embedded warehouse, so the local stack runs this in the sink process: every
``interval_s`` it mines the window ``[now - lookback, now - settle)`` and emits what it finds as
``FeedbackEvent``s (``source="implicit"``) through its own spool-backed producer. Windows overlap
on purpose: signal ids are deterministic (uuid5 of signal and interaction), so a signal found twice
lands once. ``settle_s`` leaves time for an episode's next turn to arrive before a window is mined
for the last time.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from streams.implicit import mine

log = logging.getLogger(__name__)


class ImplicitMiner:
    def __init__(self, warehouse, producer, *, interval_s: float = 30.0, lookback_s: float = 900.0,
                 settle_s: float = 5.0, stop: threading.Event | None = None):
        self.warehouse = warehouse
        self.producer = producer
        self.interval_s = interval_s
        self.lookback_s = lookback_s
        self.settle_s = settle_s
        self.stop = stop or threading.Event()
        self.emitted = 0
        self.rounds = 0
        self._seen: set[str] = set()  # ids already emitted by this process (bounded below)
        self.thread = threading.Thread(target=self._run, name="implicit-miner", daemon=True)

    def start(self) -> "ImplicitMiner":
        self.thread.start()
        return self

    def mine_once(self, now: dt.datetime | None = None) -> int:
        now = now or dt.datetime.now(dt.timezone.utc)
        events = mine(self.warehouse, now - dt.timedelta(seconds=self.lookback_s), now - dt.timedelta(seconds=self.settle_s))
        fresh = [e for e in events if e.event_id not in self._seen]
        for event in fresh:
            if self.producer.emit(event):
                self._seen.add(event.event_id)
        if len(self._seen) > 200_000:
            self._seen.clear()  # only an optimisation: the sink dedups re-emitted ids anyway
        self.emitted += len(fresh)
        self.rounds += 1
        return len(fresh)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                n = self.mine_once()
                if n:
                    log.info("implicit feedback: %d new signals", n)
            except Exception as exc:  # the warehouse may be briefly unavailable: try next round
                log.warning("implicit feedback mining failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc,
                            self.interval_s)
