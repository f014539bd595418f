"""The census task store: task states, leases, errors, results and contributors, crash-safe.

Everything lives in memory behind one lock. Every change is appended to one append-only log as a
record: a header (lengths and a CRC-32), the result bytes if any, and a JSON line holding the
changed task's whole new record (so replaying it twice is harmless). A caller returns only once
its record is durable, with group commit and no writer thread: callers queue their records, and
whichever of them holds the flush lock writes and fsyncs everything queued so far, so those that
queued meanwhile usually find theirs already durable when their turn comes (one fsync for many
requests, and no thread hand-off per request). Results are kept bit-packed in the log (8 KiB a
block, 1/8 of the string; a whole census about 0.5 GB) and read back by offset. From time to time
the flushing caller rewrites a JSON snapshot of the state (temp file, fsync, ``os.replace``, fsync
of the folder) holding the log offset it covers; loading is snapshot + replay of the log after that
offset, and a tail torn by a crash (short or failing its CRC) is ignored and cut off.

Lease deadlines are wall-clock epoch seconds (they survive restarts), so the clock is injected as
a ``time.time``-like callable; tests pass a fake one and never sleep.
"""

import base64
import bisect
import hashlib
import heapq
import hmac
import ipaddress
import json
import os
import secrets
import struct
import threading
import time
import zlib
from enum import IntEnum
from http import HTTPStatus
from pathlib import Path
from typing import NamedTuple

TASKS = 65536                       # one task per /16
RESULT_LEN = 65536                  # one '0'/'1' per address of the /16
LEASE_SECONDS = 600.0
ERROR_LIST_LIMIT = 1000             # /error shows at most this many
SNAPSHOT_EVERY = 16384              # log records between snapshots (bounds the replay)
OLD_LEASES_KEPT = 8                 # expired leases of a task still allowed to submit late

# The same 16 special-purpose ranges as icmp.RESERVED; the server keeps its own copy on purpose
# (it never imports the probing engine).
RESERVED = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32"))

SNAPSHOT_FILE = "census.json"
LOG_FILE = "census.log"
SCOPE_FILE = "census.scope"         # the --scope the data was made with, one CIDR a line
_HEADER = struct.Struct("<III")     # result bytes length, JSON line length, CRC-32 of both


class State(IntEnum):
    AVAILABLE = 0
    IN_PROGRESS = 1
    DONE = 2
    ERROR = 3
    EXCLUDED = 4


class Lease(NamedTuple):
    token: str
    deadline: float       # epoch seconds
    holder: str           # remote address of the client it was handed to


class ResultMeta(NamedTuple):
    offset: int           # in the log: the bitmap, then the client's zlib'd rtt array
    bitmap_len: int
    rtt_len: int
    contributor: str
    finished_at: float
    responders: int
    probed: int
    excluded: int
    token: str | None     # the lease token the accepted submission carried (for retries)
    holder: str


class Contributor(NamedTuple):
    name: str
    tasks_done: int
    addresses_probed: int
    responders: int
    first_seen: float
    last_seen: float


class Packed(NamedTuple):
    """A checked result, ready for the log."""
    bitmap: bytes         # 8,192 bytes, one bit per address, address 0 the top bit
    rtt: bytes            # the client's zlib'd uint32 array, or b""
    responders: int
    crc: int              # CRC-32 of bitmap + rtt, computed outside the lock (see _commit)


class Handout(NamedTuple):
    task: int
    lease: Lease
    network: str | None
    exclude: list


