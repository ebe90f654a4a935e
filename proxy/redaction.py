"""PII redaction applied to every captured event before it leaves the proxy.

A ``Redactor`` has ``redact(text: str) -> str``. Capture calls it once per event on every string
of the request, response, logprobs and error joined with NUL (``"\\x00"``), and puts the pieces back
where they came from, so a redactor must not match across (or remove) a NUL. Pluggable:
``redactor = "mypkg.pii:make_redactor"`` in the settings names a factory returning one.

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


_RULES: tuple[tuple[str, str, str], ...] = (
    # (name, precise pattern, detector). The detector starts with a literal or a character set, so
    # Python's regex engine scans for it quickly; the precise pattern (with its look-arounds) runs
    # only on text where the detector found something.
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", r"@"),
    ("secret", r"(?:\b(?:sk-(?:ant-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
               r"|xox[abposr]-[A-Za-z0-9-]{10,})|Bearer [A-Za-z0-9._~+/-]{16,}=*)",
     r"sk-|AKIA|gh[pousr]_|xox[abposr]-|Bearer "),
    ("phone", r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}(?![\w])"
              r"|(?<![\w+])\+\d{10,15}(?!\w)", r"\d[ .-]\d|\)[ .-]?\d|\+\d"),
)
_TAGS = {"email": "[EMAIL]", "secret": "[SECRET]", "phone": "[PHONE]"}


# Faster detectors for the default rules on ASCII text (the usual case), each a superset of its
# precise pattern, built from scans that run at memchr speed instead of the regex engine's
# per-character loop (which cost ~100 us per 2 KB request; bench/capture_cpu.py). They read the
# text's ASCII bytes.
# - email: an ``@``;
# - secret: each literal prefix is looked for around its rarest character (``-`` for ``sk-`` and
#   ``xox?-``, ``K`` for ``AKIA``, ``_`` for ``gh?_``, ``B`` for ``Bearer``): a ``find`` per
#   occurrence while there are few, else a substring search (CPython's is slow for 3-byte needles:
#   ~1.8 us per 3 KB each);
# - phone: every match of the precise pattern contains ``\d{3}[ .-]\d{3}`` or ``+\d{10}``. One
#   ``bytes.translate`` maps digits to ``D``, the separators to ``s`` and the rest to ``x``; then
#   those shapes are literal searches. Prices, dates, versions and plain numbers ("42.50",
#   "2026-11-26", "58213") no longer wake the precise phone pattern. Only for ASCII: ``\d`` also
#   matches other scripts' digits.
_SHAPES = bytearray(b"x" * 256)
_SHAPES[ord("0"):ord("9") + 1] = b"D" * 10
for _c in b" .-":
    _SHAPES[_c] = ord("s")
_SHAPES[ord("+")] = ord("+")
_SHAPES = bytes(_SHAPES)
_FEW = 12  # occurrences of a prefix's rare character worth checking one by one


def _around(data: bytes, char: bytes, needles: tuple[bytes, ...], at) -> bool:
    """Whether a needle occurs, looked for where ``char`` occurs (``at(data, i)``; ``find`` of one
    byte is a memchr) while it is rare, else by substring search."""
    i = data.find(char)
    checked = 0
    while i != -1:
        if at(data, i):
            return True
        checked += 1
        if checked == _FEW:
            return any(needle in data for needle in needles)
        i = data.find(char, i + 1)
    return False


def _at_dash(b: bytes, i: int) -> bool:  # sk- / xox?-
    return (i >= 2 and b[i - 2:i] == b"sk") or (i >= 4 and b[i - 4:i - 1] == b"xox")


def _at_k(b: bytes, i: int) -> bool:  # AKIA
    return i >= 1 and b[i - 1:i + 3] == b"AKIA"


def _at_underscore(b: bytes, i: int) -> bool:  # gh?_
    return i >= 3 and b[i - 3:i - 1] == b"gh" and b[i - 1] in b"pousr"


def _at_b(b: bytes, i: int) -> bool:  # Bearer
    return b.startswith(b"Bearer ", i)


def _maybe_email(data: bytes) -> bool:
    return b"@" in data


def _maybe_secret(data: bytes) -> bool:
    return (_around(data, b"-", (b"sk-", b"xox"), _at_dash)
            or _around(data, b"K", (b"AKIA",), _at_k)
            or _around(data, b"_", (b"gh",), _at_underscore)
            or _around(data, b"B", (b"Bearer ",), _at_b))


def _maybe_phone(data: bytes) -> bool:
    shaped = data.translate(_SHAPES)
    return b"DDDsDDD" in shaped or (b"+" in data and b"+DDDDDDDDDD" in shaped)


_ASCII_DETECTORS = {"email": _maybe_email, "secret": _maybe_secret, "phone": _maybe_phone}


class RegexRedactor:
    """The default redactor: a few regexes, each behind a fast detector so clean text costs little."""

    def __init__(self, rules: tuple[tuple[str, str, str], ...] = _RULES):
        self._rules = [(name, re.compile(pattern), re.compile(detector)) for name, pattern, detector in rules]
        # the default rules get the faster detectors above on ASCII text; custom rules their own
        self._default = rules is _RULES
        self._ascii = [_ASCII_DETECTORS[name] if self._default else None for (name, _, _) in self._rules]
        self.counts: dict[str, int] = {name: 0 for name, _, _ in rules}

    def redact(self, text: str) -> str:
        ascii_ = text.isascii()
        data = text.encode("ascii") if ascii_ and self._default else b""
        for (name, pattern, detector), fast in zip(self._rules, self._ascii):
            if fast is not None and ascii_:
                if not fast(data):
                    continue
            elif detector.search(text) is None:
                continue
            text, n = pattern.subn(_TAGS.get(name, "[REDACTED]"), text)
            if n:
                self.counts[name] += n
                data = text.encode("ascii") if data else data
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
