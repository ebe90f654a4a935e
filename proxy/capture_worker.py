"""Capture in its own process, so the relay's event loop only pays for handing bytes over.

Why: building an event (SSE assembly, redaction, serialization) and sending it (the spool and the
Kafka client) costs CPU on the scale of relaying the request, and in the relay's process it
competes for the GIL with the event loop. So the proxy writes each finished exchange -- the raw
request body, the raw response bytes and a few fields -- as one frame to a pipe (a non-blocking
``write(2)``), and a child process (``python -m proxy.capture_worker``) builds the
events and hands what one read of the pipe brought to ``EventProducer.emit_many``
(one write to its own spool).

Frame: ``meta length u32 | request length u32 | response length u32`` (little endian), then the
meta JSON (an array: the response's kind, then the ``Exchange`` fields in ``_META_FIELDS`` order),
the request body as the client sent it, and the response body (or the stream's bytes as relayed,
or the JSON of a response object).

Delivery promises, in order:
- the handover never blocks the relay: if the pipe is full, frames queue in memory (bounded by
  ``capture_queue_bytes``, shown as the capture queue depth in /metrics); past that they are
  dropped and counted -- the request itself is never affected;
- if the proxy is killed, the worker still reads every frame already in the pipe, emits it, then
  flushes its producer and exits (EOF on the pipe is its signal);
- if the worker dies, the proxy starts a new one; the frames still unread inside the old pipe (at
  most the pipe's buffer, 1 MiB) are lost, and their bytes counted (``lost_bytes``) when the death
  is noticed (at the next hand-over);
- once the worker emitted an event it is in the worker's spool: from there the producer's own
  promises hold (survives SIGKILL, replayed on the next start).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import json
import logging
import operator
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.capture import Exchange

log = logging.getLogger(__name__)

FRAME = struct.Struct("<III")
PIPE_BYTES = 1 << 20
_IOV_MAX = 512
_F_SETPIPE_SZ = 1031
_META_FIELDS = ("endpoint", "interaction_id", "public_model", "t0", "upstream", "upstream_model", "adapter_version",
                "stream", "episode_id", "user_id", "tenant", "train_opt_out", "status", "t_first", "t_end", "error",
                "abandoned", "handed_at")


_meta_values = operator.attrgetter(*_META_FIELDS)


def pack(ex: Exchange, request_body: bytes) -> bytes:
    if ex.response is not None:
        response, kind = [orjson.dumps(ex.response)], "object"
    elif ex.body is not None:
        response, kind = [ex.body], "body"
    else:
        response, kind = ex.chunks, "chunks"
    meta_b = orjson.dumps((kind, *_meta_values(ex)))  # an array: no dict built per request
    size = sum(len(c) for c in response)
    return b"".join((FRAME.pack(len(meta_b), len(request_body), size), meta_b, request_body, *response))


def unpack(meta_b: bytes, request_body: bytes, response: bytes) -> Exchange:
    kind, *values = orjson.loads(meta_b)
    try:
        request = orjson.loads(request_body)
        if not isinstance(request, dict):
            request = {"body": request}
    except orjson.JSONDecodeError:
        request = {"body": request_body[:10000].decode(errors="replace")}
    ex = Exchange(request=request, request_body=request_body, **dict(zip(_META_FIELDS, values)))
    if kind == "object":
        ex.response = orjson.loads(response)
    elif kind == "body":
        ex.body = response
    elif response:
        ex.chunks = [response]
    return ex


class CaptureWorker:
    """The proxy's side: starts the worker process and hands it frames without ever blocking.

    Has the same ``record(ex)`` as ``Capture`` plus ``request_body`` in the Exchange's place: the
    relay calls ``record(ex)`` and this packs ``ex.request_body``.
    """

    def __init__(self, config: dict[str, Any], *, max_queue_bytes: int, cpus: str | None = None,
                 stats_path: Path | None = None):
        self.config = config
        self.max_queue_bytes = max_queue_bytes
        self.cpus = cpus
        self.stats_path = stats_path
        self.emitted = 0  # handed to the worker
        self.dropped = 0  # queue over its budget
        self.failed = 0  # could not be packed (a bug)
        self.lost_bytes = 0  # unread inside a dead worker's pipe
        self.restarts = 0
        self.redactor = None  # redaction runs in the worker; its counts come from the stats file
        self.tally = None  # streams.reconcile.Tally: counts each exchange before the queue that could drop it
        self._queue: collections.deque[memoryview] = collections.deque()
        self._queue_bytes = 0
        self._partial = False  # the queue's head is the rest of a frame already partly in the pipe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_armed = False
        self._flush_scheduled = False
        self._spawned_at = 0.0
        self._backoff_s = 0.5
        self._closing = False
        self._proc: subprocess.Popen | None = None
        self._fd = -1

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a smaller pipe only means the in-memory queue is used sooner
        os.set_blocking(w, False)
        env = dict(os.environ, ONPOLICY_CAPTURE_WORKER_CONFIG=json.dumps(self.config))
        cmd = [sys.executable, "-m", "proxy.capture_worker", str(r)]
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        # Its own session: a Ctrl-C or SIGTERM to the proxy's process group must not kill the worker
        # before it has drained the pipe; it exits on EOF once the proxy closed its end.
        self._proc = subprocess.Popen(cmd, pass_fds=(r,), start_new_session=True, env=env)
        os.close(r)
        self._fd = w
        self._spawned_at = time.monotonic()
        log.info("capture worker started (pid %d)", self._proc.pid)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Hand over what is queued (up to ``timeout_s``), close the pipe, let the worker flush and exit."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while self._queue and self._fd >= 0 and time.monotonic() < deadline:
            self._flush()
            if self._queue:
                await asyncio.sleep(0.01)
        if self._writer_armed and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._proc is not None:
            proc = self._proc
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), max(1.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                log.warning("capture worker (pid %d) still flushing after %.0fs; leaving it to finish", proc.pid, timeout_s)

    # -- the hot path ----------------------------------------------------------------------
    def record(self, ex: Exchange) -> None:
        """Queue one exchange; the queue is written to the pipe once per loop iteration (one
        ``writev`` for every exchange that finished in it, so one wake-up of the worker)."""
        if self.tally is not None:
            self.tally.served(ex)
        try:
            frame = pack(ex, ex.request_body or b"")
        except Exception:
            self.failed += 1
            log.exception("could not pack the exchange %s for capture", ex.interaction_id)
            return
        if self._queue_bytes + len(frame) > self.max_queue_bytes:
            self.dropped += 1
            return
        self._queue.append(memoryview(frame))
        self._queue_bytes += len(frame)
        self.emitted += 1
        if not self._flush_scheduled and not self._writer_armed and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _arm_writer(self) -> None:
        if not self._writer_armed and self._loop is not None and self._fd >= 0:
            self._loop.add_writer(self._fd, self._flush)
            self._writer_armed = True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._fd < 0:
            return  # no worker right now (restart pending): frames wait in the queue
        while self._queue:
            batch = list(itertools.islice(self._queue, 0, _IOV_MAX))
            try:
                n = os.writev(self._fd, batch)
            except BlockingIOError:
                self._arm_writer()
                return
            except (BrokenPipeError, OSError):
                self._worker_died()
                if self._fd < 0:
                    return
                continue
            self._queue_bytes -= n
            self._partial = False
            while n:
                head = self._queue[0]
                if len(head) <= n:
                    n -= len(head)
                    self._queue.popleft()
                else:
                    self._queue[0] = head[n:]
                    self._partial = True  # the worker has the start of this frame
                    n = 0
            if self._partial:  # the pipe is full: wait until it is writable
                self._arm_writer()
                return
        if self._writer_armed and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False

    def _worker_died(self) -> None:
        code = self._proc.poll() if self._proc is not None else None
        if self._writer_armed and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
        try:  # what the dead worker never read (FIONREAD works on a pipe's write end on Linux)
            unread = struct.unpack("i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            unread = 0
        self.lost_bytes += unread
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
        if self._partial and self._queue:  # the rest of a frame whose start died with the pipe
            self._queue_bytes -= len(self._queue.popleft())
            self._partial = False
        self.restarts += 1
        # A worker that dies right after starting (a spool directory locked by another proxy, a bad
        # setting) must not be restarted once per request: back off, keep queueing meanwhile.
        quick = time.monotonic() - self._spawned_at < 10.0
        self._backoff_s = min(self._backoff_s * 2, 30.0) if quick else 0.0
        log.error("capture worker exited (status %s; %d bytes it never read are lost); starting a new one%s", code, unread,
                  f" in {self._backoff_s:.1f}s" if self._backoff_s else "")
        if self._backoff_s and self._loop is not None:
            self._loop.call_later(self._backoff_s, self._respawn)
        else:
            self._respawn()

    def _respawn(self) -> None:
        if self._closing:
            return
        self._spawn()
        self._flush()

    # -- observability ---------------------------------------------------------------------
    @property
    def queue_bytes(self) -> int:
        return self._queue_bytes

    @property
    def connected(self) -> bool:
        return bool(self.worker_stats().get("connected"))

    def worker_stats(self) -> dict[str, Any]:
        if self.stats_path is None:
            return {}
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}


class FrameReader:
    """The worker's side of the pipe: reads into one buffer it keeps, and cuts it into frames.

    Why a kept buffer: ``os.read(fd, 1 MiB)`` allocates a fresh megabyte per call, which the kernel
    then faults in page by page as it copies, and appending that to the pending bytes copied it once
    more. ``readv`` into the free end of a buffer whose pages are already mapped leaves the kernel's
    one copy. Per 14.5 KB stream exchange: 9.7 -> 2.6 us in a loop of pipe write + read alone; the
    worker's reading under wrk (frames read and dropped, bench/proxy_threads.py) ~8.5 -> ~6 us.
    """

    def __init__(self, fd: int, capacity: int = 2 * PIPE_BYTES):
        self.fd = fd
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0  # the first byte not yet cut into a frame
        self._end = 0  # one past the last byte read
        self.last_read = 0

    @property
    def pending(self) -> int:
        """Bytes read that are not yet a whole frame."""
        return self._end - self._start

    def read(self) -> list[tuple[bytes, bytes, bytes]] | None:
        """Block for the next read; the whole frames it completed as (meta, request, response).
        None at EOF."""
        self._make_room()
        n = os.readv(self.fd, [self._view[self._end:self._end + PIPE_BYTES]])
        self.last_read = n
        if n == 0:
            return None
        self._end += n
        frames = []
        view, pos, end = self._view, self._start, self._end
        while end - pos >= FRAME.size:
            meta_len, req_len, resp_len = FRAME.unpack_from(view, pos)
            a = pos + FRAME.size
            b, c = a + meta_len, a + meta_len + req_len
            stop = c + resp_len
            if stop > end:
                break
            frames.append((bytes(view[a:b]), bytes(view[b:c]), bytes(view[c:stop])))
            pos = stop
        self._start = pos
        return frames

    def _make_room(self) -> None:
        """At least one pipe's worth of free space after the pending bytes (and room for the
        pending frame whole, however big)."""
        need = PIPE_BYTES
        if self.pending >= FRAME.size:
            need = max(need, sum(FRAME.unpack_from(self._view, self._start)) + FRAME.size - self.pending)
        if len(self._buf) - self._end >= need:
            return
        pending = self.pending
        if pending + need > len(self._buf):  # a frame bigger than the buffer: a bigger one
            buf = bytearray(max(2 * len(self._buf), pending + need))
            buf[:pending] = self._view[self._start:self._end]
            self._view.release()
            self._buf, self._view = buf, memoryview(buf)
        else:
            self._view[:pending] = self._view[self._start:self._end]
        self._start, self._end = 0, pending


# -- the worker process ------------------------------------------------------------------------
def worker_main(fd: int, config: dict[str, Any]) -> int:
    # The proxy decides when we stop (by closing the pipe); signals aimed at its group are not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Capture is background work: where it shares a core with the relay, the relay goes first.
    try:
        os.nice(int(config.get("nice", 10)))
    except OSError:
        pass
    logging.basicConfig(level=config.get("log_level", "INFO"), format="%(asctime)s %(levelname)s capture-worker: %(message)s")
    from proxy.capture import Capture
    from proxy.redaction import load_redactor
    from streams.producer import EventProducer
    from streams.settings import KafkaSettings, ProducerSettings

    from streams.spool import SpoolLocked

    # After a proxy restart the previous worker may still hold the spool while it drains its pipe and
    # flushes (it outlives a SIGKILLed proxy on purpose). Wait for it here rather than exit: exiting
    # makes the proxy back off up to 30 s per try, and capture then lagged by a minute (chaos suite).
    lock_deadline = time.monotonic() + float(config.get("spool_lock_wait_s", 120.0))
    while True:
        try:
            producer = EventProducer(KafkaSettings(**config["kafka"]), ProducerSettings(**config["producer"]))
            break
        except SpoolLocked:
            if time.monotonic() > lock_deadline:
                raise
            time.sleep(0.2)
    capture = Capture(producer, load_redactor(config["redactor"]), int(config.get("max_event_bytes", 900_000)))
    stats_path = Path(config["stats_path"])

    def write_stats() -> None:
        st = producer.stats()
        st.update(connected=producer.connected, capture_emitted=capture.emitted, capture_dropped=capture.dropped,
                  capture_failed=capture.failed, redactions=getattr(capture.redactor, "counts", {}), pid=os.getpid())
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, stats_path)

    import threading

    done = threading.Event()

    def stats_loop() -> None:
        while not done.wait(1.0):
            try:
                write_stats()
            except OSError:
                pass

    threading.Thread(target=stats_loop, name="capture-stats", daemon=True).start()
    reader = FrameReader(fd)
    try:
        while True:
            frames = reader.read()
            if frames is None:
                if reader.pending:
                    log.error("the pipe ended inside a frame (the proxy died mid-write); that exchange is lost")
                break  # EOF: the proxy closed its end (or died)
            exchanges = []
            for meta_b, request_b, response_b in frames:
                try:
                    exchanges.append(unpack(meta_b, request_b, response_b))
                except Exception:
                    capture.failed += 1
                    log.exception("could not unpack a capture frame")
            capture.record_many(exchanges)  # one spool write for everything this read brought
            if reader.last_read < PIPE_BYTES // 4:
                # Little was waiting: let exchanges gather for a moment, so the proxy's writes wake
                # us a few hundred times a second at most instead of once per request.
                time.sleep(0.005)
    finally:
        done.set()
        write_stats()
        producer.close(timeout_s=float(config.get("close_timeout_s", 10.0)))
        write_stats()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), json.loads(os.environ["ONPOLICY_CAPTURE_WORKER_CONFIG"])))
