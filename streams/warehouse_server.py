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
import logging
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
    from streams.secret_files import ensure_secret_file

    return ensure_secret_file(token_path(), lambda: secrets.token_urlsafe(32))


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
                        with wh._lock:
                            result = wh.client.query(body["sql"].replace("{db}", wh.db),
                                                     parameters=_params_in(body.get("parameters")))
                        return self._reply(200, {"columns": list(result.column_names),
                                                 "types": [t.name for t in result.column_types],
                                                 "rows": [list(r) for r in result.result_rows]})
                    if self.path == "/command":
                        result = wh.command(body["sql"])
                        if not isinstance(result, (str, int, float, bool, type(None), list)):
                            result = None  # DDL answers with a summary object; there is nothing to return
                        return self._reply(200, {"result": result})
                    if self.path == "/insert":
                        types = dict(wh.query(
                            "SELECT name, type FROM system.columns WHERE database = %(d)s AND table = %(t)s",
                            {"d": wh.db, "t": body["table"]}))
                        convert = [_from_json_for(types.get(c, "")) for c in body["columns"]]
                        rows = [[f(v) for f, v in zip(convert, row)] for row in body["rows"]]
                        wh.insert(body["table"], rows, body["columns"])
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


_DT_TAG = "__datetime__:"


def _params_in(params: dict | None) -> dict | None:
    """Query parameters arrive as JSON: datetimes were sent tagged, turn them back."""
    if not params:
        return params
    return {k: dt.datetime.fromisoformat(v[len(_DT_TAG):]) if isinstance(v, str) and v.startswith(_DT_TAG) else v
            for k, v in params.items()}


def _from_json_for(ch_type: str):
    """A converter from the JSON form of a value back to what clickhouse-connect inserts for ``ch_type``."""
    inner = ch_type.replace("Nullable(", "").replace("LowCardinality(", "")
    if inner.startswith("DateTime"):
        return lambda v: dt.datetime.fromisoformat(v) if isinstance(v, str) else v
    if inner.startswith("Date"):
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    return lambda v: v


def _to_python_for(ch_type: str):
    """Query results come back as JSON: datetimes (naive UTC, as chdb returns them) from ISO strings."""
    inner = ch_type.replace("Nullable(", "").replace("LowCardinality(", "")
    if inner.startswith("DateTime"):
        return lambda v: dt.datetime.fromisoformat(v).replace(tzinfo=None) if isinstance(v, str) else v
    if inner.startswith("Date"):
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    return None


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

    def _query(self, sql: str, parameters: dict[str, Any] | None) -> dict:
        if parameters:
            parameters = {k: _DT_TAG + v.isoformat() if isinstance(v, dt.datetime) else v
                          for k, v in parameters.items()}
        out = self._post("/query", {"sql": sql.replace("{db}", self.db), "parameters": parameters})
        converters = [(i, f) for i, f in enumerate(_to_python_for(t) for t in out.get("types", [])) if f is not None]
        if converters:
            for row in out["rows"]:
                for i, f in converters:
                    row[i] = f(row[i])
        return out

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        return [tuple(r) for r in self._query(sql, parameters)["rows"]]

    def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        out = self._query(sql, parameters)
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
