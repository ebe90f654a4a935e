"""Reach the embedded warehouse from other processes, through the process that owns it.

chdb opens a data path in exactly one process (the sink, in the local stack). Other components --
the learner, the status page, the admin API -- read and write the warehouse through a small HTTP
endpoint that the owning process serves on loopback (``WarehouseServer``), using ``RemoteWarehouse``,
which has the same methods as ``Warehouse`` (``query``, ``query_dicts``, ``command``, ``insert``,
``insert_events``, ``migrate``, ``counts``). Against a real ClickHouse server nobody needs this:
every process opens ``http(s)://`` directly.

Settings: the owner serves on ``ONPOLICY_WAREHOUSE_SERVE_PORT``; clients set
``ONPOLICY_WAREHOUSE_URL=onpolicy+http://127.0.0.1:PORT``. Requests carry a bearer token read from
``$ONPOLICY_HOME/secrets/warehouse_token`` (created by the owner, mode 0600).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

import orjson

from streams.settings import default_home

log = logging.getLogger(__name__)


def token_path() -> Path:
    return default_home() / "secrets" / "warehouse_token"


def ensure_token() -> str:
    path = token_path()
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    raise TypeError(type(value).__name__)


class WarehouseServer:
    """Serves one ``Warehouse`` on loopback: POST /query, /command, /insert (JSON), bearer token."""

    def __init__(self, warehouse, port: int, host: str = "127.0.0.1"):
        self.warehouse = warehouse
        self.token = ensure_token()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # requests are not worth a log line each
                pass

            def do_POST(self):
                auth = self.headers.get("authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {outer.token}".encode()):
                    return self._reply(401, {"error": "missing or wrong warehouse token"})
                try:
                    body = orjson.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                    wh = outer.warehouse
                    if self.path == "/query":
                        result = wh.client.query(body["sql"].replace("{db}", wh.db), parameters=body.get("parameters"))
                        return self._reply(200, {"columns": list(result.column_names),
                                                 "rows": [list(r) for r in result.result_rows]})
                    if self.path == "/command":
                        return self._reply(200, {"result": wh.command(body["sql"])})
                    if self.path == "/insert":
                        wh.insert(body["table"], body["rows"], body["columns"])
                        return self._reply(200, {"inserted": len(body["rows"])})
                    return self._reply(404, {"error": f"no route {self.path}"})
                except Exception as exc:  # the caller gets the database's message, not a traceback
                    return self._reply(400, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})

            def _reply(self, status: int, payload: dict) -> None:
                data = orjson.dumps(payload, default=_default, option=orjson.OPT_NAIVE_UTC)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="warehouse-server", daemon=True)

    def start(self) -> "WarehouseServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RemoteWarehouseError(RuntimeError):
    pass


class RemoteWarehouse:
    """The ``Warehouse`` interface over the owner's loopback endpoint (see the module docstring)."""

    def __init__(self, url: str, database: str, token: str | None = None, timeout_s: float = 120.0):
        self.base = "http://" + url.split("://", 1)[1].rstrip("/")
        self.db = database
        self.embedded = True
        self.token = token or token_path().read_text().strip()
        self.timeout_s = timeout_s
        from streams.settings import WarehouseSettings

        self.settings = WarehouseSettings(url=url, database=database)

    def _post(self, path: str, payload: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=orjson.dumps(payload, default=_default),
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {self.token}"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = orjson.loads(exc.read()).get("error", "")
            except Exception:
                message = str(exc)
            raise RemoteWarehouseError(message) from None

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        return [tuple(r) for r in self._post("/query", {"sql": sql.replace("{db}", self.db), "parameters": parameters})["rows"]]

    def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        out = self._post("/query", {"sql": sql.replace("{db}", self.db), "parameters": parameters})
        return [dict(zip(out["columns"], row)) for row in out["rows"]]

    def command(self, sql: str) -> Any:
        return self._post("/command", {"sql": sql.replace("{db}", self.db)})["result"]

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if rows:
            self._post("/insert", {"table": table, "rows": [list(r) for r in rows], "columns": list(columns)})

    # the higher-level helpers are the same code as the local Warehouse's
    from streams.warehouse import Warehouse as _W

    insert_events = _W.insert_events
    insert_dead_letters = _W.insert_dead_letters
    counts = _W.counts
    migrate = _W.migrate
    rollback = _W.rollback
    applied = _W.applied
    del _W


def open_warehouse(settings=None):
    """``Warehouse`` for chdb:// and http(s)://, ``RemoteWarehouse`` for onpolicy+http://."""
    from streams.settings import WarehouseSettings
    from streams.warehouse import Warehouse

    settings = settings or WarehouseSettings()
    if settings.url.startswith("onpolicy+http://"):
        return RemoteWarehouse(settings.url, settings.database)
    return Warehouse(settings)
