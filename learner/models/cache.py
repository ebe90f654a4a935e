"""The model cache: one directory per (model, build inputs), with checksums and a completion marker.

Layout: ``$ONPOLICY_HOME/models/<name>-<key>/`` where ``key`` hashes everything that decides the
bytes of the result (builder source, pinned versions, hyper-parameters). Durability promise: a build
writes into ``<dir>.tmp-<pid>``, writes ``checksums.sha256`` (sha256sum format, every file), then
renames the directory into place; a directory without ``checksums.sha256`` is never used. So an
interrupted build is redone, and a finished one is never half-visible to another process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

CHECKSUMS = "checksums.sha256"


class ChecksumMismatch(RuntimeError):
    """A cached model's files differ from the checksums written when it was built."""


def models_dir() -> Path:
    from learner.serving import onpolicy_home

    return onpolicy_home() / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_inputs(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def write_checksums(directory: Path) -> dict[str, str]:
    sums = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    (directory / CHECKSUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_checksums(directory: Path) -> dict[str, str]:
    sums = {}
    for line in (directory / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


def verify(directory: Path) -> dict[str, str]:
    """Re-hash every file; raise ChecksumMismatch naming the first file that changed."""
    expected = read_checksums(directory)
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise ChecksumMismatch(f"{path} is missing; rebuild with `onpolicy models build --force`")
        actual = sha256_file(path)
        if actual != digest:
            raise ChecksumMismatch(f"{path} has sha256 {actual}, expected {digest}; rebuild with `onpolicy models build --force`")
    return expected


def tree_digest(directory: Path) -> str:
    """One digest for a built model: the hash of its checksums file."""
    return hashlib.sha256((directory / CHECKSUMS).read_bytes()).hexdigest()


def is_complete(directory: Path) -> bool:
    return (directory / CHECKSUMS).is_file()


def staging_dir(final: Path) -> Path:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(staging: Path, final: Path) -> None:
    """Checksum the staged build and move it into place atomically (same filesystem)."""
    write_checksums(staging)
    if is_complete(final):
        # Another process finished the same build first; same inputs, same bytes: keep theirs,
        # never delete a directory a running server may be reading.
        shutil.rmtree(staging, ignore_errors=True)
        return
    if final.exists():  # an incomplete leftover (no checksums file): nobody can be using it
        shutil.rmtree(final)
    try:
        os.replace(staging, final)
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(staging, ignore_errors=True)
