"""``onpolicy admin`` against a running proxy (HTTP, real warehouse; events looped back to the router
and the warehouse as the follower and the sink would): every subcommand prints its table, errors exit
with the server's message."""

from __future__ import annotations

import argparse

import pytest

from deploy.admin_cli import register
from proxy.admin import ADMIN
from proxy.routing import Router
from proxy.settings import ProxySettings
from proxy.testing import RunningProxy
from tests.unit.test_feedback_admin_api import Loopback

TOKEN = "cli-admin-token-0123456789abcdef"


@pytest.fixture
def proxy(warehouse):
    router = Router()
    s = ProxySettings(upstream_url="http://127.0.0.1:9/v1", capture=False, follow_control=False,
                      interaction_id_key="cli-signing-key-0123456789abcdef", admin_token=TOKEN)
    running = RunningProxy(s, producer=Loopback(router, warehouse), router=router).start()
    svc = running.app[ADMIN]
    svc.warehouse = warehouse

    async def served_upstream(version: str) -> bool:
        return version.startswith("cli-")

    svc.served_upstream = served_upstream
    yield running
    running.stop()


def cli(proxy, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="onpolicy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["admin", "--url", proxy.root_url, *argv])
    return args.func(args)


def test_admin_cli_every_subcommand(proxy, capsys, monkeypatch):
    monkeypatch.setenv("ONPOLICY_ADMIN_TOKEN", TOKEN)
    assert cli(proxy, "promote", "cli-v0001", "--public-model", "m", "--base", "smol", "--reason", "first") == 0
    out = capsys.readouterr().out
    assert "routing_changed" in out and "promote: first" in out and "cli-v0001" in out
    for argv in (["promote", "cli-v0002", "--reason", "better"], ["canary", "cli-v0003", "--fraction", "0.2", "--reason", "try"],
                 ["rollback", "--reason", "bad"], ["pin", "cli-v0001", "--reason", "freeze"], ["unpin", "--reason", "go"],
                 ["pause", "--reason", "incident"], ["resume", "--reason", "ok"]):
        assert cli(proxy, *argv) == 0, argv
    assert proxy.state.router.table.routes["m"].adapter == "cli-v0001"
    capsys.readouterr()
    assert cli(proxy, "versions") == 0
    out = capsys.readouterr().out
    assert "public model" in out and "cli-v0001" in out and "versions:" not in out.split("routing")[0]
    with pytest.raises(SystemExit, match="not served by the upstream"):
        cli(proxy, "promote", "ghost-v0001", "--reason", "x")
    monkeypatch.setenv("ONPOLICY_ADMIN_TOKEN", "wrong-token-0000000000000000")
    with pytest.raises(SystemExit, match="401: invalid admin token"):
        cli(proxy, "versions")

