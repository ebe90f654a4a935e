"""Secrets kept in files: created once, mode 0600, never rewritten."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def ensure_secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``; if there is none, write ``make()`` there first (0600, exclusive create,
    so two processes starting together agree on one secret)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
    return path.read_text().strip()