class Refused(Exception):
    """A request the store turns down; ``status`` is the HTTP status that says why."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def network_of(task: int) -> str:
    """The /16 of a task."""
    return f"{task >> 8}.{task & 255}.0.0/16"


def parse_blocklist(text: str) -> list:
    """A ZMap-style blocklist: a CIDR or address a line, '#' starts a comment."""
    nets = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            nets.append(ipaddress.IPv4Network(line, strict=False))
        except ValueError:
            raise ValueError(f"line {number}: not an IPv4 network: {line!r}") from None
    return nets


def remembered_scope(directory, scope=None):
    """(scope to use, scope remembered before): a scope given is remembered in `directory` for
    the next start; none given means the remembered one, so a restart without --scope never
    silently widens a census to the whole address space. [] remembered = the whole space."""
    path = Path(directory) / SCOPE_FILE
    try:
        before = [ipaddress.IPv4Network(line) for line in path.read_text().split()]
    except FileNotFoundError:
        before = None
    if scope is None:
        return before, before
    if before is None or sorted(before) != sorted(scope):
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write_atomic(path, "".join(f"{net}\n" for net in scope).encode())
    return scope, before


def plan_scope(scope=None, exclude=()):
    """Which blocks are in the census (bytearray of 0/1) and the excluded parts of partial ones.

    No scope: every block except those lying wholly in reserved space (only a reserved range of
    /16 or wider can cover a whole block). A scope is the operator's explicit choice, reserved
    space included. ``exclude`` blocks wholly covered drop out; partly covered ones keep a list.
    """
    inside = bytearray(b"\x01") * TASKS
    parts: dict[int, list] = {}
    if scope is None:
        _fill(inside, [n for n in RESERVED if n.prefixlen <= 16], 0)
    else:
        inside = bytearray(TASKS)
        _fill(inside, [n for n in scope if n.prefixlen <= 16], 1)
        narrow: dict[int, list] = {}
        for net in (n for n in scope if n.prefixlen > 16):
            narrow.setdefault(int(net.network_address) >> 16, []).append(net)
        for block, nets in narrow.items():
            if not inside[block]:
                inside[block] = 1
                parts[block] = _complement(_block_net(block), nets)
    _fill(inside, [n for n in exclude if n.prefixlen <= 16], 0)
    for net in (n for n in exclude if n.prefixlen > 16):
        parts.setdefault(int(net.network_address) >> 16, []).append(net)
    return inside, _finish_parts(inside, parts)


class Store:
    """The census state, persisted in ``directory``. Thread-safe; call ``close()`` at the end."""

    def __init__(self, directory, *, scope=None, exclude=(), lease_seconds=LEASE_SECONDS,
                 clock=time.time, snapshot_every=SNAPSHOT_EVERY):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self.snapshot_every = snapshot_every
        self._inside, parts = plan_scope(scope, exclude)
        # Blocks an administrator may bring in later (/add_task): any block not wholly reserved
        # (unless the scope allowed it) nor wholly opted out; their opted-out parts go with them.
        addable, addable_parts = plan_scope(None, exclude)
        either = int.from_bytes(addable) | int.from_bytes(self._inside)     # bytes of 0/1
        self._addable = either.to_bytes(TASKS)
        self._parts = {**addable_parts, **parts}
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._flush_lock = threading.Lock()       # held by the one caller writing the log
        self._reset_memory()
        self._load()
        self._pending: list = []                  # log records not yet written, in order
        self._durable = self._seq                 # records up to this number are on disk
        self._token_key = secrets.token_bytes(32)
        self._tokens = 0
        self._closing = False
        self._log_error: Exception | None = None

    # -- volunteers -------------------------------------------------------------------------------

    def get_task(self, holder: str) -> Handout | None:
        """Lease the next available task (spread over the space) to ``holder``; None if none."""
        with self._lock:
            now = self.clock()
            self._expire_due(now)
            task = self._pop_available()
            if task is None:
                return None
            lease = self._new_lease(task, now, holder)
            ticket = self._commit(task)
        self._wait_durable(ticket)
        return Handout(task, lease, network_of(task), self.exclude_of(task))

    def submit(self, task: int, result_data, *, holder: str, token=None, name=None, rtt=None,
               stats=None, failure=None) -> bool:
        """Record a result; True when it is a retry of the submission that already completed it.

        Raises Refused: 404 unknown task, 403 forged token, 409 done by another / leased to
        another, 400 bad data (the task goes to error only if the sender holds the live lease).
        ``failure``: the client's own error message when its result says success false.
        """
        problem, packed = _pack_result(result_data, rtt)      # the costly part, outside the lock
        if failure is not None:
            problem = f"client reported: {failure}"[:200]
        with self._lock:
            now = self.clock()
            self._expire_due(now)
            duplicate, live = self._authorise_submit(task, token, holder)
            if duplicate:
                return True
            if problem is None:
                ticket = self._accept(task, packed, now, holder, token, name, stats)
            elif live:
                ticket = self._fail(task, problem)
            else:
                raise self._refuse(HTTPStatus.BAD_REQUEST, problem)
        self._wait_durable(ticket)
        if problem is not None:
            raise Refused(HTTPStatus.BAD_REQUEST, problem)
        return False

    def release(self, task: int, *, holder: str, token=None) -> None:
        """Give a leased task back to the pool; only the live lease holder may."""
        with self._lock:
            self._expire_due(self.clock())
            self._check_task(task)
            lease = self._leases.get(task)
            if lease is None:
                raise self._refuse(HTTPStatus.CONFLICT, "task is not leased")
            if not _matches(lease, token, holder):
                raise self._refuse(HTTPStatus.FORBIDDEN if token else HTTPStatus.CONFLICT,
                                   "wrong lease token" if token else "task is leased to another")
            self._retire_lease(task)
            self._make_available(task)
            ticket = self._commit(task)
        self._wait_durable(ticket)

    # -- admin ------------------------------------------------------------------------------------

    def add_task(self, status: int, holder: str, task: int | None = None) -> int:
        """Bring a task that is out of scope into the census, in state 0 or 1; returns it.

        ``task`` None picks the lowest-numbered one; a given task must be out of scope (and
        not wholly reserved or opted out) or available, else Refused 409. The choice is kept
        across restarts, whatever the scope then.
        """
        if status not in (State.AVAILABLE, State.IN_PROGRESS):
            raise Refused(HTTPStatus.BAD_REQUEST, "task_status must be 0 or 1")
        with self._lock:
            if task is None:
                task = self._first_addable()
            else:
                self._check_task(task)
                if not (self._is_addable(task) or self._states[task] == State.AVAILABLE):
                    raise self._refuse(HTTPStatus.CONFLICT, "task is neither out of scope nor "
                                       "available")
            self._pinned.add(task)
            self._set_to(task, status, holder)
            ticket = self._commit(task)
        self._wait_durable(ticket)
        return task

    def revise(self, task: int, code: int, *, force=False, holder="") -> None:
        """Set a task's state (kept across restarts, whatever the scope then); a task in
        progress, or a done one (whose result this discards), only with ``force``."""
        if code not in tuple(State):
            raise Refused(HTTPStatus.BAD_REQUEST, "code must be 0..4")
        with self._lock:
            self._check_task(task)
            if self._states[task] == State.IN_PROGRESS and not force:
                raise self._refuse(HTTPStatus.CONFLICT, "task is in progress (use force=1)")
            if self._states[task] == State.DONE and code != State.DONE and not force:
                raise self._refuse(HTTPStatus.CONFLICT,
                                   "task is done: revising it discards its result (use force=1)")
            self._retire_lease(task)
            self._drop_result(task)
            self._errors.pop(task, None)
            self._pinned.add(task)
            self._set_to(task, code, holder)
            ticket = self._commit(task)
        self._wait_durable(ticket)

    def reset_errors(self, task: int) -> int:
        """Put an errored task (or every one, task -1) back in the pool; returns how many."""
        with self._lock:
            if task != -1:
                self._check_task(task)
            tasks = list(self._errors) if task == -1 else [task] if task in self._errors else []
            ticket = None
            for t in tasks:
                del self._errors[t]
                self._make_available(t)
                ticket = self._commit(t)
        self._wait_durable(ticket)
        return len(tasks)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def exclude_of(self, task: int) -> list:
        return [str(n) for n in self._parts.get(task, ())]

    def progress(self) -> dict:
        """The /get_progress numbers."""
        with self._lock:
            now = self.clock()
            self._expire_due(now)
            counts = [self._states.count(s) for s in range(len(State))]
            first = bisect.bisect_left(self._recent_t, now - 300)
            recent = len(self._recent_t) - first
            probes = (self._recent_p[-1] - (self._recent_p[first - 1] if first else 0)
                      if recent else 0)
            out = {"progress": 0.0, "done_tasks": counts[State.DONE],
                   "total_tasks": len(self._states) - counts[State.EXCLUDED],
                   "in_progress": counts[State.IN_PROGRESS], "error_tasks": counts[State.ERROR],
                   "excluded_tasks": counts[State.EXCLUDED],
                   "available_tasks": counts[State.AVAILABLE], "addresses_probed": self._probed,
                   "responders": self._responders, "tasks_per_min": round(recent / 5, 2),
                   "probes_per_min": round(probes / 5, 2), "eta_seconds": None,
                   "contributors": len(self._contributors), "version": self._version}
        if out["total_tasks"]:
            out["progress"] = round(100 * out["done_tasks"] / out["total_tasks"], 3)
        left = out["total_tasks"] - out["done_tasks"]
        if recent:
            out["eta_seconds"] = round(left / (recent / 300), 1)
        return out

    def rate(self) -> dict:
        """Submissions per minute over the last hour."""
        with self._lock:
            first = bisect.bisect_left(self._recent_t, self.clock() - 3600)
            count = len(self._recent_t) - first
        return {"rate": round(count / 60, 3), "submissions_last_hour": count}

    def pending(self) -> list:
        with self._lock:
            self._expire_due(self.clock())
            return sorted(self._leases)

    def latest_available(self) -> int | None:
        """The highest-numbered available task (the original's 'latest task')."""
        with self._lock:
            self._expire_due(self.clock())
            task = self._states.rfind(State.AVAILABLE)
        return None if task < 0 else task

    def errors(self, limit=ERROR_LIST_LIMIT) -> list:
        with self._lock:
            return [(t, self._errors[t]) for t in sorted(self._errors)[:limit]]

    def state_of(self, task: int) -> State:
        self._check_task(task)
        return State(self._states[task])

    def task_info(self, task: int) -> dict:
        """What the map shows when a block is hovered."""
        with self._lock:
            self._expire_due(self.clock())
            self._check_task(task)
            state = State(self._states[task])
            meta = self._results.get(task)
        return {"task_index": task, "network": network_of(task), "state": int(state),
                "state_name": state.name.lower(),
                "contributor": meta.contributor if meta else None,
                "finished_at": meta.finished_at if meta else None,
                "responders": meta.responders if meta else None,
                "probed": meta.probed if meta else None, "exclude": self.exclude_of(task)}

    def result(self, task: int) -> dict:
        """The stored result of a done task, as /result serves it; Refused 404 if not done."""
        with self._lock:
            self._check_task(task)
            meta = self._results.get(task)
        if meta is None:
            raise Refused(HTTPStatus.NOT_FOUND, "task has no result")
        bitmap, rtt_z = self._read_result(meta)
        data = format(int.from_bytes(bitmap, "big"), f"0{RESULT_LEN}b")
        return {"task_index": task, "result_data": data,
                "rtt_us": base64.b64encode(rtt_z).decode() if rtt_z else None,
                "contributor": meta.contributor, "finished_at": meta.finished_at}

    def bitmaps(self):
        """(task, 8,192-byte bitmap) of every done task in index order, read lazily."""
        with self._lock:
            done = sorted(self._results.items())
        for task, meta in done:
            yield task, self._read_result(meta)[0]

    def map_bytes(self) -> tuple[int, bytes]:
        """(version, 131,072 bytes): state then answer fraction (0..255) for each task."""
        with self._lock:
            self._expire_due(self.clock())
            return self._version, bytes(self._map)

    def contributors(self) -> list:
        """Contributors ranked by tasks done, then responders."""
        with self._lock:
            people = list(self._contributors.values())
        people.sort(key=lambda c: (-c.tasks_done, -c.responders, c.name))
        return people

    def counters(self) -> dict:
        """Numbers for /metrics."""
        with self._lock:
            states = {s.name.lower(): self._states.count(s) for s in State}
        return {"states": states, "submissions": self._submissions, "rejects": self.rejects,
                "leases_expired": self.leases_expired, "version": self._version}

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until the version differs from ``version`` (or timeout); returns the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout)
        return self._version

    def close(self) -> None:
        """Flush and write a final snapshot."""
        with self._flush_lock:
            self._closing = True
            if self._log_error is None:
                self._snapshot()
        os.close(self._log_fd)

    # -- private: state changes (call with self._lock held) ---------------------------------------

    def _reset_memory(self):
        self._states = bytearray(TASKS)
        self._map = bytearray(2 * TASKS)
        self._leases: dict[int, Lease] = {}
        self._old: dict[int, list] = {}
        self._errors: dict[int, str] = {}
        self._results: dict[int, ResultMeta] = {}
        self._contributors: dict[str, Contributor] = {}
        self._pinned: set[int] = set()            # tasks an administrator set: scope ignored
        self._seq = self._version = self._submissions = 0
        self._probed = self._responders = 0
        self.rejects = self.leases_expired = 0

    def _check_task(self, task):
        if not isinstance(task, int) or not 0 <= task < TASKS:
            raise self._refuse(HTTPStatus.NOT_FOUND, "no such task")

    def _is_addable(self, task):
        return self._states[task] == State.EXCLUDED and self._addable[task]

    def _first_addable(self):
        task = self._states.find(State.EXCLUDED)
        while task >= 0 and not self._addable[task]:
            task = self._states.find(State.EXCLUDED, task + 1)
        if task < 0:
            raise self._refuse(HTTPStatus.CONFLICT, "no task left out of scope to add")
        return task

    def _refuse(self, status, message):
        self.rejects += 1
        return Refused(status, message)

    def _authorise_submit(self, task, token, holder):
        """(duplicate, live): a retry of the accepted one, or whether the sender holds the lease."""
        self._check_task(task)
        state = self._states[task]
        if state == State.DONE:
            meta = self._results.get(task)
            if meta and (_same(token, meta.token or "") if token
                         else meta.token is None and meta.holder == holder):
                return True, False
            raise self._refuse(HTTPStatus.CONFLICT, "task already done")
        if state == State.EXCLUDED:
            raise self._refuse(HTTPStatus.CONFLICT, "task is excluded from the census")
        lease = self._leases.get(task)
        if lease and _matches(lease, token, holder):
            return False, True
        if any(_matches(old, token, holder) for old in self._old.get(task, ())):
            return False, False                         # late, but nobody else finished it
        if token:
            raise self._refuse(HTTPStatus.FORBIDDEN, "wrong lease token")
        raise self._refuse(HTTPStatus.CONFLICT, "task is leased to another" if lease
                           else "task is not leased to you")

    def _accept(self, task, packed, now, holder, token, name, stats):
        offset = self._log_size + _HEADER.size       # where _commit below puts the bytes
        excluded = sum(n.num_addresses for n in self._parts.get(task, ()))
        excluded = _stat(stats, "excluded", excluded)
        probed = _stat(stats, "probed", RESULT_LEN - excluded)
        meta = ResultMeta(offset, len(packed.bitmap), len(packed.rtt), name or holder, now,
                          packed.responders, probed, excluded, token, holder)
        self._retire_lease(task)
        self._old.pop(task, None)
        self._errors.pop(task, None)
        self._submissions += 1
        self._apply_result(task, meta, count=True)
        self._set_state(task, State.DONE)
        person = self._contributors.get(meta.contributor) or Contributor(
            meta.contributor, 0, 0, 0, now, now)
        person = person._replace(tasks_done=person.tasks_done + 1, last_seen=now,
                                 addresses_probed=person.addresses_probed + meta.probed,
                                 responders=person.responders + meta.responders)
        self._contributors[person.name] = person
        return self._commit(task, person, packed.bitmap + packed.rtt, packed.crc)

    def _fail(self, task, problem):
        self.rejects += 1
        self._retire_lease(task)
        self._errors[task] = problem[:200]
        self._set_state(task, State.ERROR)
        return self._commit(task)

    def _apply_result(self, task, meta, count):
        """Keep a result's metadata and its share of the census totals."""
        self._results[task] = meta
        self._probed += meta.probed
        self._responders += meta.responders
        if count:
            self._recent_t.append(meta.finished_at)
            self._recent_p.append((self._recent_p[-1] if self._recent_p else 0) + meta.probed)
            if len(self._recent_t) > 2 * TASKS and self._recent_t[0] < meta.finished_at - 3600:
                self._trim_recent(meta.finished_at - 3600)

    def _drop_result(self, task):
        meta = self._results.pop(task, None)
        if meta is not None:
            self._probed -= meta.probed
            self._responders -= meta.responders

    def _trim_recent(self, since):
        first = bisect.bisect_left(self._recent_t, since)
        del self._recent_t[:first]
        del self._recent_p[:first]

    def _set_to(self, task, code, holder):
        if code == State.AVAILABLE:
            self._make_available(task)
        elif code == State.IN_PROGRESS:
            self._new_lease(task, self.clock(), holder)
        else:
            if code == State.ERROR:
                self._errors[task] = "set by an administrator"
            self._set_state(task, code)

    def _new_lease(self, task, now, holder):
        lease = Lease(self._token(), now + self.lease_seconds, holder)
        self._leases[task] = lease
        heapq.heappush(self._expiry, (lease.deadline, task, lease.token))
        self._set_state(task, State.IN_PROGRESS)
        return lease

    def _retire_lease(self, task):
        """Drop the live lease, remembering it so that its holder may still submit late."""
        lease = self._leases.pop(task, None)
        if lease is not None:
            self._old[task] = (self._old.get(task, []) + [lease])[-OLD_LEASES_KEPT:]

    def _make_available(self, task):
        self._set_state(task, State.AVAILABLE)
        heapq.heappush(self._pool, _rank(task))

    def _pop_available(self):
        while self._pool:
            task = _rank(heapq.heappop(self._pool))
            if self._states[task] == State.AVAILABLE:
                return task
        return None

    def _expire_due(self, now):
        """Lazily expire leases whose deadline passed; stale heap entries are skipped."""
        while self._expiry and self._expiry[0][0] <= now:
            _, task, token = heapq.heappop(self._expiry)
            lease = self._leases.get(task)
            if lease is not None and lease.token == token:
                self._retire_lease(task)
                self._make_available(task)
                self.leases_expired += 1
                self._commit(task)

    def _set_state(self, task, state):
        self._states[task] = state
        self._map[2 * task] = state
        meta = self._results.get(task) if state == State.DONE else None
        self._map[2 * task + 1] = _fraction(meta) if meta else 0

    def _token(self) -> str:
        """An unguessable lease token: a keyed hash of a counter (no system call per lease)."""
        self._tokens += 1
        digest = hashlib.blake2b(self._tokens.to_bytes(8, "little"), key=self._token_key,
                                 digest_size=16).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _read_result(self, meta):
        self._wait_durable(self._seq)                 # its bytes may still be queued
        data = os.pread(self._log_fd, meta.bitmap_len + meta.rtt_len, meta.offset)
        return data[:meta.bitmap_len], data[meta.bitmap_len:]

    # -- private: log, snapshot, load -------------------------------------------------------------

    def _record(self, task, person=None) -> dict:
        meta = self._results.get(task)
        return {"q": self._seq, "v": self._version, "n": self._submissions, "t": task,
                "s": self._states[task], "l": self._leases.get(task),
                "o": self._old.get(task), "e": self._errors.get(task), "r": meta, "c": person,
                "p": task in self._pinned}

    def _commit(self, task, person=None, blob=b"", blob_crc=0) -> int:
        """Queue the task's new record (and result bytes, whose CRC the caller computed before
        taking the lock: zlib releases the GIL on big buffers, and a thread that waits to get
        it back while holding the lock stalls every request); returns the record's number, the
        ticket to wait on. Its place in the log is reserved here, in order."""
        if self._log_error is not None:
            raise OSError(f"the log could not be written: {self._log_error}")
        self._seq += 1
        self._version += 1
        line = _JSON.encode(self._record(task, person)).encode() + b"\n"
        crc = zlib.crc32(line, blob_crc)
        record = _HEADER.pack(len(blob), len(line), crc) + blob + line
        self._log_size += len(record)
        self._pending.append(record)
        with self._changed:
            self._changed.notify_all()
        return self._seq

    def _wait_durable(self, ticket):
        """Return once record ``ticket`` is on disk: the caller holding the flush lock writes
        and fsyncs every queued record (its own and those queued meanwhile), the others wait
        for the lock and usually find theirs written when they get it."""
        if ticket is not None and self._durable < ticket:
            with self._flush_lock:
                if self._durable < ticket and self._log_error is None:
                    try:
                        self._flush()
                    except Exception as exc:    # a full disk: fail requests, don't hang them
                        self._log_error = exc       # (nor call a lost batch durable later)
        if self._log_error is not None:
            raise OSError(f"the log could not be written: {self._log_error}")

    def _flush(self):
        """Write and fsync the queued records (call holding the flush lock, not the lock)."""
        with self._lock:
            batch, self._pending = self._pending, []
            last = self._seq
        self._write_batch(batch, last)
        if self._since_snapshot >= self.snapshot_every:
            self._snapshot()

    def _write_batch(self, batch, last):
        _write_all(self._log_fd, b"".join(batch))
        os.fsync(self._log_fd)
        self._durable = last
        self._since_snapshot += len(batch)

    def _snapshot(self):
        """Write the whole state and the log offset it covers, queued records written first
        (call holding the flush lock)."""
        with self._lock:
            if self._pending:
                self._write_batch(self._pending, self._seq)
                self._pending = []
            state = {"format": 1, "log_offset": self._log_size, "seq": self._seq,
                     "version": self._version, "submissions": self._submissions,
                     "states": self._states.translate(_DIGITS).decode(),
                     "leases": dict(self._leases), "old": dict(self._old),
                     "errors": dict(self._errors), "results": dict(self._results),
                     "contributors": list(self._contributors.values()),
                     "pinned": sorted(self._pinned)}
        _write_atomic(self.dir / SNAPSHOT_FILE, _JSON.encode(state).encode())
        self._since_snapshot = 0

    def _load(self):
        offset = 0
        path = self.dir / SNAPSHOT_FILE
        if path.exists():
            offset = self._apply_snapshot(json.loads(path.read_bytes()))
        self._log_fd = os.open(self.dir / LOG_FILE, _APPEND, 0o644)
        self._since_snapshot = 0
        for record in self._replay(offset):
            self._since_snapshot += 1
            self._apply_record(record)
        self._rebuild()

    def _apply_snapshot(self, snap) -> int:
        self._seq, self._version = snap["seq"], snap["version"]
        self._submissions = snap["submissions"]
        self._states = bytearray(snap["states"].encode()).translate(_UNDIGITS)
        self._leases = {int(t): Lease(*v) for t, v in snap["leases"].items()}
        self._old = {int(t): [Lease(*v) for v in old] for t, old in snap["old"].items()}
        self._errors = {int(t): e for t, e in snap["errors"].items()}
        self._results = {int(t): ResultMeta(*m) for t, m in snap["results"].items()}
        self._contributors = {c[0]: Contributor(*c) for c in snap["contributors"]}
        self._pinned = set(snap.get("pinned", ()))
        return snap["log_offset"]

    def _replay(self, offset):
        """The JSON records of the log from ``offset``; a torn or corrupt tail is cut off."""
        size = os.fstat(self._log_fd).st_size
        if offset > size:
            raise ValueError(f"{LOG_FILE} is shorter than {SNAPSHOT_FILE} says: restore both")
        while offset + _HEADER.size <= size:
            blob_len, line_len, crc = _HEADER.unpack(os.pread(self._log_fd, _HEADER.size, offset))
            end = offset + _HEADER.size + blob_len + line_len
            body = os.pread(self._log_fd, blob_len + line_len, offset + _HEADER.size)
            if end > size or zlib.crc32(body) != crc:
                break
            yield json.loads(body[blob_len:])
            offset = end
        if offset < size:
            os.ftruncate(self._log_fd, offset)
            os.fsync(self._log_fd)
        self._log_size = offset

    def _apply_record(self, rec):
        task = rec["t"]
        self._seq, self._version, self._submissions = rec["q"], rec["v"], rec["n"]
        self._states[task] = rec["s"]
        _put(self._leases, task, rec["l"] and Lease(*rec["l"]))
        _put(self._old, task, rec["o"] and [Lease(*v) for v in rec["o"]])
        _put(self._errors, task, rec["e"])
        _put(self._results, task, rec["r"] and ResultMeta(*rec["r"]))
        if rec["c"]:
            self._contributors[rec["c"][0]] = Contributor(*rec["c"])
        if rec.get("p"):
            self._pinned.add(task)
        else:
            self._pinned.discard(task)

    def _rebuild(self):
        """Derived structures: scope (except where an administrator decided), map, hand-out
        heap, expiry heap, totals, recent rate."""
        for task in range(TASKS):
            state = self._states[task]
            if task in self._pinned:
                continue
            if state == State.AVAILABLE and not self._inside[task]:
                self._states[task] = State.EXCLUDED
            elif state == State.EXCLUDED and self._inside[task]:
                self._states[task] = State.AVAILABLE
        self._map = bytearray(2 * TASKS)
        self._map[0::2] = self._states
        results, self._results = self._results, {}
        self._recent_t, self._recent_p = [], []
        since = self.clock() - 3600
        for task, meta in sorted(results.items(), key=lambda item: item[1].finished_at):
            self._apply_result(task, meta, count=meta.finished_at >= since)
            self._map[2 * task + 1] = _fraction(meta)
        self._pool = [_rank(t) for t in range(TASKS) if self._states[t] == State.AVAILABLE]
        heapq.heapify(self._pool)
        self._expiry = [(lease.deadline, t, lease.token) for t, lease in self._leases.items()]
        heapq.heapify(self._expiry)

    def finished_times(self) -> list:
        """When each done block was finished (epoch seconds), oldest first: the progress
        history is derived from these, so nothing more is kept."""
        with self._lock:
            return sorted(meta.finished_at for meta in self._results.values())


