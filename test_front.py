"""Tests of the server under load and attack (http_front.py and the rules in ping_server.py),
over real sockets on 127.0.0.1: bounded threads with thousands of idle and /events connections,
the head deadline and header cap, a mass close, connection caps, accept() out of descriptors,
no side doors (HEAD, cross-site, admin Host / forwarding rules), X-Forwarded-For from --proxy
peers only, /healthz from a failing store, security and cache headers, the operator's log."""

import http.client
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import http_front
import ping_server
from conftest import answer, listening_port, result_string

HERE = Path(__file__).resolve().parent


class Collected(list):
    """A Warnings stand-in: keeps (kind, text)."""

    def __call__(self, kind, text):
        self.append((kind, text))


@pytest.fixture(scope="module", autouse=True)
def many_descriptors():
    """Room for a few thousand sockets on both ends (the soft limit raised to the hard one)."""
    if http_front.raise_fd_limit() < 10000:
        pytest.skip("this test needs an fd limit of 10,000 (hard limit too low)")


def connect(port, count):
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def wait_until(condition, seconds=20.0):
    """Wait on a condition the server's own counters expose (a bound, not a speed test)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def head_of(sock) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


class Peer:
    """A raw keep-alive connection; its answers (status, body) read in order."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def ask(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        return self.answer()

    def answer(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?im)^content-length: *([0-9]+)", head)[1])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(head.split()[1]), body

    def _more(self):
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.buf += chunk


