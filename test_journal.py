"""Tests of journal.py on its own (no census in it): framing, resync past damage, torn tails of
every length, a failed write rolled back, the folder lock held against a second process."""

import errno
import os
import random
import shutil
import subprocess
import sys
import threading
import zlib

import pytest

from journal import HEADER, LOG_FILE, SNAPSHOT_FILE, Copy, Journal, StoreError, WriteFailed

HERE = os.path.dirname(os.path.abspath(__file__))


class Owner:
    """The least a journal's owner does: keeps the records it was given by tag."""

    def __init__(self):
        self.lock = threading.RLock()
        self.reloads = 0
        self.state = {}

    def reload(self):
        self.reloads += 1

    def snapshot_state(self):
        return {"state": dict(self.state)}

    def live_bytes(self):
        return 0

    def live_records(self):
        return [], b'{"base":1}'

    def rewritten(self, moved, damaged):
        self.moved, self.damaged = moved, damaged


def open_journal(directory, **kw):
    owner = Owner()
    return Journal(directory, owner, owner.lock, **kw), owner


def write_records(directory, count=12, blob_every=3):
    """A log of `count` records (every `blob_every`-th with a blob); their (offset, end)."""
    journal, owner = open_journal(directory)
    spans = []
    for tag in range(count):
        blob = bytes([tag]) * 300 if tag % blob_every == 0 else b""
        with owner.lock:
            offset = journal.next_blob_offset - HEADER.size
            ticket = journal.append(tag, b'{"tag":%d}' % tag, blob, zlib.crc32(blob))
            spans.append((offset, journal.next_blob_offset - HEADER.size))
        journal.wait(ticket)
    journal.release()                                    # as kill -9 leaves it: no snapshot
    return spans


def replayed(directory):
    journal, _ = open_journal(directory)
    try:
        tags = [record.tag for record in journal.replay()]
        return tags, journal.damage, journal.torn
    finally:
        journal.release()


def flipped(source, target, position):
    shutil.copytree(source, target)
    log = target / LOG_FILE
    data = bytearray(log.read_bytes())
    data[position] ^= 0x5A
    log.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = tmp_path_factory.mktemp("log") / "data"
    return directory, write_records(directory)


# -- damage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["header start", "header crc", "blob", "line", "last byte"])
@pytest.mark.parametrize("victim", [0, 4, 6, 11])
def test_one_damaged_record_costs_only_itself(written, tmp_path, where, victim):
    directory, spans = written
    start, end = spans[victim]
    position = {"header start": start, "header crc": start + 24, "line": end - 3,
                "blob": start + HEADER.size + (5 if victim % 3 == 0 else 0),
                "last byte": end - 1}[where]
    flipped(directory, tmp_path / "d", position)
    tags, damage, torn = replayed(tmp_path / "d")
    assert tags == [t for t in range(len(spans)) if t != victim]     # every intact one kept
    assert len(damage) == 1 and damage[0].offset == start and torn == 0
    assert damage[0].tag in (victim, None)                           # known if the header held
    assert (tmp_path / "d" / LOG_FILE).stat().st_size == spans[-1][1]   # never cut


def test_damage_at_seeded_random_places(written, tmp_path):
    directory, spans = written
    rng = random.Random(1009)
    for n in range(20):
        positions = sorted(rng.sample(range(HEADER.size + 40, spans[-1][1]), rng.randint(1, 3)))
        target = tmp_path / f"d{n}"
        shutil.copytree(directory, target)
        data = bytearray((target / LOG_FILE).read_bytes())
        for position in positions:
            data[position] ^= 1 << rng.randrange(8)
        (target / LOG_FILE).write_bytes(bytes(data))
        hit = {i for i, (s, e) in enumerate(spans) for p in positions if s <= p < e}
        tags, damage, _ = replayed(target)
        assert tags == [t for t in range(len(spans)) if t not in hit], positions
        assert sum(d.length for d in damage) == sum(spans[i][1] - spans[i][0] for i in hit)


def test_torn_tails_of_every_length_are_cut(written, tmp_path):
    directory, spans = written
    start, end = spans[-1]
    for length in range(1, end - start):
        target = tmp_path / f"t{length}"
        shutil.copytree(directory, target)
        with open(target / LOG_FILE, "r+b") as log:
            log.truncate(start + length)
        tags, damage, torn = replayed(target)
        assert (tags, damage, torn) == (list(range(len(spans) - 1)), [], length), length
        assert (target / LOG_FILE).stat().st_size == start
        shutil.rmtree(target)