# -- helpers --------------------------------------------------------------------------------------

_APPEND = os.O_RDWR | os.O_CREAT | os.O_APPEND
_JSON = json.JSONEncoder(separators=(",", ":"))   # one encoder: json.dumps builds one a call
_DIGITS = bytes.maketrans(bytes(range(5)), b"01234")
_UNDIGITS = bytes.maketrans(b"01234", bytes(range(5)))
_REV8 = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _rank(task: int) -> int:
    """Hand-out order: the 16-bit bit reversal (its own inverse), so consecutive hand-outs land
    far apart (0/16, 128/16, 64/16, ...)."""
    return _REV8[task & 255] << 8 | _REV8[task >> 8]


def _matches(lease: Lease, token, holder) -> bool:
    """Does the sender hold this lease: by token, or by address when it sent none."""
    if token:
        return _same(token, lease.token)
    return lease.holder == holder


def _same(given: str, secret: str) -> bool:
    # compare_digest refuses non-ASCII str, and a client may send anything: compare bytes
    return hmac.compare_digest(given.encode(), secret.encode())


def _pack_result(result_data, rtt):
    """(problem, None) or (None, Packed): the result checked and bit-packed, rtt_us checked."""
    try:
        digits = result_data if isinstance(result_data, bytes) else result_data.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        digits = b""
    if len(digits) != RESULT_LEN:
        return f"result_data must be a string of {RESULT_LEN} characters", None
    # int() checks the digits as it converts (a separate pass would cost 16 us more), but it
    # also takes blanks around, a sign, a 0b prefix and '_' between digits: refuse those first.
    try:
        if digits[:2].strip(b"01") or digits[-1:].strip(b"01") or b"_" in digits:
            raise ValueError
        bits = int(digits, 2)                   # character k is bit k from the top
    except ValueError:
        return "result_data may hold only '0' and '1'", None
    ones = bits.bit_count()
    bitmap = bits.to_bytes(RESULT_LEN // 8, "big")
    if not rtt:
        return None, Packed(bitmap, b"", ones, zlib.crc32(bitmap))
    try:
        rtt_z = base64.b64decode(rtt, validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(rtt_z, 4 * RESULT_LEN + 1)
        if not inflater.eof or len(raw) != 4 * ones:
            raise ValueError("length")
    except (ValueError, TypeError, zlib.error):
        return "rtt_us must be base64 of zlib'd uint32s, one per '1' of result_data", None
    return None, Packed(bitmap, rtt_z, ones, zlib.crc32(rtt_z, zlib.crc32(bitmap)))


def _stat(stats, key, default):
    value = stats.get(key) if isinstance(stats, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= RESULT_LEN:
        return value
    return default


def _fraction(meta: ResultMeta) -> int:
    """Answer fraction scaled 0..255, rounded up so that any responder shows."""
    if meta.responders <= 0:
        return 0
    return min(255, -(-255 * meta.responders // max(meta.probed, meta.responders, 1)))


def _put(table, key, value):
    if value:
        table[key] = value
    else:
        table.pop(key, None)


def _block_net(block):
    return ipaddress.IPv4Network((block << 16, 16))


def _fill(inside, nets, value):
    for net in nets:
        first = int(net.network_address) >> 16
        count = net.num_addresses >> 16
        inside[first:first + count] = bytes([value]) * count


def _complement(block, nets):
    """The parts of ``block`` not covered by ``nets``."""
    rest = [block]
    for net in ipaddress.collapse_addresses(nets):
        rest = [piece for r in rest
                for piece in ((r,) if not r.overlaps(net) else
                              () if r.subnet_of(net) else r.address_exclude(net))]
    return rest


def _finish_parts(inside, parts):
    """Collapse each partly excluded block's parts; a block they wholly cover drops out."""
    done = {}
    for block, nets in parts.items():
        if not inside[block]:
            continue
        nets = sorted(ipaddress.collapse_addresses(nets))
        if sum(n.num_addresses for n in nets) >= 1 << 16:
            inside[block] = 0
        else:
            done[block] = nets
    return done


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_atomic(path: Path, data: bytes):
    """Temp file, fsync, os.replace, fsync the directory: the file is old or new, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
