"""Interaction ids: time-ordered, and signed so the feedback API can reject forged ids without a
database look-up.

Shape: ``<prefix>op1.<uuid7 hex>.<tag>`` where ``prefix`` is what the endpoint's ids normally start
with (``chatcmpl-``, ``cmpl-``, ...; the OpenAI SDK does not care, people recognise it) and ``tag`` is
the first 20 bytes of HMAC-SHA256(key, ``op1.<uuid7 hex>|<tenant>``) in hex. Binding the tenant means a
feedback key of tenant A cannot use an id issued to tenant B even if it learns it. The same id is the
response ``id`` (chat, completions) and the ``x-onpolicy-interaction-id`` header.
"""

from __future__ import annotations

import hashlib
import hmac

import uuid_utils

VERSION_TAG = "op1."
_TAG_HEX = 40


class InteractionIds:
    """Issues and verifies signed interaction ids. Every replica must use the same key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the interaction-id signing key must be at least 16 bytes")
        self._key = key

    def _tag(self, body: str, tenant: str | None) -> str:
        msg = f"{body}|{tenant or ''}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:_TAG_HEX]

    def issue(self, prefix: str = "", tenant: str | None = None) -> str:
        body = VERSION_TAG + uuid_utils.uuid7().hex
        return f"{prefix}{body}.{self._tag(body, tenant)}"

    def verify(self, interaction_id: str, tenant: str | None = None) -> bool:
        """True if this proxy (or a replica with the same key) issued the id for this tenant."""
        if not isinstance(interaction_id, str):
            return False
        at = interaction_id.find(VERSION_TAG)
        if at < 0:
            return False
        body, dot, tag = interaction_id[at:].rpartition(".")
        if not dot or len(tag) != _TAG_HEX or len(body) != len(VERSION_TAG) + 32:
            return False
        return hmac.compare_digest(tag, self._tag(body, tenant))
