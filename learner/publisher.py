"""The only code that calls vLLM's runtime adapter API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

Ordering promise of :meth:`Publisher.publish` (why routing can follow the event blindly):
1. the adapter files are verified (peft LoRA, rank within the server's ``--max-lora-rank``, sha256);
2. they are copied to a new immutable path ``<store>/<name>/`` (read-only; a name is never reused
   for other bytes, because vLLM caches prompt results by adapter name and path);
3. the adapter is loaded on **every** replica, and each replica answers a probe completion through it;
4. only then is the ``adapter_published`` control event emitted; the proxy changes routing on it.
If any replica fails step 3 after retries, the publish raises :class:`PublishError` naming each
failed replica and why, unloads the adapter from the replicas that did load it, and emits nothing:
routing never points at an adapter some replica cannot serve.

:meth:`Publisher.retire` unloads an adapter from every replica once no route points at it, then emits
``adapter_retired``. Requests already running on it finish normally (vLLM keeps the weights until
they do). Files stay in the store, so a retired version can be published again under its own name.

Concurrency: one publish or retire at a time per adapter name (a lock per name); different names
proceed in parallel. The number of adapters this publisher keeps loaded is bounded by
``max_loaded`` (by default the server's ``--max-loras``): after a publish, the oldest loaded adapters
that no route points at are retired. Eviction runs after the name lock is released, so two
publishes evicting each other's adapters cannot deadlock.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from prometheus_client import Counter, Gauge, Histogram

from learner.serving import http_json
from streams.events import ControlEvent

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.]*(?:-[a-z0-9_.]+)*-v\d{4,}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

PUBLISH_SECONDS = Histogram(
    "onpolicy_publish_seconds",
    "Publish latency: files verified -> loaded and probed on every replica -> control event emitted.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
PUBLISH_FAILURES = Counter(
    "onpolicy_publish_failures_total", "Publishes that did not make an adapter routable, by stage.", ["stage"]
)
REPLICA_FAILURES = Counter(
    "onpolicy_publish_replica_failures_total", "Replica load/probe/unload attempts that failed (before retries ran out).",
    ["replica", "operation"],
)
RETIRED = Counter("onpolicy_adapters_retired_total", "Adapters unloaded from every replica.", ["reason"])
LOADED = Gauge("onpolicy_adapters_loaded", "Adapters the publisher keeps loaded on its replicas.")


class EventSink(Protocol):
    def emit(self, event: ControlEvent) -> bool: ...


def adapter_name(family: str, version: int) -> str:
    """The immutable name of version ``version`` of ``family``: ``family-v0007``."""
    name = f"{family}-v{version:04d}"
    if not ADAPTER_NAME.match(name):
        raise InvalidAdapter(f"adapter name {name!r} is not of the form <family>-v0007 (lower case, digits, '-', '_', '.')")
    return name


class PublishError(RuntimeError):
    """An adapter was not made routable. ``failures`` maps each failed replica to the reason."""

    def __init__(self, message: str, name: str, failures: dict[str, str] | None = None):
        details = "".join(f"\n  {replica}: {reason}" for replica, reason in (failures or {}).items())
        super().__init__(message + details)
        self.name = name
        self.failures = dict(failures or {})


class InvalidAdapter(PublishError):
    """The adapter files are not a loadable peft LoRA adapter for this server (nothing was loaded)."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message, name)


class AdapterStillRouted(RuntimeError):
    """retire() was asked to unload an adapter that a route still points at."""


@dataclass(frozen=True)
class VerifiedAdapter:
    source: Path
    rank: int
    sha256: str
    target_modules: tuple[str, ...]
    base_model: str | None


@dataclass(frozen=True)
class PublishResult:
    name: str
    path: Path
    sha256: str
    rank: int
    replicas: tuple[str, ...]
    latency_s: float
    evicted: tuple[str, ...] = ()
    already_published: bool = False
    stages_s: dict[str, float] = field(default_factory=dict)  # verify+place, load+probe on all, event


