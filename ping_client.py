"""ping_client.py: the volunteer client of the IPv4 ICMP census.

It asks the task server for a /16, pings every address of it with icmp.py, and sends back which
ones answered in the original system's format (65,536 characters of '0'/'1', character k for
address .k//256.k%256 of the block), with the round-trip times beside it. The client is two
files, this one and icmp.py; it uses urllib for HTTP and nothing else of the project.

    sudo python3 ping_client.py --server http://HOST:8001
    sudo python3 ping_client.py --scan 127.0.0.0/16 --allow 127.0.0.0/8 -o out.csv

Nothing is lost: a finished result is written to a local spool (fsynced) before it is submitted,
and removed only when the server has acknowledged or refused it; a restarted client submits its
spool first. Server errors, timeouts and connection errors are retried with exponential backoff
and jitter. Ctrl-C in the middle of a sweep gives the lease back and exits 130.

The client keeps its own rules whatever a server says: it refuses a block lying wholly in
reserved space unless its own --allow opens it, never sweeps faster than its own --rate, and
skips its own exclusions plus those the task carries (a server can add exclusions, never
remove them).
"""

import argparse
import array
import base64
import getpass
import ipaddress
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from typing import NamedTuple

import icmp

BLOCK = 65536                      # addresses in a task: one /16
DROP_STATUSES = frozenset({400, 403, 404, 409, 410, 413, 422})   # the server refused for good
RETRY_STATUSES = frozenset({408, 429})                          # ... and every 5xx
HTTP_TIMEOUT = 30.0
RELEASE_TIMEOUT = 5.0              # a release on the way out must not hold up Ctrl-C for long
PLAIN_PROGRESS_EVERY = 10.0        # seconds between progress lines when not on a terminal
DEFAULT_SPOOL = os.path.join(os.path.expanduser("~"), ".cache", "ipv4-census", "spool")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_REPLIED = bytes(0x31 if s == icmp.Status.ECHO_REPLY else 0x30 for s in range(256))


class ClientError(Exception):
    """Something this client cannot go on from (a broken server answer, a local failure)."""


class TransientError(ClientError):
    """Worth trying again later: a 5xx, 408/429, a timeout or a connection error."""


class Refused(ClientError):
    """A task this client will not do, whatever the server says."""


class Task(NamedTuple):
    index: int
    lease: str | None
    network: ipaddress.IPv4Network   # derived from the index: the numbering is fixed
    claimed: str | None              # the server's "network"; must agree with the index
    exclude: tuple                   # the server's extra exclusions, as it sent them
    rate: float | None               # a rate the server asks for; never above our own


class SweepOptions(NamedTuple):
    rate: float                      # probes/s, 0 = as fast as the machine goes
    probes: int
    cooldown: float
    timeout: float | None
    allow: tuple[ipaddress.IPv4Network, ...]     # reserved space the user opened
    exclude: tuple[ipaddress.IPv4Network, ...]   # the user's own exclusions


# --- tasks and the client's own rules ---------------------------------------------------------

def task_network(index: int) -> ipaddress.IPv4Network:
    """Task i is the /16 i//256 . i%256 .0.0/16."""
    return ipaddress.IPv4Network((index << 16, 16))


def parse_task(answer: dict) -> Task | None:
    """A /get_task answer as a Task; None when the server has nothing to hand out."""
    if "task_index" not in answer:
        if isinstance(answer.get("error"), str):
            return None       # {"error": "No tasks available"}: wait and ask again
        raise ClientError(f"unexpected /get_task answer: {answer!r:.200}")
    index = answer["task_index"]
    if isinstance(index, str) and index.isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < BLOCK:
        raise ClientError(f"bad task_index in /get_task answer: {index!r:.50}")
    lease, rate = answer.get("lease"), answer.get("rate")
    exclude = answer.get("exclude", [])
    return Task(index, lease if isinstance(lease, str) else None, task_network(index),
                answer.get("network"), tuple(exclude) if isinstance(exclude, list) else (exclude,),
                rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None)


