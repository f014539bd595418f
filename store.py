"""The census task store: task states, leases, errors, results and contributors, crash-safe.

Everything lives in memory behind one lock; ``journal.Journal`` makes it durable. Every change
is appended to the log as one record holding only what changed for its task (a new lease, its
end, the new state, an error, a result's metadata and its contributor's totals), with the result
bytes bit-packed beside it (8 KiB a block, 1/8 of the string; a whole census about 0.5 GB) and
read back by offset, checked against their CRC every time. A caller returns only once its record
is durable (group commit: see journal.py). When the disk refuses a write, nothing of it is kept:
the journal fails every record not yet durable and asks ``reload()`` for the state on disk, so
memory never shows a 503'd change; requests that change state get 503 (``Unavailable``) until
the disk takes writes again, and ``degraded`` says why. Read paths never write: an expired
lease is expired in memory, and again by replay at load.

    census.scope   the --scope the data was made with (``remembered_scope``)
    census.lock    census.log    census.json      (journal.py)

One class a job; ``Store`` (what the server uses) is made of them, all sharing one state and
one lock (mixins: no indirection on the hot paths):

    Store ─┬─ Administration      the administrator's requests
           ├─ Submissions         a submission's authority, its result accepted, a check settled
           ├─ ResultReader        stored results read back, CRC-checked
           ├─ Loader              snapshot, replay, rebuild, recovery; the journal's owner
           └─ Census ─┬─ CensusQueries   the read-only queries
                      ├─ Verification    checks handed out, standings, credit (trust.Verifier)
                      └─ CensusMemory    the state in memory and its changes

Lease deadlines are wall-clock epoch seconds (they survive restarts), so the clock is injected as
a ``time.time``-like callable; tests pass a fake one and never sleep. Start-up problems are one
``StoreError`` (one line: what is wrong, what to do); a damaged log is rebuilt from every intact
record, the original kept aside, the loss reported on stderr.
"""
import base64
import bisect
import contextlib
import gc
import hashlib
import heapq
import itertools
import hmac
import ipaddress
import json
import operator
import os
import random
import secrets
import threading
import time
import zlib
from enum import IntEnum
from http import HTTPStatus
from pathlib import Path
from typing import NamedTuple

import results
import trust
from journal import (HEADER, LOG_FILE, SNAPSHOT_EVERY, SNAPSHOT_FILE, SNAPSHOT_SECONDS, TAG_BASE,
                     TAIL_BYTES, Copy, Journal, StoreError, WriteFailed, make_folder, say,
                     write_atomic)
from upgrade import upgrade_unframed

TASKS = 65536                       # one task per /16
RESULT_LEN = 65536                  # one '0'/'1' per address of the /16
LEASE_SECONDS = 600.0
ERROR_LIST_LIMIT = 1000             # /error shows at most this many
OLD_LEASES_KEPT = 8                 # expired leases of a task still allowed to submit late

# The same 16 special-purpose ranges as icmp.RESERVED; the server keeps its own copy on purpose
# (it never imports the probing engine).
RESERVED = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32"))
_RESERVED_RANGES = tuple((int(n.network_address), int(n.broadcast_address)) for n in RESERVED)

SCOPE_FILE = "census.scope"         # the --scope the data was made with, one CIDR a line
_RECORD_SIZE = HEADER.size + 256    # a result record's size, less its bytes (about)


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
    bound: bool = False   # usable only with its token (the client asked: lease=required)


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
    crc: int = 0          # CRC-32 of the bytes at offset: checked on every read, and the
                          # digest a retry must match (then its bytes too) to be a duplicate
    errors_len: int = 0   # after the rtt array: the ICMP error entries (results.ERROR_ENTRY)
    holes: tuple = ()     # (first, last) offsets NOT probed (not "no answer"), to hand out again
    sweeps: tuple = ()    # a result several sweeps built: the earlier ones, each as it left the
                          # result (contributor, holder, responders, probed, holes): see _sweep_of

    @property
    def size(self) -> int:
        """Bytes at offset: bitmap, rtt array, ICMP error entries."""
        return self.bitmap_len + self.rtt_len + self.errors_len


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
    crc: int              # CRC-32 of the blob, computed outside the lock (see _commit)
    errors: bytes = b""   # ICMP error entries, raw
    skipped: tuple = ()   # (first, last) offsets the client did not probe

    @property
    def blob(self) -> bytes:
        return self.bitmap + self.rtt + self.errors


class Handout(NamedTuple):
    task: int
    lease: Lease
    network: str | None
    exclude: list


