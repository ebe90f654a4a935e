"""PII redaction applied to every captured event before it leaves the proxy.

A ``Redactor`` rewrites JSON text (the serialized request and response) and must keep it valid
JSON: the default never matches across a quote or backslash and replaces with plain ASCII tags.
Pluggable: ``redactor = "mypkg.pii:make_redactor"`` in the settings names a factory returning any
object with ``redact(text: str) -> str``.

Default rules (each counted, so /metrics shows what was redacted):
- emails                       -> ``[EMAIL]``
- phone numbers with separators or a leading ``+`` (``+1 415 555 0100``, ``(415) 555-0100``)
  -> ``[PHONE]``; bare digit runs are left alone (seeds, token ids, numbers in prose);
- API-key-like strings (``sk-...``, ``sk-ant-...``, ``AKIA...``, ``ghp_...``, ``xox?-...``,
  ``Bearer <token>``)            -> ``[SECRET]``.
"""

from __future__ import annotations

import importlib
import re
from typing import Protocol


class Redactor(Protocol):
    def redact(self, text: str) -> str: ...


_RULES: tuple[tuple[str, str, str | None], ...] = (
    # (name, pattern, cheap substring that must be present for the pattern to possibly match)
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "@"),
    ("secret", r"(?:\b(?:sk-(?:ant-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
               r"|xox[abposr]-[A-Za-z0-9-]{10,})|Bearer [A-Za-z0-9._~+/-]{16,}=*)", None),
    ("phone", r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}(?![\w])"
              r"|(?<![\w+])\+\d{10,15}(?!\w)", None),
)
_TAGS = {"email": "[EMAIL]", "secret": "[SECRET]", "phone": "[PHONE]"}


class RegexRedactor:
    """The default redactor: a few regexes, with a substring pre-check so clean text costs little."""

    def __init__(self, rules: tuple[tuple[str, str, str | None], ...] = _RULES):
        self._rules = [(name, re.compile(pattern), hint) for name, pattern, hint in rules]
        self.counts: dict[str, int] = {name: 0 for name, _, _ in rules}

    def redact(self, text: str) -> str:
        for name, pattern, hint in self._rules:
            if hint is not None and hint not in text:
                continue
            text, n = pattern.subn(_TAGS.get(name, "[REDACTED]"), text)
            if n:
                self.counts[name] += n
        return text


class NoRedaction:
    counts: dict[str, int] = {}

    def redact(self, text: str) -> str:
        return text


def default_redactor() -> RegexRedactor:
    return RegexRedactor()


def load_redactor(spec: str) -> Redactor:
    """``'module:factory'`` -> the factory's redactor; ``'none'`` -> no redaction."""
    if spec == "none":
        return NoRedaction()
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"redactor {spec!r} cannot be loaded ({exc}); set redactor to 'module:factory' or 'none'") from None
    redactor = factory()
    if not callable(getattr(redactor, "redact", None)):
        raise ValueError(f"redactor {spec!r} returned {type(redactor).__name__}, which has no redact(text) method")
    return redactor
