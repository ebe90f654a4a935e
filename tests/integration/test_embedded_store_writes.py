"""The durable broker's store (s3rver behind streams/s3rver_conditional.js) keeps every object whole.

Plain s3rver 3.7.1 writes an object in place: a PUT the client abandons midway leaves the object
cut to what had arrived, for good (the first test shows it; if it starts failing, s3rver fixed
it). Under load a partition's watermark.json was once found empty that way and the partition could
no longer be fetched. The wrapper writes a temporary file and renames it, and lets requests on one
key take turns: abandoned PUTs leave the old object, and reads racing writes see whole versions.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from streams.embedded import EmbeddedBroker


def _put(port: int, key: str, body: bytes) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/tansu/{key}", data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


def _get(port: int, key: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/tansu/{key}", timeout=30) as resp:
        return resp.read()


def _abandon_put(port: int, key: str) -> None:
    """A PUT that stops after 10 of its 1000 bytes (a client timing out)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"PUT /tansu/%s HTTP/1.1\r\nHost: s3\r\nContent-Length: 1000\r\n\r\n" % key.encode() + b"x" * 10)
    time.sleep(0.3)
    s.close()
    time.sleep(0.3)


def test_plain_s3rver_keeps_the_bytes_of_an_abandoned_put(tmp_path):
    """The bug the atomic writes exist for."""
    with EmbeddedBroker(data_dir=tmp_path / "broker", durable=True, conditional_writes=False) as broker:
        assert _put(broker.s3_port, "w.json", b'{"high_watermark": 1234567890}') == 200
        _abandon_put(broker.s3_port, "w.json")
        assert _get(broker.s3_port, "w.json") != b'{"high_watermark": 1234567890}'


def test_objects_stay_whole_under_abandoned_and_racing_writes(tmp_path):
    with EmbeddedBroker(data_dir=tmp_path / "broker", durable=True) as broker:
        port = broker.s3_port
        whole = b'{"high_watermark": 1234567890}'
        assert _put(port, "w.json", whole) == 200
        _abandon_put(port, "w.json")
        assert _get(port, "w.json") == whole

        # writers of different sizes racing readers: every read is one whole version
        versions = {b'{"v": %d, "pad": "%s"}' % (i, b"p" * (i * 97 % 4000)) for i in range(40)}
        seen, stop = [], threading.Event()

        def read():
            while not stop.is_set():
                seen.append(_get(port, "w.json"))

        readers = [threading.Thread(target=read) for _ in range(3)]
        for t in readers:
            t.start()
        writers = [threading.Thread(target=_put, args=(port, "w.json", v)) for v in versions]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert seen and all(body in versions | {whole} for body in seen), [b[:60] for b in seen if b not in versions | {whole}][:3]
