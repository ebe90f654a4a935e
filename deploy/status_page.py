"""The status page: per adapter version over time, rendered server-side (inline SVG, no CDN, no JS).

``/status`` is the page, ``/status.json`` its data. It reads the warehouse through whatever
``ONPOLICY_WAREHOUSE_URL`` says (the local stack: through the sink that owns it). Shows:
requests per minute and live feedback (thumbs-up rate, outcome rate) per adapter version, with
promotions, rollbacks and other control events marked; the learner's adapter versions with their
status and reason (gate failed, canary, production, ...); the current routing; recent control
decisions with their reasons; event counts; and -- in the demo only, labelled as such -- the true
success of what was served, which the simulated users know and write to ``$ONPOLICY_HOME/demo/``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from streams.settings import default_home

log = logging.getLogger(__name__)

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
MARK_COLORS = {"adapter_promoted": "#16a34a", "adapter_rolled_back": "#dc2626", "routing_changed": "#6b7280",
               "adapter_published": "#2563eb", "learning_paused": "#ca8a04", "learning_resumed": "#ca8a04"}


def _ts(value: Any) -> float:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def collect(warehouse, home: Path | None = None, minutes: int = 180) -> dict[str, Any]:
    """Everything the page shows, as plain data (also served as /status.json)."""
    since = f"now64(3) - INTERVAL {int(minutes)} MINUTE"
    requests = warehouse.query(
        "SELECT toStartOfMinute(ts) AS t, if(adapter_version = '', 'base', adapter_version) AS v, count() "
        f"FROM {{db}}.interactions FINAL WHERE ts > {since} GROUP BY t, v ORDER BY t")
    feedback = warehouse.query(
        "SELECT toStartOfMinute(f.ts) AS t, if(i.adapter_version = '', 'base', i.adapter_version) AS v, "
        "countIf(f.kind = 'thumbs' AND f.value > 0), countIf(f.kind = 'thumbs'), "
        "countIf(f.kind = 'outcome' AND f.value > 0), countIf(f.kind = 'outcome') "
        "FROM {db}.feedback AS f FINAL "
        "INNER JOIN (SELECT interaction_id, adapter_version FROM {db}.interactions FINAL) AS i "
        "ON f.interaction_id = i.interaction_id "
        f"WHERE f.ts > {since} GROUP BY t, v ORDER BY t")
    control = warehouse.query_dicts(
        "SELECT ts, action, actor, reason, public_model, adapter_version, payload FROM {db}.control FINAL "
        "ORDER BY ts DESC LIMIT 40")
    counts = warehouse.counts()
    try:  # the learner's registry (migration 0004); absent on a warehouse no learner has migrated
        versions = warehouse.query_dicts(
            "SELECT name, status, parent, reason, updated_at FROM {db}.adapter_versions FINAL ORDER BY family, version")
    except Exception as exc:
        log.debug("no adapter registry: %s", exc)
        versions = []
    data: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "requests_per_minute": {},
        "thumbs_up_rate": {},
        "outcome_rate": {},
        "control": [{**c, "ts": str(c["ts"])} for c in control],
        "counts": counts,
        "routing": None,
        "true_success_demo": {},
        "versions": [{**v, "updated_at": str(v["updated_at"])} for v in versions],
        "rounds": _rounds(warehouse),
    }
    for t, v, n in requests:
        data["requests_per_minute"].setdefault(v, []).append((_ts(t), n))
    for t, v, up, thumbs, ok, outcomes in feedback:
        if thumbs:
            data["thumbs_up_rate"].setdefault(v, []).append((_ts(t), up / thumbs))
        if outcomes:
            data["outcome_rate"].setdefault(v, []).append((_ts(t), ok / outcomes))
    for c in control:
        if c["action"] == "routing_changed":
            try:
                data["routing"] = json.loads(c["payload"] or "null")
            except ValueError:
                data["routing"] = c["payload"]
            break
    truth = (home or default_home()) / "demo" / "truth.jsonl"
    if truth.exists():
        buckets: dict[tuple[str, int], list[float]] = {}
        for line in truth.read_text().splitlines()[-20000:]:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written
            key = (row.get("adapter_version") or "base", int(row["ts"] // 60 * 60))
            buckets.setdefault(key, []).append(float(row["truth"]))
        for (v, t), values in sorted(buckets.items(), key=lambda kv: kv[0][1]):
            data["true_success_demo"].setdefault(v, []).append((t, sum(values) / len(values)))
    return data


def _rounds(warehouse, limit: int = 20) -> list[dict[str, Any]]:
    """The learner's recent round decisions (learner/round_log.py), skipped ones with why per family."""
    from learner.round_log import read_rounds

    return [{"round": r.round, "family": r.family, "status": r.status.value, "adapter": r.adapter,
             "reason": r.reason, "decided_at": r.decided_at.isoformat(),
             "families": [{"family": p.label or p.family_id, "method": p.describe_methods(), "reason": p.reason}
                          for p in r.plans]} for r in read_rounds(warehouse, limit=limit)]


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], marks: list[dict[str, Any]],
              y_max: float | None = None, unit: str = "") -> str:
    """A time-series line chart as inline SVG: one line per version, control events as vertical marks."""
    w, h, left, right, top, bottom = 640, 220, 44, 12, 26, 28
    points = [p for s in series.values() for p in s]
    esc = html.escape
    if not points:
        return (f'<figure class="chart" data-points="0"><figcaption>{esc(title)}</figcaption>'
                f'<p class="empty">no data yet</p></figure>')
    t0 = min(p[0] for p in points)
    t1 = max(p[0] for p in points)
    t1 = t1 if t1 > t0 else t0 + 60
    top_y = y_max if y_max is not None else max(p[1] for p in points) * 1.1 or 1.0

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (w - left - right)

    def y(v: float) -> float:
        return top + (1 - min(v, top_y) / top_y) * (h - top - bottom)

    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{esc(title)}" preserveAspectRatio="none">',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#9ca3af"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#9ca3af"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" class="tick">{top_y:.2g}{unit}</text>',
             f'<text x="{left - 4}" y="{h - bottom}" text-anchor="end" class="tick">0</text>']
    for label_t in (t0, (t0 + t1) / 2, t1):
        label = dt.datetime.fromtimestamp(label_t, dt.timezone.utc).strftime("%H:%M")
        parts.append(f'<text x="{x(label_t):.1f}" y="{h - 8}" text-anchor="middle" class="tick">{label}</text>')
    for mark in marks:
        t = _ts(mark["ts"])
        if t0 <= t <= t1:
            color = MARK_COLORS.get(mark["action"], "#6b7280")
            parts.append(f'<line class="mark" x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{h - bottom}" '
                         f'stroke="{color}" stroke-dasharray="4 3"><title>{esc(mark["action"])} '
                         f'{esc(mark.get("adapter_version") or "")}: {esc(mark.get("reason") or "")}</title></line>')
    legend = []
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in sorted(pts))
        parts.append(f'<polyline class="series" data-version="{esc(name)}" data-n="{len(pts)}" fill="none" '
                     f'stroke="{color}" stroke-width="2" points="{coords}"/>')
        for t, v in pts:
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>')
        legend.append(f'<span><i style="background:{color}"></i>{esc(name)}</span>')
    parts.append("</svg>")
    return (f'<figure class="chart" data-points="{len(points)}"><figcaption>{esc(title)}</figcaption>'
            f'{"".join(parts)}<div class="legend">{"".join(legend)}</div></figure>')


