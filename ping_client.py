"""ping_client.py: the volunteer client of the IPv4 ICMP census.

It asks the task server for a /16, pings every address of it with icmp.py, and sends back which
ones answered in the original system's format (65,536 characters of '0'/'1', character k for
address .k//256.k%256 of the block), with the round-trip times beside it. The client is two
files, this one and icmp.py; it uses urllib for HTTP and nothing else of the project.

    sudo python3 ping_client.py --server http://HOST:8001
    sudo python3 ping_client.py --scan 127.0.0.0/16 --allow 127.0.0.0/8 -o out.csv

A looping client starts its next task as soon as a sweep's last probe is out, while that sweep
still listens for late replies (--cooldown, 8 s by default) on the same socket, so a long
cooldown costs no throughput; each sweep has its own secret, so every reply is credited to the
sweep that sent its probe. It stops with 0 when the census is complete.

Nothing is lost: a finished result is written to a local spool (fsynced) before it is submitted,
and removed only when the server has acknowledged or refused it; a restarted client submits its
spool first (a looping client also before every new task). Server errors, timeouts and
connection errors are retried with exponential backoff and jitter (with --once for at most ten
minutes); a server never reached at all is given up on after 30 s, and an answer that is not a
census server's at once. Ctrl-C gives back the task still being sent and exits 130 (SIGTERM:
143); in a loop, a task whose probes are all out first listens to the end of its cooldown and is
submitted (a second Ctrl-C gives it back too).

The client keeps its own rules whatever a server says: it refuses a block of which nothing may
be probed (reserved space its own --allow does not open, or all excluded), sweeps at its own
--rate, and skips its own exclusions plus those the task carries (a server can add exclusions,
never remove them). A sweep that did not probe every address it should have (--timeout, sends
the network refused) is not a result: the task is given back, not submitted.
"""

import argparse
import array
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from http.client import HTTPException
from typing import NamedTuple

import icmp

BLOCK = 65536                      # addresses in a task: one /16
EVERYWHERE = ipaddress.IPv4Network("0.0.0.0/0")
DROP_STATUSES = frozenset({400, 403, 404, 409, 410, 413, 422})   # the server refused for good
RETRY_STATUSES = frozenset({408, 429})                          # ... and every 5xx
HTTP_TIMEOUT = 30.0
FIRST_CONTACT_PATIENCE = 30.0      # a server never reached at all: give up after this many seconds
FIRST_CONTACT_TIMEOUT = 10.0       # ... and wait at most this long for each try's connection
QUICK_TIMEOUT = 5.0                # a release, or a submit on the way out: must not hold up Ctrl-C for long
PLAIN_PROGRESS_EVERY = 10.0        # seconds between progress lines when not on a terminal
ONCE_PATIENCE = 600.0              # with --once, give up on a silent server after this many seconds
DEFAULT_SPOOL = os.path.join(os.path.expanduser("~"), ".cache", "ipv4-census", "spool")
UNIT_SPOOL = "/var/lib/ipv4-census/spool"   # the spool of the systemd service (its StateDirectory)
PSEUDONYM_FILE = "volunteer-id"    # in the spool folder: the random id behind the default name
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

_REPLIED = bytes(0x31 if s == icmp.Status.ECHO_REPLY else 0x30 for s in range(256))
_ERROR_TYPES = {icmp.Status.UNREACHABLE: icmp.IcmpType.DEST_UNREACHABLE,
                icmp.Status.TIME_EXCEEDED: icmp.IcmpType.TIME_EXCEEDED}
_ERROR_ENTRY = struct.Struct("!HBB")   # offset in the block, ICMP type, ICMP code
_EXCLUDED_RUN = re.compile(re.escape(bytes([icmp.Status.EXCLUDED])) + b"+")


class ClientError(Exception):
    """Something this client cannot go on from (a broken server answer, a local failure)."""


class TransientError(ClientError):
    """Worth trying again later: a 5xx, 408/429, a timeout or a connection error."""


class Unanswered(TransientError):
    """No HTTP answer at all: refused, reset, timed out, no route, a name that does not resolve."""


class NotCensus(ClientError):
    """The first answer from the server's URL is not the JSON a census server speaks."""


class Refused(ClientError):
    """A task this client will not do, whatever the server says."""


class GaveUp(ClientError):
    """With --once: the server did not answer for ONCE_PATIENCE seconds."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, kill): handled as Ctrl-C is, but the exit code is 143."""


class Task(NamedTuple):
    index: int
    lease: str | None
    network: ipaddress.IPv4Network   # derived from the index: the numbering is fixed
    claimed: str | None              # the server's "network"; must agree with the index
    exclude: tuple                   # the server's extra exclusions, as it sent them
    contact: bytes = b""             # the server's contact, for the probes' payload (checked)
    bad_contact: str | None = None   # a contact the server sent that may not go in a probe


class Spooled(NamedTuple):
    """A finished result in the spool; server and body are None when the file is unreadable."""
    path: str
    server: str | None               # the server's URL, as normal_url spells it
    body: dict | None                # the /submit_result body


class SweepOptions(NamedTuple):
    rate: float                      # probes/s, 0 = as fast as the machine goes
    probes: int
    cooldown: float
    timeout: float | None
    allow: tuple[ipaddress.IPv4Network, ...]     # reserved space the user opened
    exclude: tuple[ipaddress.IPv4Network, ...]   # the user's own exclusions
    only: tuple[ipaddress.IPv4Network, ...] = ()  # with --server: probe nothing outside these


# --- tasks and the client's own rules ---------------------------------------------------------

def task_network(index: int) -> ipaddress.IPv4Network:
    """Task i is the /16 i//256 . i%256 .0.0/16."""
    # The server numbers tasks the same way (the original system's rule); the client is two files and cannot
    # import the server, so the one-line rule is repeated here on purpose.
    return ipaddress.IPv4Network((index << 16, 16))


def parse_task(answer: dict) -> Task | None:
    """A /get_task answer as a Task; None when the server has nothing to hand out."""
    if "task_index" not in answer:
        if isinstance(answer.get("error"), str):
            return None       # {"error": "No tasks available"}: wait and ask again
        raise ClientError(f"unexpected /get_task answer: {answer!r:.200}")
    index = answer["task_index"]
    if isinstance(index, str) and index.isdecimal():      # not isdigit(): int("²") raises
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < BLOCK:
        raise ClientError(f"bad task_index in /get_task answer: {index!r:.50}")
    lease, exclude = answer.get("lease"), answer.get("exclude", [])
    contact, bad_contact = probe_contact(answer.get("contact"))
    return Task(index, lease if isinstance(lease, str) else None, task_network(index),
                answer.get("network"), tuple(exclude) if isinstance(exclude, list) else (exclude,),
                contact, bad_contact)


