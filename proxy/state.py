"""The proxy's long-lived parts, held in one typed object under one ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.capture import Capture
    from proxy.interaction_ids import InteractionIds
    from proxy.metrics import ProxyMetrics
    from proxy.routing import ControlFollower, Router
    from proxy.settings import HostedModel, ProxySettings
    from proxy.upstream import UpstreamClient


@dataclass
class ProxyState:
    settings: "ProxySettings"
    upstream: "UpstreamClient"
    router: "Router"
    ids: "InteractionIds"
    metrics: "ProxyMetrics"
    hosted: dict[str, "HostedModel"]
    capture: "Capture | None" = None
    producer: object | None = None  # streams.producer.EventProducer when capture is on
    follower: "ControlFollower | None" = None
    tally: object | None = None  # streams.reconcile.Tally when capture and reconciliation are on
    draining: bool = False
    started_at: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


STATE: web.AppKey[ProxyState] = web.AppKey("onpolicy_proxy_state", ProxyState)
