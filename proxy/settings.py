"""The proxy's settings: one frozen object, from flags, env vars (``ONPOLICY_PROXY_`` prefix) and one
config file, validated at start with messages that say how to fix them.

Precedence, highest first: constructor arguments (the CLI passes its flags this way), env vars,
the config file (``ONPOLICY_PROXY_CONFIG`` or ``--config``; YAML, JSON or TOML by extension), defaults.

The config file may also carry ``model_list`` in LiteLLM's convention, for hosted providers::

    model_list:
      - model_name: gpt-4o-mini            # the public name clients send
        litellm_params:
          model: openai/gpt-4o-mini        # litellm's provider/model
          api_key: os.environ/OPENAI_API_KEY   # read from the environment at call time
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streams.settings import KafkaSettings, ProducerSettings, default_home


class HostedModel(BaseModel):
    """One hosted model served through litellm (LiteLLM's ``model_list`` entry shape)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(description="The public model name clients send.")
    litellm_params: dict[str, Any] = Field(
        description="Passed to litellm.acompletion; must contain 'model' (provider/model). "
        "A value 'os.environ/NAME' is read from the environment at call time, never stored.")

    @field_validator("litellm_params")
    @classmethod
    def _has_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("model"), str) or "/" not in value["model"]:
            raise ValueError("litellm_params.model must be 'provider/model', e.g. 'openai/gpt-4o-mini'")
        return value


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"proxy config file {path} does not exist; fix ONPOLICY_PROXY_CONFIG / --config")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:  # pragma: no cover - depends on the environment
                raise ValueError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or use .json/.toml") from None
            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"proxy config file {path} must end in .yaml, .yml, .json or .toml")
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot parse proxy config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"proxy config file {path} must hold a mapping of settings at the top level")
    # LiteLLM configs nest server settings under general_settings; accept ours flat or under 'proxy'.
    return dict(data.get("proxy", {}), **{k: v for k, v in data.items() if k != "proxy"})


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the one config file named by ``config`` (init arg) or ``ONPOLICY_PROXY_CONFIG``."""

    def __init__(self, settings_cls, path: str | None):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used instead
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        return _read_config_file(Path(self.path))


def _default_key_file() -> Path:
    return default_home() / "proxy" / "interaction-id.key"


class ProxySettings(BaseSettings):
    """Everything the proxy needs. Frozen; built once by ``onpolicy proxy`` and passed down."""

    model_config = SettingsConfigDict(env_prefix="ONPOLICY_PROXY_", frozen=True, extra="forbid",
                                      env_nested_delimiter="__")

    config: Path | None = Field(default=None, description="The config file these settings were read from (YAML/JSON/TOML).")
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on.")

    upstream_url: str = Field(default="http://127.0.0.1:8000/v1",
                              description="Base URL of the vLLM (or other OpenAI-compatible) server, ending in /v1.")
    upstream_api_key: SecretStr | None = Field(
        default=None, description="Sent upstream as 'Authorization: Bearer ...'. Unset: the client's Authorization is forwarded.")
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0, description="Connecting to the upstream; past it: 502.")
    upstream_timeout_s: float = Field(
        default=600.0, gt=0, description="Whole non-streaming upstream call, and the wait for a stream's first byte; past it: 504.")
    upstream_read_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest silence between two chunks of a stream before it is cut (recorded as an upstream error).")
    upstream_max_connections: int = Field(default=1024, ge=1, description="Pooled keep-alive connections to the upstream.")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024,
                                description="Largest request body accepted; larger gets 413. aiohttp's default (1 MiB) is too small for long prompts.")

    # -- hostile clients (proxy/http_server.py, proxy/middleware.py; docs/proxy.md "Limits and timeouts") --
    request_header_timeout_s: float = Field(
        default=10.0, ge=0, description="Time a client has to send a request's whole head (request line and headers), from "
        "the connection's start or the next request's first byte; past it: 408 and the connection is closed (slowloris). 0: no limit.")
    request_body_timeout_s: float = Field(
        default=60.0, ge=0, description="Time a client has to send a request's whole body once its head arrived; past it: 408 "
        "and the connection is closed (a trickled body). 0: no limit.")
    keepalive_timeout_s: float = Field(default=75.0, gt=0, description="An idle kept-alive client connection is closed after this long.")
    max_header_field_bytes: int = Field(default=16384, ge=1024, description="Longest request header line; longer gets 431.")
    max_request_line_bytes: int = Field(default=8190, ge=1024, description="Longest request line (method, URL, version); longer gets 414.")
    max_headers: int = Field(default=128, ge=16, description="Most headers in one request; more gets 431.")

    capture: bool = Field(default=True, description="Emit one InteractionEvent per request to Kafka (through the spool).")
    capture_mode: Literal["process", "inline"] = Field(
        default="process", description="'process': events are built and sent by a capture worker process fed through a pipe "
        "(the relay's loop only hands bytes over); 'inline': in the proxy process, right after each response.")
    capture_queue_bytes: int = Field(default=256 * 1024 * 1024, ge=0,
                                     description="Process mode: memory for exchanges waiting while the worker's pipe is full; past it they are dropped and counted.")
    capture_worker_cpus: str | None = Field(default=None, description="Process mode: pin the capture worker to these CPUs (taskset list, e.g. '1'), away from the relay.")
    capture_max_event_bytes: int = Field(default=900_000, ge=10_000,
                                         description="Keep each event under this size (Kafka's default message limit is 1 MB): longer strings are cut, with a note.")
    reconcile_tally_interval_s: float = Field(
        default=5.0, ge=0, description="Report this replica's per-minute counts (requests handed to capture, feedback accepted) "
        "this often as tally events, for the sink's reconciliation (streams/reconcile.py); 0 = off.")
    redactor: str = Field(default="proxy.redaction:default_redactor",
                          description="'module:factory' returning a Redactor; applied before an event leaves the proxy. 'none' disables redaction.")
    follow_control: bool = Field(default=True, description="Build the routing table from the control topic; off: names always pass through.")
    interaction_id_key: SecretStr | None = Field(
        default=None, description="HMAC key signing interaction ids; every replica must share it. Unset: read (or created) at interaction_id_key_file.")
    interaction_id_key_file: Path = Field(default_factory=_default_key_file,
                                          description="Where the signing key lives when interaction_id_key is unset.")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM, how long in-flight requests and streams may take to finish.")
    model_list: tuple[HostedModel, ...] = Field(default=(), description="Hosted models served through litellm (LiteLLM config convention).")

    # -- feedback and admin APIs (proxy/feedback.py, proxy/admin.py) --
    api_keys: tuple[dict[str, str], ...] = Field(
        default=(), description="Feedback API keys: [{name, tenant, sha256}] (sha256 from `python -m proxy.api_keys new`; "
        "'key' instead of 'sha256' is hashed at start). Tenant \"\" = requests sent without x-onpolicy-tenant.")
    api_keys_file: Path | None = Field(default=None, description="A JSON file with more api_keys entries (a list).")
    api_key_pepper: SecretStr | None = Field(default=None, description="HMAC pepper for stored key hashes; unset: plain SHA-256.")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token of the /admin API. Unset: read (or created) at admin_token_file.")
    admin_token_file: Path = Field(default_factory=lambda: default_home() / "secrets" / "admin_token",
                                   description="Where the admin token lives when admin_token is unset (created once, 0600).")
    feedback_max_batch: int = Field(default=100, ge=1, le=10_000, description="Most feedback items in one batch request.")
    feedback_max_text_chars: int = Field(default=20_000, ge=1, description="Longest comment, and longest correction message content.")
    feedback_max_metadata_bytes: int = Field(default=16_384, ge=0, description="Largest metadata object (as JSON) on one feedback item.")
    feedback_score_min: float = Field(default=0.0, description="Lowest value a kind=score feedback may carry.")
    feedback_score_max: float = Field(default=1.0, description="Highest value a kind=score feedback may carry.")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Broker settings (ONPOLICY_KAFKA_* also apply).")
    producer: ProducerSettings = Field(
        default_factory=lambda: ProducerSettings(spool_dir=default_home() / "spool" / "proxy"),
        description="The event producer's spool; one spool directory per proxy process.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        path = init_settings.init_kwargs.get("config") or os.environ.get("ONPOLICY_PROXY_CONFIG")
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, str(path) if path else None))

    @field_validator("upstream_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"upstream_url {value!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
        value = value.rstrip("/")
        if not value.endswith("/v1"):
            raise ValueError(f"upstream_url {value!r} must end in /v1 (the OpenAI API root), e.g. http://127.0.0.1:8000/v1")
        return value

    @field_validator("redactor")
    @classmethod
    def _redactor(cls, value: str) -> str:
        if value != "none" and ":" not in value:
            raise ValueError(f"redactor {value!r} must be 'module:factory' (e.g. proxy.redaction:default_redactor) or 'none'")
        return value

    @model_validator(mode="after")
    def _unique_hosted(self) -> "ProxySettings":
        names = [m.model_name for m in self.model_list]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model_list names must be unique; duplicated: {dupes}")
        return self

    @model_validator(mode="after")
    def _score_range(self) -> "ProxySettings":
        if not self.feedback_score_min < self.feedback_score_max:
            raise ValueError(f"feedback_score_min ({self.feedback_score_min}) must be below feedback_score_max ({self.feedback_score_max})")
        return self

    def signing_key(self) -> bytes:
        """The interaction-id HMAC key: the configured one, or the key file (created once, 0600)."""
        if self.interaction_id_key is not None:
            key = self.interaction_id_key.get_secret_value().encode()
            if len(key) < 16:
                raise ValueError("interaction_id_key must be at least 16 characters; use e.g. `openssl rand -hex 32`")
            return key
        path = self.interaction_id_key_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            # link() fails if the file exists: of two replicas starting together, one key wins and
            # both read that one below.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip().encode()
