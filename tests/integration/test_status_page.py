"""The status page against real data in the warehouse, loaded in headless Chromium (Debian's)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from aiohttp import web

from deploy.status_page import create_app
from streams.embedded import free_port
from streams.events import ControlEvent, FeedbackEvent, InteractionEvent

ARTIFACTS = Path(__file__).parents[2] / "artifacts"


def _seed(warehouse, home: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    items, fb = [], []
    for minute in range(12):
        for k in range(5):
            version = "demo-v0001" if minute < 6 else "demo-v0002"
            ts = now - dt.timedelta(minutes=12 - minute, seconds=k)
            e = InteractionEvent(ts=ts, interaction_id=f"i-{minute}-{k}", endpoint="/v1/chat/completions",
                                 public_model="demo", adapter_version=version, request={"messages": []})
            items.append((e, ("i", 0, len(items))))
            good = (k + minute) % 3 != 0 if version == "demo-v0002" else k % 2 == 0
            fb.append((FeedbackEvent(ts=ts + dt.timedelta(seconds=1), interaction_id=e.interaction_id, kind="thumbs",
                                     value=1 if good else -1), ("f", 0, len(fb))))
    control = ControlEvent(ts=now - dt.timedelta(minutes=6), action="adapter_promoted", actor="canary",
                           reason="won on live feedback", public_model="demo", adapter_version="demo-v0002")
    routing = ControlEvent(ts=now - dt.timedelta(minutes=6), action="routing_changed", actor="canary",
                           payload={"demo": {"adapter": "demo-v0002"}})
    warehouse.insert_events(items + fb + [(control, ("c", 0, 0)), (routing, ("c", 0, 1))])
    (home / "demo").mkdir(parents=True)
    with open(home / "demo" / "truth.jsonl", "w") as f:
        for i, (e, _) in enumerate(items):
            f.write(json.dumps({"ts": e.ts.timestamp(), "truth": float(i % 3 != 0), "adapter_version": e.adapter_version}) + "\n")


@pytest.fixture
def status_url(warehouse, tmp_path):
    _seed(warehouse, tmp_path)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(warehouse, home=tmp_path))
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is required (deploy/local/setup.sh installs it)"
    profile = ARTIFACTS / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=timeout)


def test_status_json_has_series_per_version(status_url):
    import urllib.request

    data = json.loads(urllib.request.urlopen(status_url + "/status.json", timeout=30).read())
    assert set(data["requests_per_minute"]) == {"demo-v0001", "demo-v0002"}
    assert set(data["thumbs_up_rate"]) == {"demo-v0001", "demo-v0002"}
    assert data["routing"] == {"demo": {"adapter": "demo-v0002"}}
    assert data["true_success_demo"]


def test_chromium_renders_the_charts_with_data_on_a_phone_width_screen(status_url):
    ARTIFACTS.mkdir(exist_ok=True)
    dom = _chromium("--window-size=390,2200", "--virtual-time-budget=5000", "--dump-dom", status_url + "/status")
    assert dom.returncode == 0, dom.stderr[-2000:]
    charts = re.findall(r'<figure class="chart" data-points="(\d+)"', dom.stdout)
    assert len(charts) >= 4 and all(int(n) > 0 for n in charts[:2] + charts[3:4]), charts
    assert dom.stdout.count('class="series"') >= 6
    assert 'class="mark"' in dom.stdout  # the promotion is marked
    assert "True success (demo only" in dom.stdout
    shot = _chromium("--window-size=390,2200", "--virtual-time-budget=5000",
                     f"--screenshot={ARTIFACTS / 'status-phone.png'}", status_url + "/status")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert (ARTIFACTS / "status-phone.png").stat().st_size > 10_000
