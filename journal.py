"""The durable log under the census store: framed records, group commit, snapshots, compaction,
the folder lock and recovery. It knows nothing of tasks: a record is an opaque JSON line with an
optional binary blob, tagged with a number (the store's task index) and a sequence number.

    census.lock   flock(LOCK_EX) held for the process's lifetime; holds the owner's PID
    census.log    record, record, ...   (first record: the log's identity)
    census.json   snapshot: the owner's state (a JSON object) with the log's identity, the
                  offset it covers and the sequence number there added

    record = header (32 bytes) | blob | JSON line
    header = magic "CNS1" | seq u64 | tag u32 | blob length u32 | line length u32
             | CRC-32 of the 24 bytes before | CRC-32 of blob + line

The magic word and the header's own CRC let replay find the next intact record after damage
(scan for the magic, check the header, then the body), so one bad byte costs one record, not
the rest of the log. Only an incomplete last record (a write torn by a crash) is cut off;
damage anywhere else is reported and left for the owner to rebuild from (``damage``), the
original file kept aside. A blob is read back by offset and checked against the CRC the
caller kept.

Group commit without a writer thread: callers ``append`` under the owner's lock (which fixes the
order and reserves each record's place), then ``wait``; whichever waiter holds the flush lock
writes and fsyncs everything queued so far. A write that fails is never half-kept: the file is
cut back to its durable size, every record not yet durable is failed, and the owner is asked to
reload its state from disk (``owner.reload()``), so memory never shows what the disk lacks.
The log is then ``degraded`` (a one-line reason) until a probe shows the disk takes writes
again; nothing needs a restart.

After a flush the flushing waiter also keeps the log small: a snapshot every ``snapshot_every``
records or ``snapshot_seconds``, and a compaction when the log outgrows the live data (1.5 x
``owner.live_bytes()`` + ``tail_bytes``): live blobs are copied to ``census.log.new`` in
rounds with no lock held (requests go on), then, holding the locks, what changed since and a
base record of the whole state; fsynced, renamed over the log, the folder fsynced; a crash at
any step leaves either the old log or the new one, each complete. A snapshot or compaction that
fails is reported on stderr and tried again later; it never fails a request whose record is
durable, and leaves no temporary file.

The owner (the census store) provides: ``reload()``, ``snapshot_state() -> dict``,
``live_bytes() -> int``, ``live_records() -> (copies, base_line)``, ``forget_line(tag)`` (a
record saying a blob copied earlier is no longer live) and ``rewritten(moved, damaged)``.

    Journal    opens and locks the folder, replays the log, reads blobs: the public face
    _Appender  the writing end: group commit, the degraded state
    _Upkeep    snapshots and compaction (the new log written by a _Rewrite)
"""

import errno
import fcntl
import json
import mmap
import os
import secrets
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import NamedTuple

LOG_FILE = "census.log"
SNAPSHOT_FILE = "census.json"
LOCK_FILE = "census.lock"
NEW_SUFFIX = ".new"
TMP_SUFFIX = ".tmp"
SNAPSHOT_EVERY = 8192               # records between snapshots (bounds the replay) ...
SNAPSHOT_SECONDS = 60.0             # ... or seconds, whichever comes first
TAIL_BYTES = 16 << 20               # log growth over 1.5 x the live data before a compaction
CLOSE_TAIL_BYTES = 256 << 10        # ... or over 1.5 x + this at a clean stop
PROBE_BYTES = 64 << 10              # a degraded log writes again once this much fits
_COPY_ROUNDS = 4                    # a compaction copies without the locks at most this often,
_LAST_ROUND = 64                    # ... until a round copies no more than this many blobs

MAGIC = b"CNS1"
HEADER = struct.Struct("<4sQIIIII")  # magic, seq, tag, blob len, line len, header CRC, body CRC
_HEAD_CHECKED = 24                   # the header CRC covers the bytes before it
TAG_BASE = 0xFFFFFFFE                # the owner's whole-state record (written by a compaction)
_TAG_START = 0xFFFFFFFF              # the log's own first record: its identity
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class StoreError(Exception):
    """A reason the store cannot start: one line saying what is wrong and what to do."""