class Refused(Exception):
    """A request the store turns down; ``status`` is the HTTP status that says why."""

    def __init__(self, status: HTTPStatus, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after      # seconds, for a Retry-After header (429, 503)


class Unavailable(Refused):
    """The disk refuses writes: nothing of the request was kept; try again later."""

    def __init__(self, message: str):
        super().__init__(HTTPStatus.SERVICE_UNAVAILABLE, message, retry_after=5)


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
    silently widens a census to the whole address space. [] remembered = the whole space.
    StoreError if the folder is unusable, or the remembered scope unreadable and none given."""
    path = Path(directory) / SCOPE_FILE
    try:
        before = [ipaddress.IPv4Network(line) for line in path.read_text().split()]
    except FileNotFoundError:
        before = None
    except NotADirectoryError:
        raise StoreError(f"{directory} is a file, not a folder: give --data a folder") from None
    except (OSError, ValueError) as exc:
        if scope is None:
            raise StoreError(f"{path} is unreadable ({exc}): fix or delete it, or start with "
                             "--scope to replace it") from None
        say(f"{path} is unreadable ({exc}): replaced by the --scope given")
        before = None
    if scope is None:
        return before, before
    if before is None or sorted(before) != sorted(scope):
        make_folder(Path(directory))
        try:
            write_atomic(path, "".join(f"{net}\n" for net in scope).encode())
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}: give --data a folder this "
                             "user may write") from None
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


class CensusMemory:
    """The census state in memory and the changes to it: task states, the map, leases (live,
    old, per holder), errors, results' metadata and the census totals, the hand-out and expiry
    heaps. Guarded by one lock (``_lock``); knows nothing of files. Each change (call holding
    the lock) returns the record of what changed (a dict), which ``Store`` makes durable."""

    # -- state ------------------------------------------------------------------------------------

    def __init__(self, *, scope=None, exclude=(), lease_seconds=LEASE_SECONDS, clock=time.time,
                 verify=trust.FRACTION, rng=random.random):
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self._verify, self._rng = verify, rng     # trust.Verifier's fraction and random source
        self._inside, parts = plan_scope(scope, exclude)
        # what explains a client's skipped range besides the operator's exclusions: reserved
        # space, unless the operator named it in the scope (a loopback lab does)
        self._reserved_explains = scope is None
        # Blocks an administrator may bring in later (/add_task): any block not wholly reserved
        # (unless the scope allowed it) nor wholly opted out; their opted-out parts go with them.
        addable, addable_parts = plan_scope(None, exclude)
        either = int.from_bytes(addable) | int.from_bytes(self._inside)     # bytes of 0/1
        self._addable = either.to_bytes(TASKS)
        self._parts = {**addable_parts, **parts}
        self._lock = threading.RLock()            # the journal flushes and reloads under it too
        self._changed = threading.Condition()
        self._token_key = secrets.token_bytes(32)
        self._tokens = 0
        self.rejects = self.leases_expired = 0
        self._reset_memory()

    @property
    def version(self) -> int:
        return self._version

    def _reset_memory(self):
        self._states = bytearray(TASKS)
        self._map = bytearray(2 * TASKS)
        self._leases: dict[int, Lease] = {}
        self._old: dict[int, list] = {}
        self._errors: dict[int, str] = {}
        self._results: dict[int, ResultMeta] = {}
        self._contributors: dict[str, Contributor] = {}
        self._pinned: set[int] = set()            # tasks an administrator set: scope ignored
        self._held: dict[str, int] = {}           # live leases per holder
        self._checks: dict[int, Lease] = {}       # done tasks leased for a second opinion
        self._verifier = trust.Verifier(self._verify, rng=self._rng)
        self._version = self._submissions = 0
        self._probed = self._responders = self._result_bytes = 0
        self._pool, self._expiry, self._recent_t, self._recent_p = [], [], [], []

    # -- private: changes (call holding the lock; each returns the record of what changed) --------

    def _check_task(self, task):
        if not isinstance(task, int) or not 0 <= task < TASKS:
            raise self._refuse(HTTPStatus.NOT_FOUND, "no such task")

    def _refuse(self, status, message):
        self.rejects += 1
        return Refused(status, message)

    def _find_within(self, nets, holder=None, name=None):
        """The first available block inside one of ``nets``, else overlapping one; as in
        _pop_available, a block whose holes ``holder`` (or ``name``) left is kept for another."""
        wide = [n for n in nets if n.prefixlen <= 16]
        narrow = [n for n in nets if n.prefixlen > 16]
        for net in wide + narrow:
            task, end = int(net.network_address) >> 16, (int(net.broadcast_address) >> 16) + 1
            while (task := self._states.find(State.AVAILABLE, task, end)) >= 0:
                if not self._own_holes(task, holder, name):
                    return task
                task += 1
        return None

    def _own_holes(self, task, holder, name=None) -> bool:
        """Did ``holder`` (or ``name``) sweep part of this block's result with holes?"""
        meta = self._results.get(task)
        if meta is None or not meta.holes:
            return False
        return any(address == holder or who == name
                   for who, address, *_ in (_sweep_of(meta), *meta.sweeps))

    def _is_addable(self, task):
        return self._states[task] == State.EXCLUDED and self._addable[task]

    def _first_addable(self):
        task = self._states.find(State.EXCLUDED)
        while task >= 0 and not self._addable[task]:
            task = self._states.find(State.EXCLUDED, task + 1)
        if task < 0:
            raise self._refuse(HTTPStatus.CONFLICT, "no task left out of scope to add")
        return task

    def _requeue(self, task, why) -> dict:
        """A task whose record or result was lost: back to the pool, the loss noted."""
        note = f"{why}; handed out again"
        change = {**self._retire_lease(task), **self._discard_result(task), "e": note}
        self._errors[task] = note
        change.update(self._make_available(task))
        return change

    def _apply_result(self, task, meta, count):
        """Keep a result's metadata and its share of the census totals."""
        self._results[task] = meta
        self._probed += meta.probed
        self._responders += meta.responders
        self._result_bytes += _RECORD_SIZE + meta.size
        if count:
            self._recent_t.append(meta.finished_at)
            self._recent_p.append((self._recent_p[-1] if self._recent_p else 0) + meta.probed)
            if len(self._recent_t) > 2 * TASKS and self._recent_t[0] < meta.finished_at - 3600:
                self._trim_recent(meta.finished_at - 3600)

    def _drop_result(self, task) -> dict:
        meta = self._results.pop(task, None)
        if meta is None:
            return {}
        self._probed -= meta.probed
        self._responders -= meta.responders
        self._result_bytes -= _RECORD_SIZE + meta.size
        return {"r": None}

    def _discard_result(self, task) -> dict:
        """The result goes, and with it every opinion of the block and any check of it."""
        self._verifier.forget(task)
        return {**self._drop_result(task), **self._retire_check(task), "t": None}

    def _trim_recent(self, since):
        first = bisect.bisect_left(self._recent_t, since)
        del self._recent_t[:first]
        del self._recent_p[:first]

    def _set_to(self, task, code, holder) -> dict:
        if code == State.AVAILABLE:
            return self._make_available(task)
        if code == State.IN_PROGRESS:
            return self._new_lease(task, self.clock(), holder, False)[1]
        change = {}
        if code == State.ERROR:
            self._errors[task] = change["e"] = "set by an administrator"
        change.update(self._set_state(task, code))
        return change

    def _new_lease(self, task, now, holder, bound):
        change = self._retire_lease(task)
        lease = Lease(self._token(), now + self.lease_seconds, holder, bound)
        self._leases[task] = lease
        self._held[holder] = self._held.get(holder, 0) + 1
        heapq.heappush(self._expiry, (lease.deadline, task, lease.token))
        change.update(self._set_state(task, State.IN_PROGRESS), l=lease)
        return lease, change

    def _retire_lease(self, task) -> dict:
        """Drop the live lease, remembering it so that its holder may still submit late."""
        lease = self._leases.pop(task, None)
        if lease is None:
            return {}
        self._old[task] = (self._old.get(task, []) + [lease])[-OLD_LEASES_KEPT:]
        self._unhold(lease.holder)
        return {"l": None}

    def _unhold(self, holder):
        """One live lease fewer for ``holder`` (the lease cap counts them)."""
        left = self._held.get(holder, 1) - 1
        if left:
            self._held[holder] = left
        else:
            self._held.pop(holder, None)

    def _make_available(self, task) -> dict:
        heapq.heappush(self._pool, _rank(task))
        return self._set_state(task, State.AVAILABLE)

    def _pop_available(self, holder=None, name=None):
        """The next available task; a block whose holes ``holder`` (or ``name``) itself left,
        or that it helped fill, is kept for someone else (another sweeps its holes)."""
        passed, task = [], None
        while self._pool and task is None:
            candidate = _rank(heapq.heappop(self._pool))
            if self._states[candidate] != State.AVAILABLE:
                continue
            if self._own_holes(candidate, holder, name):
                passed.append(candidate)
            else:
                task = candidate
        for other in passed:
            heapq.heappush(self._pool, _rank(other))
        return task

    def _expire_due(self, now):
        """Expire leases whose deadline passed, in memory only (no record: replay expires them
        again at load); stale heap entries are skipped."""
        while self._expiry and self._expiry[0][0] <= now:
            _, task, token = heapq.heappop(self._expiry)
            lease = self._leases.get(task)
            if lease is not None and lease.token == token:
                self._retire_lease(task)
                self._make_available(task)
                self.leases_expired += 1
            check = self._checks.get(task)
            if check is not None and check.token == token:
                self._retire_check(task)          # the block stays queued for a check
                self.leases_expired += 1

    def _set_state(self, task, state) -> dict:
        self._states[task] = state
        self._map[2 * task] = state
        meta = self._results.get(task) if state == State.DONE else None
        self._map[2 * task + 1] = _fraction(meta) if meta else 0
        return {"s": state}

    def _token(self) -> str:
        """An unguessable lease token: a keyed hash of a counter (no system call per lease)."""
        self._tokens += 1
        digest = hashlib.blake2b(self._tokens.to_bytes(8, "little"), key=self._token_key,
                                 digest_size=16).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Verification:
    """The verification bookkeeping in memory (trust.Verifier does the deciding): the checks
    handed out (a done block leased for a second opinion), the contributors' standing and
    credit a verifier outcome settles, and what /task, /result and /get_progress say of it.
    Call with the lock held, unless said."""

    # -- reading ----------------------------------------------------------------------------------

    def standing(self, name: str) -> dict:
        """A contributor's verification: results verified (agreed with), disputed (lost),
        the rest unverified; flagged: every result checked, credit only once verified."""
        with self._lock:
            standing = self._verifier.standing(name)
            person = self._contributors.get(name)
        done = person.tasks_done if person else 0
        return {"verified": standing.agreed, "disputed": standing.disputed,
                "unverified": max(0, done - standing.agreed), "flagged": standing.flagged}

    def _verification_progress(self, done) -> dict:
        counts = self._verifier.counts()
        verified = counts["verified"]
        return {"verified_tasks": verified, "unverified_tasks": counts["unverified"],
                "checks_waiting": counts["waiting"] + counts["disputed"],
                "disputed_tasks": counts["disputed"] + counts["unresolved"],
                "verified_share": round(verified / done, 4) if done else 0.0,
                "verify_fraction": self._verify}

    def _verification_of(self, task) -> dict | None:
        """/task and /result: how far the block's kept result is verified."""
        with self._lock:
            block = self._verifier.blocks.get(task)
            checking = task in self._checks
        if block is None:
            return None
        kept = block.opinions[block.kept]
        return {"status": block.status.name.lower(), "opinions": len(block.opinions),
                "contributors": [o.contributor for o in block.opinions],
                "kept": kept.contributor, "checking": checking,
                "kept_sweepers": [s.contributor for s in kept.sweeps]}

    # -- private: checks and their outcome --------------------------------------------------------

    def _next_check(self, name, holder, within):
        """A check for this holder: only of a block it sweeps whole (a check with holes is
        no opinion), so with ``within`` one that leaves out nothing the operator does not
        (and none it already sent back unswept in part: trust.Verifier.decline)."""
        ranges = [(int(n.network_address), int(n.broadcast_address)) for n in within or ()]

        def wanted(task):
            return not self._unexplained(task, _outside(task, ranges))
        return self._verifier.next_check(name, holder, busy=self._checks,
                                         wanted=None if within is None else wanted)

    def _new_check(self, task, now, holder, bound):
        lease = Lease(self._token(), now + self.lease_seconds, holder, bound)
        self._checks[task] = lease
        self._held[holder] = self._held.get(holder, 0) + 1
        heapq.heappush(self._expiry, (lease.deadline, task, lease.token))
        return lease, {"k": lease}

    def _retire_check(self, task) -> dict:
        lease = self._checks.pop(task, None)
        if lease is None:
            return {}
        self._unhold(lease.holder)
        return {"k": None}

    def _settled(self, task, outcome, now) -> dict:
        """The record of a verifier outcome: the block, its contributors' standing and
        credit (a credit counts a result for its contributor, a debit takes it back)."""
        people = {}
        for opinions, sign in ((outcome.credit, 1), (outcome.debit, -1)):
            for opinion in opinions:
                people[opinion.contributor] = self._credit(opinion, sign, now)
        standings = {s.contributor: self._verifier.standing(s.contributor)
                     for o in outcome.block.opinions for s in o.sweeps}
        return {"t": _block_record(outcome.block), "w": standings, "cs": list(people.values())}

    def _credit(self, opinion, sign, now):
        person = self._contributors.get(opinion.contributor) or Contributor(
            opinion.contributor, 0, 0, 0, now, now)
        person = person._replace(tasks_done=person.tasks_done + sign,
                                 addresses_probed=person.addresses_probed + sign * opinion.probed,
                                 responders=person.responders + sign * opinion.responders,
                                 last_seen=max(person.last_seen, now) if sign > 0
                                 else person.last_seen)
        self._contributors[person.name] = person
        return person


class CensusQueries:
    """The read-only queries of the census in memory: progress, rate, pending leases, errors,
    a task's state and info, the map, contributors, finish times, waiting for a change. Each
    takes the lock for its read alone; an expired lease is expired in memory only."""

    # -- reading ----------------------------------------------------------------------------------

    def exclude_of(self, task: int) -> list:
        """The hand-out's exclude: the operator's exclusions, and for a block that came back
        with holes, the parts already probed."""
        parts = [str(n) for n in self._parts.get(task, ())]
        meta = self._results.get(task)
        if meta is None or not meta.holes:
            return parts
        return parts + _span_cidrs(task, _cut_all([(0, RESULT_LEN - 1)], meta.holes))

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
            out.update(self._verification_progress(counts[State.DONE]))
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
        with self._lock:
            self._expire_due(self.clock())
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
                "probed": meta.probed if meta else None, "exclude": self.exclude_of(task),
                "not_probed": _hole_nets(task, meta),
                "verification": self._verification_of(task)}

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

    def finished_times(self) -> list:
        """When each done block was finished (epoch seconds), oldest first: the progress
        history is derived from these, so nothing more is kept."""
        with self._lock:
            return sorted(meta.finished_at for meta in self._results.values())

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until the version differs from ``version`` (or timeout); returns the version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout)
        return self._version


