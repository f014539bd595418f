"""One-time upgrade of a data folder written before the log had record framing (the census.log
of commit 10c2256: each record its lengths and a CRC, then the result bytes, then the task's
whole record as JSON; census.json format 1). The old state is read once, written as a log of
today's format, and the old files are kept aside, never changed:

    census.log (old) --read--> state --Journal--> census.upgrade/census.log (fsynced)
    census.log                 linked as census.log.unframed-<time>
    census.upgrade/census.log  renamed over census.log, the folder fsynced
    census.json                renamed census.json.unframed-<time> (it describes the old log)

A crash at any step leaves either the old log in place (the upgrade runs again at the next
start) or the new one complete (the store rebuilds its state from it). Called by the store,
before it opens the log; a folder in today's format is left alone.
"""

import json
import mmap
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

from journal import (LOG_FILE, MAGIC, SNAPSHOT_FILE, TAG_BASE, Journal, StoreError, fsync_dir, say,
                     take_folder)

WORK_DIR = "census.upgrade"
_OLD_HEADER = struct.Struct("<III")  # result bytes length, JSON line length, CRC-32 of both
_BATCH = 256                         # records queued before waiting for them


def upgrade_unframed(directory) -> bool:
    """Rewrite an old-format census.log in today's format; True if there was one to upgrade.
    StoreError if it cannot be written (say why, nothing changed)."""
    directory = Path(directory)
    if not _is_unframed(directory / LOG_FILE):
        return False
    lock = take_folder(directory)
    stamp = f"unframed-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        tasks = _write_new_log(directory)
        os.link(directory / LOG_FILE, directory / f"{LOG_FILE}.{stamp}")
        os.replace(directory / WORK_DIR / LOG_FILE, directory / LOG_FILE)
        if (directory / SNAPSHOT_FILE).exists():
            os.replace(directory / SNAPSHOT_FILE, directory / f"{SNAPSHOT_FILE}.{stamp}")
        fsync_dir(directory)
    except OSError as exc:
        raise StoreError(f"cannot upgrade {directory / LOG_FILE} from the earlier format: "
                         f"{exc}: free some space and start again (nothing has been "
                         "changed)") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StoreError(f"{directory / LOG_FILE} looks like the earlier format but cannot be "
                         f"read as it ({exc!r}): move the folder aside to start afresh") from None
    finally:
        shutil.rmtree(directory / WORK_DIR, ignore_errors=True)
        os.close(lock)
    say(f"upgraded {directory / LOG_FILE} from the earlier format ({tasks} results); the "
        f"original is kept as {LOG_FILE}.{stamp}")
    return True


# -- private --------------------------------------------------------------------------------------

class _Owner:
    """The journal's owner while the new log is written: it holds nothing to snapshot."""

    def __init__(self):
        self.lock = threading.RLock()

    def live_bytes(self):
        return 0

    def reload(self):
        pass                                        # the write's WriteFailed says why


def _is_unframed(path: Path) -> bool:
    try:
        with open(path, "rb") as log:
            head = log.read(_OLD_HEADER.size)
            if len(head) < _OLD_HEADER.size or head.startswith(MAGIC):
                return False
            blob_len, line_len, crc = _OLD_HEADER.unpack(head)
            body = log.read(blob_len + line_len)
    except OSError:
        return False                                # the store says what is wrong
    return len(body) == blob_len + line_len and zlib.crc32(body) == crc


def _write_new_log(directory: Path) -> int:
    """census.upgrade/census.log: each result copied, then one record of the rest."""
    work = directory / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)         # a crashed attempt's
    with open(directory / LOG_FILE, "rb") as old, \
            mmap.mmap(old.fileno(), 0, prot=mmap.PROT_READ) as view:
        state = _old_state(directory, view)
        owner = _Owner()
        journal = Journal(work, owner, owner.lock, snapshot_every=1 << 62,
                          snapshot_seconds=float("inf"), tail_bytes=1 << 62)
        try:
            results = state.pop("results")
            for count, (task, meta) in enumerate(results.items(), 1):
                blob = view[meta[0]:meta[0] + meta[1] + meta[2]]
                crc = zlib.crc32(blob)
                with owner.lock:
                    line = {"r": [journal.next_blob_offset, *meta[1:10], crc]}
                    ticket = journal.append(task, json.dumps(line).encode(), blob, crc)
                if count % _BATCH == 0:
                    journal.wait(ticket)
            with owner.lock:
                ticket = journal.append(TAG_BASE, json.dumps({"format": 2, **state}).encode())
            journal.wait(ticket)
        finally:
            journal.release()
    return len(results)


def _old_state(directory, view) -> dict:
    """The old store's state: its snapshot (if usable) and every intact record after it."""
    try:
        snap = json.loads((directory / SNAPSHOT_FILE).read_bytes())
        offset = snap["log_offset"]
        state = {key: snap[key] for key in ("version", "submissions", "leases", "old",
                                            "errors", "results", "contributors")}
        state["states"] = bytearray(snap["states"].encode())
        pinned = set(snap.get("pinned", ()))
        if not 0 <= offset <= len(view) or len(state["states"]) != 65536:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        offset, pinned = 0, set()
        state = {"version": 0, "submissions": 0, "leases": {}, "old": {}, "errors": {},
                 "results": {}, "contributors": [], "states": bytearray(b"0" * 65536)}
    people = {person[0]: person for person in state["contributors"]}
    for rec in _old_records(view, offset):
        task, key = rec["t"], str(rec["t"])
        state["version"], state["submissions"] = rec["v"], rec["n"]
        state["states"][task] = ord("0") + rec["s"]
        for name, field in (("leases", "l"), ("old", "o"), ("errors", "e"), ("results", "r")):
            if rec[field]:
                state[name][key] = rec[field]
            else:
                state[name].pop(key, None)
        if rec["c"]:
            people[rec["c"][0]] = rec["c"]
        (pinned.add if rec.get("p") else pinned.discard)(task)
    state.update(states=state["states"].decode(), contributors=list(people.values()),
                 pinned=sorted(pinned),
                 results={int(task): meta for task, meta in state["results"].items()})
    return state


def _old_records(view, offset):
    """The old log's records from ``offset`` up to the first torn or damaged one (where the
    old store stopped too)."""
    while offset + _OLD_HEADER.size <= len(view):
        blob_len, line_len, crc = _OLD_HEADER.unpack_from(view, offset)
        body = offset + _OLD_HEADER.size
        end = body + blob_len + line_len
        if end > len(view) or zlib.crc32(view[body:end]) != crc:
            return
        yield json.loads(view[body + blob_len:end])
        offset = end