def probe_contact(value) -> tuple[bytes, str | None]:
    """(the contact for the probes, None) from a /get_task "contact"; (b"", what was sent) when
    it may not go in a probe: printable ASCII of at most icmp.CONTACT_MAX bytes only."""
    if value is None or value == "":
        return b"", None
    if isinstance(value, str) and value.isascii() and icmp.is_contact(value.encode("ascii")):
        return value.encode("ascii"), None
    return b"", f"{value!r:.60}"


def contact_note(task: Task) -> str:
    """What the probes of a task carry after the tag, in words."""
    tag = icmp.TAG.decode().strip()
    if task.contact:
        return f"probes carry the tag {tag!r} and the contact {task.contact.decode()!r}"
    if task.bad_contact:
        return (f"probes carry only the tag {tag!r}: the server's contact {task.bad_contact} is not "
                f"printable ASCII of at most {icmp.CONTACT_MAX} bytes, so it is left out")
    return f"probes carry only the tag {tag!r} (the server names no contact)"


def check_task(task: Task, options: SweepOptions) -> tuple[ipaddress.IPv4Network, ...]:
    """Apply the client's own rules; return the exclusions to sweep with, or raise Refused."""
    if task.claimed is not None and task.claimed != str(task.network):
        raise Refused(f"the server calls it {task.claimed!r}, but task {task.index} "
                      f"is {task.network}")
    try:
        extra = tuple(ipaddress.IPv4Network(_text(cidr), strict=False) for cidr in task.exclude)
    except ValueError as exc:
        raise Refused(f"the task's exclude list cannot be honoured: {exc}") from None
    why = blocked(task.network, options.allow, options.exclude, options.only, extra)
    if why:
        raise Refused(f"{task.network} is {why}")
    exclude = options.exclude + extra    # the server adds; it never takes ours away
    if options.only:                     # everything of the block outside --only is excluded
        exclude += tuple(_gaps(task.network, options.only))
    return exclude


def blocked(network: ipaddress.IPv4Network, allow, exclude, only=(), theirs=()) -> str:
    """Why no address of `network` may be probed under these rules (the one reason that
    applies); '' when some may. `exclude` is the user's, `theirs` the server's."""
    if icmp.wholly_reserved(network, allow):
        return ("reserved address space, and --allow does not open it (pass --allow only for "
                "space that is yours to probe)")
    if only and not any(network.overlaps(net) for net in only):
        return f"outside --only {', '.join(map(str, only))}"
    if _covered(network, exclude):
        return "inside your own --exclude"
    if _covered(network, theirs):
        return "excluded in full by the server's exclusions for it"
    outside = tuple(_gaps(network, only)) if only else ()
    if not icmp.wholly_excluded(network, allow, (*exclude, *theirs, *outside)):
        return ""
    reserved = tuple(net for net in icmp.RESERVED if not any(net.subnet_of(a) for a in allow))
    parts = [what for what, nets in (("your --exclude", exclude), ("the server's exclusions", theirs),
                                     ("the part outside --only", outside),
                                     ("reserved space --allow does not open", reserved))
             if any(network.overlaps(net) for net in nets)]
    return "excluded in full by " + " and ".join(parts) + " together"


# --- result encoding --------------------------------------------------------------------------

def result_string(status) -> str:
    """The original format: '1' where an echo reply came back, '0' everywhere else."""
    return bytes(status).translate(_REPLIED).decode("ascii")


def encode_rtt(values) -> str:
    """base64 of zlib-compressed little-endian uint32s (the contract's "rtt_us")."""
    arr = array.array("I", values)
    if sys.byteorder == "big":
        arr.byteswap()
    return base64.b64encode(zlib.compress(arr.tobytes())).decode("ascii")