def head(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("HEAD", path)
    response = conn.getresponse()
    conn.close()
    return response


def timed_call(running, method, path, headers=None):
    started = time.monotonic()
    status = running.call(method, path, headers=headers)[0]
    return status, time.monotonic() - started


# -- bounded concurrency --------------------------------------------------------------------------

def test_threads_stay_bounded_with_idle_and_event_streams(census_server):
    running = census_server(workers=8, max_per_address=10000)
    assert running.call("GET", "/ping")[0] == 200
    threads = threading.active_count()
    idle = connect(running.port, 2000)
    streams = connect(running.port, 2000)
    try:
        for sock in streams:
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        front = running.server.front
        wait_until(lambda: front.counts()["subscribers"] == 2000)
        assert threading.active_count() <= threads + 2     # no thread per connection
        status, seconds = timed_call(running, "GET", "/get_task")
        assert status == 200 and seconds < 2.0                # loosely: not behind 4,000 others
        # one update reaches every stream
        for sock in streams[::100]:
            sock.settimeout(10)
            got = head_of(sock)
            while b"event: update" not in got:
                got += sock.recv(65536)
    finally:
        for sock in idle + streams:
            sock.close()


def test_a_mass_close_does_not_stall_service(census_server):
    running = census_server(max_per_address=10000)
    socks = connect(running.port, 4000)
    front = running.server.front
    wait_until(lambda: front.counts()["connections"] >= 4000)
    for sock in socks:
        sock.close()
    status, seconds = timed_call(running, "GET", "/get_task")
    assert status == 200 and seconds < 1.0
    wait_until(lambda: front.counts()["connections"] <= 1)


def test_a_subscriber_that_stops_reading_is_dropped(census_server):
    running = census_server()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", running.port))
    with sock:
        sock.sendall(b"GET /events HTTP/1.1\r\n\r\n")
        front = running.server.front
        wait_until(lambda: front.counts()["subscribers"] == 1)
        for _ in range(1000):                               # never read: its buffer fills
            front.publish(b": " + b"x" * 65536 + b"\n\n")
            if front.counts()["subscribers"] == 0:
                break
            time.sleep(0.002)
        wait_until(lambda: front.counts()["subscribers"] == 0)


def test_an_idle_keep_alive_connection_frees_its_worker(census_server):
    """The worker that answered waits for the peer's next request only a moment."""
    running = census_server(workers=1)
    idle = Peer(running.port)
    with idle.sock:
        assert idle.ask(b"GET /ping HTTP/1.1\r\n\r\n")[0] == 200
        status, seconds = timed_call(running, "GET", "/ping")      # the only worker is free
        assert status == 200 and seconds < 2.0
        assert idle.ask(b"GET /ping HTTP/1.1\r\n\r\n")[0] == 200


def test_keep_alive_requests_in_pieces_pipelined_and_bad(census_server):
    """What a worker reads of a next request that is not whole goes back to the loop."""
    running = census_server()
    peer = Peer(running.port)
    with peer.sock:
        assert peer.ask(b"GET /ping HTTP/1.1\r\n\r\n")[0] == 200
        peer.sock.sendall(b"GET /ping HTTP/1.1\r\n")
        time.sleep(0.1)
        assert peer.ask(b"Host: 127.0.0.1\r\n\r\n")[0] == 200
        assert peer.ask(b"GET /ping HTTP/1.1\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\n")[0] == 200
        assert peer.answer()[0] == 404                              # in order
        status, body = peer.ask(b"GET /ping HTTP/1.1\r\nno colon\r\n\r\n")
        assert status == 400 and "error" in json.loads(body)


def test_a_slow_head_after_a_keep_alive_answer_keeps_its_deadline(census_server):
    running = census_server(head_timeout=0.5)
    peer = Peer(running.port)
    with peer.sock:
        assert peer.ask(b"GET /ping HTTP/1.1\r\n\r\n")[0] == 200
        started = time.monotonic()
        assert peer.ask(b"GET /ping HTTP/1.1\r\n")[0] == 408     # never finished
        assert time.monotonic() - started < 3                       # 0.5 s and the sweep, loosely


# -- deadlines and sizes --------------------------------------------------------------------------

def test_a_slow_head_is_dropped_at_its_deadline(census_server):
    running = census_server(head_timeout=0.5)
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /ping HTTP/1.1\r\n")
        answer_bytes = b""
        while time.monotonic() - started < 5:
            sock.sendall(b"X")                              # a byte every 50 ms: never done
            time.sleep(0.05)
            sock.settimeout(0.001)
            try:
                answer_bytes = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        assert time.monotonic() - started < 3               # 0.5 s and the sweep, loosely
        assert answer_bytes.startswith(b"HTTP/1.1 408 ")


def test_header_bytes_are_capped(census_server):
    running = census_server()
    many = b"".join(b"X-%d: %s\r\n" % (n, b"a" * 1000) for n in range(70))     # 70 KB, 70 lines
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\n" + many + b"\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 431 and "error" in json.loads(response.read())


def test_caps_answer_503_with_retry_after_and_are_logged(census_server):
    warned = Collected()
    running = census_server(max_per_address=5, warn=warned)
    held = connect(running.port, 5)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as extra:
            extra.sendall(b"GET /ping HTTP/1.1\r\n\r\n")
            response = http.client.HTTPResponse(extra)
            response.begin()
            assert response.status == 503 and response.getheader("Retry-After")
            assert "error" in json.loads(response.read())
    finally:
        for sock in held:
            sock.close()
    assert any(kind == "cap" and "--max-per-address" in text for kind, text in warned)
    wait_until(lambda: running.call("GET", "/ping")[0] == 200)


def test_accept_out_of_descriptors_backs_off_and_logs_once(tmp_path):
    """A real EMFILE: the server's fd limit below --max-connections."""
    def small_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (80, 80))

    server = subprocess.Popen(
        [sys.executable, str(HERE / "ping_server.py"), "--host", "127.0.0.1", "--port", "0",
         "--data", str(tmp_path), "--scope", "127.0.0.0/16", "--max-connections", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=small_limit, cwd=tmp_path)
    try:
        port = listening_port(server.stderr, drain=False)   # the rest is read below
        socks = connect(port, 150)                      # the kernel's backlog holds the rest
        time.sleep(1.0)
        cpu = _cpu_seconds(server.pid)
        time.sleep(1.0)
        assert _cpu_seconds(server.pid) - cpu < 0.5     # not spinning on accept()
        for sock in socks:
            sock.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert answer(conn, "GET", "/healthz")[0] == 200    # served again once fds are back
        conn.close()
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert err.decode().count("cannot accept connections") == 1     # logged once (rate-limited)


def _cpu_seconds(pid) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- no side doors --------------------------------------------------------------------------------

def test_head_only_on_read_routes_and_without_effects(census_server):
    running = census_server()
    for path in ("/get_task", "/revise?id=1&code=2&force=1", "/error/reset?id=-1"):
        response = head(running.port, path)
        assert response.status == 405 and "HEAD" not in response.getheader("Allow")
    assert running.call("GET", "/get_progress")[2]["in_progress"] == 0     # no lease was made
    response = head(running.port, "/get_progress")
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length")) > 0
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"HEAD /events HTTP/1.1\r\n\r\n")
        assert head_of(sock).startswith(b"HTTP/1.1 200 ") and sock.recv(100) == b""
    assert running.server.front.counts()["subscribers"] == 0


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "http://evil.example"},
                                     {"Origin": "null"}])