# -- writing --------------------------------------------------------------------------------------

def test_a_failed_write_keeps_nothing_and_the_next_one_works(tmp_path):
    journal, owner = open_journal(tmp_path / "data")
    with owner.lock:
        first = journal.append(1, b'{"a":1}')
    journal.wait(first)
    size = (tmp_path / "data" / LOG_FILE).stat().st_size

    def full(fd, data):
        os.write(fd, data[:7])                          # a part lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    journal.write = full
    with owner.lock:
        second, third = journal.append(2, b'{"b":2}'), journal.append(3, b'{"c":3}')
    for ticket in (second, third):
        with pytest.raises(WriteFailed):
            journal.wait(ticket)
    assert journal.degraded.startswith("disk full: ") and owner.reloads == 1
    assert (tmp_path / "data" / LOG_FILE).stat().st_size == size     # the part cut off
    del journal.write
    journal.check_writable()                            # the disk takes writes again
    assert journal.degraded is None
    with owner.lock:
        fourth = journal.append(4, b'{"d":4}')
    journal.wait(fourth)
    journal.close()
    tags, damage, _ = replayed(tmp_path / "data")
    assert (tags, damage) == ([1, 4], [])


def test_records_a_failing_snapshot_was_writing_fail_their_waiters(tmp_path):
    journal, owner = open_journal(tmp_path / "data", snapshot_every=1)
    with owner.lock:
        ticket = journal.append(1, b"{}")
    journal.write = lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))
    with journal._flush_lock:
        journal._maintain()                             # its snapshot writes the queue first
    with pytest.raises(WriteFailed, match="write failed: .*I/O error"):
        journal.wait(ticket)
    assert owner.reloads == 1 and not list((tmp_path / "data").glob("*.tmp"))
    journal.release()


def test_compaction_keeps_live_blobs_and_drops_damaged_ones(tmp_path):
    journal, owner = open_journal(tmp_path / "data")
    with owner.lock:
        offset = journal.next_blob_offset
        journal.wait(journal.append(7, b'{"r":1}', b"x" * 100, zlib.crc32(b"x" * 100)))
    copies = [Copy(7, offset, 100, zlib.crc32(b"x" * 100), lambda at: b'{"at":%d}' % at),
              Copy(8, offset, 100, 12345, lambda at: b"{}")]       # its CRC does not match
    owner.live_records = lambda: (copies, b'{"base":1}')
    journal.compact()
    assert owner.damaged == [8] and list(owner.moved) == [7]
    assert journal.read_blob(owner.moved[7], 100, zlib.crc32(b"x" * 100)) == b"x" * 100
    assert not (tmp_path / "data" / (LOG_FILE + ".new")).exists()
    journal.close()
    again, _ = open_journal(tmp_path / "data")
    assert again.read_snapshot() is not None
    assert [r.tag for r in again.replay()] == []          # the snapshot covers the whole log
    again.release()


def test_snapshot_by_time_as_well_as_by_count(tmp_path):
    now = [0.0]
    journal, owner = open_journal(tmp_path / "data", snapshot_every=1000, snapshot_seconds=60,
                                  clock=lambda: now[0])
    with owner.lock:
        journal.wait(journal.append(1, b"{}"))
    assert not (tmp_path / "data" / SNAPSHOT_FILE).exists()
    now[0] += 61
    with owner.lock:
        journal.wait(journal.append(2, b"{}"))
    assert (tmp_path / "data" / SNAPSHOT_FILE).exists()
    journal.close()


# -- one owner ------------------------------------------------------------------------------------

def test_a_second_process_on_the_folder_is_refused_with_the_holder_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, journal, threading\n"
         "owner = type('O', (), {})()\n"
         f"j = journal.Journal({str(tmp_path / 'data')!r}, owner, threading.RLock())\n"
         "print('ready', flush=True)\nsys.stdin.read()\n"],
        cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(StoreError, match=f"in use by another server \\(PID {holder.pid}\\)"):
            open_journal(tmp_path / "data")
    finally:
        holder.kill()
        holder.wait()
    journal, _ = open_journal(tmp_path / "data")         # the lock went with the process
    journal.release()


def test_files_are_private(tmp_path):
    journal, owner = open_journal(tmp_path / "data")
    with owner.lock:
        journal.wait(journal.append(1, b"{}"))
    journal.close()
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    for name in (LOG_FILE, SNAPSHOT_FILE, "census.lock"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name
