"""Benchmark of the task server on loopback (no packets are sent: this is HTTP only).

1. Load: N keep-alive clients doing GET /get_task + POST /submit_result cycles with real
   65,536-character results, against ping_server.py (every answer durable) and, in the same run,
   against a bare ThreadingHTTPServer that only parses and answers (the ceiling), twice: "bare
   json" also decodes the JSON body (the least any real server does), "bare http" does not.
   Prints cycles/s, p50/p99 latency, server CPU and RSS, and the ratios; then ping_server again
   with 50 dashboards' /events streams open.
2. Census: all 65,536 tasks handed out and completed through HTTP by 64 simulated clients, timed.
3. Restart: the server killed with SIGKILL after the census, restarted, timed until it answers
   (then once more after a clean SIGTERM); and killed with SIGKILL in the middle of a census.
4. Hostile: (a) the plain load alone; (b) the same load while 10,000 /events streams, 2,000 idle
   keep-alive connections and 200 slow heads (a byte a second, reopened when dropped) are open;
   (c) 8,000 connections closed at once: time until /get_task answers. Prints cycles/s, p99 and
   server RSS, and (b) as a share of (a). The hostile sockets live in a process of their own.
5. Churn: one client doing GET /get_task + POST /release (no results): log bytes per 1,000
   cycles, and the folder's size before and after the compaction at a clean stop.
6. Compact: the load of 1. with our client's compact form (bitmap: zlib'd, base64'd) and with the
   string form, against ping_server and the bare json server each; body sizes and ratios.
7. Verify: a census of --verify-scope (default 0.0.0.0/4, 4,096 blocks) by clients each at its own
   loopback address, --verify 0.05: the extra sweeps the checks cost, and the verified share.

The clients run in their own processes (the machine may have only 2 cores; clients and server
share them). Servers bind to 127.0.0.1 only.

    python3 bench/server_load.py [--clients 8] [--procs 2] [--seconds 10] [--census-clients 64]
                                 [--streams 10000] [--idle 2000] [--slow 200] [--mass-close 8000]
"""

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
sys.path.insert(0, str(ROOT))
import trust  # noqa: E402  (the server's trust rule, for the figures it prints)


class BareHandler(BaseHTTPRequestHandler):
    """The ceiling: parse the request, read the body (and decode its JSON when ``decode``),
    answer a fixed-shape JSON. Same HTTP settings as ping_server.py."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    counter = iter(range(1 << 62))
    decode = False

    def do_GET(self):
        self._answer(b'{"task_index":%d,"task_status":1,"lease":"x"}' % next(self.counter))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.decode:
            json.loads(body)
        self._answer(b'{"success":true}')

    def _answer(self, data):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


def run_bare_server(decode):
    BareHandler.decode = decode
    server = ThreadingHTTPServer((HOST, 0), BareHandler)
    server.daemon_threads = True
    print(f"listening on http://{HOST}:{server.server_address[1]}/", file=sys.stderr, flush=True)
    server.serve_forever()


def start(argv, quiet=False, **kw):
    """A server subprocess and its port (from the 'listening on' line of its banner, on
    stderr; ping_server.py's banner has several lines, the bare server's one). The rest of its
    stderr is copied to ours, or dropped when `quiet`."""
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, **kw)
    for line in process.stderr:
        if b"listening on " in line:
            rest = open(os.devnull, "wb") if quiet else sys.stderr.buffer
            threading.Thread(target=shutil.copyfileobj, args=(process.stderr, rest),
                             daemon=True).start()
            return process, int(line.decode().rsplit(":", 1)[1].strip(" /\n"))
    process.kill()
    raise RuntimeError("server did not start")


def census_server(data_dir, scope="0.0.0.0/0", *extra):
    # every simulated client shares 127.0.0.1: no per-address lease cap here
    return start([sys.executable, str(ROOT / "ping_server.py"), "--host", HOST, "--port", "0",
                  "--data", str(data_dir), "--scope", scope, "--max-leases", "0", *extra],
                 quiet=True, env={**os.environ, "PING_ADMIN_TOKEN": ""})


def rss_mb(pid) -> tuple[float, float]:
    """(current, peak) resident set size of a process, MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


# -- clients --------------------------------------------------------------------------------------

