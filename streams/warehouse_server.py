"""Reach the embedded warehouse from other processes, through the process that owns it.

chdb opens a data path in exactly one process (the sink, in the local stack). Other components --
the learner, the status page, the admin API -- read and write the warehouse through a small HTTP
endpoint that the owning process serves on loopback (``WarehouseServer``), using ``RemoteWarehouse``,
which has the same methods as ``Warehouse`` (``query``, ``query_dicts``, ``command``, ``insert``,
``insert_events``, ``migrate``, ``counts``). Against a real ClickHouse server nobody needs this:
every process opens ``http(s)://`` directly.

Settings: the owner serves on ``ONPOLICY_SINK_WAREHOUSE_PORT`` (``onpolicy sink --warehouse-port``); clients set
``ONPOLICY_WAREHOUSE_URL=onpolicy+http://127.0.0.1:PORT``. Requests carry a bearer token read from
``$ONPOLICY_HOME/secrets/warehouse_token`` (created by the owner, mode 0600).

``open_warehouse()`` picks the right one: with no URL set, it finds the running local stack's owner
through ``$ONPOLICY_HOME/stack.json`` (see its docstring), so CLIs need nothing but ``ONPOLICY_HOME``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import http.client
import logging
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

import orjson

from streams.settings import WarehouseSettings, default_home
from streams.warehouse import Warehouse

log = logging.getLogger(__name__)


def token_path(home: Path | None = None) -> Path:
    """Where the owner of the warehouse under ``home`` (default ``$ONPOLICY_HOME``) keeps its token."""
    return (home or default_home()) / "secrets" / "warehouse_token"


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
    """The owner answered with an error (the database's message), or refused the token."""


class _Refused(Exception):
    """A 401 from the owner; ``RemoteWarehouse`` re-reads its token file once before giving up."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RemoteWarehouse:
    """The ``Warehouse`` interface over the owner's loopback endpoint (see the module docstring).

    The bearer token is the one given (to the constructor, or set on ``token`` later), used as is;
    otherwise it is read from ``$ONPOLICY_HOME/secrets/warehouse_token`` at the first request and read
    again once when the owner refuses it (a stack restarted over a fresh home has a new token), so a
    refusal means the token really is wrong.
    """

    def __init__(self, url: str, database: str, token: str | None = None, timeout_s: float = 120.0):
        self.base = "http://" + url.split("://", 1)[1].rstrip("/")
        self.db = database
        self.embedded = True
        self._token = token
        self._token_given = token is not None
        self.timeout_s = timeout_s
        self.settings = WarehouseSettings(url=url, database=database)

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self._read_token()
        return self._token

    @token.setter
    def token(self, value: str) -> None:
        self._token, self._token_given = value, True

    @staticmethod
    def _read_token() -> str:
        path = token_path()
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise RemoteWarehouseError(
                f"no warehouse token at {path}: the warehouse's owner (the local stack's sink) writes it there; "
                "start the stack (`onpolicy up`) with this ONPOLICY_HOME, or point ONPOLICY_HOME at the stack's"
            ) from None

    def _post(self, path: str, payload: dict) -> dict:
        body = orjson.dumps(payload, default=_default)
        try:
            return self._send(path, body)
        except _Refused as refused:
            fresh = None if self._token_given else self._read_token()
            if fresh is None or fresh == self._token:
                raise self._refusal(refused) from None
        self._token = fresh  # the owner's token changed since this process read it
        try:
            return self._send(path, body)
        except _Refused as refused:
            raise self._refusal(refused) from None

    def _refusal(self, refused: _Refused) -> RemoteWarehouseError:
        where = "the token given" if self._token_given else f"the token in {token_path()}"
        return RemoteWarehouseError(f"{refused.message}: the owner at {self.base} refused {where}; a client must "
                                    "use the owner's ONPOLICY_HOME (the one `onpolicy up` ran with)")

    def _send(self, path: str, body: bytes) -> dict:
        req = urllib.request.Request(self.base + path, data=body,
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
            if exc.code == 401:
                raise _Refused(message) from None
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
    insert_events = Warehouse.insert_events
    insert_dead_letters = Warehouse.insert_dead_letters
    counts = Warehouse.counts
    migrate = Warehouse.migrate
    rollback = Warehouse.rollback
    applied = Warehouse.applied


# A live owner answers SELECT 1 in milliseconds; a refused connection (no stack) fails at once. The
# bound only matters for a listener that never answers, and for an owner busy with a large insert
# (queries wait on its lock), which is why it is seconds and not milliseconds.
PROBE_TIMEOUT_S = 3.0


def stack_warehouse_url(home: Path | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """``onpolicy+http://127.0.0.1:PORT`` of the local stack's warehouse owner, if one answers.

    The port comes from ``<home>/stack.json`` (``"ports"."warehouse"``, written by ``onpolicy up``);
    the owner answers when an authenticated ``SELECT 1`` succeeds with the token in
    ``<home>/secrets/warehouse_token``. ``None`` when there is no stack file, no port in it, or no
    owner answering there (the stack is down, or the port belongs to something else).
    """
    home = home or default_home()
    try:
        port = int(orjson.loads((home / "stack.json").read_bytes())["ports"]["warehouse"])
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        log.warning("warehouse: ignoring %s (%s: %s)", home / "stack.json", type(exc).__name__, exc)
        return None
    url = f"onpolicy+http://127.0.0.1:{port}"
    try:
        token = token_path(home).read_text().strip()
        RemoteWarehouse(url, "system", token=token, timeout_s=timeout_s).query("SELECT 1")
    # OSError: no token file, refused connection, timeout (URLError is one); the rest: something other
    # than a WarehouseServer on that port (not HTTP, or not its JSON).
    except (OSError, RemoteWarehouseError, http.client.HTTPException, ValueError) as exc:
        log.info("warehouse: no local stack owner answers on port %d (%s)", port, exc)
        return None
    return url


def open_warehouse(settings: WarehouseSettings | None = None) -> Warehouse | RemoteWarehouse:
    """The warehouse for this process, by URL -- and, with none set, the running local stack's.

    - ``onpolicy+http://``: ``RemoteWarehouse`` through the owning process.
    - ``chdb://`` or ``http(s)://`` set explicitly (``ONPOLICY_WAREHOUSE_URL`` or the ``settings``
      passed in): ``Warehouse``, opened here. An explicit URL always wins.
    - Nothing set (the default ``chdb://$ONPOLICY_HOME/warehouse``): if the local stack runs on this
      home (``stack_warehouse_url`` finds its owner), ``RemoteWarehouse`` to it; otherwise that path
      opened here. Why: chdb opens a data path in exactly one process, and while the stack runs its
      sink holds this one, so opening it here would fail on the lock; reading through the sink needs
      nothing but ``ONPOLICY_HOME``.
    """
    settings = settings or WarehouseSettings()
    if settings.url.startswith("onpolicy+http://"):
        log.info("warehouse: %s (through its owner)", settings.url)
        return RemoteWarehouse(settings.url, settings.database)
    default_url = f"chdb://{default_home() / 'warehouse'}"
    if "url" not in settings.model_fields_set and settings.url == default_url:
        remote = stack_warehouse_url()
        if remote is not None:
            log.info("warehouse: the local stack's, through its owner at %s (chdb allows one process on %s)",
                     remote, default_url[len("chdb://"):])
            return RemoteWarehouse(remote, settings.database)
    log.info("warehouse: %s (opened in this process)", _without_credentials(settings.url))
    return Warehouse(settings)


def _without_credentials(url: str) -> str:
    """``http://user:pass@host`` -> ``http://host``: URLs go to logs, passwords must not."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return scheme + sep + netloc.rpartition("@")[2] + slash + path