def test_browser_requests_from_other_sites_are_refused(census_server, headers):
    running = census_server()
    assert running.call("GET", "/get_task", headers=headers)[0] == 403
    assert running.call("POST", "/release", {"task_index": 1}, headers)[0] == 403
    assert running.call("GET", "/error/reset?id=-1", headers=headers)[0] == 403
    assert running.call("GET", "/get_progress", headers=headers)[0] == 200   # reading is fine
    assert running.call("GET", "/get_progress")[2]["in_progress"] == 0


def test_same_origin_and_programs_are_served(census_server):
    running = census_server()
    own = {"Origin": f"http://127.0.0.1:{running.port}", "Sec-Fetch-Site": "same-origin"}
    assert running.call("GET", "/get_task", headers=own)[0] == 200
    assert running.call("GET", "/get_task")[0] == 200


@pytest.mark.parametrize("headers,status", [
    ({"Host": "rebind.attacker.example", "Sec-Fetch-Site": "same-origin"}, 403),
    ({"Host": "rebind.attacker.example:8001"}, 403),
    ({"X-Forwarded-For": "203.0.113.9"}, 403),
    ({"X-Real-IP": "203.0.113.9"}, 403),
    ({"Forwarded": "for=203.0.113.9"}, 403),
    ({"Host": "localhost:8001"}, 200),
    ({"Host": "[::1]:8001"}, 200),
    ({"Host": "127.0.0.2"}, 200),
])
def test_token_less_admin_needs_a_direct_request_to_localhost(census_server, headers, status):
    running = census_server()
    assert running.call("GET", "/error/reset?id=-1", headers=headers)[0] == status


def test_forwarded_for_is_trusted_only_from_proxy_peers(census_server):
    plain = census_server()
    proxied = census_server(proxies=["127.0.0.1"])
    forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    for running, holder in ((plain, "127.0.0.1"), (proxied, "203.0.113.9")):
        seen = []
        leased = running.store.get_task
        running.store.get_task = lambda who, **options: seen.append(who) or leased(who)
        assert running.call("GET", "/get_task", headers=forwarded)[0] == 200
        assert seen == [holder]
    # token-less admin for a forwarded client: refused (it is not loopback)
    assert proxied.call("GET", "/error/reset?id=-1", headers=forwarded)[0] == 403


def test_client_address_walks_trusted_hops():
    trusted = frozenset({"127.0.0.1", "10.9.9.9"})
    headers = http_front.Headers()
    headers.add("X-Forwarded-For", "1.2.3.4, 5.6.7.8, 10.9.9.9")
    assert ping_server.client_address("127.0.0.1", headers, trusted) == "5.6.7.8"
    assert ping_server.client_address("192.0.2.1", headers, trusted) == "192.0.2.1"
    garbage = http_front.Headers()
    garbage.add("X-Forwarded-For", "not-an-address")
    assert ping_server.client_address("127.0.0.1", garbage, trusted) == "127.0.0.1"