class WriteFailed(OSError):
    """A record that could not be made durable (the disk refused it); nothing of it was kept.
    Its str() is one line saying why."""


class Record(NamedTuple):
    offset: int           # of the header in the log
    seq: int              # 0 for records a compaction wrote
    tag: int              # the owner's number (a task), or TAG_BASE
    blob_len: int
    line: bytes

    @property
    def blob_offset(self) -> int:
        return self.offset + HEADER.size


class Damage(NamedTuple):
    """A stretch of the log that holds no intact record."""
    offset: int
    length: int
    tag: int | None       # the record's tag when its header survived
    had_blob: bool


class Copy(NamedTuple):
    """A live record for ``rewrite``: its blob is copied from the current log."""
    tag: int
    blob_offset: int
    blob_len: int
    blob_crc: int
    make_line: object     # callable(new blob offset) -> the record's JSON line


class Journal:
    """The log of one folder, locked for this process: opening, replay, reads and the public
    face; the writing end is an ``_Appender``, snapshots and compaction an ``_Upkeep``.
    Thread-safe with the owner's lock."""

    def __init__(self, directory, owner, lock, *, snapshot_every=SNAPSHOT_EVERY,
                 snapshot_seconds=SNAPSHOT_SECONDS, tail_bytes=TAIL_BYTES, clock=time.monotonic):
        self.dir = Path(directory)
        self.owner, self._lock, self.clock = owner, lock, clock
        self.snapshot_every, self.snapshot_seconds = snapshot_every, snapshot_seconds
        self.tail_bytes = tail_bytes
        self.damage: list[Damage] = []
        self.torn = 0                               # bytes of torn tail cut at load
        self.lost_records = 0                       # missing sequence numbers seen by replay
        self._old_fd = None
        self._lock_fd = take_folder(self.dir)
        self._log = _Appender(self, _open_log(self.dir / LOG_FILE))
        self._flush_lock = self._log.flush_lock
        self._upkeep = _Upkeep(self)
        self._cleanup()
        self._log_id = self._identity()

    # -- appending --------------------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        """Why the disk refuses writes (one line), or None."""
        return self._log.degraded

    @property
    def next_blob_offset(self) -> int:
        """Where the blob of the next ``append`` will lie (call holding the owner's lock)."""
        return self._log.size + HEADER.size

    def append(self, tag: int, line: bytes, blob=b"", blob_crc=0) -> tuple:
        """Queue a record (holding the owner's lock); returns the ticket to ``wait`` on.
        ``blob_crc`` is zlib.crc32(blob), computed by the caller before taking its lock."""
        self._upkeep.since_snapshot += 1
        return self._log.append(tag, line, blob, blob_crc)

    def wait(self, ticket) -> None:
        """Return once the record is durable; WriteFailed if the disk refused it."""
        if ticket is None or self._log.settled(ticket):
            return self._log.check(ticket)
        with self._flush_lock:
            if not self._log.settled(ticket):
                try:
                    self._log.flush()
                except WriteFailed:
                    pass                            # check below says so
                else:
                    self._maintain()
        self._log.check(ticket)
        if self._upkeep.compact_due:
            self._upkeep.compact_when_free()

    def check_writable(self) -> None:
        """Raise WriteFailed while the disk still refuses writes; a degraded log whose disk
        takes ``PROBE_BYTES`` again is writable (the next write says for sure)."""
        self._log.check_writable()

    def durable_through(self, end: int) -> bool:
        return end <= self._log.durable_size

    def last_ticket(self) -> tuple:
        """The ticket of the last record queued (a reader waits on it for a blob just queued)."""
        return self._log.gen, self._log.seq

    write = staticmethod(lambda fd, data: _write_all(fd, data))   # tests inject failures here

    # -- reading ----------------------------------------------------------------------------------

    def read_blob(self, offset: int, length: int, crc: int) -> bytes | None:
        """The blob at ``offset``, or None when it fails its CRC (damaged on disk)."""
        data = os.pread(self._log.fd, length, offset)
        return data if len(data) == length and zlib.crc32(data) == crc else None

    def read_snapshot(self, quiet=False) -> dict | None:
        """The owner's state from the snapshot if it matches this log, else None (said why
        unless ``quiet``)."""
        path = self.dir / SNAPSHOT_FILE
        try:
            state = json.loads(path.read_bytes())
            offset, seq = state["log_offset"], state["seq"]
            if state["log"] != self._log_id or not 0 <= offset <= self._log.size:
                raise ValueError("it belongs to another log")
        except FileNotFoundError:
            if self._log.size > _start_size() and not quiet:
                say(f"{path} is missing: rebuilding the state from {LOG_FILE}")
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not quiet:
                say(f"{path} is unusable ({exc}): rebuilding the state from {LOG_FILE} "
                    f"(nothing is lost)")
            return None
        self.snapshot_offset = offset
        self._log.seq = self._log.durable_seq = seq
        return state

    snapshot_offset = 0

    def forget_snapshot(self) -> None:
        """The owner could not use the snapshot: replay the whole log instead."""
        self.snapshot_offset = self._log.seq = self._log.durable_seq = 0

    def replay(self, cut_torn=True):
        """The intact records after the snapshot's offset; sets ``damage`` and
        ``lost_records``; cuts an incomplete last record (``torn``: its length) if asked."""
        log = self._log
        start, end = self.snapshot_offset, log.durable_size
        self.damage, self.lost_records = [], 0
        if end <= start:
            return
        with mmap.mmap(log.fd, end, prot=mmap.PROT_READ) as view:
            offset, last = start, log.seq
            while offset < end:
                record, problem = _record_at(view, offset, end)
                if record is not None:
                    if record.seq:
                        if record.tag < TAG_BASE:   # start and base records set the count
                            self.lost_records += max(0, record.seq - last - 1)
                        last = log.seq = record.seq
                    if record.tag != _TAG_START:
                        yield record
                    offset = record.blob_offset + record.blob_len + len(record.line)
                    continue
                resume = _resync(view, offset + 1, end)
                if resume is None and problem.torn:
                    break
                resume = end if resume is None else resume
                self.damage.append(Damage(offset, resume - offset, problem.tag, problem.had_blob))
                offset = resume
        log.durable_seq = log.seq
        if cut_torn and offset < end and not self.damage:
            self.torn = end - offset
            os.ftruncate(log.fd, offset)
            os.fsync(log.fd)
            log.settle(log.fd, offset)

    # -- keeping the log small ---------------------------------------------------------------------

    def compact(self, keep_aside: str | None = None) -> None:
        """Rewrite the log from the owner's live state now (see the module docstring); with
        ``keep_aside`` the current log is first linked under that name, never shortened."""
        with self._upkeep.compacting:
            self._upkeep.compact(keep_aside)

    def worth_compacting(self, tail=None) -> bool:
        return self._upkeep.worth_compacting(tail)

    between_rounds = staticmethod(lambda: None)     # tests hold a compaction here

    def close(self) -> None:
        """Flush, compact if worth it, snapshot, and let the folder go."""
        self._upkeep.close()
        self.release()

    def release(self) -> None:
        """Close the files and let the folder go (the flock goes with its file)."""
        for fd in (self._log.fd, self._old_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._log.fd = self._old_fd = self._lock_fd = None

    # -- private ----------------------------------------------------------------------------------

    def _maintain(self):
        """After a successful flush (holding the flush lock): see ``_Upkeep.maintain``."""
        self._upkeep.maintain()

    def _cleanup(self):
        """Leftovers of a crash mid-compaction or mid-snapshot: never in use, always partial."""
        for name in (LOG_FILE + NEW_SUFFIX, SNAPSHOT_FILE + TMP_SUFFIX, LOCK_FILE + ".probe"):
            (self.dir / name).unlink(missing_ok=True)

    def _identity(self) -> str:
        """The log's identity from its first record; a new log gets one."""
        log = self._log
        if log.size == 0:
            log_id = secrets.token_hex(8)
            self.write(log.fd, _frame(0, _TAG_START, json.dumps({"log": log_id}).encode(),
                                      b"", 0))
            os.fsync(log.fd)
            log.settle(log.fd, os.fstat(log.fd).st_size)
            return log_id
        with mmap.mmap(log.fd, log.size, prot=mmap.PROT_READ) as view:
            record, _ = _record_at(view, 0, log.size)
            if record is None and _old_format(view):
                raise StoreError(f"{self.dir / LOG_FILE} was written by an earlier version of "
                                 "the server (no record framing): run that version to export "
                                 "it, or move the folder aside to start afresh")
        if record is not None and record.tag == _TAG_START:
            return json.loads(record.line).get("log", "")
        return ""                                   # damaged: no snapshot can match


class _Appender:
    """The writing end of the log, with group commit: records queued under the owner's lock,
    written and fsynced in one go by whichever waiter holds ``flush_lock``. A failed write
    keeps nothing: the file cut back, the waiters failed, the owner reloaded, the log
    ``degraded`` until a probe shows the disk takes writes again.

    A ticket is (generation, seq): a failure starts a new generation; a ticket of an older
    generation, numbered past the records durable in it, has failed."""

    def __init__(self, journal, fd):
        self.journal, self.fd = journal, fd
        self.flush_lock = threading.Lock()
        self.degraded: str | None = None
        self.pending: list[bytes] = []
        self.gen, self.failed_at = 0, {}            # tickets of a failed generation
        self.seq = self.durable_seq = 0
        self.size = self.durable_size = os.fstat(fd).st_size
        self.leftovers = False

    def settle(self, fd, size) -> None:
        """Nothing queued: the log is now ``fd``, ``size`` bytes, every record durable."""
        self.fd, self.size = fd, size
        self.durable_size, self.durable_seq = size, self.seq

    def append(self, tag: int, line: bytes, blob: bytes, blob_crc: int) -> tuple:
        """Queue a record, framed and numbered ``seq + 1`` here (holding the owner's lock)."""
        self.seq += 1
        record = _frame(self.seq, tag, line, blob, blob_crc)
        self.size += len(record)
        self.pending.append(record)
        return self.gen, self.seq

    def settled(self, ticket):
        gen, seq = ticket
        return gen < self.gen or seq <= self.durable_seq

    def check(self, ticket):
        if ticket is None:
            return
        gen, seq = ticket
        if gen < self.gen and seq > self.failed_at.get(gen, 0):
            raise WriteFailed(f"storage unavailable: {self.degraded or 'write failed'}")

    def check_writable(self):
        if self.degraded is None:
            return
        with self.flush_lock:
            if self.degraded is not None:
                try:
                    self._probe()
                except OSError as exc:
                    raise WriteFailed(f"storage unavailable: {_reason(exc)}") from None
                self.degraded = None

    def flush(self):
        """Write and fsync the queued records (holding the flush lock); on failure nothing of
        them is kept (see _failed) and WriteFailed is raised."""
        with self.journal._lock:
            batch, self.pending = self.pending, []
            seq, size = self.seq, self.size
        if not batch:
            return
        try:
            if self.leftovers:                      # a failed write's, not yet cut off
                os.ftruncate(self.fd, self.durable_size)
                self.leftovers = False
            self.journal.write(self.fd, b"".join(batch))
            os.fsync(self.fd)
        except OSError as exc:
            self._failed(exc)
            raise WriteFailed(f"storage unavailable: {self.degraded}") from None
        self.durable_seq, self.durable_size = seq, size

    def _failed(self, exc):
        """Nothing not yet durable is kept: the file cut back, waiters failed, owner reloaded."""
        journal = self.journal
        with journal._lock:
            self.pending = []
            self.failed_at[self.gen] = self.durable_seq
            self.gen += 1
            self.seq, self.size = self.durable_seq, self.durable_size
            self.degraded = _reason(exc)
            say(f"{journal.dir / LOG_FILE}: {self.degraded}; requests that change state are "
                "refused until the disk takes writes again")
            try:
                os.ftruncate(self.fd, self.durable_size)
            except OSError:
                self.leftovers = True               # flush cuts it before the next write
            journal.owner.reload()

    def _probe(self):
        path = self.journal.dir / (LOCK_FILE + ".probe")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            os.posix_fallocate(fd, 0, PROBE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _write_all(fd, bytes(PROBE_BYTES))        # no fallocate here: write it for real
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)


class _Upkeep:
    """Keeps the log small: a snapshot every ``snapshot_every`` records or
    ``snapshot_seconds``, a compaction (a ``_Rewrite`` swapped in) when the log outgrows the
    live data; one compaction at a time (``compacting``). Failures are reported on stderr and
    tried again later, never failing a request whose record is durable."""

    def __init__(self, journal):
        self.journal, self.log = journal, journal._log
        self.compacting = threading.Lock()
        self.compact_due = False
        self.since_snapshot, self.snapshot_time = 0, journal.clock()
        self.compact_after = 0

    def worth_compacting(self, tail=None) -> bool:
        journal = self.journal
        with journal._lock:
            live = journal.owner.live_bytes()
        tail = journal.tail_bytes if tail is None else tail
        return self.log.size > max(1.5 * live + tail, self.compact_after)

    def maintain(self):
        """After a successful flush (holding the flush lock): snapshot when due, and note a
        compaction due (the waiter runs it once it lets the flush lock go); failures only
        reported."""
        journal = self.journal
        try:
            if self.worth_compacting():
                self.compact_due = True
            elif self.since_snapshot >= journal.snapshot_every or (
                    self.since_snapshot and
                    journal.clock() - self.snapshot_time >= journal.snapshot_seconds):
                self.snapshot()
        except WriteFailed:
            pass                                    # reported by _failed already
        except OSError as exc:
            self._failed(exc)

    def compact_when_free(self):
        """Run a compaction that is due, unless one is running already (requests go on
        meanwhile: see compact)."""
        if not self.compacting.acquire(blocking=False):
            return
        try:
            self.compact_due = False
            if self.worth_compacting():
                self.compact()
        except WriteFailed:
            pass                                    # reported by _failed already
        except OSError as exc:
            self._failed(exc)
        finally:
            self.compacting.release()

    def close(self):
        """At a clean stop: flush, then compact if worth it, else snapshot if behind."""
        with self.compacting:
            try:
                with self.log.flush_lock:
                    self.log.flush()
                if self.worth_compacting(min(self.journal.tail_bytes, CLOSE_TAIL_BYTES)):
                    self.compact()
                else:
                    with self.log.flush_lock:
                        if self.log.size != self.journal.snapshot_offset:
                            self.snapshot()
            except OSError as exc:
                say(f"closing the store: {_reason(exc)} (the log keeps every answered change)")

    def compact(self, keep_aside=None):
        """Rewrite the log (holding ``compacting``, not the other locks): the live blobs are
        copied in rounds with no lock held, each round from a list taken under the lock; then,
        holding both locks, what changed since, the base record, and the swap (``_swap``)."""
        journal, log = self.journal, self.log
        rewrite = _Rewrite(journal)
        try:
            for _ in range(_COPY_ROUNDS):
                with log.flush_lock, journal._lock:
                    log.flush()                     # copy only durable blobs
                    copies, _ = journal.owner.live_records()
                copied = rewrite.copy(copies)
                journal.between_rounds()
                if copied <= _LAST_ROUND:
                    break
            with log.flush_lock:
                with journal._lock:
                    log.flush()
                    copies, base_line = journal.owner.live_records()
                    rewrite.finish(copies, base_line, log.seq)
                    self._swap(rewrite, keep_aside)
                self.snapshot()
        except BaseException:
            rewrite.abandon()
            raise

    def snapshot(self):
        """Write the owner's state and the log offset it covers (holding the flush lock)."""
        journal = self.journal
        with journal._lock:
            state = journal.owner.snapshot_state()
            offset, seq = self.log.size, self.log.seq
        self.log.flush()                            # the records the state includes
        state.update(log=journal._log_id, log_offset=offset, seq=seq)
        data = json.dumps(state, separators=(",", ":")).encode()
        write_atomic(journal.dir / SNAPSHOT_FILE, data)
        journal.snapshot_offset = offset
        self.since_snapshot, self.snapshot_time = 0, journal.clock()

    def _swap(self, rewrite, keep_aside):
        """Put the finished new log in place (holding both locks, the queue empty)."""
        journal = self.journal
        if keep_aside:
            os.link(journal.dir / LOG_FILE, journal.dir / keep_aside)
        os.replace(rewrite.path, journal.dir / LOG_FILE)
        if journal._old_fd is not None:             # a reader may still pread the one before
            os.close(journal._old_fd)
        journal._old_fd, journal._log_id = self.log.fd, rewrite.log_id
        self.log.settle(rewrite.fd, rewrite.size)
        rewrite.fd = None
        self.compact_after = 0
        journal.snapshot_offset = -1                # the old snapshot covers nothing now
        journal.owner.rewritten(rewrite.moved(), list(rewrite.damaged))
        fsync_dir(journal.dir)

    def _failed(self, exc):
        say(f"{self.journal.dir}: {_reason(exc)} while keeping the log small; tried again later")
        self.since_snapshot, self.snapshot_time = 0, self.journal.clock()
        self.compact_after = self.log.size + self.journal.tail_bytes


# -- helpers --------------------------------------------------------------------------------------

class _Rewrite:
    """A new log being written by a compaction (``census.log.new``): its start record, then
    copies of live blobs, made in rounds while requests go on; ``finish`` brings it up to the
    live state (holding both locks) and ends it with the base record. A copy is known by
    (tag, offset, length, CRC) in the current log: a result replaced since is copied again, one
    dropped since is forgotten by a record of the owner's ``forget_line``."""

    def __init__(self, journal):
        self.journal, self.log_id = journal, secrets.token_hex(8)
        self.path = journal.dir / (LOG_FILE + NEW_SUFFIX)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                          _FILE_MODE)
        self.size, self._chunk = 0, []
        self._copied: dict[int, tuple] = {}         # tag -> (key, new blob offset)
        self.damaged: dict[int, tuple] = {}         # tag -> key of a blob failing its CRC
        self._add(_frame(journal.last_ticket()[1], _TAG_START,
                         json.dumps({"log": self.log_id}).encode(), b"", 0))

    def copy(self, copies) -> int:
        """Copy the blobs not copied yet; returns how many were."""
        count = 0
        for copy in copies:
            key = copy[:4]
            if self._copied.get(copy.tag, (None,))[0] == key or self.damaged.get(copy.tag) == key:
                continue
            count += 1
            blob = self.journal.read_blob(copy.blob_offset, copy.blob_len, copy.blob_crc)
            if blob is None:
                self.damaged[copy.tag] = key
                continue
            self._copied[copy.tag] = key, self.size + HEADER.size
            self._add(_frame(0, copy.tag, copy.make_line(self.size + HEADER.size), blob,
                             copy.blob_crc))
        self._write()
        os.fsync(self.fd)                           # the bulk now, so finish's fsync is short
        return count

    def finish(self, copies, base_line, seq) -> None:
        """Bring the copies up to ``copies`` (the live ones now), add the base record (its
        sequence number the current one), fsync."""
        live = {copy.tag: copy[:4] for copy in copies}
        for tag, (key, _) in list(self._copied.items()):
            if live.get(tag) != key:
                del self._copied[tag]
                if tag not in live:
                    self._add(_frame(0, tag, self.journal.owner.forget_line(tag), b"", 0))
        self.damaged = {tag: key for tag, key in self.damaged.items() if live.get(tag) == key}
        self.copy(copies)
        self._add(_frame(seq, TAG_BASE, base_line, b"", 0))
        self._write()
        os.fsync(self.fd)

    def moved(self) -> dict:
        return {tag: offset for tag, (_, offset) in self._copied.items()}

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)

    def _add(self, record):
        self._chunk.append(record)
        self.size += len(record)
        if len(self._chunk) >= 64:
            self._write()

    def _write(self):
        self.journal.write(self.fd, b"".join(self._chunk))
        self._chunk = []