class Census(CensusQueries, Verification, CensusMemory):
    """The census state in memory: its state and changes (``CensusMemory``), the verification
    bookkeeping (``Verification``) and the read-only queries (``CensusQueries``)."""


class Loader:
    """How the census state comes from disk and goes back to it: the snapshot's content, the
    log's replay, the derived structures rebuilt, a damaged log recovered, and what the
    journal asks of its owner (``live_records``, ``forget_line``, ``rewritten``, ``reload``;
    called by it holding the lock)."""

    # -- what the journal keeps -------------------------------------------------------------------

    def snapshot_state(self, results=True) -> dict:
        state = {"format": 2, "version": self._version, "submissions": self._submissions,
                 "states": self._states.translate(_DIGITS).decode(),
                 "leases": dict(self._leases), "old": dict(self._old),
                 "errors": dict(self._errors),
                 "contributors": list(self._contributors.values()),
                 "pinned": sorted(self._pinned), "checks": dict(self._checks),
                 "trust": {t: _block_record(b) for t, b in self._verifier.blocks.items()},
                 "standings": dict(self._verifier.standings)}
        if results:
            state["results"] = dict(self._results)
        return state

    def live_bytes(self) -> int:
        return self._result_bytes + 2 * TASKS + 160 * (
            len(self._leases) + len(self._errors) + len(self._contributors) + 2 * len(self._old)
            + len(self._checks) + 2 * len(self._verifier.blocks))

    # -- the journal's owner (called by it, holding the lock) -------------------------------------

    def live_records(self):
        """What a compaction keeps: a copy of each result record, then the rest as one."""
        copies = [Copy(task, meta.offset, meta.size, meta.crc,
                       lambda offset, meta=meta: _JSON.encode(
                           {"r": meta._replace(offset=offset)}).encode())
                  for task, meta in self._results.items()]
        return copies, _JSON.encode(self.snapshot_state(results=False)).encode()

    def forget_line(self, task) -> bytes:
        """A record saying ``task`` has no result (a compaction's, for one dropped meanwhile)."""
        return b'{"r":null}'

    def rewritten(self, moved: dict, damaged: list) -> None:
        """After a compaction: results now lie at ``moved`` offsets; ``damaged`` failed their
        CRC and were left out."""
        for task, offset in moved.items():
            self._results[task] = self._results[task]._replace(offset=offset)
        for task in damaged:
            self._requeue_now(task, "its stored result was damaged on disk")

    def reload(self) -> None:
        """Forget what is not durable: the state again from the snapshot and the log."""
        self._reset_memory()
        snap = self._journal.read_snapshot(quiet=True)
        if snap is not None:
            self._apply_snapshot(snap)
        self._replay(cut_torn=False)
        self._rebuild()
        with self._changed:
            self._changed.notify_all()

    # -- private: load ----------------------------------------------------------------------------

    def _load(self):
        snap = self._journal.read_snapshot()
        if snap is not None:
            try:
                self._apply_snapshot(snap)
            except (KeyError, ValueError, TypeError) as exc:
                say(f"{SNAPSHOT_FILE} is unusable ({exc!r}): rebuilding the state from "
                    f"{LOG_FILE} (nothing is lost)")
                self._reset_memory()
                self._journal.forget_snapshot()
        self._replay()
        if self._journal.torn:
            say(f"{LOG_FILE}: cut a record torn by a crash at its end ({self._journal.torn} "
                "bytes, never acknowledged)")
        self._rebuild()
        if self._journal.damage or self._journal.lost_records:
            self._recover()
        elif self._journal.worth_compacting():
            self._journal.compact()

    def _recover(self):
        """Damage in the middle of the log: every intact record is kept, the tasks of the lost
        ones handed out again, the log rewritten and the original kept aside."""
        damage = self._journal.damage
        lost = max(len(damage), self._journal.lost_records)
        self.damaged_records = lost
        aside = f"{LOG_FILE}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        tasks = sorted({d.tag for d in damage if d.tag is not None and d.tag < TASKS})
        unknown = sum(d.tag is None for d in damage)
        say(f"{self.dir / LOG_FILE} is damaged: {sum(d.length for d in damage)} bytes in "
            f"{len(damage)} place(s) (offsets {', '.join(str(d.offset) for d in damage[:10])})"
            f", {lost} record(s) lost; tasks of lost records: "
            f"{', '.join(map(str, tasks)) or 'none known'}"
            f"{f' (and {unknown} record(s) whose task is unknown)' if unknown else ''}. "
            f"Rebuilt from every intact record; the original is kept as {aside}")
        for task in tasks:
            if not (self._states[task] == State.DONE and task in self._results):
                self._requeue(task, "a record of it was lost to damage in the log")
        try:
            self._journal.compact(keep_aside=aside)
        except OSError as exc:
            raise StoreError(f"cannot rewrite the damaged {self.dir / LOG_FILE}: {exc}: free "
                             "some space and start again (nothing has been changed)") from None

    def _apply_snapshot(self, snap):
        self._apply_base(snap)
        if len(self._states) != TASKS:
            raise ValueError(f"{len(self._states)} task states")
        self._results = {int(t): ResultMeta(*m) for t, m in snap["results"].items()}

    def _apply_base(self, snap):
        self._version, self._submissions = snap["version"], snap["submissions"]
        self._states = bytearray(snap["states"].encode()).translate(_UNDIGITS)
        self._leases = {int(t): Lease(*v) for t, v in snap["leases"].items()}
        self._old = {int(t): [Lease(*v) for v in old] for t, old in snap["old"].items()}
        self._errors = {int(t): e for t, e in snap["errors"].items()}
        self._contributors = {c[0]: Contributor(*c) for c in snap["contributors"]}
        self._pinned = set(snap.get("pinned", ()))
        self._checks = {int(t): Lease(*v) for t, v in snap.get("checks", {}).items()}
        self._verifier = trust.Verifier(self._verify, rng=self._rng)
        for task, record in snap.get("trust", {}).items():
            self._verifier.restore(int(task), _block_from(record))
        self._verifier.standings = {n: trust.Standing(*w)
                                    for n, w in snap.get("standings", {}).items()}

    def _replay(self, cut_torn=True):
        """Apply the log's records after the snapshot, their JSON decoded in one call (half
        the cost of one call a record, on a restart's longest step)."""
        records = list(self._journal.replay(cut_torn))
        lines = json.loads(b"[%s]" % b",".join(record.line for record in records))
        for record, rec in zip(records, lines):
            self._apply_record(record, rec)

    def _apply_record(self, record, rec):
        if record.tag == TAG_BASE:
            return self._apply_base(rec)
        task = record.tag
        if "l" in rec:
            lease = self._leases.pop(task, None)
            if lease is not None:
                self._old[task] = (self._old.get(task, []) + [lease])[-OLD_LEASES_KEPT:]
            if rec["l"]:
                self._leases[task] = Lease(*rec["l"])
        if "r" in rec:
            _put(self._results, task, rec["r"] and ResultMeta(*rec["r"]))
            if rec["r"]:
                self._old.pop(task, None)
        if "e" in rec:
            _put(self._errors, task, rec["e"])
        if "s" in rec:
            self._states[task] = rec["s"]
        for person in ([rec["c"]] if rec.get("c") else []) + rec.get("cs", []):
            self._contributors[person[0]] = Contributor(*person)
        if "k" in rec:
            _put(self._checks, task, rec["k"] and Lease(*rec["k"]))
        if "t" in rec:
            self._verifier.restore(task, rec["t"] and _block_from(rec["t"]))
        for name, standing in rec.get("w", {}).items():
            self._verifier.standings[name] = trust.Standing(*standing)
        if "p" in rec:
            self._pinned.add(task)
        self._version = rec.get("v", self._version)
        self._submissions = rec.get("n", self._submissions)

    def _rebuild_totals(self):
        """What _apply_result keeps, for every result at once (a restart's longest step)."""
        metas = self._results.values()
        self._probed = sum(map(_PROBED, metas))
        self._responders = sum(map(_RESPONDERS, metas))
        self._result_bytes = (_RECORD_SIZE * len(metas) + sum(map(_BITMAP_LEN, metas))
                              + sum(map(_RTT_LEN, metas)) + sum(map(_ERRORS_LEN, metas)))
        since = self.clock() - 3600
        recent = sorted((m for m in metas if m.finished_at >= since), key=_FINISHED_AT)
        self._recent_t = list(map(_FINISHED_AT, recent))
        self._recent_p = list(itertools.accumulate(map(_PROBED, recent)))
        for task, meta in self._results.items():
            self._map[2 * task + 1] = _fraction(meta)

    def _rebuild(self):
        """Derived structures: scope (except where an administrator decided), map, hand-out
        heap, expiry heap, leases per holder, totals, recent rate; leases past their deadline
        expire, done tasks whose result is missing go back to the pool."""
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
        self._rebuild_totals()
        self._pool = [_rank(t) for t in range(TASKS) if self._states[t] == State.AVAILABLE]
        heapq.heapify(self._pool)
        leases = [*self._leases.items(), *self._checks.items()]
        self._expiry = [(lease.deadline, t, lease.token) for t, lease in leases]
        heapq.heapify(self._expiry)
        self._held = {}
        for _, lease in leases:
            self._held[lease.holder] = self._held.get(lease.holder, 0) + 1
        if self._states.count(State.DONE) != sum(self._states[t] == State.DONE
                                                 for t in self._results):
            missing = [t for t in range(TASKS) if self._states[t] == State.DONE
                       and t not in self._results]
            for task in missing:
                self._requeue(task, "its result record is missing")
            say(f"{len(missing)} done task(s) had no result record: handed out again "
                f"({', '.join(map(str, missing[:20]))})")
        self._expire_due(self.clock())