def results_pool(seed, count=8, form="string"):
    """Realistic results: about 10 % of addresses answer; each as the "result" members of the
    original form (result_data) or of our client's compact one (bitmap)."""
    rng = random.Random(seed)
    digits = [("".join("1" if rng.random() < 0.1 else "0" for _ in range(65536))).encode()
              for _ in range(count)]
    return [result_members(d, form) for d in digits]


def result_members(digits: bytes, form: str) -> bytes:
    if form == "string":
        return b'"result_data":"' + digits + b'"'
    packed = zlib.compress(int(digits, 2).to_bytes(8192, "big"))
    return b'"bitmap":"' + base64.b64encode(packed) + b'"'


def client_thread(port, deadline, pool, name, out, until_empty, source=None):
    """get + submit cycles; `source`: the loopback address to send from (a holder of its own);
    with it, a block's result is the same whoever sweeps it (so that checks agree)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60,
                                      source_address=(source, 0) if source else None)
    latencies, cycles = [], 0
    while until_empty or time.perf_counter() < deadline:
        started = time.perf_counter()
        conn.request("GET", "/get_task")
        task = json.loads(conn.getresponse().read())
        if "task_index" not in task:
            break
        middle = time.perf_counter()
        pick = task["task_index"] if source else cycles
        body = (b'{"task_index":%d,"lease":"%s","name":"%s","result":{"success":true,'
                % (task["task_index"], task["lease"].encode(), name.encode())
                + pool[pick % len(pool)] + b'}}')
        conn.request("POST", "/submit_result", body, {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        if not answer.get("success"):
            raise RuntimeError(f"submit refused: {answer}")
        ended = time.perf_counter()
        latencies.append((middle - started, ended - middle, ended - started))
        cycles += 1
    conn.close()
    out.extend(latencies)


def client_process(port, threads, seconds, first, until_empty, queue, form="string",
                   own_address=False):
    pool = results_pool(0 if own_address else first, form=form)
    started = time.perf_counter()
    deadline = started + seconds
    out = []
    workers = [threading.Thread(target=client_thread,
                                args=(port, deadline, pool, f"c{first + n}", out, until_empty,
                                      _address(first + n) if own_address else None))
               for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    queue.put((out, time.perf_counter() - started))


def drive(port, clients, procs, seconds=0.0, until_empty=False, form="string",
          own_address=False):
    """Run the clients in ``procs`` processes; (latency triples, seconds the clients ran).
    form: "string" or "compact" results; own_address: each client sends from 127.0.x.y."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    per = [clients // procs + (1 if n < clients % procs else 0) for n in range(procs)]
    workers = [ctx.Process(target=client_process,
                           args=(port, per[n], seconds, sum(per[:n]), until_empty, queue, form,
                                 own_address))
               for n in range(procs) if per[n]]
    for worker in workers:
        worker.start()
    answers = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return [item for out, _ in answers for item in out], max(wall for _, wall in answers)


def cpu_seconds(pid) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid, port, clients, procs, seconds=0.0, until_empty=False, **how):
    """drive() plus the server's CPU use over the run."""
    cpu = cpu_seconds(pid)
    latencies, wall = drive(port, clients, procs, seconds, until_empty, **how)
    return latencies, wall, (cpu_seconds(pid) - cpu) / wall


def summary(label, latencies, wall, cpu, pid):
    cycles = len(latencies)
    whole = sorted(t[2] for t in latencies)
    submit = sorted(t[1] for t in latencies)
    rss, peak = rss_mb(pid)
    rate = cycles / wall
    print(f"{label:>12}: {rate:8.0f} cycles/s   cycle p50 {pct(whole, 50):6.2f} ms  "
          f"p99 {pct(whole, 99):6.2f} ms   submit p50 {pct(submit, 50):6.2f} ms  "
          f"p99 {pct(submit, 99):6.2f} ms   server CPU {cpu:.0%}   "
          f"RSS {rss:.0f} MB (peak {peak:.0f})",
          flush=True)
    return rate


def pct(values, p):
    return 1000 * values[min(len(values) - 1, int(len(values) * p / 100))] if values else 0.0


# -- phases ---------------------------------------------------------------------------------------

