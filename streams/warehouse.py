"""The ClickHouse warehouse, through clickhouse-connect: embedded chdb by default, a server by URL.

``Warehouse(settings)`` opens ``chdb:///abs/path`` in this process (chdb allows exactly one process
per data path, and one path per process: every other reader goes through the owning process) or
``http(s)://...`` for a ClickHouse server -- the same client API and the same SQL either way.

Migrations are numbered SQL files in ``streams/migrations`` (``NNNN_name.up.sql`` and
``.down.sql``), applied in order and recorded in ``<db>.schema_migrations``. Applied migrations are
never edited: a change is a new number.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Sequence

import orjson

from streams.errors import OnpolicyUserError
from streams.events import ControlEvent, FeedbackEvent, InteractionEvent, TallyEvent
from streams.settings import WarehouseSettings

log = logging.getLogger(__name__)


class WarehouseUnavailable(OnpolicyUserError):
    """The warehouse cannot be opened or reached; the message says what to check."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str


def migrations() -> list[Migration]:
    files = {f.name: f for f in resources.files("streams.migrations").iterdir() if f.name.endswith(".sql")}
    out = []
    for name in sorted(files):
        m = re.fullmatch(r"(\d{4})_(\w+)\.up\.sql", name)
        if not m:
            continue
        down = files.get(name.replace(".up.sql", ".down.sql"))
        if down is None:
            raise RuntimeError(f"migration {name} has no .down.sql")
        out.append(Migration(int(m.group(1)), m.group(2), files[name].read_text(), down.read_text()))
    versions = [m.version for m in out]
    if versions != list(range(1, len(out) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return out


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    # Statements end with ";" at the end of a line (a ";" inside a string or COMMENT is kept).
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip()]


_open_lock = threading.Lock()
_chdb_paths: dict[str, Any] = {}

# The embedded engine's global thread pool starts a thread only when a query needs one more than are
# idle, and keeps idle threads for good (max_thread_pool_free_size 1000); each thread keeps three
# descriptors open on its procfs counters once it has run part of a query. Filled lazily, the pool
# grew from 4 to ~12 threads over a 10-minute soak: +1.7 descriptors/min that read as a leak and hid
# any real one (docs/reliability.md). Starting the threads at open makes the engine's footprint flat
# from the first request: 16 covers the sink's peak (inserts, merges and the reconciliation and
# status queries at once; 10 seen under a 100 req/s soak) for ~48 descriptors and 16 idle stacks.
ENGINE_POOL_THREADS = 16


def _fill_engine_pool(client: Any) -> None:
    client.command(f"SELECT count() FROM numbers_mt({ENGINE_POOL_THREADS * 65536}) "
                   f"SETTINGS max_threads={ENGINE_POOL_THREADS}, max_block_size=8192")


def _open_client(url: str):
    import clickhouse_connect

    if url.startswith("chdb://"):
        path = url[len("chdb://"):]
        with _open_lock:
            # chdb: one data path per process, opened once; share the client.
            if path in _chdb_paths:
                return _chdb_paths[path]
            if _chdb_paths:
                other = next(iter(_chdb_paths))
                raise WarehouseUnavailable(
                    f"this process already owns the embedded warehouse at {other}; chdb opens one path per "
                    f"process, so {path} must be opened by another process (or point ONPOLICY_WAREHOUSE_URL at {other})"
                )
            try:
                client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
            except Exception as exc:
                msg = str(exc)
                if "lock" in msg.lower():
                    raise WarehouseUnavailable(
                        f"the embedded warehouse at {path} is in use by another process (chdb allows one); stop it, "
                        "or read through that process, or use a ClickHouse server (ONPOLICY_WAREHOUSE_URL=http://...)"
                    ) from None
                raise WarehouseUnavailable(f"cannot open the embedded warehouse at {path}: {msg.splitlines()[0]}") from None
            _fill_engine_pool(client)
            _chdb_paths[path] = client
            return client
    try:
        return clickhouse_connect.get_client(dsn=url)
    except Exception as exc:
        raise WarehouseUnavailable(
            f"cannot reach ClickHouse at {url} ({str(exc).splitlines()[0]}); check ONPOLICY_WAREHOUSE_URL"
        ) from None


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()


def _naive_utc(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(dt.timezone.utc).replace(tzinfo=None)


INTERACTION_COLUMNS = (
    "event_id", "ts", "schema_version", "interaction_id", "endpoint", "public_model", "upstream_model",
    "adapter_version", "upstream", "stream", "request", "response", "sampling", "prompt_tokens", "completion_tokens",
    "latency_first_token_ms", "latency_total_ms", "http_status", "error", "finish_reasons", "logprobs", "abandoned",
    "episode_id", "user_id", "tenant", "train_opt_out", "kafka_topic", "kafka_partition", "kafka_offset",
)
FEEDBACK_COLUMNS = (
    "event_id", "ts", "schema_version", "interaction_id", "episode_id", "kind", "value", "comment", "correction",
    "source", "weight", "idempotency_key", "user_id", "tenant", "metadata", "kafka_topic", "kafka_partition",
    "kafka_offset",
)
CONTROL_COLUMNS = (
    "event_id", "ts", "schema_version", "action", "actor", "reason", "public_model", "adapter_version", "payload",
    "kafka_topic", "kafka_partition", "kafka_offset",
)
TALLY_COLUMNS = (
    "event_id", "ts", "schema_version", "reporter", "minute", "interactions", "feedback", "kafka_topic",
    "kafka_partition", "kafka_offset",
)
DEAD_LETTER_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset", "reason", "payload")

Origin = tuple[str, int, int]  # kafka topic, partition, offset


def interaction_row(e: InteractionEvent, origin: Origin) -> list[Any]:
    usage = e.usage
    return [
        e.event_id, _naive_utc(e.ts), e.schema_version, e.interaction_id, e.endpoint, e.public_model,
        e.upstream_model or "", e.adapter_version or "", e.upstream or "", e.stream, _json(e.request),
        _json(e.response), _json(e.sampling), usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None, e.latency_first_token_ms, e.latency_total_ms, e.http_status,
        e.error or "", [r or "" for r in e.finish_reasons], _json(e.logprobs), e.abandoned, e.episode_id or "",
        e.user_id or "", e.tenant or "", e.train_opt_out, *origin,
    ]


def feedback_row(e: FeedbackEvent, origin: Origin) -> list[Any]:
    return [
        e.event_id, _naive_utc(e.ts), e.schema_version, e.interaction_id or "", e.episode_id or "", e.kind, e.value,
        e.comment or "", _json(e.correction), e.source, e.weight, e.idempotency_key or "", e.user_id or "",
        e.tenant or "", _json(e.metadata), *origin,
    ]


def control_row(e: ControlEvent, origin: Origin) -> list[Any]:
    return [
        e.event_id, _naive_utc(e.ts), e.schema_version, e.action, e.actor, e.reason, e.public_model or "",
        e.adapter_version or "", _json(e.payload), *origin,
    ]


def tally_row(e: TallyEvent, origin: Origin) -> list[Any]:
    return [e.event_id, _naive_utc(e.ts), e.schema_version, e.reporter, _naive_utc(e.minute), e.interactions,
            e.feedback, *origin]


class Warehouse:
    """One warehouse database. Thread-safe for chdb (calls are serialized) and for servers."""

    def __init__(self, settings: WarehouseSettings | None = None):
        self.settings = settings or WarehouseSettings()
        self.db = self.settings.database
        self.embedded = self.settings.url.startswith("chdb://")
        if self.embedded:
            from pathlib import Path

            Path(self.settings.url[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
        self.client = _open_client(self.settings.url)
        self._lock = threading.Lock()

    # -- raw access -------------------------------------------------------------------------
    def command(self, sql: str) -> Any:
        with self._lock:
            return self.client.command(sql.replace("{db}", self.db))

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        with self._lock:
            return self.client.query(sql.replace("{db}", self.db), parameters=parameters).result_rows

    def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            result = self.client.query(sql.replace("{db}", self.db), parameters=parameters)
            return [dict(zip(result.column_names, row)) for row in result.result_rows]

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        with self._lock:
            self.client.insert(f"{self.db}.{table}", rows, column_names=list(columns))

    # -- migrations -------------------------------------------------------------------------
    def migrate(self, target: int | None = None) -> list[int]:
        """Apply pending migrations up to ``target`` (default: all). Returns the versions applied."""
        self.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        self.command(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, "
            "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = MergeTree ORDER BY version"
        )
        done = self.applied()
        applied = []
        for m in migrations():
            if m.version in done or (target is not None and m.version > target):
                continue
            for stmt in _statements(m.up):
                self.command(stmt)
            self.insert("schema_migrations", [[m.version, m.name]], ["version", "name"])
            applied.append(m.version)
            log.info("warehouse %s: applied migration %04d_%s", self.db, m.version, m.name)
        return applied

    def rollback(self, target: int) -> list[int]:
        """Undo applied migrations above ``target``, newest first. Returns the versions undone."""
        undone = []
        for m in sorted(migrations(), key=lambda m: -m.version):
            if m.version <= target or m.version not in self.applied():
                continue
            for stmt in _statements(m.down):
                self.command(stmt)
            self.command(f"ALTER TABLE {{db}}.schema_migrations DELETE WHERE version = {m.version} SETTINGS mutations_sync = 1")
            undone.append(m.version)
        return undone

    def applied(self) -> set[int]:
        try:
            return {r[0] for r in self.query("SELECT version FROM {db}.schema_migrations")}
        except Exception:
            return set()

    # -- events -----------------------------------------------------------------------------
    def insert_events(self, items: Iterable[tuple[InteractionEvent | FeedbackEvent | ControlEvent | TallyEvent, Origin]]
                      ) -> dict[str, int]:
        """Insert events into their tables. Durable when this returns (the parts are written)."""
        rows: dict[str, list[list[Any]]] = {"interactions": [], "feedback": [], "control": [], "tallies": []}
        for event, origin in items:
            if isinstance(event, InteractionEvent):
                rows["interactions"].append(interaction_row(event, origin))
            elif isinstance(event, FeedbackEvent):
                rows["feedback"].append(feedback_row(event, origin))
            elif isinstance(event, TallyEvent):
                rows["tallies"].append(tally_row(event, origin))
            else:
                rows["control"].append(control_row(event, origin))
        columns = {"interactions": INTERACTION_COLUMNS, "feedback": FEEDBACK_COLUMNS, "control": CONTROL_COLUMNS,
                   "tallies": TALLY_COLUMNS}
        for table, table_rows in rows.items():
            self.insert(table, table_rows, columns[table])
        return {t: len(r) for t, r in rows.items()}

    def insert_dead_letters(self, rows: Sequence[tuple[str, int, int, str, str]]) -> None:
        self.insert("dead_letters", [list(r) for r in rows], DEAD_LETTER_COLUMNS)

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows and distinct event ids per table (equal when nothing is duplicated after FINAL)."""
        out = {}
        for table in ("interactions", "feedback", "control"):
            total, distinct = self.query(f"SELECT count(), uniqExact(event_id) FROM {{db}}.{table} FINAL")[0]
            raw = self.query(f"SELECT count() FROM {{db}}.{table}")[0][0]
            out[table] = {"final": int(total), "distinct": int(distinct), "raw": int(raw)}
        return out