class _Problem(NamedTuple):
    torn: bool            # an incomplete record at the end of the file
    tag: int | None
    had_blob: bool


def say(message: str) -> None:
    """Report to the operator on stderr (one line)."""
    print(f"store: {message}", file=sys.stderr, flush=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, os.replace, fsync the folder: the file is old or new, never torn; a
    failed write leaves no temp file behind."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_folder(directory: Path) -> None:
    """The data folder, created 0700 if missing; StoreError if it cannot be."""
    try:
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"{directory} is a file, not a folder: give --data a folder") from None
    except NotADirectoryError:
        raise StoreError(f"{directory}: a part of that path is a file: give --data a "
                         "folder") from None
    except OSError as exc:
        raise StoreError(f"cannot create the data folder {directory}: {exc.strerror}: create "
                         "it, or give --data a folder this user may write") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(f"the data folder {directory} is not writable by this user: fix its "
                         "permissions, or give --data another folder")


def _frame(seq, tag, line, blob, blob_crc) -> bytes:
    head = struct.pack("<4sQIII", MAGIC, seq, tag, len(blob), len(line))
    body_crc = zlib.crc32(line, blob_crc)
    return head + struct.pack("<II", zlib.crc32(head), body_crc) + blob + line


def _record_at(view, offset, end):
    """(Record, None) if an intact record starts at ``offset``, else (None, _Problem)."""
    if offset + HEADER.size > end:
        return None, _Problem(True, None, False)
    magic, seq, tag, blob_len, line_len, head_crc, body_crc = HEADER.unpack_from(view, offset)
    if magic != MAGIC or zlib.crc32(view[offset:offset + _HEAD_CHECKED]) != head_crc:
        return None, _Problem(False, None, False)
    body = offset + HEADER.size
    if body + blob_len + line_len > end:
        return None, _Problem(True, tag, blob_len > 0)
    if zlib.crc32(view[body:body + blob_len + line_len]) != body_crc:
        return None, _Problem(False, tag, blob_len > 0)
    line = view[body + blob_len:body + blob_len + line_len]
    return Record(offset, seq, tag, blob_len, line), None