def check_task(task: Task, options: SweepOptions) -> tuple[ipaddress.IPv4Network, ...]:
    """Apply the client's own rules; return the exclusions to sweep with, or raise Refused."""
    if task.claimed is not None and task.claimed != str(task.network):
        raise Refused(f"the server calls it {task.claimed!r}, but task {task.index} "
                      f"is {task.network}")
    if icmp.wholly_reserved(task.network, options.allow):
        raise Refused(f"{task.network} is reserved address space, and --allow does not open it")
    try:
        extra = tuple(ipaddress.IPv4Network(_text(cidr), strict=False) for cidr in task.exclude)
    except ValueError as exc:
        raise Refused(f"the task's exclude list cannot be honoured: {exc}") from None
    exclude = options.exclude + extra    # the server adds; it never takes ours away
    if any(task.network.subnet_of(net) for net in ipaddress.collapse_addresses(exclude)):
        raise Refused(f"{task.network} is wholly excluded (--exclude and the task's list)")
    return exclude


def effective_rate(own: float, asked: float | None) -> float:
    """The slower of our --rate and what a server asks for (0 means unlimited)."""
    if not asked or asked <= 0:
        return own
    return asked if own == 0 else min(own, asked)


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
    """The inverse of encode_rtt."""
    arr = array.array("I", zlib.decompress(base64.b64decode(text)))
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def submission_body(task: Task, result, name: str) -> dict:
    """The /submit_result body: the original shape plus lease, name, rtt_us and stats."""
    status = result.status
    if len(status) != BLOCK or result.addresses[0] != int(task.network.network_address):
        raise ClientError(f"sweep result does not cover {task.network} in address order")
    replied = icmp.Status.ECHO_REPLY
    rtts = (rtt for st, rtt in zip(status, result.rtt_us) if st == replied)
    excluded = status.count(icmp.Status.EXCLUDED)
    body = {"task_index": task.index,
            "result": {"success": True, "result_data": result_string(status)},
            "name": name, "rtt_us": encode_rtt(rtts),
            "stats": {"probed": BLOCK - excluded, "excluded": excluded,
                      "unreachable": status.count(icmp.Status.UNREACHABLE),
                      "sent": result.stats.sent}}
    if task.lease is not None:
        body["lease"] = task.lease
    return body


def incomplete(result) -> bool:
    """True when the sweep stopped (--timeout) before every target had been probed once."""
    stats = result.stats
    probed = len(result.status) - result.status.count(icmp.Status.EXCLUDED)
    return stats.sent + getattr(stats, "send_errors", 0) < probed


def summary(label: str, result) -> str:
    """One line per sweep: what was probed, what answered, how fast."""
    status, stats = result.status, result.stats
    excluded = status.count(icmp.Status.EXCLUDED)
    probed, replies = len(status) - excluded, status.count(icmp.Status.ECHO_REPLY)
    share = 100.0 * replies / probed if probed else 0.0
    speed = stats.sent / stats.elapsed if stats.elapsed > 0 else 0.0
    return (f"{label}: {probed:,} targets, {replies:,} replied ({share:.1f} %), "
            f"{status.count(icmp.Status.UNREACHABLE):,} unreachable, {excluded:,} excluded; "
            f"{stats.sent:,} probes in {stats.elapsed:.1f} s ({speed:,.0f}/s, "
            f"{stats.kind} socket)")


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

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 32))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0