def load_phase(args, tmp):
    print(f"load: {args.clients} keep-alive clients in {args.procs} processes, "
          f"{args.seconds} s a run, 65,536-char results", flush=True)
    ceilings = {}
    for kind in ("http", "json"):
        bare, port = start([sys.executable, __file__, "--bare-server", kind])
        try:
            drive(port, args.clients, args.procs, 1.0)             # warm up
            ceilings[kind] = summary(f"bare {kind}", *measured(bare.pid, port, args.clients,
                                                               args.procs, args.seconds), bare.pid)
        finally:
            bare.kill()
            bare.wait()
    server, port = census_server(tmp / "load")
    try:
        drive(port, args.clients, args.procs, 1.0)
        ours = summary("ping_server", *measured(server.pid, port, args.clients, args.procs,
                                                args.seconds), server.pid)
        if args.dashboards:
            stop = threading.Event()
            for _ in range(args.dashboards):
                threading.Thread(target=dashboard, args=(port, stop), daemon=True).start()
            summary(f"+{args.dashboards} SSE", *measured(server.pid, port, args.clients,
                                                         args.procs, args.seconds), server.pid)
            stop.set()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    print(f"       ratio: {ours / ceilings['json']:.0%} of the bare server that parses the HTTP "
          f"request and its JSON body; {ours / ceilings['http']:.0%} of one that parses only "
          "the HTTP (every ping_server answer durable)", flush=True)


def census_phase(args, tmp):
    data = tmp / "census"
    server, port = census_server(data)
    print(f"census: 65,536 tasks by {args.census_clients} clients in {args.procs} processes",
          flush=True)
    try:
        latencies, wall, cpu = measured(server.pid, port, args.census_clients, args.procs,
                                        until_empty=True)
        summary("census", latencies, wall, cpu, server.pid)
        progress = get_json(port, "/get_progress")
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    print(f"      census: {progress['done_tasks']} tasks done in {wall:.1f} s; "
          f"log {os.path.getsize(data / 'census.log') / 1e6:.0f} MB, "
          f"snapshot {os.path.getsize(data / 'census.json') / 1e6:.1f} MB", flush=True)
    for how in ("after kill -9", "after SIGTERM"):
        timed_restart(data, how)


def mid_census_restart_phase(args, tmp):
    """A census killed with SIGKILL part-way (no clean stop, no final snapshot), restarted."""
    data = tmp / "half"
    server, port = census_server(data)
    try:
        drive(port, args.census_clients, args.procs, args.seconds)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    timed_restart(data, f"after kill -9 mid-census (log "
                        f"{os.path.getsize(data / 'census.log') / 1e6:.0f} MB)")