def decode_rtt(text: str) -> array.array:
    """The inverse of encode_rtt: for readers of "rtt_us" (the tests, analysis scripts)."""
    arr = array.array("I", zlib.decompress(base64.b64decode(text)))
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def compact_bitmap(status) -> str:
    """The compact form's "bitmap": base64 of zlib of one bit per address, address 0 the top
    bit of the first byte (bit k is character k of result_string)."""
    bits = int(result_string(status), 2).to_bytes(len(status) // 8, "big")
    return base64.b64encode(zlib.compress(bits)).decode("ascii")


def encode_icmp_errors(status, code) -> str:
    """"icmp_errors": base64 of zlib of (offset uint16 big-endian, ICMP type, code) for each
    unreachable or time exceeded answer, in address order ('' when there is none)."""
    entries = b"".join(_ERROR_ENTRY.pack(k, _ERROR_TYPES[st], code[k])
                       for k, st in enumerate(status) if st in _ERROR_TYPES)
    return base64.b64encode(zlib.compress(entries)).decode("ascii") if entries else ""


def skipped_networks(network: ipaddress.IPv4Network, status) -> list[str]:
    """The CIDRs of `network` the sweep did not probe (its exclusions, --only, reserved space)."""
    base = int(network.network_address)
    return [str(net) for run in _EXCLUDED_RUN.finditer(bytes(status))
            for net in _span(base + run.start(), base + run.end() - 1)]


def string_form(body: dict) -> dict:
    """A compact /submit_result body in the original form: result_data in place of bitmap."""
    bits = zlib.decompress(base64.b64decode(body["result"]["bitmap"]))
    result = {key: value for key, value in body["result"].items() if key != "bitmap"}
    result["result_data"] = format(int.from_bytes(bits, "big"), f"0{8 * len(bits)}b")
    return {**body, "result": result}


def submission_body(task: Task, result, name: str, compact: bool = True) -> dict:
    """The /submit_result body: the original shape (or, `compact`, the bitmap in place of
    result_data) plus lease, name, rtt_us, stats, icmp_errors and skipped."""
    status = result.status
    if len(status) != BLOCK or result.addresses[0] != int(task.network.network_address):
        raise ClientError(f"sweep result does not cover {task.network} in address order")
    replied = icmp.Status.ECHO_REPLY
    rtts = (rtt for st, rtt in zip(status, result.rtt_us) if st == replied)
    probed, excluded, _, unreachable = tally(result)
    data = {"bitmap": compact_bitmap(status)} if compact else {"result_data": result_string(status)}
    body = {"task_index": task.index, "result": {"success": True, **data},
            "name": name, "rtt_us": encode_rtt(rtts),
            "stats": {"probed": probed, "excluded": excluded, "unreachable": unreachable,
                      "sent": result.stats.sent}}
    errors, skipped = encode_icmp_errors(status, result.code), skipped_networks(task.network, status)
    if errors:
        body["icmp_errors"] = errors
    if skipped:
        body["skipped"] = skipped
    if task.lease is not None:
        body["lease"] = task.lease
    return body


def tally(result) -> tuple[int, int, int, int]:
    """(probed, excluded, replies, unreachable) of a sweep, from its own counters."""
    stats = result.stats
    return len(result.status) - stats.excluded, stats.excluded, stats.replies, stats.unreachable


def incomplete(result) -> str:
    """Why the sweep may have left addresses unprobed or replies unheard (their '0' would be a
    lie); '' if not."""
    stats, probed = result.stats, tally(result)[0]
    if not probed:
        return "nothing was probed: every address is excluded"
    # A failed send skips its address for that round, and which ones failed is not known. An
    # address never probed failed in every round but perhaps the last (cut by --timeout), so
    # fewer failures than that cannot hide one; more might.
    if stats.send_errors >= max(1, stats.rounds - 1):
        return (f"{stats.send_errors:,} probes could not be sent (the network refused them), "
                f"so some addresses may never have been probed")
    if stats.sent < probed:
        return f"the sweep stopped (--timeout) after {stats.sent:,} probes for {probed:,} targets"
    if stats.dropped:
        return (f"the kernel dropped {stats.dropped:,} packets on the ICMP socket (its receive queue "
                f"was full), so some live addresses may read as silent; a lower --rate or a larger "
                f"queue (sudo sysctl -w net.core.rmem_max=33554432) avoids that")
    return ""


def summary(label: str, result) -> str:
    """One line per sweep: what was probed, what answered, how fast, at what CPU cost: that
    of the sweep's own threads (not of the process, which also starts Python and talks to the
    server), also per 65,536 probes, so that blocks with holes and --probes 2 compare."""
    stats = result.stats
    probed, excluded, replies, unreachable = tally(result)
    share = 100.0 * replies / probed if probed else 0.0
    speed = stats.sent / stats.send_seconds if stats.send_seconds > 0 else 0.0
    per_probe = stats.cpu_seconds / stats.sent if stats.sent else 0.0
    return (f"{label}: {probed:,} targets, {replies:,} replied ({share:.1f} %), "
            f"{unreachable:,} unreachable, {excluded:,} excluded; "
            f"{stats.sent:,} probes in {stats.send_seconds:.1f} s ({speed:,.0f}/s, "
            f"{stats.kind} socket), {stats.elapsed:.1f} s with the cooldown; sweep CPU "
            f"{stats.cpu_seconds:.2f} s ({per_probe * 1e6:.1f} us a probe, "
            f"{per_probe * BLOCK:.2f} s per 65,536 probes)")


def write_csv(result, stream) -> int:
    """ZMap-style CSV of the responders (saddr,rtt_ms), in address order; returns the rows."""
    stream.write("saddr,rtt_ms\n")
    rows = 0
    for addr, st, rtt in zip(result.addresses, result.status, result.rtt_us):
        if st == icmp.Status.ECHO_REPLY:
            stream.write(f"{socket.inet_ntoa(addr.to_bytes(4, 'big'))},{rtt / 1000:.3f}\n")
            rows += 1
    return rows


# --- retry pacing, spool, HTTP ----------------------------------------------------------------

class Backoff:
    """Exponential backoff with "equal jitter": wait n is in [d/2, d], d = min(cap, base*2^n)."""

    def __init__(self, base: float = 0.5, cap: float = 60.0, rng=random.random):
        self.base, self.cap, self.rng = base, cap, rng
        self.failures = 0

    def delay(self) -> float:
        """The next wait, in seconds; each call counts one more failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0


class Spool:
    """Finished results waiting for the server's answer: one JSON file each, written durably.
    The folder also keeps the random id behind the volunteer's default name (pseudonym())."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        for name in os.listdir(path):       # half-written by a run that died mid-put
            if name.endswith(".tmp"):
                os.unlink(os.path.join(path, name))
        self._write(os.path.join(path, "writable"), "")   # fail now, not after a sweep
        os.unlink(os.path.join(path, "writable"))

    @classmethod
    def open(cls, path: str) -> "Spool":
        """Spool(path), or a ClientError saying what is wrong with the folder and what to do."""
        try:
            return cls(path)
        except OSError as exc:
            raise ClientError(f"cannot use the spool folder {path}: {exc.strerror or exc} "
                              f"(choose another with --spool DIR)") from None

    def put(self, server: str, body: dict, index: int) -> Spooled:
        """Write a result durably (temp file, fsync, rename, fsync the folder)."""
        final = os.path.join(self.path, f"{time.time_ns():020d}-task{index}.json")
        self._write(final, json.dumps({"server": server, "body": body}))
        return Spooled(final, server, body)

    def pseudonym(self) -> str:
        """volunteer-<8 hex digits>: a hash of a random id kept in the folder (made on the
        first call), so a volunteer who gives no --name is the same person run after run
        without their user or host name going on a public page."""
        path = os.path.join(self.path, PSEUDONYM_FILE)
        try:
            with open(path, encoding="ascii") as fh:
                ident = fh.read().strip()
        except (OSError, ValueError):
            ident = ""
        if len(ident) != 32 or not all(c in "0123456789abcdef" for c in ident):
            ident = secrets.token_hex(16)
            self._write(path, ident + "\n")
        return "volunteer-" + hashlib.sha256(ident.encode("ascii")).hexdigest()[:8]

    def pending(self) -> list[Spooled]:
        """Every spooled result, oldest first."""
        return [self._load(os.path.join(self.path, name))
                for name in sorted(os.listdir(self.path)) if name.endswith(".json")]

    def drop(self, path: str) -> None:
        """Forget a record the server has answered for good."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._sync()

    def set_aside(self, path: str) -> str:
        """Move an unreadable record out of the way (kept, for a human to look at)."""
        os.replace(path, path + ".bad")
        self._sync()
        return path + ".bad"

    @staticmethod
    def _load(path: str) -> Spooled:
        try:
            with open(path, encoding="ascii") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("server"), str)
                and isinstance(record.get("body"), dict)):
            return Spooled(path, None, None)
        return Spooled(path, record["server"], record["body"])

    def _write(self, final: str, text: str) -> None:
        temp = final + ".tmp"
        with open(temp, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
        self._sync()

    def _sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def normal_url(url: str) -> str:
    """One spelling of a server's URL (scheme and host in lower case, no default port, no
    trailing slash), so that a result spooled under another spelling still finds its server."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:                 # e.g. a broken [IPv6] host: leave it as it is
        return url
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and netloc.endswith(default):
        netloc = netloc[:-len(default)]
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