@dataclass
class _Loaded:
    name: str
    path: Path
    sha256: str
    loaded_at: float = field(default_factory=time.monotonic)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without torch: 8-byte length, then JSON."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError("file too short for a safetensors header")
        header_len = int.from_bytes(raw_len, "little")
        if header_len <= 0 or header_len > 100_000_000:
            raise ValueError(f"implausible safetensors header length {header_len}")
        header = json.loads(f.read(header_len))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def adapter_sha256(directory: Path) -> str:
    """Digest of an adapter: the files vLLM reads, by name and content, in a fixed order."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        data = (directory / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def verify_adapter(directory: str | Path, *, max_rank: int, expected_sha256: str | None = None) -> VerifiedAdapter:
    """Check that ``directory`` holds a peft LoRA adapter vLLM can load; raise InvalidAdapter saying why."""
    directory = Path(directory)
    for name in ADAPTER_FILES:
        if not (directory / name).is_file():
            raise InvalidAdapter(f"{directory} has no {name}: save the adapter with peft's save_pretrained (safetensors)")
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except ValueError as exc:
        raise InvalidAdapter(f"{directory}/adapter_config.json is not JSON: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"{directory} is a {config.get('peft_type')!r} adapter; only peft LORA adapters can be served")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter(f"{directory}/adapter_config.json has no valid rank r (got {rank!r})")
    if rank > max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the server's --max-lora-rank {max_rank}; train with r <= {max_rank}")
    try:
        shapes = _safetensors_shapes(directory / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise InvalidAdapter(f"{directory}/adapter_model.safetensors is not readable safetensors: {exc}") from None
    lora_a = {k: s for k, s in shapes.items() if ".lora_A." in k}
    if not lora_a:
        raise InvalidAdapter(f"{directory}/adapter_model.safetensors holds no lora_A weights")
    for key, shape in lora_a.items():
        if not shape or shape[0] > max_rank:
            raise InvalidAdapter(f"weight {key} has rank {shape[0] if shape else '?'} > --max-lora-rank {max_rank}")
    digest = adapter_sha256(directory)
    if expected_sha256 is not None and digest != expected_sha256:
        raise InvalidAdapter(f"{directory} has sha256 {digest}, expected {expected_sha256}: the files changed after training")
    targets = config.get("target_modules") or ()
    return VerifiedAdapter(
        source=directory, rank=rank, sha256=digest,
        target_modules=tuple(sorted(targets)) if isinstance(targets, (list, tuple)) else (str(targets),),
        base_model=config.get("base_model_name_or_path"),
    )


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)[:500]


class _Retryable(Exception):
    pass


class Publisher:
    """Loads adapters on every vLLM replica, then announces them. Thread-safe; see the module docstring.

    ``replicas`` are OpenAI base URLs (``http://host:port/v1``). ``store_dir`` must be readable by
    every replica under the same path (local disk for one machine, a shared volume for a cluster).
    ``routed()`` returns the adapter names some route points at (the registry / proxy routing table);
    those are never evicted or retired.
    """

    def __init__(
        self,
        replicas: Sequence[str],
        store_dir: str | Path,
        producer: EventSink,
        *,
        max_lora_rank: int = 8,
        max_loaded: int = 4,
        routed: Callable[[], Iterable[str]] = lambda: (),
        actor: str = "learner",
        retries: int = 3,
        backoff_s: float = 0.2,
        timeout_s: float = 60.0,
        probe_prompt: str = "Hi",
    ):
        if not replicas:
            raise ValueError("a publisher needs at least one replica")
        self.replicas = tuple(r.rstrip("/") for r in replicas)
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.producer = producer
        self.max_lora_rank = max_lora_rank
        self.max_loaded = max_loaded
        self.routed = routed
        self.actor = actor
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.probe_prompt = probe_prompt
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._state = threading.Lock()
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.replicas)), thread_name_prefix="publisher")

    # -- public API ----------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """Adapter names this publisher keeps loaded, oldest first."""
        with self._state:
            return list(self._loaded)

    def publish(self, name: str, source_dir: str | Path, *, expected_sha256: str | None = None,
                public_model: str | None = None, payload: dict[str, Any] | None = None) -> PublishResult:
        """Make adapter ``name`` routable on every replica, then emit ``adapter_published``.

        Idempotent: publishing the same name with the same bytes again re-checks every replica and
        re-emits the event (so a publish interrupted after loading can simply be retried); the same
        name with different bytes raises InvalidAdapter.
        """
        started = time.monotonic()
        if not ADAPTER_NAME.match(name):
            PUBLISH_FAILURES.labels("verify").inc()
            raise InvalidAdapter(f"adapter name {name!r} is not of the form <family>-v0007", name)
        with self._name_lock(name):
            try:
                verified = verify_adapter(source_dir, max_rank=self.max_lora_rank, expected_sha256=expected_sha256)
                path, already = self._place(name, verified)
            except InvalidAdapter as exc:
                PUBLISH_FAILURES.labels("verify").inc()
                exc.name = name
                raise
            placed = time.monotonic()
            failures = self._on_all(lambda replica: self._load_and_probe(replica, name, path))
            served = time.monotonic()
            if failures:
                PUBLISH_FAILURES.labels("replica").inc()
                loaded_ok = [r for r in self.replicas if r not in failures]
                self._on_all(lambda replica: self._unload(replica, name), replicas=loaded_ok)
                raise PublishError(f"adapter {name} was not published: {len(failures)} of {len(self.replicas)} "
                                   "replicas failed to load or serve it; routing is unchanged", name, failures)
            with self._state:
                self._loaded.pop(name, None)
                self._loaded[name] = _Loaded(name, path, verified.sha256)
                LOADED.set(len(self._loaded))
            latency = time.monotonic() - started
            event = ControlEvent(
                action="adapter_published", actor=self.actor, adapter_version=name, public_model=public_model,
                reason="loaded and probed on every replica",
                payload={"path": str(path), "sha256": verified.sha256, "rank": verified.rank,
                         "target_modules": list(verified.target_modules), "replicas": list(self.replicas),
                         "latency_s": round(latency, 4), **(payload or {})},
            )
            if not self.producer.emit(event):
                PUBLISH_FAILURES.labels("event").inc()
                raise PublishError(f"adapter {name} is loaded on every replica but the control event was dropped "
                                   "(event spool full); routing is unchanged; publish again to retry", name)
            PUBLISH_SECONDS.observe(latency)
            stages = {"verify_place": placed - started, "load_probe": served - placed,
                      "event": time.monotonic() - served}
        evicted = self._evict(keep=name)
        log.info("published %s on %d replicas in %.3f s", name, len(self.replicas), latency)
        return PublishResult(name=name, path=path, sha256=verified.sha256, rank=verified.rank,
                             replicas=self.replicas, latency_s=latency, evicted=tuple(evicted), already_published=already,
                             stages_s=stages)

    def retire(self, name: str, *, reason: str = "retired") -> None:
        """Unload ``name`` from every replica and emit ``adapter_retired``. Refuses while it is routed."""
        if name in set(self.routed()):
            raise AdapterStillRouted(f"adapter {name} is still routed; re-point the route before retiring it")
        with self._name_lock(name):
            failures = self._on_all(lambda replica: self._unload(replica, name))
            with self._state:
                self._loaded.pop(name, None)
                LOADED.set(len(self._loaded))
            if failures:
                raise PublishError(f"adapter {name} could not be unloaded everywhere", name, failures)
            RETIRED.labels(reason).inc()
            self.producer.emit(ControlEvent(action="adapter_retired", actor=self.actor, adapter_version=name,
                                            reason=reason, payload={"replicas": list(self.replicas)}))

    def adopt_loaded(self) -> list[str]:
        """After a restart: take over adapters from this store that every replica already serves."""
        per_replica = []
        for replica in self.replicas:
            status, body = http_json("GET", f"{replica}/models", None, self.timeout_s)
            if status != 200:
                raise PublishError("cannot list models", "", {replica: f"HTTP {status}: {_error_text(body)}"})
            per_replica.append({c["id"]: c.get("root") for c in body.get("data", []) if c.get("parent")})
        common = set(per_replica[0]).intersection(*per_replica[1:])
        adopted = []
        with self._state:
            for name in sorted(common):
                root = Path(per_replica[0][name] or "")
                if root.parent == self.store_dir and name not in self._loaded and (root / ADAPTER_FILES[0]).exists():
                    self._loaded[name] = _Loaded(name, root, adapter_sha256(root))
                    adopted.append(name)
            LOADED.set(len(self._loaded))
        return adopted

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- steps ---------------------------------------------------------------------------------
    def _name_lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[name]

    def _place(self, name: str, verified: VerifiedAdapter) -> tuple[Path, bool]:
        """Copy the adapter to ``<store>/<name>`` once; the directory appears whole (rename) and read-only."""
        final = self.store_dir / name
        if final.exists():
            existing = adapter_sha256(final)
            if existing != verified.sha256:
                raise InvalidAdapter(f"adapter name {name} is already taken by other weights (sha256 {existing}); "
                                     "names are immutable: publish the new weights as the next version", name)
            return final, True
        staging = self.store_dir / f".{name}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for file_name in ADAPTER_FILES:
            shutil.copyfile(verified.source / file_name, staging / file_name)
            os.chmod(staging / file_name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        if adapter_sha256(staging) != verified.sha256:
            shutil.rmtree(staging, ignore_errors=True)
            raise InvalidAdapter(f"the files of {name} changed while being copied; try again", name)
        os.replace(staging, final)
        return final, False

    def _on_all(self, fn: Callable[[str], None], replicas: Sequence[str] | None = None) -> dict[str, str]:
        """Run ``fn`` on each replica in parallel; returns {replica: error} for those that failed."""
        targets = list(self.replicas if replicas is None else replicas)
        futures = {replica: self._pool.submit(fn, replica) for replica in targets}
        failures = {}
        for replica, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # each replica's failure is reported, not raised on its own
                failures[replica] = str(exc) or type(exc).__name__
        return failures

    def _retrying(self, replica: str, operation: str, attempt_fn: Callable[[], None]) -> None:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                attempt_fn()
                return
            except _Retryable as exc:
                last = str(exc)
            except OSError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {exc}"
            REPLICA_FAILURES.labels(replica, operation).inc()
            if attempt < self.retries:
                time.sleep(self.backoff_s * (2 ** attempt))
        raise RuntimeError(f"{operation} failed after {self.retries + 1} attempts: {last}")

    def _load_and_probe(self, replica: str, name: str, path: Path) -> None:
        def load() -> None:
            status, body = http_json("POST", f"{replica}/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, self.timeout_s)
            if status == 200:
                return
            if status == 400 and "already been loaded" in _error_text(body):
                # A retried publish: fine if the replica serves this name from this very path.
                status, models = http_json("GET", f"{replica}/models", None, self.timeout_s)
                roots = {c["id"]: c.get("root") for c in (models.get("data", []) if isinstance(models, dict) else [])}
                if roots.get(name) == str(path):
                    return
                raise RuntimeError(f"replica already serves {name} from {roots.get(name)}, not {path}")
            if status >= 500:
                raise _Retryable(f"HTTP {status}: {_error_text(body)}")
            raise RuntimeError(f"load refused, HTTP {status}: {_error_text(body)}")

        def probe() -> None:
            status, body = http_json("POST", f"{replica}/completions",
                                 {"model": name, "prompt": self.probe_prompt, "max_tokens": 1, "temperature": 0},
                                 self.timeout_s)
            if status == 200 and isinstance(body, dict) and body.get("choices"):
                return
            if status == 404:
                # The name is not registered (e.g. the replica restarted in between): load again.
                raise _Retryable(f"probe: HTTP 404: {_error_text(body)}")
            if status >= 500:
                raise _Retryable(f"probe: HTTP {status}: {_error_text(body)}")
            raise RuntimeError(f"probe completion refused, HTTP {status}: {_error_text(body)}")

        self._retrying(replica, "load", load)

        def probe_or_reload() -> None:
            try:
                probe()
            except _Retryable:
                load()
                raise

        self._retrying(replica, "probe", probe_or_reload)

    def _unload(self, replica: str, name: str) -> None:
        def unload() -> None:
            status, body = http_json("POST", f"{replica}/unload_lora_adapter", {"lora_name": name}, self.timeout_s)
            if status in (200, 404):  # 404: not loaded there (already unloaded, or restarted)
                return
            if status >= 500:
                raise _Retryable(f"HTTP {status}: {_error_text(body)}")
            raise RuntimeError(f"unload refused, HTTP {status}: {_error_text(body)}")

        self._retrying(replica, "unload", unload)

    def _evict(self, keep: str) -> list[str]:
        """Retire the oldest unrouted adapters until at most ``max_loaded`` stay loaded."""
        evicted = []
        while True:
            routed = set(self.routed())
            with self._state:
                if len(self._loaded) <= self.max_loaded:
                    return evicted
                victims = [n for n in self._loaded if n != keep and n not in routed]
            if not victims:
                log.warning("%d adapters loaded (max %d) but every other one is routed; none evicted",
                            len(self._loaded), self.max_loaded)
                return evicted
            try:
                self.retire(victims[0], reason="evicted: over max_loaded")
            except (AdapterStillRouted, PublishError) as exc:
                log.warning("could not evict %s: %s", victims[0], exc)
                return evicted
            evicted.append(victims[0])
