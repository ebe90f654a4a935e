import os

import pytest

from streams.spool import MAGIC, Position, Spool, SpoolFull, SpoolLocked


def payloads(n, size=100):
    return [f"{i:08d}".encode() + b"x" * size for i in range(n)]


def test_append_read_in_order_across_segments(tmp_path):
    spool = Spool(tmp_path, segment_bytes=4096)
    for p in payloads(200):
        spool.append("t", b"k", p)
    got = []
    pos = spool.acked
    while True:
        batch = spool.read(pos, max_records=37)
        if not batch:
            break
        got.extend(r.payload for r in batch)
        pos = batch[-1].end
    assert got == payloads(200)
    assert len(list(tmp_path.glob("seg-*.log"))) > 3
    spool.close()


def test_ack_trims_segments_and_reopen_replays_only_unacked(tmp_path):
    spool = Spool(tmp_path, segment_bytes=4096)
    for p in payloads(100):
        spool.append("t", b"k", p)
    records = spool.read(spool.acked, max_records=60)
    spool.ack(records[-1].end)
    before = len(list(tmp_path.glob("seg-*.log")))
    spool.close()
    reopened = Spool(tmp_path, segment_bytes=4096)
    rest = reopened.read(reopened.acked, max_records=1000)
    assert [r.payload for r in rest] == payloads(100)[60:]
    assert len(list(tmp_path.glob("seg-*.log"))) <= before + 1
    reopened.close()


def test_records_survive_without_close(tmp_path):
    """What append() returned for is in the file even if the process never closes the spool."""
    spool = Spool(tmp_path)
    for p in payloads(10):
        spool.append("t", b"k", p)
    data = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("seg-*.log")))
    assert data.count(MAGIC) == 10
    spool.close()


def test_torn_tail_replays_the_readable_part_and_is_reported(tmp_path):
    spool = Spool(tmp_path)
    for p in payloads(20):
        spool.append("t", b"k", p)
    spool.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    size = seg.stat().st_size
    os.truncate(seg, size - 30)  # a crash mid-write of the last record
    reopened = Spool(tmp_path)
    got = reopened.read(reopened.acked, max_records=100)
    assert [r.payload for r in got] == payloads(20)[:19]
    assert reopened.corrupt_records == 1
    # and it keeps working: new records go to a new segment and read after the old ones
    reopened.append("t", b"k", b"after")
    assert reopened.read(got[-1].end, max_records=10)[-1].payload == b"after"
    reopened.close()


def test_corrupt_record_in_the_middle_is_skipped_and_the_rest_replays(tmp_path):
    spool = Spool(tmp_path)
    for p in payloads(20):
        spool.append("t", b"k", p)
    spool.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    record_len = len(data) // 20
    data[5 * record_len + 20] ^= 0xFF  # flip a byte in record 5's body: its checksum fails
    seg.write_bytes(bytes(data))
    reopened = Spool(tmp_path)
    got = [r.payload for r in reopened.read(reopened.acked, max_records=100)]
    assert got == payloads(20)[:5] + payloads(20)[6:]
    assert reopened.corrupt_records == 1
    reopened.close()


def test_disk_budget_is_enforced(tmp_path):
    spool = Spool(tmp_path, disk_budget_bytes=10_000)
    with pytest.raises(SpoolFull):
        for p in payloads(1000):
            spool.append("t", b"k", p)
    spool.close()


def test_one_process_per_spool_directory(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolLocked, match="in use by another process"):
        Spool(tmp_path)
    spool.close()


def test_positions_order():
    assert Position(1, 500) < Position(2, 0) < Position(2, 1)