CSS = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;color:#111827;background:#f9fafb}
h1{font-size:1.3rem;margin:4px 0 12px} h2{font-size:1.05rem;margin:18px 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.chart{background:#fff;border:1px solid #e5e7eb;border-radius:8px;margin:0;padding:8px}
.chart svg{width:100%;height:auto} figcaption{font-weight:600;font-size:.9rem}
.tick{font-size:10px;fill:#6b7280} .legend span{margin-right:10px;font-size:.8rem;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
table{border-collapse:collapse;width:100%;font-size:.82rem;background:#fff} td,th{border-bottom:1px solid #e5e7eb;padding:4px;text-align:left}
.demo{border-left:4px solid #ca8a04;padding-left:8px} .empty{color:#6b7280;font-size:.85rem}
.scroll{overflow-x:auto}
"""


def render(data: dict[str, Any]) -> str:
    esc = html.escape
    marks = data["control"]
    charts = [
        svg_chart("Requests per minute, by adapter version", data["requests_per_minute"], marks),
        svg_chart("Live feedback: thumbs-up rate, by version", data["thumbs_up_rate"], marks, y_max=1.0),
        svg_chart("Live feedback: outcome success rate, by version", data["outcome_rate"], marks, y_max=1.0),
    ]
    demo = ""
    if data["true_success_demo"]:
        demo = ('<section class="demo"><h2>True success (demo only: the simulated users know the answer; '
                'real deployments have no such number)</h2>'
                + svg_chart("True success of what was served, by version", data["true_success_demo"], marks, y_max=1.0)
                + "</section>")
    rows = "".join(
        f"<tr><td>{esc(c['ts'][:19])}</td><td>{esc(c['action'])}</td><td>{esc(c['adapter_version'] or '')}</td>"
        f"<td>{esc(c['actor'])}</td><td>{esc(c['reason'] or '')}</td></tr>" for c in marks[:20])
    versions = "".join(
        f"<tr><td>{esc(v['name'])}</td><td>{esc(v['status'])}</td><td>{esc(v['parent'] or '(base)')}</td>"
        f"<td>{esc(v['updated_at'][:19])}</td><td>{esc(v['reason'] or '')}</td></tr>" for v in reversed(data.get("versions", [])))
    versions = versions or '<tr><td colspan="5" class="empty">no adapter trained yet</td></tr>'
    rounds = "".join(
        f"<tr><td>{esc(r['decided_at'][:19])}</td><td>{r['round']}</td><td>{esc(r['status'])}</td>"
        f"<td>{esc(r['adapter'])}</td><td>{esc(r['reason'])}<ul>"
        + "".join(f"<li>{esc(f['family'])}: <b>{esc(f['method'])}</b>: {esc(f['reason'])}</li>" for f in r["families"])
        + "</ul></td></tr>" for r in data.get("rounds", []))
    rounds = rounds or '<tr><td colspan="5" class="empty">no learning round decided yet</td></tr>'
    counts = data["counts"]
    count_text = ", ".join(f"{t}: {c['final']:,}" for t, c in counts.items())
    routing = esc(json.dumps(data["routing"], indent=1)) if data["routing"] is not None else "names pass through (no routing table yet)"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><meta http-equiv="refresh" content="15">
<title>onpolicy status</title><style>{CSS}</style></head><body>
<h1>onpolicy status</h1><p class="empty">generated {esc(data['generated_at'][:19])} UTC · events landed: {esc(count_text)}</p>
<div class="grid">{''.join(charts)}</div>{demo}
<h2>Adapter versions (learner)</h2><div class="scroll"><table><tr><th>version</th><th>status</th><th>parent</th><th>updated</th><th>reason</th></tr>{versions}</table></div>
<h2>Learning rounds (every decision, skipped rounds with why)</h2><div class="scroll"><table><tr><th>decided</th><th>round</th><th>status</th><th>adapter</th><th>why, per task family</th></tr>{rounds}</table></div>
<h2>Routing</h2><pre class="scroll">{routing}</pre>
<h2>Decisions (control events)</h2><div class="scroll"><table><tr><th>time</th><th>action</th><th>version</th><th>actor</th><th>reason</th></tr>{rows}</table></div>
</body></html>"""


def create_app(warehouse, home: Path | None = None) -> web.Application:
    import asyncio

    async def page(request: web.Request) -> web.Response:
        data = await asyncio.to_thread(collect, warehouse, home)
        return web.Response(text=render(data), content_type="text/html")

    async def as_json(request: web.Request) -> web.Response:
        data = await asyncio.to_thread(collect, warehouse, home)
        return web.json_response(data)

    app = web.Application()
    app.router.add_get("/status", page)
    app.router.add_get("/status.json", as_json)
    app.router.add_get("/", lambda r: web.HTTPFound("/status"))
    return app


def register(sub) -> None:
    p = sub.add_parser("status-page", help="serve the status page (charts per adapter version) on /status")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from streams.warehouse_server import open_warehouse

    web.run_app(create_app(open_warehouse()), host=args.host, port=args.port, print=None)
    return 0
