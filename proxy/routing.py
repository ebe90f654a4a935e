"""Routing: a public model name -> the base model, an adapter version, or a canary split.

The table is state derived from the control topic (``streams.topics.CONTROL``, one partition, kept
forever): every proxy replica replays it from the start on boot and then follows it, so replicas
converge on the same table and a restarted proxy comes back with the table it had.

Payload shape of a ``ControlEvent(action="routing_changed")`` (``ROUTING_PAYLOAD_VERSION`` = 1)::

    # replace the whole table (what the admin API writes after any change):
    {"routing_version": 1,
     "routes": {"<public model>": {"base": "<upstream base model name>",
                                    "adapter": "<adapter version name, e.g. support-v0007> | null",
                                    "canary": {"adapter": "<adapter name> | null", "fraction": 0.1} | null}}}

    # or change one public model (the event's ``public_model`` names it; "route": null removes it):
    {"routing_version": 1, "route": {"base": ..., "adapter": ..., "canary": ...} | null}

``adapter`` is the adapter version that serves the public name (the vLLM LoRA name; names are
immutable, so a rollback is just a route that names the older version). ``adapter: null`` serves the
base model. With a ``canary``, a ``fraction`` of requests go to the canary's adapter (``null``: the
base model) instead; the split is sticky per episode (else per user) so a conversation stays on one
version, and random for anonymous traffic.

Names not in the table pass through unchanged (so do all names before any table exists). A request
resolves its route once, at its start, and finishes on that version even if the table changes
under it (the table is replaced, never mutated).
"""

from __future__ import annotations

import logging
import random
import threading
import zlib
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ROUTING_PAYLOAD_VERSION = 1


class RoutingPayloadError(ValueError):
    """A routing_changed payload this code cannot apply; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Route:
    base: str
    adapter: str | None = None
    canary_adapter: str | None = None
    canary_fraction: float = 0.0

    @classmethod
    def from_payload(cls, public: str, data: Any) -> "Route":
        if not isinstance(data, dict):
            raise RoutingPayloadError(f"route for {public!r} must be an object, got {type(data).__name__}")
        base = data.get("base")
        if not isinstance(base, str) or not base:
            raise RoutingPayloadError(f"route for {public!r} needs 'base': the upstream base model name")
        adapter = data.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise RoutingPayloadError(f"route for {public!r}: 'adapter' must be a string or null")
        canary = data.get("canary")
        c_adapter, fraction = None, 0.0
        if canary is not None:
            if not isinstance(canary, dict):
                raise RoutingPayloadError(f"route for {public!r}: 'canary' must be an object or null")
            c_adapter = canary.get("adapter")
            fraction = canary.get("fraction", 0.0)
            if c_adapter is not None and not isinstance(c_adapter, str):
                raise RoutingPayloadError(f"route for {public!r}: canary 'adapter' must be a string or null")
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
                raise RoutingPayloadError(f"route for {public!r}: canary 'fraction' must be a number in [0, 1]")
        return cls(base=base, adapter=adapter, canary_adapter=c_adapter, canary_fraction=float(fraction))

    def to_payload(self) -> dict[str, Any]:
        canary = None
        if self.canary_fraction > 0 or self.canary_adapter is not None:
            canary = {"adapter": self.canary_adapter, "fraction": self.canary_fraction}
        return {"base": self.base, "adapter": self.adapter, "canary": canary}


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where one request goes: the model name sent upstream and the adapter version (None = base)."""

    upstream_model: str
    adapter_version: str | None
    routed: bool  # False: the name passed through (no route for it)