# -- operators see trouble ------------------------------------------------------------------------

class Degradable:
    """The real store, with the ``degraded`` reason the store exposes, set by the test."""

    def __init__(self, store):
        self._store, self.degraded = store, None

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_healthz_is_503_while_the_store_cannot_write(census_server):
    running = census_server()
    running.server.store = store = Degradable(running.store)
    store.degraded = "cannot write census.log: No space left on device"
    status, _, body = running.call("GET", "/healthz")
    assert status == 503 and "No space left" in body["error"]
    store.degraded = None
    assert running.call("GET", "/healthz")[::2] == (200, {"status": "ok"})


def test_internal_errors_and_storage_failures_are_logged_with_traceback(census_server):
    warned = Collected()
    running = census_server(warn=warned)

    def broken():
        raise RuntimeError("bug in progress()")

    def full(holder, **options):
        raise OSError(28, "No space left on device")

    running.store.progress, running.store.get_task = broken, full
    status, _, body = running.call("GET", "/get_progress")
    assert status == 500 and body == {"error": "internal error"}
    assert running.call("GET", "/get_task")[0] == 503
    kinds = dict(warned)
    assert "Traceback" in kinds["internal"] and "bug in progress()" in kinds["internal"]
    assert "No space left" in kinds["storage"]


def test_warnings_are_rate_limited():
    now = [0.0]
    lines = []

    class Sink:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    warn = ping_server.Warnings(every=10, clock=lambda: now[0], stream=Sink())
    for _ in range(5):
        warn("cap", "refused")
    now[0] = 11
    warn("cap", "refused")
    text = "".join(lines)
    assert text.count("refused") == 2 and "4 more like it" in text


# -- headers --------------------------------------------------------------------------------------

def test_security_headers_on_every_answer(census_server):
    running = census_server(static_dir=ping_server.HERE)
    answers = [running.call("GET", path)[1] for path in ("/", "/ping", "/nope", "/map")]
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\n" + b"X-A: a\r\n" * 101 + b"\r\n")   # from the loop
        refused = http.client.HTTPResponse(sock)
        refused.begin()
        answers.append(refused)
    for response in answers:
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert "frame-ancestors 'none'" in response.getheader("Content-Security-Policy")
        assert response.getheader("Referrer-Policy") == "no-referrer"
    page = (ping_server.HERE / "dashboard.html").read_bytes()
    script = re.search(rb"<script>(.*?)</script>", page, re.S)[1]
    import base64
    import hashlib
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"'sha256-{digest}'" in answers[0].getheader("Content-Security-Policy")


def test_501_and_505_are_json(census_server):
    running = census_server()
    for request, status in ((b"BREW /ping HTTP/1.1\r\n\r\n", 501), (b"GET / HTTP/2.0\r\n\r\n", 505)):
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(request)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == status
            assert response.getheader("Content-Type") == "application/json"
            assert "error" in json.loads(response.read())


@pytest.mark.parametrize("path", ["/get_progress", "/contributors", "/map", "/", "/export.csv"])
def test_read_endpoints_send_cache_control_and_etag(census_server, path):
    running = census_server()
    status, response, _ = running.call("GET", path)
    etag = response.getheader("ETag")
    assert status == 200 and "max-age" in response.getheader("Cache-Control") and etag
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    conn.request("GET", path, headers={"If-None-Match": etag})
    assert conn.getresponse().status == 304
    conn.close()
    assert running.call("GET", "/get_task")[1].getheader("Cache-Control") == "no-store"


def test_http_1_0_keep_alive_is_kept(census_server):
    running = census_server()
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = head_of(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head
            if not head.endswith(b"{}"):
                assert sock.recv(2) == b"{}"
