"""``onpolicy admin``: the admin API from a terminal, printing tables.

    onpolicy admin versions [--family F]
    onpolicy admin promote VERSION [--public-model M] [--base B] --reason "..."
    onpolicy admin pin VERSION --reason "..."        onpolicy admin unpin --reason "..."
    onpolicy admin rollback [--to VERSION] --reason "..."
    onpolicy admin canary VERSION --fraction 0.1 --reason "..."
    onpolicy admin pause --reason "..."              onpolicy admin resume --reason "..."

Talks to ``--url`` (``ONPOLICY_ADMIN_URL``, default http://127.0.0.1:8080) with the admin token from
``ONPOLICY_ADMIN_TOKEN`` or the proxy's token file (``$ONPOLICY_HOME/secrets/admin_token``; this command
creates it, mode 0600, if it is missing, and the proxy on the same host reads it -- the proxy never
writes it).
Standard library only; exits 1 with the server's message on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

ACTIONS = ("promote", "pin", "unpin", "rollback", "canary", "pause", "resume")


def register(subparsers) -> None:
    p = subparsers.add_parser("admin", help="adapter versions, routing and learning control (the proxy's /admin API)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="the proxy's root URL (default $ONPOLICY_ADMIN_URL or http://127.0.0.1:8080)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer instead of tables")
    sub = p.add_subparsers(dest="admin_action", required=True)
    v = sub.add_parser("versions", help="adapter versions with lineage, and the routing table")
    v.add_argument("--family", default=None)
    for action in ACTIONS:
        a = sub.add_parser(action, help=f"{action} (one control event, with actor and reason)")
        if action in ("promote", "pin", "canary"):
            a.add_argument("version", help="adapter version name, e.g. support-v0007")
        if action == "canary":
            a.add_argument("--fraction", type=float, required=True, help="share of requests for the version, in (0, 1]")
        if action == "rollback":
            a.add_argument("--to", default=None, help="version to return to (default: the previous one)")
        if action in ("pause", "resume"):
            a.add_argument("--family", default=None, help="only this family (default: all learning)")
        else:
            a.add_argument("--public-model", default=None, help="public model name (default: the only routed one)")
            a.add_argument("--base", default=None, help="upstream base model, for a public name with no route yet")
            a.add_argument("--force", action="store_true", help="override pin and registry-status checks")
        a.add_argument("--reason", required=True, help="why: recorded in the audit log")
        a.add_argument("--actor", default=os.environ.get("USER") or "admin", help="who (recorded as admin:<actor>)")
    p.set_defaults(func=run)


def _token() -> str:
    token = os.environ.get("ONPOLICY_ADMIN_TOKEN")
    if token:
        return token
    from proxy.admin import admin_token
    from proxy.settings import ProxySettings

    return admin_token(ProxySettings(), create=True) or ""


def call(url: str, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise SystemExit(f"onpolicy admin: {exc.code}: {message}") from None
    except OSError as exc:
        raise SystemExit(f"onpolicy admin: cannot reach the proxy at {url} ({exc}); pass --url") from None


def table(header: list[str], rows: list[list[Any]]) -> str:
    body = [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    cells = ([header] if any(header) else []) + body
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def render_versions(answer: dict[str, Any]) -> str:
    routes = answer.get("routing") or {}
    out = ["routing (this replica, control offset %s):" % answer.get("routing_offset")]
    out.append(table(["public model", "base", "adapter", "canary", "fraction"], [
        [name, r["base"], r.get("adapter"), (r.get("canary") or {}).get("adapter"), (r.get("canary") or {}).get("fraction")]
        for name, r in sorted(routes.items())]))
    versions = answer.get("versions")
    out.append("")
    if versions is None:
        out.append(f"versions: unavailable ({answer.get('warehouse_error')})")
        return "\n".join(out)
    serving = {r.get("adapter") for r in routes.values()} | {(r.get("canary") or {}).get("adapter") for r in routes.values()}
    rows = []
    for v in versions:
        gate = v["gate"][-1] if v.get("gate") else None
        canary = v["canary"][-1] if v.get("canary") else None
        rows.append([v["name"] + (" *" if v["name"] in serving else ""), v["status"], v.get("parent"),
                     str(v.get("created_at", ""))[:19], ",".join(v.get("env_versions") or []),
                     ",".join(v.get("reward_versions") or []),
                     gate and f"{gate['decision']}", canary and f"{canary['decision']}", v.get("promoted_by"),
                     (v.get("reason") or "")[:60]])
    out.append(table(["version (* routed)", "status", "parent", "created", "envs", "rewards", "gate", "canary",
                      "promoted by", "reason"], rows))
    return "\n".join(out)


def render_event(answer: dict[str, Any]) -> str:
    route = (answer.get("payload") or {}).get("route")
    rows = [["event", answer["id"]], ["action", answer["action"]], ["actor", answer["actor"]],
            ["reason", answer["reason"]], ["public model", answer.get("public_model")],
            ["version", answer.get("adapter_version")]]
    if route is not None:
        rows.append(["route now", json.dumps(route)])
        rows.append(["applied here", answer.get("applied_on_this_replica")])
    return table(["", ""], rows)


def run(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("ONPOLICY_ADMIN_URL") or "http://127.0.0.1:8080"
    token = _token()
    if args.admin_action == "versions":
        q = f"?family={urllib.request.quote(args.family)}" if args.family else ""
        answer = call(url, "GET", f"/admin/versions{q}", token)
        print(json.dumps(answer, indent=2, default=str) if args.json else render_versions(answer))
        return 0
    body: dict[str, Any] = {"reason": args.reason, "actor": args.actor}
    for name in ("version", "fraction", "to", "family", "public_model", "base"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    if getattr(args, "force", False):
        body["force"] = True
    answer = call(url, "POST", f"/admin/{args.admin_action}", token, body)
    print(json.dumps(answer, indent=2) if args.json else render_event(answer))
    return 0


if __name__ == "__main__":  # python -m deploy.admin_cli ... (before deploy/cli.py lists it)
    parser = argparse.ArgumentParser(prog="onpolicy")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
