"""API keys for the feedback API: stored hashed, each scoped to one tenant.

A key is a random bearer token (``op-`` + 43 url-safe characters, 256 bits). The proxy never keeps the
plain key: configuration holds ``sha256:<hex>`` where hex = HMAC-SHA256(pepper, key) -- or plain
SHA-256(key) when no pepper is configured. The keys are random and long, so a hash is not worth
brute-forcing; the pepper (kept apart from the config, e.g. in a secret) makes a leaked config useless
on its own. A slow KDF (scrypt) would add milliseconds to every feedback request for no gain on
256-bit random secrets.

Tenant scoping: an interaction id is signed for the tenant it was served to (``proxy.interaction_ids``),
and a key of tenant A verifies ids only against A -- so it cannot give feedback on tenant B's
interactions even if it learns their ids, and the check needs no database. The tenant ``""`` is the
one requests without an ``x-onpolicy-tenant`` get (single-tenant deployments, the local demo).

Make a key: ``python -m proxy.api_keys new --tenant acme [--pepper-env NAME]`` prints the key (give it
to the client) and the entry for the config (keep it in the proxy's config).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from streams.secret_files import ensure_secret_file

HASH_PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, as the proxy holds it: a name (for logs and audit), a tenant, never the key."""

    name: str
    tenant: str


def hash_key(key: str, pepper: bytes | None) -> str:
    """The stored form of ``key``: ``sha256:<hex>``."""
    raw = key.encode()
    digest = hmac.new(pepper, raw, hashlib.sha256).hexdigest() if pepper else hashlib.sha256(raw).hexdigest()
    return HASH_PREFIX + digest


def new_key() -> str:
    return "op-" + secrets.token_urlsafe(32)


def ensure_key_file(path: Path, *, tenant: str = "", name: str = "demo", pepper: bytes | None = None) -> dict[str, str]:
    """Make a key in ``path`` once (mode 0600; kept if it exists) and return its config entry, which holds
    only the hash -- for a local stack that hands the key to its own clients (the demo's users)."""
    key = ensure_secret_file(path, new_key)
    return {"name": name, "tenant": tenant, "sha256": hash_key(key, pepper)}


class ApiKeyError(ValueError):
    """A key entry in the configuration that cannot be used; the message says how to fix it."""


class ApiKeys:
    """Looks up the tenant of a presented bearer token. One dict look-up on a hash per request."""

    def __init__(self, entries: Iterable[Mapping[str, str]], pepper: bytes | None = None):
        self._pepper = pepper
        self._by_hash: dict[str, ApiKey] = {}
        for i, entry in enumerate(entries):
            name = str(entry.get("name") or f"key{i}")
            tenant = entry.get("tenant")
            if not isinstance(tenant, str):
                raise ApiKeyError(f"api key {name!r} needs a 'tenant' (a string; \"\" for requests sent without a tenant)")
            stored = entry.get("sha256") or entry.get("hash")
            plain = entry.get("key")
            if stored and plain:
                raise ApiKeyError(f"api key {name!r}: give either 'sha256' or 'key', not both")
            if plain:
                # Accepted for convenience (env var, k8s secret); hashed now, the plain value is not kept.
                stored = hash_key(str(plain), pepper)
            if not isinstance(stored, str):
                raise ApiKeyError(f"api key {name!r} needs 'sha256' (from `python -m proxy.api_keys new`) or 'key'")
            if not stored.startswith(HASH_PREFIX):
                stored = HASH_PREFIX + stored
            hexpart = stored[len(HASH_PREFIX):]
            if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart.lower()):
                raise ApiKeyError(f"api key {name!r}: 'sha256' must be 64 hex digits (optionally prefixed 'sha256:')")
            self._by_hash[HASH_PREFIX + hexpart.lower()] = ApiKey(name=name, tenant=tenant)

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key's record, or None. The dict is keyed by a hash, so timing reveals nothing of a key."""
        if not presented:
            return None
        return self._by_hash.get(hash_key(presented, self._pepper))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.api_keys", description="Make a feedback API key for a tenant.")
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help="print a new key and its config entry")
    n.add_argument("--tenant", required=True, help='tenant the key may give feedback for ("" = requests without a tenant)')
    n.add_argument("--name", default=None, help="a label for logs and the audit trail")
    n.add_argument("--pepper-env", default=None, help="env var holding the proxy's api_key_pepper, if one is set")
    args = p.parse_args(argv)
    pepper = os.environ[args.pepper_env].encode() if args.pepper_env else None
    key = new_key()
    # the label is random, not a slice of the key: labels go to logs and events
    entry = {"name": args.name or f"{args.tenant or 'default'}-{secrets.token_hex(3)}", "tenant": args.tenant,
             "sha256": hash_key(key, pepper)}
    print(f"key (give to the client, shown once): {key}")
    print(f"config entry (api_keys): {json.dumps(entry)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