def _resync(view, offset, end):
    """The offset of the next intact record at or after ``offset``, or None."""
    while True:
        offset = view.find(MAGIC, offset, end)
        if offset < 0:
            return None
        if _record_at(view, offset, end)[0] is not None:
            return offset
        offset += 1


def _old_format(view) -> bool:
    """Does the log start with a record of the unframed format (lengths, CRC, no magic)?"""
    if len(view) < 12:
        return False
    blob_len, line_len, crc = struct.unpack_from("<III", view, 0)
    end = 12 + blob_len + line_len
    return end <= len(view) and zlib.crc32(view[12:end]) == crc


def _start_size() -> int:
    return HEADER.size + len(json.dumps({"log": "0" * 16}))


def take_folder(directory: Path) -> int:
    """Create the folder if needed and hold its lock file (with our PID in it) for good."""
    make_folder(directory)
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}: give --data a folder this user "
                         "may write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"the data folder {directory} is in use by another server (PID "
                         f"{holder}): stop that one, or give --data another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_log(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, _FILE_MODE)
    except IsADirectoryError:
        raise StoreError(f"{path} is a folder: move it away") from None
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}: fix the data folder's "
                         "permissions") from None
    os.fchmod(fd, _FILE_MODE)                       # files of older versions were 0644
    return fd


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc}"
    return f"write failed: {exc}"


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