class ResultReader:
    """The stored results read back from the log, checked against their CRC every time: /result,
    every bitmap in order, the bytes a submission is compared with; a damaged one is counted,
    reported and its task handed out again."""

    # -- reading ----------------------------------------------------------------------------------

    def result(self, task: int) -> dict:
        """The stored result of a done task, as /result serves it; Refused 404 if not done
        (or if its stored bytes fail their CRC: the task is then handed out again)."""
        with self._lock:
            self._check_task(task)
            meta = self._results.get(task)
        data = self._read_result(task, meta)
        if data is None:
            raise Refused(HTTPStatus.NOT_FOUND, "task has no result")
        meta, bitmap, rtt_z, errors = data
        digits = format(int.from_bytes(bitmap, "big"), f"0{RESULT_LEN}b")
        return {"task_index": task, "result_data": digits,
                "rtt_us": base64.b64encode(rtt_z).decode() if rtt_z else None,
                "icmp_errors": [[k, kind, icmp_type, code] for k, kind, icmp_type, code
                                in results.icmp_error_rows(errors)],
                "contributor": meta.contributor, "finished_at": meta.finished_at,
                "not_probed": _hole_nets(task, meta),
                "verification": self._verification_of(task)}

    def bitmaps(self, with_errors=False):
        """(task, 8,192-byte bitmap) of every done task in index order, read lazily (a result
        whose bytes fail their CRC is left out, and its task handed out again); with_errors:
        (task, bitmap, ICMP error entries) (see results.icmp_error_rows)."""
        with self._lock:
            done = sorted(self._results.items())
        for task, meta in done:
            data = self._read_result(task, meta)
            if data is not None:
                yield (task, data[1], data[3]) if with_errors else (task, data[1])

    # -- private ----------------------------------------------------------------------------------

    def _read_result(self, task, meta):
        """(meta, bitmap, rtt) of a done task, checked against its CRC; None if it has none.
        A damaged one is counted, reported and its task handed out again."""
        for _ in range(2):                          # a compaction may move it meanwhile
            if meta is None:
                return None
            if not self._journal.durable_through(meta.offset + meta.size):
                self._wait(self._journal.last_ticket())   # its bytes may still be queued
            data = self._journal.read_blob(meta.offset, meta.size, meta.crc)
            if data is not None:
                rtt_end = meta.bitmap_len + meta.rtt_len
                return meta, data[:meta.bitmap_len], data[meta.bitmap_len:rtt_end], data[rtt_end:]
            with self._lock:
                current = self._results.get(task)
                if current == meta:
                    self.damaged_results += 1
                    ticket = self._requeue_now(task, "its stored result failed its CRC check")
                    break
            meta = current
        else:
            return None
        try:
            self._wait(ticket)
        except Refused:
            pass                                    # kept in memory; the next write saves it
        return None

    def _partial(self, task):
        """(meta, bitmap, rtt, errors) of a result with holes (call unlocked: it reads)."""
        with self._lock:
            meta = self._results.get(task) if isinstance(task, int) else None
        if meta is None or not meta.holes:
            return None
        return self._read_result(task, meta)

    def _prior_bitmaps(self, task):
        """The bitmaps of a block's opinions, if it wants another (call unlocked: it reads)."""
        with self._lock:
            block = self._verifier.blocks.get(task) if isinstance(task, int) else None
            meta = self._results.get(task)
        if block is None or not block.wants_opinion or meta is None:
            return []
        data = self._read_result(task, meta)
        kept = data[1] if data else bytes(RESULT_LEN // 8)
        return [kept if i == block.kept else base64.b64decode(o.ref or "")
                for i, o in enumerate(block.opinions)]

    def _same_as_stored(self, task, meta, packed) -> bool:
        """True if ``packed`` is byte for byte the stored result, else Refused 409."""
        stored = self._read_result(task, meta)
        if stored is None or stored[1:] != (packed.bitmap, packed.rtt, packed.errors):
            raise self._refuse(HTTPStatus.CONFLICT, _OTHER_DATA)
        return True

    def _requeue_now(self, task, why):
        """Hand a task out again whose stored result is lost; returns the record's ticket."""
        change = self._requeue(task, why)
        say(f"task {task} ({network_of(task)}): {self._errors[task]}")
        return self._commit(task, change)


class Submissions:
    """What a submission is checked against and what it changes (call holding the lock): the
    sender's authority (its lease, by token or address), a result accepted (holes handed out
    again, a partial result filled), a check's opinion compared and settled, a failure."""

    # -- private ----------------------------------------------------------------------------------

    def _take_submission(self, task, packed, problem, prior, partial, holder, token, name,
                         stats):
        """(duplicate, ticket, refusal): the submission's change queued, or the stored result's
        metadata if it may be a retry of it, and (status, why) to refuse it with once durable."""
        now = self.clock()
        self._expire_due(now)
        check = self._checks.get(task) if isinstance(task, int) else None
        if check is not None and _matches(check, token, holder):
            return None, *self._accept_check(task, packed, problem, prior, now, holder, token,
                                             name, stats)
        duplicate, live = self._authorise_submit(task, token, holder, packed)
        if duplicate:
            return duplicate, None, None
        if problem is None and packed.skipped and self._probed_nothing(task, packed.skipped):
            problem = "nothing probed: every address of the block was skipped"
        if problem is None:
            return None, self._accept(task, packed, now, holder, token, name, stats, partial), None
        if live:
            return None, self._fail(task, problem), (HTTPStatus.BAD_REQUEST, problem)
        raise self._refuse(HTTPStatus.BAD_REQUEST, problem)

    def _authorise_submit(self, task, token, holder, packed):
        """(duplicate, live): the accepted result's metadata if this may be a retry of it (the
        caller compares the bytes), else None and whether the sender holds the lease."""
        self._check_task(task)
        state = self._states[task]
        if state == State.DONE:
            meta = self._results.get(task)
            if meta and (_same(token, meta.token or "") if token
                         else meta.token is None and meta.holder == holder):
                if packed is not None and packed.crc == meta.crc:
                    return meta, False                  # the same data, if its bytes agree
                raise self._refuse(HTTPStatus.CONFLICT, _OTHER_DATA)
            raise self._refuse(HTTPStatus.CONFLICT, "task already done")
        if state == State.EXCLUDED:
            raise self._refuse(HTTPStatus.CONFLICT, "task is excluded from the census")
        lease = self._leases.get(task)
        if lease and _matches(lease, token, holder):
            return None, True
        if any(_matches(old, token, holder) for old in self._old.get(task, ())):
            return None, False                          # late, but nobody else finished it
        raise self._not_yours(lease, token)

    def _accept(self, task, packed, now, holder, token, name, stats, partial=None):
        """A result for a block; one with holes (not probed, not explained by the operator's
        exclusions) goes back to the pool for those parts, and fills those of a result before
        (whose sweeps it remembers: the block's opinion then has a part for each)."""
        before, sweeps = self._results.get(task), ()
        if before is not None and before.holes and partial is not None and partial[0] == before:
            packed = self._filled(partial, packed)
            sweeps = (*before.sweeps, _sweep_of(before))
        holes, probeable = self._unexplained(task, packed.skipped), ()
        meta = self._result_meta(task, packed, now, holder, token, name, stats)
        # counted here, not from the stats: a client's "excluded" has its --only, a hole too
        if holes or before is not None:
            probeable = self._probeable(task)
            meta = meta._replace(probed=_count(probeable) - _count(holes))
        meta = meta._replace(holes=holes, sweeps=sweeps)
        change = self._retire_lease(task)
        self._old.pop(task, None)
        if self._errors.pop(task, None) is not None:
            change["e"] = None
        self._submissions += 1
        change.update(self._drop_result(task))
        self._apply_result(task, meta, count=True)
        if holes:          # handed out again for the holes alone; credit comes with a whole block
            change.update(self._make_available(task), r=meta, n=self._submissions)
            return self._commit(task, change, packed.blob, packed.crc)
        change.update(self._set_state(task, State.DONE))
        opinion = trust.Opinion(meta.contributor, holder, meta.responders, meta.probed,
                                parts=_parts(meta, packed.bitmap, probeable))
        outcome = self._verifier.add(task, opinion, check=before is not None and bool(before.holes))
        change.update(self._settled(task, outcome, now), r=meta, n=self._submissions)
        return self._commit(task, change, packed.blob, packed.crc)

    def _accept_check(self, task, packed, problem, prior, now, holder, token, name, stats):
        """A check's result: (ticket, None) or (ticket, (status, why)) to refuse it with."""
        change = self._retire_check(task)
        block = self._verifier.blocks.get(task)
        if problem is None and not self._verifier.may_check(task, name or holder, holder):
            problem = ("your results disagree with others too often: you are given no checks"
                       if self._verifier.standing(name or holder).flagged
                       else "this contributor or address already gave this block a result")
            return self._commit(task, change), (HTTPStatus.CONFLICT, problem)
        if problem is not None or len(prior) != len(block.opinions):
            problem = problem or "the block changed meanwhile: sweep it again"
            return self._commit(task, change), (HTTPStatus.BAD_REQUEST, problem)
        holes = self._unexplained(task, packed.skipped)
        if holes:           # no opinion on what it did not probe: not judged, nor handed it again
            self._verifier.decline(task, name or holder, holder)
            return self._commit(task, change), (HTTPStatus.UNPROCESSABLE_ENTITY, _partial_check(
                task, holes))
        meta = self._result_meta(task, packed, now, holder, token, name, stats)
        agrees = [trust.agreement(packed.bitmap, other).agrees for other in prior]
        confirms = _confirms(block.opinions[0], packed.bitmap, prior[0])   # add() needs all
        opinion = trust.Opinion(meta.contributor, holder, meta.responders, meta.probed,
                                confirms=confirms)
        outcome = self._verifier.add(task, opinion, agrees)
        self._submissions += 1
        if not outcome.block.wants_opinion:      # settled: the bitmaps kept for comparing go
            block = outcome.block._replace(opinions=tuple(
                o._replace(ref=None) for o in outcome.block.opinions))
        elif outcome.block.kept != len(prior):   # unsettled: keep the newcomer's for the next
            newest = outcome.block.opinions[-1]._replace(
                ref=base64.b64encode(packed.bitmap).decode())
            block = outcome.block._replace(opinions=outcome.block.opinions[:-1] + (newest,))
        else:                                    # the newcomer's is kept: its bytes are the result
            block = outcome.block
        self._verifier.restore(task, block)
        change.update(self._settled(task, outcome._replace(block=block), now),
                      n=self._submissions)
        for again in outcome.requeued:           # a flagged contributor's unverified results
            self._commit(again, {"t": _block_record(self._verifier.blocks[again])})
        if not outcome.kept_changed:
            return self._commit(task, change), None
        change.update(self._drop_result(task))
        meta = meta._replace(offset=self._journal.next_blob_offset)
        self._apply_result(task, meta, count=False)
        change.update(self._set_state(task, State.DONE), r=meta)
        return self._commit(task, change, packed.blob, packed.crc), None

    def _filled(self, partial, packed):
        """The result before, its holes filled from this one (results.fill_holes)."""
        meta, bitmap, rtt, errors = partial
        old = results.Packed(bitmap, rtt, meta.responders, errors)
        new = results.Packed(packed.bitmap, packed.rtt, packed.responders, packed.errors,
                             packed.skipped)
        both = results.fill_holes(old, meta.holes, new)
        blob = both.bitmap + both.rtt + both.errors
        return Packed(both.bitmap, both.rtt, both.responders, zlib.crc32(blob), both.errors,
                      both.skipped)

    def _probed_nothing(self, task, skipped) -> bool:
        """Whether `skipped` leaves out every address that no exclusion explains."""
        return _count(self._unexplained(task, skipped)) == _count(self._probeable(task))

    def _probeable(self, task) -> tuple:
        """The spans of the block that no exclusion explains: what a whole sweep probes."""
        return self._unexplained(task, ((0, RESULT_LEN - 1),))

    def _unexplained(self, task, skipped) -> tuple:
        """The skipped spans that neither the operator's exclusions nor (with no scope given)
        reserved space explain: holes."""
        explained = [(int(n.network_address), int(n.broadcast_address))
                     for n in self._parts.get(task, ())]
        if self._reserved_explains:
            explained += _RESERVED_RANGES
        return tuple(_cut_ranges(list(skipped), task, explained))

    def _result_meta(self, task, packed, now, holder, token, name, stats):
        """The metadata of a result about to be committed (its bytes go where the next
        record's blob will: commit it before any other record)."""
        excluded = sum(n.num_addresses for n in self._parts.get(task, ()))
        excluded = _stat(stats, "excluded", excluded)
        probed = _stat(stats, "probed", RESULT_LEN - excluded)
        return ResultMeta(self._journal.next_blob_offset, len(packed.bitmap), len(packed.rtt),
                          name or holder, now, packed.responders, probed, excluded, token,
                          holder, packed.crc, len(packed.errors))

    def _fail(self, task, problem):
        self.rejects += 1
        change = self._retire_lease(task)
        self._errors[task] = problem[:200]
        change.update(self._set_state(task, State.ERROR), e=problem[:200])
        return self._commit(task, change)

    def _not_yours(self, lease, token):
        if token:
            return self._refuse(HTTPStatus.FORBIDDEN, "wrong lease token")
        if lease is not None and lease.bound:
            return self._refuse(HTTPStatus.FORBIDDEN, "this lease is usable only with its "
                                "token: send it as \"lease\"")
        return self._refuse(HTTPStatus.CONFLICT, "task is leased to another" if lease
                            else "task is not leased to you")


class Administration:
    """The administrator's requests: a task brought into the census, a task's state revised,
    errored tasks put back in the pool; each kept across restarts, answered once durable."""

    # -- admin ------------------------------------------------------------------------------------

    def add_task(self, status: int, holder: str, task: int | None = None) -> int:
        """Bring a task that is out of scope into the census, in state 0 or 1; returns it.

        ``task`` None picks the lowest-numbered one; a given task must be out of scope (and
        not wholly reserved or opted out) or available, else Refused 409. The choice is kept
        across restarts, whatever the scope then.
        """
        if status not in (State.AVAILABLE, State.IN_PROGRESS):
            raise Refused(HTTPStatus.BAD_REQUEST, "task_status must be 0 or 1")
        self._writable()
        with self._lock:
            if task is None:
                task = self._first_addable()
            else:
                self._check_task(task)
                if not (self._is_addable(task) or self._states[task] == State.AVAILABLE):
                    raise self._refuse(HTTPStatus.CONFLICT, "task is neither out of scope nor "
                                       "available")
            self._pinned.add(task)
            ticket = self._commit(task, {"p": 1, **self._set_to(task, status, holder)})
        self._wait(ticket)
        return task

    def revise(self, task: int, code: int, *, force=False, holder="") -> None:
        """Set a task's state (kept across restarts, whatever the scope then); a task in
        progress, or a done one (whose result this discards), only with ``force``."""
        if code not in tuple(State):
            raise Refused(HTTPStatus.BAD_REQUEST, "code must be 0..4")
        self._writable()
        with self._lock:
            self._check_task(task)
            if self._states[task] == State.IN_PROGRESS and not force:
                raise self._refuse(HTTPStatus.CONFLICT, "task is in progress (use force=1)")
            if self._states[task] == State.DONE and code != State.DONE and not force:
                raise self._refuse(HTTPStatus.CONFLICT,
                                   "task is done: revising it discards its result (use force=1)")
            change = {**self._retire_lease(task), **self._discard_result(task), "e": None, "p": 1}
            self._errors.pop(task, None)
            self._pinned.add(task)
            change.update(self._set_to(task, code, holder))
            ticket = self._commit(task, change)
        self._wait(ticket)

    def reset_errors(self, task: int) -> int:
        """Put an errored task (or every one, task -1) back in the pool; returns how many."""
        self._writable()
        with self._lock:
            if task != -1:
                self._check_task(task)
            tasks = list(self._errors) if task == -1 else [task] if task in self._errors else []
            ticket = None
            for t in tasks:
                del self._errors[t]
                change = {"e": None}
                if self._states[t] == State.ERROR:
                    change.update(self._make_available(t))
                ticket = self._commit(t, change)
        self._wait(ticket)
        return len(tasks)


class Store(Administration, Submissions, ResultReader, Loader, Census):
    """The census state made durable by a Journal in ``directory``: the volunteers' and the
    administrator's requests, each answered once its record is on disk. Thread-safe; call
    ``close()`` at the end. StoreError when the folder cannot be used (one line saying why)."""

    # -- volunteers -------------------------------------------------------------------------------

    def __init__(self, directory, *, scope=None, exclude=(), lease_seconds=LEASE_SECONDS,
                 clock=time.time, snapshot_every=SNAPSHOT_EVERY,
                 snapshot_seconds=SNAPSHOT_SECONDS, tail_bytes=TAIL_BYTES, max_leases=None,
                 verify=trust.FRACTION, rng=random.random):
        super().__init__(scope=scope, exclude=exclude, lease_seconds=lease_seconds, clock=clock,
                         verify=verify, rng=rng)
        self.dir = Path(directory)
        self.max_leases = max_leases
        self._closing = False
        self.damaged_results = self.damaged_records = 0
        upgrade_unframed(self.dir)                  # a folder of the earlier format, once
        self._journal = Journal(self.dir, self, self._lock, snapshot_every=snapshot_every,
                                snapshot_seconds=snapshot_seconds, tail_bytes=tail_bytes)
        try:
            with _collector_paused():
                self._load()
        except BaseException:
            self._journal.release()
            raise

    def get_task(self, holder: str, *, within=None, lease_required=False,
                 name=None) -> Handout | None:
        """Lease the next available task (spread over the space) to ``holder``; None if none.
        A done block owed a check (trust.Verifier) that this holder may give comes first: its
        result is already kept, so checks never hold up the census; ``name``, if the client
        says it, keeps a contributor from checking its own results from another address.

        ``within``: a list of IPv4Networks; only a block whose /16 overlaps one of them (those
        wholly inside first), and a check only of a block they cover, bar the operator's
        exclusions (a check with holes is refused: ``_accept_check``). ``lease_required``:
        the lease is usable only with its token.
        Refused 429 (``retry_after`` set) when the holder has ``max_leases`` live leases."""
        self._writable()
        with self._lock:
            now = self.clock()
            self._expire_due(now)
            self._check_cap(holder)
            task = self._next_check(name or holder, holder, within)
            if task is not None:
                lease, change = self._new_check(task, now, holder, lease_required)
            else:
                task = (self._pop_available(holder, name) if within is None
                        else self._find_within(within, holder, name))
                if task is None:
                    return None
                lease, change = self._new_lease(task, now, holder, lease_required)
            ticket = self._commit(task, change)
        self._wait(ticket)
        return Handout(task, lease, network_of(task), self.exclude_of(task))

    def submit(self, task: int, result_data, *, holder: str, token=None, name=None, rtt=None,
               stats=None, failure=None, bitmap=None, icmp_errors=None, skipped=None) -> bool:
        """Record a result; True when it repeats the submission that already completed it
        (same sender, same data).

        Raises Refused: 404 unknown task, 403 forged token (or none for a lease that needs
        one), 409 done by another / with other data / leased to another, 400 bad data (the
        task goes to error only if the sender holds the live lease), 503 storage unavailable.
        ``failure``: the client's own error message when its result says success false.
        The result is ``result_data`` (the original string) or ``bitmap`` (the compact form),
        with ``rtt``, ``icmp_errors`` and ``skipped`` beside it (see results.py). A submission
        for a check lease is compared with the block's kept result instead (trust.py).
        """
        problem, packed = _pack_result(task, result_data, bitmap=bitmap, rtt=rtt,  # outside
                                       icmp_errors=icmp_errors, skipped=skipped)  # the lock
        if failure is not None:
            problem, packed = f"client reported: {failure}"[:200], None
        token = token or None                               # an empty token is no token
        self._writable()
        prior = self._prior_bitmaps(task)       # what a check is compared with: read unlocked
        partial = self._partial(task)           # a result with holes this one may fill
        with self._lock:
            duplicate, ticket, refusal = self._take_submission(task, packed, problem, prior,
                                                               partial, holder, token, name, stats)
        if duplicate:
            return self._same_as_stored(task, duplicate, packed)
        self._wait(ticket)
        if refusal is not None:
            raise Refused(*refusal)
        return False

    def release(self, task: int, *, holder: str, token=None) -> None:
        """Give a leased task back to the pool; only the live lease holder may."""
        token = token or None
        self._writable()
        with self._lock:
            self._expire_due(self.clock())
            self._check_task(task)
            lease = self._leases.get(task)
            if lease is None:
                raise self._refuse(HTTPStatus.CONFLICT, "task is not leased")
            if not _matches(lease, token, holder):
                raise self._not_yours(lease, token)
            change = self._retire_lease(task)
            change.update(self._make_available(task))
            ticket = self._commit(task, change)
        self._wait(ticket)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        """None while writes work, else why not (one line); clears by itself."""
        return self._journal.degraded

    def counters(self) -> dict:
        """Numbers for /metrics."""
        with self._lock:
            states = {s.name.lower(): self._states.count(s) for s in State}
        return {"states": states, "submissions": self._submissions, "rejects": self.rejects,
                "leases_expired": self.leases_expired, "version": self._version,
                "damaged_results": self.damaged_results,
                "damaged_records": self.damaged_records, "degraded": int(bool(self.degraded)),
                "agreements": self._verifier.agreements, "disputes": self._verifier.disputes,
                "flagged": sum(w.flagged for w in self._verifier.standings.values()),
                "verification": self._verifier.counts()}

    # -- ending -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush, compact if worth it, write a final snapshot, let the folder go."""
        self._closing = True
        self._journal.close()

    # -- private ----------------------------------------------------------------------------------

    def _writable(self):
        try:
            self._journal.check_writable()
        except WriteFailed as exc:
            raise Unavailable(str(exc)) from None

    def _wait(self, ticket):
        try:
            self._journal.wait(ticket)
        except WriteFailed as exc:
            raise Unavailable(str(exc)) from None

    def _check_cap(self, holder):
        if self.max_leases and self._held.get(holder, 0) >= self.max_leases:
            self.rejects += 1
            retry = max(1, min(60, round(self.lease_seconds / 10)))
            raise Refused(HTTPStatus.TOO_MANY_REQUESTS,
                          f"{holder} already holds {self.max_leases} leases (the most one "
                          f"address may): finish or release one first", retry_after=retry)

    def _commit(self, task, change, blob=b"", blob_crc=0):
        """Queue the task's change as a record (its result bytes' CRC computed by the caller
        before taking the lock: zlib releases the GIL on big buffers, and a thread that waits
        to get it back while holding the lock stalls every request); returns the ticket."""
        self._version += 1
        change["v"] = self._version
        ticket = self._journal.append(task, _JSON.encode(change).encode(), blob, blob_crc)
        with self._changed:
            self._changed.notify_all()
        return ticket


# -- helpers --------------------------------------------------------------------------------------

_JSON = json.JSONEncoder(separators=(",", ":"))   # one encoder: json.dumps builds one a call
_OTHER_DATA = "task already done with different data"
_PROBED, _RESPONDERS = operator.attrgetter("probed"), operator.attrgetter("responders")
_BITMAP_LEN, _RTT_LEN = operator.attrgetter("bitmap_len"), operator.attrgetter("rtt_len")
_FINISHED_AT, _ERRORS_LEN = operator.attrgetter("finished_at"), operator.attrgetter("errors_len")
_DIGITS = bytes.maketrans(bytes(range(5)), b"01234")
_UNDIGITS = bytes.maketrans(b"01234", bytes(range(5)))
_REV8 = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while a load builds the state: about a million
    objects that all stay, which it would otherwise traverse again and again (a sixth of a
    full census's load time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _count(spans) -> int:
    return sum(last - first + 1 for first, last in spans)


def _cut(spans, first, last) -> list:
    """`spans` less first..last (sorted, merged, inclusive)."""
    out = []
    for a, b in spans:
        if b < first or a > last:
            out.append((a, b))
            continue
        if a < first:
            out.append((a, first - 1))
        if b > last:
            out.append((last + 1, b))
    return out


def _cut_all(spans, cuts) -> list:
    """`spans` less each of `cuts` (offsets, inclusive)."""
    for first, last in cuts:
        spans = _cut(spans, first, last)
    return spans


def _cut_ranges(spans, task, ranges) -> list:
    """`spans` of block ``task`` (offsets, inclusive) less what ``ranges`` (first and last
    address, as ints) cover of the block."""
    base = task << 16
    return _cut_all(spans, [(max(first - base, 0), min(last - base, RESULT_LEN - 1))
                            for first, last in ranges if first < base + RESULT_LEN and last >= base])


def _outside(task, ranges) -> list:
    """The spans of block ``task`` (offsets, inclusive) that none of ``ranges`` (first and
    last address, as ints) covers."""
    return _cut_ranges([(0, RESULT_LEN - 1)], task, ranges)


def _span_nets(task, first, last):
    base = task << 16
    return ipaddress.summarize_address_range(ipaddress.IPv4Address(base + first),
                                             ipaddress.IPv4Address(base + last))


def _span_cidrs(task, spans) -> list:
    """Spans of block ``task`` (offsets, inclusive) as CIDR strings."""
    return [str(n) for first, last in spans for n in _span_nets(task, first, last)]


def _hole_nets(task, meta) -> list:
    """A result's holes as CIDRs (what /result and /task call "not_probed")."""
    return _span_cidrs(task, meta.holes) if meta else []


def _block_record(block: trust.Block) -> list:
    """A trust.Block as plain JSON values (its opinions as lists)."""
    return [[list(o) for o in block.opinions], [list(p) for p in block.agreeing], block.kept,
            int(block.status)]


def _block_from(record) -> trust.Block:
    opinions, agreeing, kept, status = record
    return trust.Block(tuple(_opinion_from(o) for o in opinions),
                       tuple(tuple(p) for p in agreeing), kept, trust.Status(status))


def _opinion_from(values) -> trust.Opinion:
    """A trust.Opinion from its record (one written before opinions had parts has 6 values);
    a part's ref is the spans it probed."""
    opinion = trust.Opinion(*values)
    if len(values) <= 6:
        return opinion
    parts = (trust.Opinion(*p) for p in opinion.parts)
    return opinion._replace(parts=tuple(p._replace(ref=tuple(map(tuple, p.ref))) for p in parts),
                            confirms=tuple(opinion.confirms))


def _sweep_of(meta: ResultMeta) -> tuple:
    """One sweep as it left a result (the ``sweeps`` entry of the results built on it)."""
    return (meta.contributor, meta.holder, meta.responders, meta.probed,
            tuple(map(tuple, meta.holes)))


def _parts(meta: ResultMeta, bitmap: bytes, probeable) -> tuple:
    """A whole result several sweeps built: one trust.Opinion a sweep, with the spans it
    probed (the holes the one before left, less its own; the first's, the block's
    `probeable` spans less its holes), its responders there and its addresses probed: those
    spans' size (not the sweep's own count: a client's --only is in its stats' excluded and
    in its holes); () for a result one sweep made."""
    if not meta.sweeps:
        return ()
    bits, parts, left = int.from_bytes(bitmap, "big"), [], list(probeable)
    for who, address, _, _, holes in (*meta.sweeps, _sweep_of(meta)):
        spans = _cut_all(left, holes)
        responders = (bits & results.span_mask(spans)).bit_count()
        parts.append(trust.Opinion(who, address, responders, _count(spans), ref=tuple(spans)))
        left = holes
    return tuple(parts)


def _confirms(first: trust.Opinion, bitmap: bytes, other: bytes) -> tuple:
    """For each part of ``first`` (a result several sweeps built, its bytes ``other``), does
    ``bitmap`` agree with it on the addresses that part probed; () if it has no parts."""
    if not first.parts or len(other) != len(bitmap):
        return ()
    return tuple(trust.agreement(bitmap, other, results.span_mask(part.ref)).agrees
                 for part in first.parts)


def _partial_check(task, holes) -> str:
    """Why a check with holes is refused (422: not a disagreement, and the client's fallback
    to the string form answers only a 400)."""
    nets = _span_cidrs(task, holes)
    shown = ", ".join(nets[:4]) + (f" and {len(nets) - 4} more" if len(nets) > 4 else "")
    return (f"a check must probe the whole block, and {shown} was not probed: not judged; "
            f"the check goes to another holder")


def _rank(task: int) -> int:
    """Hand-out order: the 16-bit bit reversal (its own inverse), so consecutive hand-outs land
    far apart (0/16, 128/16, 64/16, ...)."""
    return _REV8[task & 255] << 8 | _REV8[task >> 8]


def _matches(lease: Lease, token, holder) -> bool:
    """Does the sender hold this lease: by token, or by address when it sent none and the
    lease does not need its token."""
    if token:
        return _same(token, lease.token)
    return not lease.bound and lease.holder == holder


def _same(given: str, secret: str) -> bool:
    # compare_digest refuses non-ASCII str, and a client may send anything: compare bytes
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), secret.encode())


def _pack_result(task, result_data, *, bitmap=None, rtt=None, icmp_errors=None, skipped=None):
    """(problem, None) or (None, Packed): the result checked (results.pack) and hashed."""
    block = _block_net(task) if isinstance(task, int) and 0 <= task < TASKS else _block_net(0)
    try:
        checked = results.pack(result_data, bitmap, block=block, rtt=rtt,
                               icmp_errors=icmp_errors, skipped=skipped)
    except results.Invalid as exc:
        return str(exc), None
    blob = checked.bitmap + checked.rtt + checked.errors
    return None, Packed(checked.bitmap, checked.rtt, checked.responders, zlib.crc32(blob),
                        checked.errors, checked.skipped)


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