class RoutingTable:
    """An immutable snapshot: ``resolve`` is a dict look-up (plus a hash for canaries)."""

    __slots__ = ("routes", "offset", "pinned")

    def __init__(self, routes: dict[str, Route] | None = None, offset: int = -1,
                 pinned: frozenset[str] = frozenset()):
        self.routes = dict(routes or {})
        self.offset = offset  # control-topic offset this table reflects; -1 = no table yet
        # Public models an operator pinned (payload.admin.pinned): only another admin action moves
        # them; the learner's canary and promotions leave their routes alone until unpinned.
        self.pinned = pinned

    def resolve(self, public_model: str, sticky_key: str | None = None) -> Resolution:
        route = self.routes.get(public_model)
        if route is None:
            return Resolution(public_model, None, False)
        adapter = route.adapter
        if route.canary_fraction > 0.0:
            if sticky_key:
                u = (zlib.crc32(sticky_key.encode()) & 0xFFFFFFFF) / 2**32
            else:
                u = random.random()
            if u < route.canary_fraction:
                adapter = route.canary_adapter
        return Resolution(adapter or route.base, adapter, True)

    def apply(self, public_model: str | None, payload: dict[str, Any], offset: int) -> "RoutingTable":
        """A new table with one routing_changed payload applied (this one is left unchanged)."""
        version = payload.get("routing_version", ROUTING_PAYLOAD_VERSION)
        if version != ROUTING_PAYLOAD_VERSION:
            raise RoutingPayloadError(f"routing_version {version!r} is not understood (this proxy knows 1); upgrade the proxy")
        admin = payload.get("admin")
        pinned = set(self.pinned)
        if isinstance(admin, dict) and public_model:
            if admin.get("pinned"):
                pinned.add(public_model)
            else:
                pinned.discard(public_model)
        elif not isinstance(admin, dict):
            admin = None
        if "routes" in payload:
            routes = payload["routes"]
            if not isinstance(routes, dict):
                raise RoutingPayloadError("'routes' must be an object of public model -> route")
            new = {name: Route.from_payload(name, r) for name, r in routes.items()}
            if admin is None:  # not an operator: pinned models keep the route they have
                for name in self.pinned:
                    if name in self.routes:
                        new[name] = self.routes[name]
                    else:
                        new.pop(name, None)
            return RoutingTable(new, offset, frozenset(pinned))
        if "route" in payload:
            if not public_model:
                raise RoutingPayloadError("a single-route change needs the event's public_model")
            if admin is None and public_model in self.pinned:
                log.warning("routing change for pinned %r at control offset %d ignored (unpin it first)",
                            public_model, offset)
                return RoutingTable(self.routes, offset, self.pinned)
            new = dict(self.routes)
            if payload["route"] is None:
                new.pop(public_model, None)
            else:
                new[public_model] = Route.from_payload(public_model, payload["route"])
            return RoutingTable(new, offset, frozenset(pinned))
        raise RoutingPayloadError("routing_changed payload needs 'routes' (whole table) or 'route' (one model)")

    def to_payload(self) -> dict[str, Any]:
        return {"routing_version": ROUTING_PAYLOAD_VERSION, "routes": {k: r.to_payload() for k, r in self.routes.items()}}


class Router:
    """Holds the current table; swapped atomically by the control follower (a reference assignment)."""

    def __init__(self, table: RoutingTable | None = None):
        self.table = table or RoutingTable()
        self.changes = 0
        self.bad_events = 0
        self._lock = threading.Lock()  # serializes writers only; readers just read self.table

    def resolve(self, public_model: str, sticky_key: str | None = None) -> Resolution:
        return self.table.resolve(public_model, sticky_key)

    def on_control(self, action: str, public_model: str | None, payload: dict[str, Any], offset: int) -> None:
        if action != "routing_changed":
            return
        with self._lock:
            try:
                self.table = self.table.apply(public_model, payload, offset)
            except RoutingPayloadError as exc:
                # A bad event must not wedge every replica: keep the last good table, say why.
                self.bad_events += 1
                log.error("ignoring routing_changed at control offset %d: %s", offset, exc)
                return
            self.changes += 1
        log.info("routing table now at control offset %d: %s", offset, sorted(self.table.routes))


class ControlFollower:
    """A thread that replays the control topic from the start, then follows it, feeding a Router.

    It reads with a plain consumer (no group, no commits): every replica must see every event, and
    each boot must rebuild the table from the first event. ``caught_up`` is set once the replay has
    reached the end that existed at start (readiness waits for it, so a restarted replica never
    serves traffic on an empty table when a real one exists).
    """

    def __init__(self, kafka, router: Router, poll_timeout_ms: int = 200):
        self.kafka = kafka
        self.router = router
        self.poll_timeout_ms = poll_timeout_ms
        self.caught_up = threading.Event()
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-follower", daemon=True)

    def start(self) -> "ControlFollower":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.events import ControlEvent, EventDecodeError, decode
        from streams.topics import CONTROL

        backoff = 0.2
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(bootstrap_servers=self.kafka.servers, client_id=f"{self.kafka.client_id}-proxy-control",
                                         group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                         request_timeout_ms=10000)
                tp = TopicPartition(CONTROL.name, 0)
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                # Where the replay ends: the high watermark at start. (tansu's end_offsets is wrong
                # on S3 storage -- docs/streams.md, "Tansu quirks" -- so an empty poll after a position past it also counts.)
                try:
                    end = consumer.end_offsets([tp])[tp]
                except Exception:
                    end = None
                self.connected = True
                backoff = 0.2
                next_offset = self.router.table.offset + 1
                empty_polls = 0
                while not self._stop.is_set():
                    batches = consumer.poll(timeout_ms=self.poll_timeout_ms)
                    records = [r for recs in batches.values() for r in recs]
                    for rec in records:
                        if rec.offset < next_offset:
                            continue  # already applied before a reconnect
                        next_offset = rec.offset + 1
                        try:
                            event = decode(rec.value)
                        except EventDecodeError as exc:
                            log.error("control offset %d is not a valid event (%s); skipped", rec.offset, exc.reason)
                            continue
                        if isinstance(event, ControlEvent):
                            self.router.on_control(event.action, event.public_model, event.payload, rec.offset)
                    empty_polls = 0 if records else empty_polls + 1
                    if not self.caught_up.is_set() and (
                        (end is not None and next_offset >= end) or (end is None and empty_polls >= 2) or empty_polls >= 5
                    ):
                        self.caught_up.set()
                        log.info("control topic replayed up to offset %d", next_offset - 1)
            except Exception as exc:
                self.connected = False
                log.warning("control topic not readable (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        pass