class Spool:
    """Finished results waiting for the server's answer: one JSON file each, written durably."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    def put(self, record: dict, index: int) -> str:
        """Write a record durably (temp file, fsync, rename, fsync the folder); its path."""
        final = os.path.join(self.path, f"{time.time_ns():020d}-task{index}.json")
        temp = final + ".tmp"
        with open(temp, "w", encoding="ascii") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
        self._sync()
        return final

    def pending(self) -> list[tuple[str, dict | None]]:
        """Every spooled (path, record), oldest first; record is None for an unreadable file."""
        found = []
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".json"):
                path = os.path.join(self.path, name)
                try:
                    with open(path, encoding="ascii") as fh:
                        record = json.load(fh)
                except (OSError, ValueError):
                    record = None
                found.append((path, record if isinstance(record, dict) else None))
        return found

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

    def _sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Api:
    """The task server's HTTP API over urllib: (status, JSON object) or TransientError."""

    def __init__(self, base: str, timeout: float = HTTP_TIMEOUT):
        self.base, self.timeout = base.rstrip("/"), timeout

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body: dict, timeout: float | None = None) -> tuple[int, dict]:
        return self.request("POST", path, body, timeout)

    def request(self, method, path, body=None, timeout=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode("ascii")
        headers = {} if data is None else {"Content-Type": "application/json"}
        req = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            status, raw = _exchange(req, timeout or self.timeout)
        except (OSError, HTTPException) as exc:     # URLError, refused, reset, timeout
            raise TransientError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None
        answer = _json_object(raw)
        if status >= 500 or status in RETRY_STATUSES or (status == 200 and answer is None):
            raise TransientError(f"{method} {path}: HTTP {status} {_reason(answer, raw)}")
        return status, answer if answer is not None else {"error": _reason(answer, raw)}


# --- what a person sees -----------------------------------------------------------------------

class Console:
    """Log lines on stderr, and a one-line progress display when stderr is a terminal."""

    def __init__(self, stream=None, verbosity: int = 1, tty: bool | None = None,
                 clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.verbosity = verbosity            # 0 quiet, 1 normal, 2 verbose
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.label, self._showing, self._next_line = "", False, 0.0

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

    def progress(self, p) -> None:
        """The sweep's progress callback (an icmp.Progress)."""
        if self.verbosity < 1:
            return
        line = progress_line(self.label, p)
        if self.tty:                            # one line, never wrapped: \r must reach it
            line = line[:shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._showing = True
        elif self.clock() >= self._next_line:
            self._next_line = self.clock() + PLAIN_PROGRESS_EVERY
            self._emit(line)

    def _emit(self, msg: str) -> None:
        if self._showing:                       # the next line replaces the progress display
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

class Client:
    """Get a task, sweep it, spool the result, submit it; repeat (or once)."""

    def __init__(self, api: Api, spool: Spool, options: SweepOptions, console: Console, *,
                 name: str, once: bool = False, sleep=time.sleep, rng=random.random):
        self.api, self.spool, self.options, self.console = api, spool, options, console
        self.name, self.once, self.sleep, self.rng = name, once, sleep, rng

    def run(self) -> int:
        """Submit the spool, then work tasks; the exit code."""
        self.console.info(f"ping_client as {self.name!r} for {self.api.base}, "
                          f"{_pace(self.options.rate)}, spool {self.spool.path}")
        self.flush_spool()
        idle = Backoff(base=5.0, cap=300.0, rng=self.rng)
        while True:
            code = self.work(self.next_task(idle))
            if self.once:
                return code
            if code != EXIT_OK:
                self._wait(idle, "asking for another task")
            else:
                idle.reset()

    def flush_spool(self) -> None:
        """Submit what an earlier run left in the spool (for this server)."""
        for path, record in self.spool.pending():
            if record is None or not isinstance(record.get("body"), dict):
                self.console.warn(f"unreadable spool file set aside: {self.spool.set_aside(path)}")
            elif record.get("server") != self.api.base:
                self.console.info(f"{path} is for {record.get('server')}; left in the spool")
            else:
                self.console.info(f"submitting a result left in the spool: {path}")
                self.submit(path, record["body"])

    def next_task(self, idle: Backoff) -> Task:
        """Ask until the server hands out a task, waiting longer each time it has none."""
        while True:
            status, answer = self._retrying("/get_task", lambda: self.api.get("/get_task"))
            if status != 200:
                raise ClientError(f"/get_task refused: HTTP {status} {answer.get('error')}")
            task = parse_task(answer)
            if task is not None:
                return task
            self._wait(idle, f"no task available ({answer['error']}); asking again")

    def work(self, task: Task) -> int:
        """Sweep one task and submit it: 0 when the server accepted it."""
        try:
            exclude = check_task(task, self.options)
        except Refused as exc:
            self.console.error(f"refusing task {task.index}: {exc}")
            self.release(task)
            return EXIT_ERROR
        rate = effective_rate(self.options.rate, task.rate)
        self.console.info(f"task {task.index}: sweeping {task.network} {_pace(rate)}")
        try:
            result = run_sweep(task.network, self.options, self.console, exclude, rate)
            body = submission_body(task, result, self.name)
        except BaseException:          # Ctrl-C, no permission, a socket error: give it back
            self.release(task)
            raise
        if incomplete(result):         # unprobed addresses would read '0': not a result
            self.console.error(f"task {task.index}: --timeout ran out after {result.stats.sent:,}"
                               f" probes; not submitted")
            self.release(task)
            return EXIT_ERROR
        path = self.spool.put({"server": self.api.base, "body": body}, task.index)
        self.console.info(summary(f"task {task.index} {task.network}", result))
        return EXIT_OK if self.submit(path, body) else EXIT_ERROR

    def submit(self, path: str, body: dict) -> bool:
        """Submit a spooled result until the server answers for good; True when accepted."""
        index = body.get("task_index")
        status, answer = self._retrying(f"submitting task {index}",
                                        lambda: self.api.post("/submit_result", body))
        if status == 200 and answer.get("success") is True:
            again = " (it already had it)" if answer.get("duplicate") else ""
            self.console.info(f"task {index}: result accepted{again}")
            self.spool.drop(path)
            return True
        reason = f"HTTP {status}: {answer.get('error') or answer}"
        if status == 200 or status in DROP_STATUSES:
            self.console.error(f"task {index}: the server refused the result ({reason}); dropped")
            self.spool.drop(path)
        else:
            self.console.error(f"task {index}: unexpected answer ({reason}); the result stays "
                               f"in {path} and is submitted at the next start")
        return False

    def release(self, task: Task) -> None:
        """Give the lease back, once and quickly; the lease expires anyway if this fails."""
        body = {"task_index": task.index}
        if task.lease is not None:
            body["lease"] = task.lease
        try:
            status, answer = self.api.post("/release", body, timeout=RELEASE_TIMEOUT)
        except TransientError as exc:
            self.console.warn(f"could not release task {task.index}: {exc}")
            return
        if status == 200 and answer.get("success") is True:
            self.console.info(f"task {task.index}: lease released")
        else:
            self.console.warn(f"release of task {task.index} refused: HTTP {status} "
                              f"{answer.get('error')}")

    def _retrying(self, what: str, call):
        backoff = Backoff(rng=self.rng)
        while True:
            try:
                status, answer = call()
                self.console.debug(f"{what}: HTTP {status} {json.dumps(answer)[:300]}")
                return status, answer
            except TransientError as exc:
                self._wait(backoff, f"{what} failed ({exc}); retrying", self.console.warn)

    def _wait(self, backoff: Backoff, why: str, say=None) -> None:
        delay = backoff.next()
        (say or self.console.info)(f"{why} in {delay:.1f} s")
        self.sleep(delay)


def run_sweep(network, options: SweepOptions, console: Console, exclude=None, rate=None):
    """One icmp.sweep with the client's options, showing progress."""
    console.begin(str(network))
    return icmp.sweep(network, rate=options.rate if rate is None else rate,
                      probes=options.probes, cooldown=options.cooldown, timeout=options.timeout,
                      allow=options.allow, exclude=options.exclude if exclude is None else exclude,
                      progress=console.progress)


def scan(network: ipaddress.IPv4Network, output: str, options: SweepOptions,
         console: Console) -> int:
    """Standalone mode: sweep a network without a server and write the responders as CSV."""
    if icmp.wholly_reserved(network, options.allow):
        console.error(f"refusing to scan {network}: reserved address space; pass --allow "
                      f"{network} only if it is yours to probe")
        return EXIT_USAGE
    result = run_sweep(network, options, console)
    if output == "-":
        write_csv(result, sys.stdout)
        sys.stdout.flush()
    else:
        with open(output, "w", encoding="ascii", newline="") as fh:
            write_csv(result, fh)
    console.info(summary(str(network), result))
    if incomplete(result):
        console.error(f"--timeout ran out after {result.stats.sent:,} probes: a partial list")
        return EXIT_ERROR
    return EXIT_OK


# --- command line -----------------------------------------------------------------------------

def default_name() -> str:
    """user@host, the user behind sudo rather than root."""
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):     # no passwd entry (containers)
        user = "volunteer"
    return f"{user}@{socket.gethostname()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ping_client.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Volunteer client of the IPv4 ICMP census: sweeps the /16 blocks a task\n"
                    "server hands out (--server), or one network on its own (--scan).",
        epilog="exit codes: 0 done, 1 error (refused task, no ICMP permission, result refused),"
               "\n            2 usage (bad flags; --scan of reserved space not --allow'ed),"
               "\n            130 interrupted (Ctrl-C; a task in hand is released)\n\n"
               "examples:\n  sudo python3 ping_client.py --server http://HOST:8001\n"
               "  sudo python3 ping_client.py --scan 127.0.0.0/16 --allow 127.0.0.0/8 -o out.csv")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--server", metavar="URL", type=_server_url,
                      help="task server to work for, e.g. http://HOST:8001 (default: none)")
    mode.add_argument("--scan", metavar="CIDR", type=_network,
                      help="sweep this network without a server and write the responders as "
                           "CSV (saddr,rtt_ms) (default: none)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="with --scan: the CSV file, '-' for stdout (default: -)")
    parser.add_argument("--once", action="store_true",
                        help="do one task and exit; waits for one if none is free (default: keep "
                             "asking for tasks)")
    parser.add_argument("--name", default=default_name(),
                        help="contributor name shown on the dashboard (default: %(default)s)")
    _sweep_flags(parser)
    _talk_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.allow = [net for group in args.allow for net in group]      # nargs + extend: lists
    args.exclude = [net for group in args.exclude for net in group]
    if args.output is not None and args.scan is None:
        parser.error("-o/--output goes with --scan")
    if args.once and args.scan is not None:
        parser.error("--once goes with --server")
    return args


def options_from(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(args.rate, args.probes, args.cooldown, args.timeout,
                        tuple(args.allow), tuple(args.exclude))


# --- private helpers --------------------------------------------------------------------------

def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r:.50} is not a CIDR string")
    return value


def _exchange(req: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:         # a 4xx/5xx answer is an answer, not a failure
        with err:
            return err.code, err.read()


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


def _pace(rate: float) -> str:
    return f"at most {rate:,.0f} probes/s" if rate else "as fast as the machine goes"


def _sweep_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=_number(float, 0), default=10000.0, metavar="PPS",
                        help="most probes per second, 0 = as fast as the machine goes; a server "
                             "may ask for less, never more (default: %(default).0f)")
    parser.add_argument("--probes", type=_number(int, 1), default=1, metavar="N",
                        help="rounds per sweep; later rounds re-probe the silent addresses "
                             "(default: %(default)s)")
    parser.add_argument("--cooldown", type=_number(float, 0), default=1.0, metavar="S",
                        help="seconds to wait for late replies after a round's last probe "
                             "(default: %(default)s)")
    parser.add_argument("--timeout", type=_number(float, 0, above=True), default=None, metavar="S",
                        help="give up a sweep after this many seconds; a task cut short is "
                             "released, not submitted (default: no limit)")
    parser.add_argument("--allow", type=_networks, nargs="+", action="extend", default=[],
                        metavar="CIDR",
                        help="reserved space you may probe, e.g. 127.0.0.0/8 for the local "
                             "demo; several CIDRs, space- or comma-separated (default: none, "
                             "reserved space is refused)")
    parser.add_argument("--exclude", type=_networks, nargs="+", action="extend", default=[],
                        metavar="CIDR",
                        help="never probe these, whatever a server says; several CIDRs, "
                             "space- or comma-separated (default: none)")


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
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected http://HOST:PORT")
    return text


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


def _interrupt(signum, frame):
    raise KeyboardInterrupt        # SIGTERM (systemd, kill) releases the lease like Ctrl-C


def main(argv=None, *, sleep=time.sleep) -> int:
    """Run the client; the exit code (0 done, 1 error, 2 usage, 130 interrupted)."""
    args = parse_args(argv)
    console, spool = Console(verbosity=args.verbosity), None
    try:
        if args.scan is not None:
            return scan(args.scan, args.output or "-", options_from(args), console)
        spool = Spool(args.spool)
        return Client(Api(args.server), spool, options_from(args), console,
                      name=args.name, once=args.once, sleep=sleep).run()
    except KeyboardInterrupt:
        waiting = len(spool.pending()) if spool else 0
        console.warn(f"interrupted; {waiting} result(s) in {spool.path}, submitted at the next "
                     f"start" if waiting else "interrupted")
        return EXIT_INTERRUPTED
    except (ClientError, OSError) as exc:     # icmp.IcmpPermissionError says what to do
        console.error(str(exc))
        return EXIT_ERROR


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