def timed_restart(data, how):
    """Start a server on ``data`` and time it until it answers."""
    started = time.perf_counter()
    server, port = census_server(data)
    try:
        progress = get_json(port, "/get_progress")
        elapsed = time.perf_counter() - started
        print(f"     restart: {elapsed:.2f} s {how} until it answers; done_tasks "
              f"{progress['done_tasks']}; RSS {rss_mb(server.pid)[0]:.0f} MB", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()


def churn_phase(args, tmp):
    """get_task + release by one keep-alive client: what the log costs, and compaction."""
    data = tmp / "churn"
    server, port = census_server(data)
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    cycles, deadline, largest = 0, time.perf_counter() + args.seconds, 0
    try:
        before = folder_bytes(data)
        while time.perf_counter() < deadline:
            conn.request("GET", "/get_task")
            task = json.loads(conn.getresponse().read())
            body = json.dumps({"task_index": task["task_index"], "lease": task["lease"]})
            conn.request("POST", "/release", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
            cycles += 1
            largest = max(largest, os.path.getsize(data / "census.log")) if cycles % 200 == 0 \
                else largest
        grown = folder_bytes(data) - before
        log_before = os.path.getsize(data / "census.log")
    finally:
        conn.close()
        server.send_signal(signal.SIGTERM)
        server.wait()
    print(f"       churn: {cycles} get_task+release cycles in {args.seconds:.0f} s by one "
          f"client: the folder grew {grown / 1e3:.0f} kB ({grown / cycles:.0f} kB per 1,000 "
          f"cycles; the log peaked at {largest / 1e6:.1f} MB); log before compaction "
          f"{log_before / 1e3:.0f} kB, after (at the clean stop) "
          f"{os.path.getsize(data / 'census.log') / 1e3:.0f} kB; snapshot "
          f"{os.path.getsize(data / 'census.json') / 1e3:.0f} kB", flush=True)
    raw = record_bytes_per_cycle(tmp / "churn-raw")
    print(f"       churn: {raw:.0f} log bytes per 1,000 cycles before any compaction "
          f"(2 records a cycle)", flush=True)


def record_bytes_per_cycle(data):
    """Log bytes 1,000 get_task+release cycles write, measured on the store itself."""
    sys.path.insert(0, str(ROOT))
    import store as census_store
    churn = census_store.Store(data, scope=None, tail_bytes=1 << 40)
    try:
        first = os.path.getsize(data / "census.log")
        for _ in range(1000):
            handout = churn.get_task("127.0.0.1")
            churn.release(handout.task, holder="127.0.0.1", token=handout.lease.token)
        churn._journal.wait(churn._journal.last_ticket())
        return os.path.getsize(data / "census.log") - first
    finally:
        churn.close()


def folder_bytes(data) -> int:
    return sum(path.stat().st_size for path in Path(data).iterdir() if path.is_file())


def compact_phase(args, tmp):
    """Our client's compact form beside the original string form: ping_server and the bare
    json server, each fed both, in the same run."""
    size = {form: len(results_pool(0, 1, form)[0]) for form in ("string", "compact")}
    print(f"compact: result per /16 in the body: string {size['string']:,} bytes, compact "
          f"{size['compact']:,} bytes (10 % answer; RTTs, the same in both, not sent here)",
          flush=True)
    rates = {}
    for form in ("string", "compact"):
        bare, port = start([sys.executable, __file__, "--bare-server", "json"])
        try:
            drive(port, args.clients, args.procs, 1.0, form=form)
            rates["bare", form] = summary(f"bare {form}", *measured(
                bare.pid, port, args.clients, args.procs, args.seconds, form=form), bare.pid)
        finally:
            bare.kill()
            bare.wait()
        server, port = census_server(tmp / f"compact-{form}")
        try:
            drive(port, args.clients, args.procs, 1.0, form=form)
            rates["ours", form] = summary(f"ours {form}", *measured(
                server.pid, port, args.clients, args.procs, args.seconds, form=form), server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
    print(f"       ratio: compact {rates['ours', 'compact'] / rates['bare', 'string']:.0%} of the "
          f"bare json server fed strings ({rates['ours', 'compact'] / rates['bare', 'compact']:.0%}"
          f" of it fed compact bodies); string {rates['ours', 'string'] / rates['bare', 'string']:.0%}"
          " (every ping_server answer durable)", flush=True)


def verify_phase(args, tmp):
    """A census of --verify-scope by clients each at its own loopback address (a block's
    result the same whoever sweeps it), --verify 0.05: what the checks cost in sweeps."""
    server, port = census_server(tmp / "verify", args.verify_scope, "--verify", "0.05")
    print(f"verify: {args.verify_scope} by {args.verify_clients} clients at their own "
          f"addresses, --verify 0.05", flush=True)
    try:
        latencies, wall, cpu = measured(server.pid, port, args.verify_clients, args.procs,
                                        until_empty=True, form="compact", own_address=True)
        summary("verify", latencies, wall, cpu, server.pid)
        progress = get_json(port, "/get_progress")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    done, sweeps = progress["done_tasks"], len(latencies)
    print(f"      checks: {sweeps:,} sweeps for {done:,} blocks: {sweeps - done:,} extra "
          f"({(sweeps - done) / max(done, 1):.1%}; each contributor's first "
          f"{trust.TRUST_AFTER} checked, then 5 %); verified share {progress['verified_share']:.1%}",
          flush=True)


def _address(n: int) -> str:
    """The loopback address of client n: 127.0.1.1, 127.0.1.2, ..."""
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


def hostile_phase(args, tmp):
    """(a) plain load, (b) the same under hostile connections, (c) a mass close."""
    print(f"hostile: (b) {args.streams} /events + {args.idle} idle + {args.slow} slow heads; "
          f"(c) {args.mass_close} closed at once", flush=True)
    server, port = census_server(tmp / "hostile", "0.0.0.0/0", "--max-per-address", "100000")
    try:
        drive(port, args.clients, args.procs, 1.0)
        plain = summary("(a) plain", *measured(server.pid, port, args.clients, args.procs,
                                               args.seconds), server.pid)
        with Holder(port, args.streams, args.idle, args.slow):
            latencies = measured(server.pid, port, args.clients, args.procs, args.seconds)
            hostile = summary("(b) hostile", *latencies, server.pid)
            whole = sorted(t[2] for t in latencies[0])
            print(f"         (b): {hostile / plain:.0%} of (a); get+submit p99 "
                  f"{pct(whole, 99):.1f} ms (goals: >= 80 %, <= 50 ms, RSS <= 400 MB)", flush=True)
        with Holder(port, 0, args.mass_close, 0) as holder:
            closed_at = holder.close_all()
            get_json(port, "/get_task")
            print(f"         (c): /get_task answered {time.monotonic() - closed_at:.3f} s after "
                  f"{args.mass_close} connections closed at once (goal <= 1 s); "
                  f"RSS {rss_mb(server.pid)[0]:.0f} MB", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()


class Holder:
    """A process holding hostile connections open: /events streams it never reads, idle
    keep-alive connections, slow heads (a byte a second, reopened when the server drops them)."""

    def __init__(self, port, streams, idle, slow):
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=_hold, args=(port, streams, idle, slow, child))

    def __enter__(self):
        self.process.start()
        assert self.pipe.recv() == "ready"
        return self

    def close_all(self) -> float:
        """Close every connection at once; the monotonic time at which it began."""
        self.pipe.send("close")
        return self.pipe.recv()

    def __exit__(self, *exc):
        self.pipe.send("stop")
        self.process.join(30)


def _hold(port, streams, idle, slow, pipe):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for _ in range(streams):
        sock = socket.create_connection((HOST, port))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        held.append(sock)
    held += [socket.create_connection((HOST, port)) for _ in range(idle)]
    heads = [_slow_head(port) for _ in range(slow)]
    pipe.send("ready")
    while not pipe.poll(1.0):                       # a byte a second on each slow head
        for n, sock in enumerate(heads):
            try:
                sock.send(b"X")
            except OSError:                         # dropped at its deadline: open another
                sock.close()
                heads[n] = _slow_head(port)
    command = pipe.recv()
    started = time.monotonic()
    for sock in held + heads:
        sock.close()
    if command == "close":
        pipe.send(started)
        pipe.recv()


def _slow_head(port):
    sock = socket.create_connection((HOST, port))
    sock.setblocking(False)
    sock.send(b"GET /ping HTTP/1.1\r\n")
    return sock


def dashboard(port, stop):
    """An open dashboard: one /events stream, read until told to stop."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/events")
    response = conn.getresponse()
    while not stop.is_set() and response.fp.readline():
        pass
    conn.close()


def get_json(port, path):
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--census-clients", type=int, default=64)
    parser.add_argument("--dashboards", type=int, default=50, help="SSE streams in a 2nd run")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-census", action="store_true")
    parser.add_argument("--skip-churn", action="store_true")
    parser.add_argument("--skip-hostile", action="store_true")
    parser.add_argument("--skip-compact", action="store_true")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--verify-scope", default="0.0.0.0/4", help="the verify phase's census")
    parser.add_argument("--verify-clients", type=int, default=32)
    parser.add_argument("--streams", type=int, default=10000, help="hostile (b): /events streams")
    parser.add_argument("--idle", type=int, default=2000, help="hostile (b): idle connections")
    parser.add_argument("--slow", type=int, default=200, help="hostile (b): slow heads")
    parser.add_argument("--mass-close", type=int, default=8000,
                        help="hostile (c): connections closed at once")
    parser.add_argument("--bare-server", choices=("http", "json"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server:
        return run_bare_server(args.bare_server == "json")
    with tempfile.TemporaryDirectory(prefix="census-bench-") as tmp:
        if not args.skip_load:
            load_phase(args, Path(tmp))
        if not args.skip_compact:
            compact_phase(args, Path(tmp))
        if not args.skip_verify:
            verify_phase(args, Path(tmp))
        if not args.skip_hostile:
            hostile_phase(args, Path(tmp))
        if not args.skip_census:
            census_phase(args, Path(tmp))
            mid_census_restart_phase(args, Path(tmp))
        if not args.skip_churn:
            churn_phase(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
