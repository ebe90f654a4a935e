"""Interaction ids (signed, tenant-bound) and the routing table built from control events."""

from __future__ import annotations

import collections

import pytest

from proxy.interaction_ids import InteractionIds
from proxy.routing import ROUTING_PAYLOAD_VERSION, Router, RoutingPayloadError, RoutingTable


def test_ids_are_signed_time_ordered_and_bound_to_tenant():
    ids = InteractionIds(b"k" * 32)
    a, b = ids.issue("chatcmpl-"), ids.issue("chatcmpl-")
    assert a.startswith("chatcmpl-op1.") and a != b and a < b  # uuid7: later ids sort later
    assert ids.verify(a) and ids.verify(a[len("chatcmpl-"):])  # the prefix does not matter
    t = ids.issue("cmpl-", tenant="acme")
    assert ids.verify(t, tenant="acme") and not ids.verify(t) and not ids.verify(t, tenant="other")
    assert not InteractionIds(b"x" * 32).verify(a)  # another key
    forged = a[:-1] + ("0" if a[-1] != "0" else "1")
    assert not ids.verify(forged)
    for junk in ("", "chatcmpl-123", "op1.zz.zz", None, 5, a + "0"):
        assert not ids.verify(junk)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        InteractionIds(b"short")


def test_routing_passes_names_through_until_a_table_exists():
    router = Router()
    r = router.resolve("anything")
    assert (r.upstream_model, r.adapter_version, r.routed) == ("anything", None, False)


def test_routing_whole_table_single_route_and_removal():
    router = Router()
    router.on_control("routing_changed", None, {"routing_version": 1, "routes": {
        "support": {"base": "smol", "adapter": "support-v0002", "canary": None},
        "plain": {"base": "smol", "adapter": None}}}, offset=0)
    assert router.resolve("support").upstream_model == "support-v0002"
    assert router.resolve("support").adapter_version == "support-v0002"
    assert router.resolve("plain").upstream_model == "smol" and router.resolve("plain").adapter_version is None
    assert router.resolve("other").routed is False
    old = router.table
    router.on_control("routing_changed", "support", {"route": {"base": "smol", "adapter": "support-v0001"}}, offset=1)
    assert router.resolve("support").adapter_version == "support-v0001"  # rollback = point at the older version
    assert old.resolve("support").adapter_version == "support-v0002"  # a request that started keeps its table
    router.on_control("routing_changed", "support", {"route": None}, offset=2)
    assert router.resolve("support").routed is False and router.table.offset == 2
    router.on_control("adapter_published", "x", {"anything": 1}, offset=3)  # other actions: ignored
    assert router.table.offset == 2


def test_canary_split_is_sticky_and_close_to_the_fraction():
    router = Router(RoutingTable().apply(None, {"routes": {"m": {
        "base": "smol", "adapter": "m-v0001", "canary": {"adapter": "m-v0002", "fraction": 0.2}}}}, 0))
    counts = collections.Counter(router.resolve("m", f"episode-{i}").adapter_version for i in range(5000))
    assert 0.17 < counts["m-v0002"] / 5000 < 0.23
    assert len({router.resolve("m", "episode-42").adapter_version for _ in range(50)}) == 1  # sticky
    anon = collections.Counter(router.resolve("m").adapter_version for _ in range(5000))
    assert 0.16 < anon["m-v0002"] / 5000 < 0.24
    # canary to the base model (adapter None)
    t = RoutingTable().apply(None, {"routes": {"m": {"base": "smol", "adapter": "m-v1", "canary": {"adapter": None, "fraction": 1.0}}}}, 0)
    assert t.resolve("m", "e").upstream_model == "smol" and t.resolve("m", "e").adapter_version is None


@pytest.mark.parametrize("payload, message", [
    ({"routes": {"m": {"adapter": "x"}}}, "needs 'base'"),
    ({"routes": {"m": {"base": "b", "canary": {"adapter": "c", "fraction": 1.5}}}}, "fraction"),
    ({"routes": {"m": {"base": "b", "canary": {"adapter": "c", "fraction": True}}}}, "fraction"),
    ({"routes": []}, "must be an object"),
    ({"route": {"base": "b"}}, "public_model"),
    ({"routing_version": 2, "routes": {}}, "routing_version"),
    ({}, "needs 'routes'"),
])
def test_bad_routing_payloads_are_refused_and_keep_the_last_good_table(payload, message):
    with pytest.raises(RoutingPayloadError, match=message):
        RoutingTable().apply(None, payload, 0)
    router = Router()
    router.on_control("routing_changed", None, {"routes": {"m": {"base": "b", "adapter": "a"}}}, 0)
    router.on_control("routing_changed", None, payload, 1)
    assert router.bad_events == 1 and router.resolve("m").adapter_version == "a"


def test_table_round_trips_through_its_payload():
    payload = {"routing_version": ROUTING_PAYLOAD_VERSION, "routes": {
        "m": {"base": "b", "adapter": "a", "canary": {"adapter": "c", "fraction": 0.25}},
        "n": {"base": "b", "adapter": None, "canary": None}}}
    assert RoutingTable().apply(None, payload, 5).to_payload() == payload
