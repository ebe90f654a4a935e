"""A pinned public model moves only by an operator's (admin) routing change."""

from proxy.routing import RoutingTable


def route(adapter):
    return {"base": "base-model", "adapter": adapter}


def test_pin_blocks_learner_changes_until_unpinned():
    t = RoutingTable().apply("demo", {"route": route("demo-v0001")}, 0)
    t = t.apply("demo", {"routes": {"demo": route("demo-v0001")}, "admin": {"op": "pin", "pinned": True}}, 1)
    assert "demo" in t.pinned
    # the canary / learner promote: single-route and whole-table changes without "admin"
    t = t.apply("demo", {"route": route("demo-v0002")}, 2)
    assert t.resolve("demo").adapter_version == "demo-v0001"
    t = t.apply(None, {"routes": {"demo": route("demo-v0003"), "other": route("o-v1")}}, 3)
    assert t.resolve("demo").adapter_version == "demo-v0001"
    assert t.resolve("other").adapter_version == "o-v1"  # unpinned models still move
    # an operator's change goes through, and any admin action other than pin unpins
    t = t.apply("demo", {"routes": {"demo": route("demo-v0004"), "other": route("o-v1")},
                         "admin": {"op": "unpin", "pinned": False}}, 4)
    assert t.resolve("demo").adapter_version == "demo-v0004" and not t.pinned
    t = t.apply("demo", {"route": route("demo-v0005")}, 5)
    assert t.resolve("demo").adapter_version == "demo-v0005"
