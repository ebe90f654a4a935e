"""An append-only, crash-safe on-disk log of serialized events: the producer's write-ahead spool.

Every event ``emit()`` accepts is appended here *before* it is sent to Kafka, and the spool is
trimmed only once the broker has acknowledged (``acks=all``) everything up to a point. So the spool
is both the producer's queue and its outage buffer: a broker that is down for an hour just makes
the spool longer, and a process killed at any moment finds every accepted event on disk when it
restarts.

Layout: ``DIR/seg-000000000001.log``, ``seg-...2.log``, ... plus ``DIR/acked`` (the position of
the first record not yet acknowledged: ``<segment> <byte offset>``, replaced atomically).

Record: ``MAGIC(2) | body length u32 | crc32c(body) u32 | body`` where body is
``topic length u16 | topic | key length u16 | key | payload``. Little endian.

Durability (the fsync policy):
- each record (or each batch, ``append_many``) is written with one ``write(2)`` on an ``O_APPEND``
  descriptor before ``append`` returns, so it survives SIGKILL of this process (it is in the
  kernel's page cache);
- the active segment is ``fsync``-ed every ``fsync_interval_s`` (default 1 s) and on rotation and
  close, so a power loss or kernel crash loses at most the last ``fsync_interval_s`` of records;
- ``acked`` is written with write-to-temp + ``rename`` (atomic); losing it only means records that
  were already delivered are delivered again, which the sink deduplicates by event id.

Damage: a torn tail (a crash mid-write at the OS level) or a corrupt record is reported (logged and
counted in ``corrupt_records``), skipped by scanning for the next valid record, and the rest replays.
A reopened spool never appends to an old segment: it starts a new one.

Reading: the records appended by this process are also kept in memory (``tail_bytes``, counting
each record's payload plus 4 KiB) until the reader has passed them, so the sender, which usually
reads what was just appended, does not read the file back and check every CRC again
(bench/capture_cpu.py: the sender's CPU per record). The file stays the truth: after a rewind, a
restart, or when the reader fell behind the memory budget, ``read`` reads the file as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections import deque
from pathlib import Path
from typing import NamedTuple, Sequence

import crc32c

from streams.errors import OnpolicyUserError

log = logging.getLogger(__name__)

MAGIC = b"\xa7\x5e"
_HEADER = struct.Struct("<2sII")
_U16 = struct.Struct("<H")
_MAX_BODY = 64 * 1024 * 1024
# What the in-memory tail charges a record beyond its payload's length: orjson returns a small payload
# inside a 4 KiB allocation (3.13.0), and the tuples around it; so tiny events cannot make the tail
# hold many times its budget while the sender is not reading (broker down).
_TAIL_OVERHEAD = 4096
_INCOMPLETE = object()
_BAD = object()


class SpoolFull(Exception):
    """The disk budget is exhausted (or the disk itself is full)."""


class SpoolLocked(OnpolicyUserError):
    """Another process owns this spool directory."""


class Position(NamedTuple):
    """A place in the spool: a segment number and a byte offset inside it (ordered as a tuple)."""

    segment: int
    offset: int


class Record(NamedTuple):
    topic: str
    key: bytes
    payload: bytes
    end: Position  # the position just after this record


def _record_head(topic: str, key: bytes, payload: bytes) -> bytes:
    """Everything of a record but its payload: header, topic and key (the CRC runs on without a copy)."""
    topic_b = topic.encode()
    prefix = b"".join((_U16.pack(len(topic_b)), topic_b, _U16.pack(len(key)), key))
    return _HEADER.pack(MAGIC, len(prefix) + len(payload), crc32c.crc32c(payload, crc32c.crc32c(prefix))) + prefix


def _decode_body(body: bytes) -> tuple[str, bytes, bytes]:
    (tlen,) = _U16.unpack_from(body, 0)
    topic = body[2 : 2 + tlen].decode()
    (klen,) = _U16.unpack_from(body, 2 + tlen)
    kstart = 4 + tlen
    return topic, body[kstart : kstart + klen], body[kstart + klen :]


class Spool:
    """The write-ahead spool. ``append`` is thread-safe; one reader (the sender) at a time."""

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 16 * 1024 * 1024,
                 disk_budget_bytes: int = 1024 * 1024 * 1024, fsync_interval_s: float = 1.0,
                 tail_bytes: int = 8 * 1024 * 1024):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.fsync_interval_s = fsync_interval_s
        self.corrupt_records = 0
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(
                f"spool directory {self.dir} is in use by another process; give each producer its own "
                "spool directory (ONPOLICY_SPOOL_DIR)"
            ) from None
        self._sizes: dict[int, int] = {n: p.stat().st_size for n, p in self._segment_paths().items()}
        self._acked = self._read_acked()
        # Never append to a segment written by an earlier process: its tail may be torn.
        self._active = max(self._sizes, default=0) + 1
        self._fd = self._open_segment(self._active)
        self._acked = self._normalize(self._acked)
        self._delete_delivered(self._acked)
        self._dirty = False
        self._closed = False
        # (start, record) of what this process appended and the reader has not passed yet, in order
        # and without gaps; cleared whenever a record does not fit in ``tail_bytes``
        self.tail_bytes = tail_bytes
        self._tail: deque[tuple[Position, Record]] = deque()
        self._tail_size = 0
        self._stop = threading.Event()
        self._fsync_thread = threading.Thread(target=self._fsync_loop, name="spool-fsync", daemon=True)
        self._fsync_thread.start()

    # -- writing ---------------------------------------------------------------------------
    def append(self, topic: str, key: bytes, payload: bytes) -> Position:
        """Append one record; when this returns the record survives SIGKILL. Raises SpoolFull."""
        return self.append_many(((topic, key, payload),))

    def append_many(self, records: Sequence[tuple[str, bytes, bytes]]) -> Position:
        """Append records with one ``write(2)``: all of them survive SIGKILL when this returns, or
        none was written (SpoolFull). Returns the position after the last one."""
        heads = [_record_head(topic, key, payload) for topic, key, payload in records]
        data = b"".join([part for head, (_, _, payload) in zip(heads, records) for part in (head, payload)])
        with self._lock:
            if self._closed:
                raise SpoolFull("spool is closed")
            if self.bytes_on_disk + len(data) > self.disk_budget_bytes:
                raise SpoolFull(f"spool disk budget of {self.disk_budget_bytes} bytes is exhausted")
            if self._sizes[self._active] + len(data) > self.segment_bytes and self._sizes[self._active] > 0:
                self._rotate()
            try:
                written = os.write(self._fd, data)
            except OSError as exc:  # ENOSPC, EIO, read-only file system
                self._truncate_partial()
                raise SpoolFull(f"cannot write spool: {exc}") from None
            if written != len(data):
                self._truncate_partial()
                raise SpoolFull("short write to spool (disk full?)")
            seg, offset = self._active, self._sizes[self._active]
            self._sizes[seg] = offset + written
            self._dirty = True
            tail = self._tail
            for head, (topic, key, payload) in zip(heads, records):
                start = Position(seg, offset)
                offset += len(head) + len(payload)
                cost = len(payload) + _TAIL_OVERHEAD
                if self._tail_size + cost > self.tail_bytes:
                    tail.clear()  # the reader is behind: it reads the file until it reaches what follows
                    self._tail_size = 0
                    continue
                tail.append((start, Record(topic, key, payload, Position(seg, offset))))
                self._tail_size += cost
            return Position(seg, offset)

    def _truncate_partial(self) -> None:
        try:
            os.ftruncate(self._fd, self._sizes[self._active])
        except OSError:
            pass

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._active += 1
        self._fd = self._open_segment(self._active)

    def _open_segment(self, n: int) -> int:
        fd = os.open(self._path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes[n] = os.fstat(fd).st_size
        return fd

    def _fsync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync the active segment if anything was written since the last sync.

        The fsync itself runs outside the lock (on a duplicate of the descriptor, so a concurrent
        rotation cannot close it under us): ``append`` must never wait for the disk."""
        with self._lock:
            if not self._dirty or self._closed:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------
    @property
    def acked(self) -> Position:
        return self._acked

    @property
    def end(self) -> Position:
        with self._lock:
            return Position(self._active, self._sizes[self._active])

    @property
    def bytes_on_disk(self) -> int:
        return sum(self._sizes.values())

    def pending_bytes(self) -> int:
        """Bytes not yet acknowledged by the broker."""
        with self._lock:
            return sum(size - (self._acked.offset if n == self._acked.segment else 0)
                       for n, size in self._sizes.items() if n >= self._acked.segment)

    def read(self, start: Position, max_records: int = 1000, max_bytes: int = 4 * 1024 * 1024) -> list[Record]:
        """Records from ``start`` on (crossing segments), up to what has been appended so far."""
        out: list[Record] = []
        with self._lock:
            tail = self._tail
            while tail and tail[0][0] < start:  # passed by the reader
                self._tail_size -= len(tail.popleft()[1].payload) + _TAIL_OVERHEAD
            if tail and tail[0][0] == start:  # what was just appended: no file read, no CRC check
                consumed = 0
                while tail and len(out) < max_records and consumed < max_bytes:
                    rec = tail.popleft()[1]
                    self._tail_size -= len(rec.payload) + _TAIL_OVERHEAD
                    consumed += len(rec.payload)
                    out.append(rec)
                return out
            sizes = dict(self._sizes)
        seg, offset = start.segment, start.offset
        consumed = 0
        while len(out) < max_records and consumed < max_bytes:
            size = sizes.get(seg)
            if size is None or offset >= size:
                later = [n for n in sizes if n > seg]
                if not later:
                    break
                seg, offset = min(later), 0
                continue
            want = min(size - offset, max(max_bytes - consumed, 64 * 1024))
            chunk = self._read_chunk(seg, offset, want)
            pos = 0
            while pos < len(chunk) and len(out) < max_records and consumed < max_bytes:
                parsed = self._parse_at(chunk, pos)
                if parsed is _INCOMPLETE:
                    if offset + len(chunk) < size:
                        if pos == 0:  # one record larger than the window: read exactly it
                            _, length, _ = _HEADER.unpack_from(chunk, 0) if len(chunk) >= _HEADER.size else (0, 0, 0)
                            chunk = self._read_chunk(seg, offset, min(size - offset, _HEADER.size + length))
                            if len(chunk) < _HEADER.size + length:
                                self._report(seg, offset, "torn tail (incomplete record)")
                                pos = len(chunk)
                            continue
                        break  # the rest is read on the next pass
                    self._report(seg, offset + pos, "torn tail (incomplete record)")
                    pos = len(chunk)
                    break
                if parsed is _BAD:
                    self._report(seg, offset + pos, "corrupt record")
                    pos = self._next_valid(chunk, pos)
                    continue
                topic, key, payload, rec_size = parsed
                pos += rec_size
                consumed += rec_size
                out.append(Record(topic, key, payload, Position(seg, offset + pos)))
            offset += pos
        return out

    def _read_chunk(self, seg: int, offset: int, n: int) -> bytes:
        with open(self._path(seg), "rb") as f:
            f.seek(offset)
            return f.read(n)

    @staticmethod
    def _parse_at(chunk: bytes, pos: int):
        if len(chunk) - pos < _HEADER.size:
            return _INCOMPLETE
        magic, length, crc = _HEADER.unpack_from(chunk, pos)
        if magic != MAGIC or length > _MAX_BODY:
            return _BAD
        end = pos + _HEADER.size + length
        if end > len(chunk):
            return _INCOMPLETE
        body = chunk[pos + _HEADER.size : end]
        if crc32c.crc32c(body) != crc:
            return _BAD
        topic, key, payload = _decode_body(body)
        return topic, key, payload, end - pos

    def _next_valid(self, chunk: bytes, pos: int) -> int:
        """Skip a damaged record: the next offset in ``chunk`` where a valid record starts."""
        nxt = chunk.find(MAGIC, pos + 1)
        while nxt != -1:
            if self._parse_at(chunk, nxt) not in (_BAD, _INCOMPLETE):
                return nxt
            nxt = chunk.find(MAGIC, nxt + 1)
        return len(chunk)

    def _report(self, seg: int, offset: int, what: str) -> None:
        self.corrupt_records += 1
        log.error("spool %s: %s in segment %d at byte %d; skipped, the readable rest replays",
                  self.dir, what, seg, offset)

    # -- acknowledgement -------------------------------------------------------------------
    def ack(self, pos: Position) -> None:
        """Everything before ``pos`` is delivered: persist it and delete fully delivered segments."""
        with self._lock:
            pos = self._normalize(pos)
        if pos <= self._acked:
            return
        self._acked = pos
        tmp = self.dir / "acked.tmp"
        tmp.write_text(f"{pos.segment} {pos.offset}\n")
        os.replace(tmp, self.dir / "acked")
        self._delete_delivered(pos)

    def _normalize(self, pos: Position) -> Position:
        # A position at the end of a finished segment is the start of the next one, so that
        # "acked == end" means "nothing pending" across rotations and restarts.
        while pos.segment != self._active and pos.offset >= self._sizes.get(pos.segment, 0):
            later = [n for n in self._sizes if n > pos.segment]
            if not later:
                break
            pos = Position(min(later), 0)
        return pos

    def _delete_delivered(self, pos: Position) -> None:
        with self._lock:
            done = [n for n in self._sizes if n < pos.segment or (n == pos.segment and n != self._active
                                                                     and pos.offset >= self._sizes[n])]
            for n in done:
                if n == self._active:
                    continue
                try:
                    self._path(n).unlink()
                except FileNotFoundError:
                    pass
                del self._sizes[n]

    def _read_acked(self) -> Position:
        try:
            seg, off = (self.dir / "acked").read_text().split()
            return Position(int(seg), int(off))
        except (FileNotFoundError, ValueError):
            first = min(self._sizes, default=1)
            return Position(first, 0)

    # -- plumbing --------------------------------------------------------------------------
    def _path(self, n: int) -> Path:
        return self.dir / f"seg-{n:012d}.log"

    def _segment_paths(self) -> dict[int, Path]:
        out = {}
        for p in self.dir.glob("seg-*.log"):
            try:
                out[int(p.stem[4:])] = p
            except ValueError:
                continue
        return out

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.fsync(self._fd)
            os.close(self._fd)
        os.close(self._lock_fd)