class Api:
    """The task server's HTTP API over urllib: (status, JSON object) or TransientError.

    Until the server has answered with JSON once (`answered`), a non-JSON answer below 500 is
    NotCensus (the URL points at some other web server) and each try waits at most
    FIRST_CONTACT_TIMEOUT for its connection."""

    def __init__(self, base: str, timeout: float = HTTP_TIMEOUT):
        self.base, self.timeout = normal_url(base), timeout
        self.answered = False

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body: dict, timeout: float | None = None) -> tuple[int, dict]:
        return self.request("POST", path, body, timeout)

    def request(self, method, path, body=None, timeout=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode("ascii")
        headers = {} if data is None else {"Content-Type": "application/json"}
        req = urllib.request.Request(self.base + path, data, headers, method=method)
        timeout = timeout or (self.timeout if self.answered else min(self.timeout, FIRST_CONTACT_TIMEOUT))
        try:
            status, raw, kind = _exchange(req, timeout)
        except (OSError, HTTPException) as exc:     # URLError, refused, reset, timeout
            raise Unanswered(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None
        answer = _json_object(raw)
        if answer is not None:
            self.answered = True
        elif not self.answered and status < 500:
            raise NotCensus(f"{self.base} does not look like a census server (HTTP {status}, "
                            f"{kind or 'no Content-Type'}); is the URL right?")
        if status >= 500 or status in RETRY_STATUSES or (status == 200 and answer is None):
            raise TransientError(f"{method} {path}: HTTP {status} {_reason(answer, raw)}")
        return status, answer if answer is not None else {"error": _reason(answer, raw)}


# --- what a person sees -----------------------------------------------------------------------

class Console:
    """Log lines on stderr, and a one-line progress display when stderr is a terminal."""

    def __init__(self, stream=None, verbosity: int = 1, tty: bool | None = None,
                 clock=time.monotonic, columns=None):
        self.stream = sys.stderr if stream is None else stream
        self.verbosity = verbosity            # 0 quiet, 1 normal, 2 verbose
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.columns = columns or (lambda: shutil.get_terminal_size().columns)   # () -> int
        self.label, self._showing, self._next_line = "", False, 0.0
        self._lock = threading.RLock()        # sweeps report from their own threads

    def error(self, msg: str) -> None:
        self._emit("error: " + msg)

    def warn(self, msg: str) -> None:
        self._emit("warning: " + msg)

    def info(self, msg: str) -> None:
        if self.verbosity >= 1:
            self._emit(msg)

    def debug(self, msg: str) -> None:
        if self.verbosity >= 2:
            self._emit(msg)

    def begin(self, label: str) -> None:
        """A sweep starts: progress lines will carry this label."""
        self.label, self._next_line = label, self.clock() + PLAIN_PROGRESS_EVERY

    def progress(self, p, label: str | None = None) -> None:
        """The sweep's progress callback (an icmp.Progress); `label` names the sweep when it is
        not the one begin() announced (a sweep that reports from its cooldown)."""
        if self.verbosity < 1:
            return
        line = progress_line(label or self.label, p)
        with self._lock:
            if self.tty:                        # one line, never wrapped: \r must reach it
                line = line[:self.columns() - 1]
                self.stream.write("\r" + line + "\x1b[K")
                self.stream.flush()
                self._showing = True
            elif self.clock() >= self._next_line:
                self._next_line = self.clock() + PLAIN_PROGRESS_EVERY
                self._emit(line)

    def _emit(self, msg: str) -> None:
        with self._lock:
            if self._showing:                   # the next line replaces the progress display
                self.stream.write("\r\x1b[K")
                self._showing = False
            stamp = "" if self.tty else time.strftime("%Y-%m-%d %H:%M:%S ")
            self.stream.write(stamp + msg + "\n")
            self.stream.flush()


def progress_line(label: str, p) -> str:
    """block, % done, probes/s, replies so far, ETA."""
    pct = min(100.0, 100.0 * p.sent / p.total) if p.total else 100.0   # rounds > 1 resend
    if p.sent >= p.total:
        eta = "cooling down"
    elif p.pps > 0:
        eta = f"ETA {_duration((p.total - p.sent) / p.pps)}"
    else:
        eta = "ETA ?"
    return f"{label}  {pct:5.1f} %  {p.pps:,.0f} probes/s  {p.replies:,} replies  {eta}"


# --- the census loop --------------------------------------------------------------------------

class Job(NamedTuple):
    """A leased task and its sweep in flight (an icmp.Sweep)."""
    task: Task
    sweep: object


class Client:
    """Get a task, sweep it, spool the result, submit it; repeat (or once).

    In a loop the next task starts as soon as a sweep's last probe is out, while that sweep
    listens for late replies (its cooldown) on the same socket; its result is spooled and
    submitted when the cooldown ends. So a long cooldown costs no throughput:

        task 1  |== send ==|..... cooldown .....| submit
        task 2             |== send ==|..... cooldown .....| submit
        task 3                        |== send ==| ...
    """

    def __init__(self, api: Api, spool: Spool, options: SweepOptions, console: Console, *,
                 name: str, once: bool = False, sleep=time.sleep, clock=time.monotonic,
                 rng=random.random, sweeper=None):
        self.api, self.spool, self.options, self.console = api, spool, options, console
        self.name, self.once, self.sleep, self.clock, self.rng = name, once, sleep, clock, rng
        self.sweeper = sweeper if sweeper is not None else icmp.Sweeper()
        self.held: list[Job] = []             # leased, result not yet spooled: given back on exit
        self.cooling: list[Job] = []          # all probes out, listening for late replies
        self._told = set()                    # spool files for other servers, warned about

    def run(self) -> int:
        """Work tasks, submitting the spool before each; the exit code."""
        self.console.info(f"ping_client as {self.name!r} for {self.api.base}, "
                          f"{_pace(self.options.rate)}, cooldown {self.options.cooldown:g} s, "
                          f"spool {self.spool.path}; probes carry the tag "
                          f"{icmp.TAG.decode().strip()!r} and the server's contact, if it names one")
        idle = Backoff(base=5.0, cap=300.0, rng=self.rng)
        try:
            while True:
                self.flush_spool()
                task = self.next_task(idle)
                if task is None:              # the census is complete
                    return EXIT_OK
                code = self.work(task)
                if self.once:
                    return code
                if code != EXIT_OK:
                    self._wait(idle, "asking for another task")
                else:
                    idle.reset()
        except BaseException:                 # Ctrl-C, SIGTERM, a fatal error
            self.wind_up()
            raise

    def flush_spool(self) -> None:
        """Submit what is waiting in the spool for this server."""
        for record in self.spool.pending():
            if record.body is None:
                self.console.warn("unreadable spool file set aside: "
                                  f"{self.spool.set_aside(record.path)}")
            elif normal_url(record.server) == self.api.base:
                self.console.info(f"submitting a result left in the spool: {record.path}")
                self.submit(record)
            elif record.path not in self._told:
                self._told.add(record.path)
                self.console.warn(f"{record.path} is a result for {record.server}, not this "
                                  f"server; it stays in the spool until a run with --server "
                                  f"{record.server}")

    def next_task(self, idle: Backoff) -> Task | None:
        """Ask until the server hands out a task, waiting longer each time it has none; None
        when the census is complete. Sweeps still cooling down are finished first."""
        while True:
            status, answer = self._retrying("/get_task", lambda: self.api.get(self.task_path()))
            if status != 200:
                raise ClientError(f"/get_task refused: HTTP {status} {answer.get('error')}")
            task = parse_task(answer)
            if task is not None:
                return task
            if self.cooling:                  # ours are in progress too: finish, then ask again
                self.finish_all()
                continue
            left = self.census_left()
            if not left:
                self.console.info("no task available, none in progress and none in error: the "
                                  "census on this server is complete")
                return None
            self._wait(idle, f"no task available ({answer['error']}; {left}); asking again")

    def task_path(self) -> str:
        """/get_task with what this client accepts: a lease, and blocks inside --only (a server
        that does not know these parameters ignores them); the name keeps the server from
        handing us a check of our own results."""
        query = {"lease": "required", "name": self.name}
        if self.options.only:
            query["within"] = ",".join(map(str, self.options.only))
        return "/get_task?" + urllib.parse.urlencode(query, safe="/,")

    def census_left(self) -> str:
        """'' when /get_progress shows the census complete (nothing available, nothing in
        progress, nothing in error); else what is left, in words."""
        status, answer = self._retrying("/get_progress", lambda: self.api.get("/get_progress"))
        if status != 200:
            return "the server does not say how far the census is"
        counts = [(answer.get(key), what) for key, what in (
            ("available_tasks", "available"), ("in_progress", "in progress"),
            ("error_tasks", "in error, waiting for the operator"))]
        if any(not isinstance(n, int) for n, _ in counts[:2]):
            return "the server does not say how far the census is"
        return ", ".join(f"{n:,} {what}" for n, what in counts if isinstance(n, int) and n)

    def work(self, task: Task) -> int:
        """Start sweeping a task; 0 once its last probe is out (looping) or its result was
        accepted (--once). A loop finishes the task later (finish_cooled / finish_all)."""
        try:
            exclude = check_task(task, self.options)
        except Refused as exc:
            self.console.error(f"refusing task {task.index}: {exc}")
            self.release(task)
            return EXIT_ERROR
        job = self.start(task, exclude)
        if job is None:
            return EXIT_ERROR
        if self.once:
            self.sweeper.wait_for(lambda: job.sweep.done)
            return self.finish(job)
        self.until_sent(job)
        if job.sweep.done:                    # failed, or nothing left to listen for
            return self.finish(job)
        self.cooling.append(job)
        return EXIT_OK

    def start(self, task: Task, exclude) -> Job | None:
        """Start the task's sweep; from here on the task is held (given back on the way out)."""
        job = None
        try:
            self.console.info(f"task {task.index}: sweeping {task.network} "
                              f"{_pace(self.options.rate)}; {contact_note(task)}")
            if task.bad_contact:
                self.console.warn(f"task {task.index}: the server's contact {task.bad_contact} "
                                  f"was left out")
            self.console.begin(str(task.network))
            job = Job(task, start_sweep(self.sweeper, task.network, self.options, self.console,
                                        exclude, task.contact))
            self.held.append(job)
        except OSError as exc:
            return self._failed(task, exc)
        except BaseException:          # Ctrl-C, SIGTERM: the lease goes back whenever it came
            if job is None or job not in self.held:
                self.release(task)
            raise
        return job

    def until_sent(self, job: Job) -> None:
        """Wait until the job's last probe is out, finishing cooled sweeps as their cooldown ends."""
        while True:
            self.sweeper.wait_for(lambda: job.sweep.all_sent or any(j.sweep.done for j in self.cooling))
            self.finish_cooled()
            if job.sweep.all_sent:
                return

    def finish_cooled(self) -> None:
        for job in [job for job in self.cooling if job.sweep.done]:
            self.cooling.remove(job)
            self.finish(job)

    def finish_all(self) -> None:
        if self.cooling:
            self.console.info(f"waiting up to {self.options.cooldown:g} s for late replies to "
                              f"task(s) {_indices(self.cooling)}")
        while self.cooling:
            job = self.cooling.pop(0)
            self.sweeper.wait_for(lambda: job.sweep.done)
            self.finish(job)

    def finish(self, job: Job) -> int:
        """Spool and submit a finished sweep: 0 when the server accepted the result."""
        spooled = self.keep(job)
        return EXIT_OK if spooled is not None and self.submit(spooled) else EXIT_ERROR

    def keep(self, job: Job) -> Spooled | None:
        """Spool a finished sweep's result; None, the task given back, when the sweep failed
        or fell short."""
        task = job.task
        try:
            result = job.sweep.result()
            shortfall = incomplete(result)
            if not shortfall:
                self.console.info(summary(f"task {task.index} {task.network}", result))
                spooled = self.spool.put(self.api.base, submission_body(task, result, self.name), task.index)
        except OSError as exc:         # a socket or disk error: give the task back
            self.held.remove(job)
            return self._failed(task, exc)
        self.held.remove(job)          # spooled, from here on it is kept; or given back now
        if shortfall:                  # unprobed addresses would read '0': not a result
            self.console.error(f"task {task.index}: {shortfall}; not submitted")
            self.release(task)
            return None
        return spooled

    def wind_up(self) -> None:
        """On the way out (Ctrl-C, SIGTERM, a fatal error): give back the task still being
        sent; a looping client's task whose probes are all out is worth its cooldown, at most
        --cooldown s more, so it is finished and spooled, then submitted with one quick try
        (a server that does not answer gets the spool at the next start). A second Ctrl-C
        gives back what is not spooled yet."""
        cooled = [] if self.once else [job for job in self.held if job.sweep.all_sent]
        try:
            self.give_back([job for job in self.held if job not in cooled])
            if cooled:
                self.console.info(f"stopping: listening up to {self.options.cooldown:g} s more for "
                                  f"late replies to task(s) {_indices(cooled)}, "
                                  f"then submitting (Ctrl-C again gives them back)")
            kept = [self.keep_on_the_way_out(job) for job in cooled]
            for spooled in filter(None, kept):
                self.submit(spooled, patient=False)
        except TransientError as exc:
            self.console.warn(f"the server did not answer ({exc}); not submitting now")
        finally:                              # a second Ctrl-C: what is left goes back
            self.give_back(list(self.held))

    def keep_on_the_way_out(self, job: Job) -> Spooled | None:
        """keep() once the job's cooldown is over; a failure is told, not raised (the exit
        code stays that of the interrupt)."""
        try:
            self.sweeper.wait_for(lambda: job.sweep.done)
            return self.keep(job)
        except Exception as exc:              # e.g. no permission on the spool: given back below
            self.console.error(f"task {job.task.index}: {exc}")
            return None

    def give_back(self, jobs: list) -> None:
        """Stop these sweeps and release their leases (a job stays held until its release
        has been tried, so a Ctrl-C in the middle leaves the rest to the caller's finally)."""
        for job in jobs:
            job.sweep.cancel()
        for job in jobs:
            self.release(job.task)
            if job in self.held:
                self.held.remove(job)

    def submit(self, spooled: Spooled, patient: bool = True) -> bool:
        """Submit a spooled result until the server answers for good; True when accepted. Not
        `patient`: one quick try, and a TransientError when the server does not answer."""
        index = spooled.body.get("task_index")
        post = functools.partial(self.api.post, "/submit_result", spooled.body,
                                 None if patient else QUICK_TIMEOUT)
        try:
            status, answer = self._retrying(f"submitting task {index}", post) if patient else post()
        except GaveUp as exc:
            raise GaveUp(f"{exc}; the result stays in {spooled.path} and is sent at the next "
                         f"start") from None
        if status == 200 and answer.get("success") is True:
            again = " (it already had it)" if answer.get("duplicate") else ""
            self.console.info(f"task {index}: result accepted{again}")
            self.spool.drop(spooled.path)
            return True
        reason = f"HTTP {status}: {answer.get('error') or answer}"
        if status == 400 and "bitmap" in spooled.body.get("result", {}):
            # a server that knows only the original form gets the same result as a string
            self.console.warn(f"task {index}: the server refused the compact form ({reason}); "
                              f"sending it as a string")
            return self.submit(spooled._replace(body=string_form(spooled.body)), patient)
        if status == 200 or status in DROP_STATUSES:
            self.console.error(f"task {index}: the server refused the result ({reason}); dropped")
            self.spool.drop(spooled.path)
        else:
            self.console.error(f"task {index}: unexpected answer ({reason}); the result stays "
                               f"in {spooled.path} and is submitted again later")
        return False

    def release(self, task: Task) -> None:
        """Give the lease back, once and quickly; the lease expires anyway if this fails."""
        body = {"task_index": task.index}
        if task.lease is not None:
            body["lease"] = task.lease
        try:
            status, answer = self.api.post("/release", body, timeout=QUICK_TIMEOUT)
        except TransientError as exc:
            self.console.warn(f"could not release task {task.index}: {exc}")
            return
        if status == 200 and answer.get("success") is True:
            self.console.info(f"task {task.index}: lease released")
        else:
            self.console.warn(f"release of task {task.index} refused: HTTP {status} "
                              f"{answer.get('error')}")

    def _failed(self, task: Task, exc: OSError) -> None:
        """A socket or disk error: give the task back; stop (raise) with --once or without
        ICMP permission, else say so and go on."""
        self.release(task)
        if self.once or isinstance(exc, PermissionError):
            raise exc
        self.console.error(f"task {task.index} failed: {exc}")

    def _retrying(self, what: str, call):
        """call() until it is not a TransientError. A server never reached at all is given up
        on after FIRST_CONTACT_PATIENCE (the URL is likely wrong); with --once any silence
        after ONCE_PATIENCE; a server that answered before is otherwise waited for."""
        backoff, since = Backoff(rng=self.rng), self.clock()
        while True:
            try:
                status, answer = call()
            except TransientError as exc:
                waited = self.clock() - since
                if not self.api.answered and waited >= FIRST_CONTACT_PATIENCE:
                    raise ClientError(f"cannot reach {self.api.base}: {exc} (is the server "
                                      f"running? is the URL right?)") from None
                if self.once and waited >= ONCE_PATIENCE:
                    raise GaveUp(f"{what}: no answer from {self.api.base} for "
                                 f"{_duration(waited)} ({exc})") from None
                cap = None if self.api.answered else FIRST_CONTACT_PATIENCE - waited
                self._wait(backoff, f"{what} failed ({exc}); retrying", self.console.warn, cap)
            else:
                self.console.debug(f"{what}: HTTP {status} {json.dumps(answer)[:300]}")
                return status, answer

    def _wait(self, backoff: Backoff, why: str, say=None, cap: float | None = None) -> None:
        delay = backoff.delay() if cap is None else min(backoff.delay(), cap)
        (say or self.console.info)(f"{why} in {delay:.1f} s")
        self.sleep(delay)


def start_sweep(sweeper, network, options: SweepOptions, console: Console, exclude=None,
                contact: bytes = b""):
    """sweeper.start() with the client's options, its progress shown under the network's name."""
    return sweeper.start(network, rate=options.rate, probes=options.probes,
                         cooldown=options.cooldown, timeout=options.timeout, allow=options.allow,
                         exclude=options.exclude if exclude is None else exclude,
                         progress=functools.partial(console.progress, label=str(network)),
                         contact=contact)


class Output:
    """The --scan CSV: checked (folder there, writable) before any probe is sent, written to a
    temporary file beside it and renamed into place when complete; '-' is stdout."""

    def __init__(self, path: str):
        self.path, self._temp = path, None
        if path == "-":
            return
        if os.path.isdir(path):
            raise ClientError(f"cannot write {path}: it is a folder")
        try:
            fd, self._temp = tempfile.mkstemp(prefix=".scan-", suffix=".tmp",
                                              dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
        except OSError as exc:
            raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, result) -> int:
        """Write the responders; returns the rows."""
        if self._temp is None:
            rows = write_csv(result, sys.stdout)
            sys.stdout.flush()
            return rows
        with open(self._temp, "w", encoding="ascii", newline="") as fh:
            rows = write_csv(result, fh)
        os.replace(self._temp, self.path)
        self._temp = None
        return rows

    def discard(self) -> None:
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            self._temp = None


def scan(network: ipaddress.IPv4Network, output: Output, options: SweepOptions,
         console: Console, sweeper) -> int:
    """Standalone mode: sweep a network without a server (one sweep, start to end) and write
    the responders as CSV."""
    why = blocked(network, options.allow, options.exclude)
    if why:
        console.error(f"refusing to scan {network}: it is {why}")
        return EXIT_USAGE
    console.begin(str(network))
    result = start_sweep(sweeper, network, options, console).result()
    output.write(result)
    console.info(summary(str(network), result))
    shortfall = incomplete(result)
    if shortfall:
        console.error(f"{shortfall}: a partial list")
        return EXIT_ERROR
    return EXIT_OK


# --- command line -----------------------------------------------------------------------------

def systemd_unit(argv: list[str], cooldown: float = icmp.DEFAULT_COOLDOWN) -> str:
    """A systemd service running this client with these flags, restarted when it fails."""
    flags = [arg for arg in argv if arg != "--print-systemd-unit"]
    if not any(arg == "--spool" or arg.startswith("--spool=") for arg in flags):
        flags += ["--spool", UNIT_SPOOL]
    command = shlex.join([sys.executable, os.path.abspath(__file__), *flags])
    return f"""\
# The IPv4 census volunteer as a systemd service. Save as
# /etc/systemd/system/ipv4-census.service, then:
#   systemctl daemon-reload && systemctl enable --now ipv4-census
#   journalctl -u ipv4-census -f
[Unit]
Description=IPv4 ICMP census volunteer (ping_client.py)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart={command}
# exit 0 (the census is complete) ends the service; an error, a crash or a kill restarts it
Restart=on-failure
RestartSec=60
# a stop lets the last task's cooldown run out and submits it (Client.wind_up)
TimeoutStopSec={math.ceil(cooldown) + 30}
StateDirectory=ipv4-census
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
Nice=10

[Install]
WantedBy=multi-user.target
"""


EPILOG = ("--allow, --exclude and --only take several CIDRs, space- or comma-separated, and\n"
          "may be repeated.\n\n"
          "exit codes:\n"
          "  0    done: the census is complete (--once: or the result was accepted)\n"
          "  1    error: no ICMP permission, an unusable spool folder or output file, a\n"
          "       server never reached in 30 s or not a census server, a local failure, a\n"
          "       server answer it cannot go on from; with --once also a refused task or\n"
          "       result, a sweep cut short or failed, or no answer from the server for 10\n"
          "       minutes (a finished result stays in the spool and is sent at the next start)\n"
          "  2    usage: bad flags, or --scan of a network nothing of which may be probed\n"
          "  130  interrupted (Ctrl-C); the task being sent is released; in a loop, one whose\n"
          "       probes are all out is submitted after its cooldown (a second Ctrl-C releases it)\n"
          "  143  terminated (SIGTERM); the same\n\n"
          "running unattended: --print-systemd-unit prints a systemd service for the same\n"
          "flags (Restart=on-failure: it stops when the census is complete, restarts after an\n"
          "error); a looping client on a complete census says so and exits 0.\n\n"
          "examples:\n  sudo python3 ping_client.py --server http://HOST:8001 --name NAME\n"
          "  sudo python3 ping_client.py --server http://HOST:8001 --print-systemd-unit "
          "> ipv4-census.service\n"
          "  sudo python3 ping_client.py --scan 127.0.0.0/16 --allow 127.0.0.0/8 -o out.csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ping_client.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Volunteer client of the IPv4 ICMP census: sweeps the /16 blocks a task\n"
                    "server hands out (--server), or one network on its own (--scan).",
        epilog=EPILOG)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", metavar="URL", type=_server_url,
                      help="task server to work for, e.g. http://HOST:8001 (default: none)")
    mode.add_argument("--scan", metavar="CIDR", type=_network,
                      help="sweep this network without a server and write the responders as "
                           "CSV (saddr,rtt_ms) (default: none)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="with --scan: the CSV file, '-' for stdout (default: -)")
    parser.add_argument("--once", action="store_true",
                        help="do one task and exit; waits for one if none is free, exits 0 if "
                             "the census is complete, gives up after 10 minutes without an "
                             "answer from the server (default: keep asking for tasks)")
    parser.add_argument("--name", default=None,
                        help="contributor name, shown publicly on the dashboard (default: a "
                             "stable pseudonym, volunteer-<hash> of a random id kept in the "
                             "spool folder)")
    parser.add_argument("--print-systemd-unit", action="store_true",
                        help="print a systemd service that runs the client with these flags "
                             "and exit (default: off)")
    _sweep_flags(parser)
    _talk_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in CIDR_FLAGS:                      # nargs + extend gives a list of lists
        setattr(args, flag, [net for group in getattr(args, flag) for net in group])
    if args.output is not None and args.scan is None:
        parser.error("-o/--output goes with --scan")
    if args.once and args.scan is not None:
        parser.error("--once goes with --server")
    if args.print_systemd_unit and args.server is None:
        parser.error("--print-systemd-unit goes with --server")
    return args


def options_from(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(args.rate, args.probes, args.cooldown, args.timeout,
                        tuple(args.allow), tuple(args.exclude), tuple(args.only))


# --- private helpers --------------------------------------------------------------------------

def _gaps(network: ipaddress.IPv4Network, holes):
    """Yield the networks that make up `network` minus `holes`, in address order."""
    start, end = int(network.network_address), int(network.broadcast_address)
    for hole in ipaddress.collapse_addresses(holes):        # sorted, disjoint
        first, last = int(hole.network_address), int(hole.broadcast_address)
        if last < start or first > end:
            continue
        if first > start:
            yield from _span(start, first - 1)
        start = last + 1
    if start <= end:
        yield from _span(start, end)


def _span(first: int, last: int):
    return ipaddress.summarize_address_range(ipaddress.IPv4Address(first),
                                             ipaddress.IPv4Address(last))


def _covered(network: ipaddress.IPv4Network, nets) -> bool:
    """True if `nets` alone cover every address of `network` (reserved space aside)."""
    return icmp.wholly_excluded(network, (EVERYWHERE,), nets)


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r:.50} is not a CIDR string")
    return value


def _exchange(req: urllib.request.Request, timeout: float) -> tuple[int, bytes, str]:
    """(status, body, media type) of one request."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as err:         # a 4xx/5xx answer is an answer, not a failure
        with err:
            return err.code, err.read(), err.headers.get_content_type()


def _json_object(raw: bytes) -> dict | None:
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _reason(answer: dict | None, raw: bytes) -> str:
    if answer and answer.get("error"):
        return str(answer["error"])
    return raw[:200].decode("utf-8", "replace").strip() or "(empty answer)"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def _indices(jobs: list) -> str:
    return ", ".join(str(job.task.index) for job in jobs)


def _pace(rate: float) -> str:
    return f"at most {rate:,.0f} probes/s" if rate else "as fast as the machine goes"


CIDR_FLAGS = {   # the client's own rules; several CIDRs, space- or comma-separated, repeatable
    "allow": "reserved space you may probe, e.g. 127.0.0.0/8 for the local demo; a server "
             "cannot widen this (default: none, reserved space is refused)",
    "exclude": "never probe these, whatever a server says; a server can add exclusions but "
               "cannot narrow these (default: none)",
    "only": "with --server: probe nothing outside these networks, and refuse a task that lies "
            "wholly outside them, e.g. 127.0.0.0/8 for the local demo (default: anywhere the "
            "other rules allow)",
}


def _sweep_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=_number(float, 0), default=10000.0, metavar="PPS",
                        help="at most this many probes per second, 0 = as fast as the machine "
                             "goes; a server cannot change it (default: %(default).0f)")
    parser.add_argument("--probes", type=_number(int, 1), default=1, metavar="N",
                        help="rounds per sweep; later rounds re-probe the silent addresses, "
                             "each after a cooldown; only the last round's cooldown overlaps "
                             "the next task (default: %(default)s)")
    parser.add_argument("--cooldown", type=_number(float, 0), default=icmp.DEFAULT_COOLDOWN,
                        metavar="S",
                        help="seconds to wait for late replies after a round's last probe, "
                             "ended early once every target answered; satellite and cellular "
                             "networks answer late, and the next task is swept meanwhile, so "
                             "a long one costs nothing (default: %(default)g)")
    parser.add_argument("--timeout", type=_number(float, 0, above=True), default=None, metavar="S",
                        help="give up a sweep after this many seconds; a task cut short is "
                             "released, not submitted (default: no limit)")
    for flag, text in CIDR_FLAGS.items():
        parser.add_argument(f"--{flag}", type=_networks, nargs="+", action="extend", default=[],
                            metavar="CIDR", help=text)


def _talk_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool", metavar="DIR", default=DEFAULT_SPOOL,
                        help="where finished results wait until the server has them "
                             "(default: %(default)s)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=0,
                      default=1, help="only warnings and errors (default: progress and a "
                                      "summary per task)")
    talk.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=2,
                      help="also every server answer (default: off)")


def _server_url(text: str) -> str:
    url = normal_url(text)
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest.split("/")[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected http://HOST:PORT")
    return url


def _network(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _networks(text: str) -> list[ipaddress.IPv4Network]:
    return [_network(part.strip()) for part in text.split(",") if part.strip()]


def _number(kind, low, above=False):
    """An argparse type: a finite number >= low (> low when `above`)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range")
        return value
    return convert


def _terminate(signum, frame):
    raise Terminated               # SIGTERM (systemd, kill) releases the lease like Ctrl-C


def main(argv=None, *, sleep=time.sleep, clock=time.monotonic) -> int:
    """Run the client; the exit code (0 done, 1 error, 2 usage, 130 interrupted, 143
    terminated). The output file, the spool folder and ICMP permission are checked first,
    before any task is leased or any probe sent."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.print_systemd_unit:
        sys.stdout.write(systemd_unit(argv, args.cooldown))
        return EXIT_OK
    console, spool, output = Console(verbosity=args.verbosity), None, None
    try:
        if args.scan is not None:
            output = Output(args.output or "-")
            with icmp.Sweeper() as sweeper:
                sweeper.open()
                return scan(args.scan, output, options_from(args), console, sweeper)
        spool = Spool.open(args.spool)
        name = args.name or spool.pseudonym()
        with icmp.Sweeper() as sweeper:
            sweeper.open()                    # no ICMP permission: say so before any lease
            return Client(Api(args.server), spool, options_from(args), console, name=name,
                          once=args.once, sleep=sleep, clock=clock, sweeper=sweeper).run()
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        waiting = len(spool.pending()) if spool else 0
        console.warn(f"{how}; {waiting} result(s) in {spool.path}, submitted at the next start"
                     if waiting else how)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except (ClientError, OSError) as exc:     # icmp.IcmpPermissionError says what to do
        console.error(str(exc))
        return EXIT_ERROR
    finally:
        if output is not None:
            output.discard()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
