"""The demo's simulated users (deploy/simulated_users.py) keep working against the feedback API: every
body the demo tasks send is accepted with the local stack's key."""

from __future__ import annotations

from proxy.routing import Router
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy


def test_the_demo_users_feedback_bodies_are_accepted(tmp_path):
    """deploy/simulated_users.post_feedback with every body the demo tasks send, on an id the proxy issued,
    with the local stack's key (tenant "": the demo sends no tenant)."""
    import random

    from deploy.simulated_users import DEFAULT_TASKS, load_task, post_feedback
    from proxy.api_keys import ensure_key_file
    from tests.unit.test_feedback_api import Collecting

    entry = ensure_key_file(tmp_path / "demo_api_key")
    key = (tmp_path / "demo_api_key").read_text().strip()
    producer = Collecting()
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key="demo-signing-key-0123456789abcdef", api_keys=[entry])
    running = RunningProxy(s, producer=producer, router=Router()).start()
    try:
        iid = running.state.ids.issue("chatcmpl-")
        sent = 0
        for spec in DEFAULT_TASKS:
            task = load_task(spec)
            rng = random.Random(7)
            for request in task.requests(rng, 20):
                for body in task.feedback(request, "some answer", rng):
                    body = {**body, "interaction_id": iid, "source": body.get("source", "explicit")}
                    assert post_feedback(running.base_url, body, key) == 202, body
                    sent += 1
        assert sent > 10 and len(producer.events) == sent
        assert post_feedback(running.base_url, {"interaction_id": iid, "kind": "thumbs", "value": 1}, "op-wrong") == 401
    finally:
        running.stop()
