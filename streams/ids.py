"""Time-ordered identifiers (UUIDv7, RFC 9562) and UTC timestamps."""

from __future__ import annotations

import datetime as dt

import uuid_utils


def new_id() -> str:
    """A UUIDv7 as a string: unique, and sortable by creation time (millisecond precision)."""
    return str(uuid_utils.uuid7())


def id_time(event_id: str) -> dt.datetime:
    """The creation time embedded in a UUIDv7 (UTC)."""
    millis = int(event_id.replace("-", "")[:12], 16)
    return dt.datetime.fromtimestamp(millis / 1000, tz=dt.timezone.utc)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
