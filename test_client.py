"""Unit tests of ping_client.py: fakes for the sweep and a tiny fake task server on 127.0.0.1.

No test here sends a packet outside a lab: icmp.Sweeper is replaced by a fake, or the real one
is handed a RecordingSocket that keeps what it is given; the one lab test (conftest.py) runs a
server and a client inside a sealed namespace. The reserved block a "server" hands out here
(10.0.0.0/16) only ever meets `no_packets`: a sweep, a socket opener and a socket.socket that
record and fail on anything ICMP, to prove the client refuses it before anything is sent.
"""

import array
import base64
import io
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import icmp
import ping_client
from ping_client import Api, Backoff, Spool, TransientError
from test_e2e import FETCH, Proc           # the subprocess helpers of the end-to-end tests

LOOP = "127.0.0.0/16"
LOOP_TASK = 32512
NO_TASK = {"error": "No tasks available"}


# --- fakes ------------------------------------------------------------------------------------

def fake_result(network, replied=(), unreachable=(), excluded=(), rtt=100, **stats):
    """An icmp.SweepResult for `network`: offsets in `replied` answered with rtt + offset µs;
    every other target probed once, unless `stats` (SweepStats fields) says otherwise."""
    net = ipaddress.IPv4Network(network)
    base, size = int(net.network_address), net.num_addresses
    status, rtts = bytearray(size), array.array("I", bytes(4 * size))
    for k in replied:
        status[k], rtts[k] = icmp.Status.ECHO_REPLY, rtt + k
    for k in unreachable:
        status[k] = icmp.Status.UNREACHABLE
    for k in excluded:
        status[k] = icmp.Status.EXCLUDED
    counts = {f: 0 for f in icmp.SweepStats._fields}
    counts.update(sent=size - len(excluded), replies=len(replied), unreachable=len(unreachable),
                  excluded=len(excluded), rounds=1, elapsed=2.0, kind="fake")
    counts.update(stats)
    stats = icmp.SweepStats(**counts)
    return icmp.SweepResult(range(base, base + size), status, bytearray(size), rtts, stats)


class FakeSweep:
    """Stands in for icmp.Sweeper (icmp.Sweeper() gives this one): records every start(),
    whose sweep is over at once, with a result or an error that its result() raises."""

    def __init__(self, replied=(), error=None, result=None, open_error=None):
        self.calls, self.replied, self.error, self.result = [], replied, error, result
        self.open_error = open_error

    def __call__(self, sock=None, **kwargs):
        return self

    def open(self):
        if self.open_error is not None:
            raise self.open_error
        return self

    def start(self, targets, **kwargs):
        self.calls.append((targets, kwargs))
        kwargs["progress"](icmp.Progress(10, 20, 5, 0, 1.0, 10.0))
        return FakeJob(self.error, self.result or fake_result(targets, self.replied))

    def wait_for(self, predicate, timeout=None):
        return predicate()

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeJob:
    """A FakeSweep's sweep: sent and done from the start."""
    all_sent = done = True

    def __init__(self, error, result):
        self.error, self._result, self.cancelled = error, result, False

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self._result

    def cancel(self):
        self.cancelled = True


@pytest.fixture
def no_packets(monkeypatch):
    """A sweep, a socket opener and socket.socket that record and fail on anything ICMP."""
    calls, real_socket = [], socket.socket

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the client tried to send")

    class GuardedSocket(real_socket):       # TCP for the fake server still works
        def __init__(self, family=-1, kind=-1, proto=-1, fileno=None):
            if kind == socket.SOCK_RAW or proto == socket.IPPROTO_ICMP:
                refuse(family, kind, proto)
            super().__init__(family, kind, proto, fileno)

    sweeper = FakeSweep()                   # may be opened (that sends nothing), never started
    sweeper.start = lambda targets, **kwargs: refuse(targets, kwargs)
    monkeypatch.setattr(icmp, "Sweeper", sweeper)
    monkeypatch.setattr(icmp, "sweep", refuse)
    monkeypatch.setattr(icmp.IcmpSocket, "open", classmethod(refuse))
    monkeypatch.setattr(socket, "socket", GuardedSocket)
    return calls


class RecordingSocket:
    """A fake IcmpSocket for the real icmp.sweep: keeps every packet, sends none, hears none."""
    kind, lanes, stamps = "raw", 1, False

    def __init__(self):
        self.sent = []                       # (destination, packet)

    def send(self, outbox, start, stop, lane=0):
        size = outbox.size
        self.sent += [(outbox.addrs[k], outbox.data[k * size:(k + 1) * size])
                      for k in range(start, stop)]
        return stop - start

    def recv(self, timeout):
        time.sleep(min(timeout, 0.001))
        return []

    def wake(self):
        pass

    def close(self):
        pass


class FakeServer(ThreadingHTTPServer):
    """Answers from a script: (method, path) -> [(status, body), ...], the last one repeats."""

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = {key: list(answers) for key, answers in script.items()}
        self.requests, self.paths, self.content_type = [], [], "application/json"
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, method, path):
        answers = self.script.get((method, path)) or [(404, {"error": "unknown path"})]
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def calls(self, method=None, path=None):
        return [r for r in self.requests if method in (None, r[0]) and path in (None, r[1])]


class ScriptedHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._serve(None)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._serve(json.loads(raw))

    def _serve(self, body):
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path, body))
        self.server.paths.append(self.path)
        status, answer = self.server.answer(self.command, path)
        raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(script):
        server = FakeServer(script)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def task(index=LOOP_TASK, **extra):
    answer = {"task_index": index, "task_status": 1, "lease": "L1", "deadline": 0.0,
              "lease_seconds": 600, "network": str(ping_client.task_network(index)),
              "exclude": []}
    answer.update(extra)
    return answer


OK = (200, {"success": True})


def run_client(server, tmp_path, *flags, sleep=None, clock=None):
    sleeps, timing = [], {} if clock is None else {"clock": clock}
    code = ping_client.main(["--server", server.url, "--spool", str(tmp_path / "spool"),
                             "--name", "tester", *flags], sleep=sleep or sleeps.append, **timing)
    return code, sleeps


def interrupt_after(n):
    """A sleep that records its waits and raises KeyboardInterrupt on the n-th; (sleep, waits)."""
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == n:
            raise KeyboardInterrupt

    return sleep, waits


def spooled(tmp_path):
    return sorted(os.listdir(tmp_path / "spool"))


# --- tasks and rules --------------------------------------------------------------------------

def test_task_numbering():
    assert ping_client.task_network(LOOP_TASK) == ipaddress.IPv4Network(LOOP)
    assert ping_client.task_network(0) == ipaddress.IPv4Network("0.0.0.0/16")
    assert ping_client.task_network(65535) == ipaddress.IPv4Network("255.255.0.0/16")


def test_parse_task_original_and_new_shapes():
    old = ping_client.parse_task({"task_index": "32512", "task_status": 1})
    assert (old.index, old.lease, old.network) == (LOOP_TASK, None, ipaddress.IPv4Network(LOOP))
    new = ping_client.parse_task(task(exclude=["127.0.3.0/24"], rate=50))
    assert (new.lease, new.exclude) == ("L1", ("127.0.3.0/24",))
    assert ping_client.parse_task(NO_TASK) is None
    for bad in ({"task_index": 65536}, {"task_index": "x"}, {"task_index": True}, {},
                {"task_index": "\u00b2"}, {"task_index": "-1"}, {"task_index": 1.0}):
        with pytest.raises(ping_client.ClientError):
            ping_client.parse_task(bad)


@pytest.mark.parametrize("network, allow, exclude, refused", [
    ("10.0.0.0/16", [], [], True),                                  # reserved
    ("127.0.0.0/16", ["127.0.0.0/8"], [], False),
    ("127.0.0.0/16", ["127.0.128.0/17"], ["127.0.128.0/17"], True),  # allowed part excluded
    ("127.0.0.0/16", ["127.0.128.0/17"], ["127.0.128.0/18"], False),
    ("127.0.0.0/16", ["127.0.0.0/8"], ["127.0.0.0/17", "127.0.128.0/17"], True),
    ("127.0.0.0/16", ["127.0.0.0/8"], [f"127.0.{k}.0/24" for k in range(255)], False),
    ("127.0.0.0/16", ["127.0.0.0/8"], [f"127.0.{k}.0/24" for k in range(256)], True),
])
def test_blocked_when_nothing_is_left_to_probe(network, allow, exclude, refused):
    nets = [[ipaddress.IPv4Network(n) for n in group] for group in (allow, exclude)]
    assert bool(ping_client.blocked(ipaddress.IPv4Network(network), *nets)) is refused


def test_normal_url():
    for spelling in ("HTTP://Census.Example:8001/", "http://census.example:8001",
                     " http://CENSUS.example:8001// "):
        assert ping_client.normal_url(spelling) == "http://census.example:8001"
    assert ping_client.normal_url("https://h:443/api/") == "https://h/api"
    assert ping_client.normal_url("http://h:80") == "http://h"


# --- result encoding --------------------------------------------------------------------------

def test_result_encoding():
    result = fake_result(LOOP, replied=(0, 258, 65535), unreachable=(2,), excluded=(3, 4))
    body = ping_client.submission_body(ping_client.parse_task(task()), result, "alice")
    data = ping_client.string_form(body)["result"]["result_data"]
    assert len(data) == 65536 and set(data) == {"0", "1"}
    assert [k for k, c in enumerate(data) if c == "1"] == [0, 258, 65535]
    assert list(ping_client.decode_rtt(body["rtt_us"])) == [100, 358, 65635]
    assert body["stats"] == {"probed": 65534, "excluded": 2, "unreachable": 1, "sent": 65534}
    assert (body["task_index"], body["lease"], body["name"]) == (LOOP_TASK, "L1", "alice")
    assert body["result"]["success"] is True


def test_rtt_golden_bytes_and_round_trip():
    golden = base64.b64encode(zlib.compress(b"\x64\x00\x00\x00\xfa\x00\x00\x00\xff\xff\xff\xff"))
    assert ping_client.encode_rtt([100, 250, 2**32 - 1]) == golden.decode()
    assert list(ping_client.decode_rtt(golden.decode())) == [100, 250, 2**32 - 1]


@pytest.mark.parametrize("stats, why", [
    ({}, ""),
    ({"sent": 100}, "--timeout"),                                   # cut short
    ({"sent": 0, "send_errors": 65536}, "could not be sent"),       # ENETUNREACH on every send
    ({"sent": 65535, "send_errors": 1}, "could not be sent"),
    ({"sent": 70000, "send_errors": 1, "rounds": 2}, "could not be sent"),
    ({"sent": 70000, "send_errors": 1, "rounds": 3}, ""),          # cannot hide an address
    ({"excluded": range(65536)}, "nothing was probed"),
    ({"dropped": 3}, "dropped 3 packets"),                       # a full receive queue
])
def test_incomplete_sweeps(stats, why):
    reason = ping_client.incomplete(fake_result(LOOP, **stats))
    assert (why in reason) if why else reason == ""


def test_submission_refuses_a_result_of_another_shape():
    with pytest.raises(ping_client.ClientError):
        ping_client.submission_body(ping_client.parse_task(task()),
                                    fake_result("127.0.0.0/24"), "alice")


# --- backoff and spool ------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_and_caps():
    top = Backoff(base=0.5, cap=4.0, rng=lambda: 1.0)
    assert [top.delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = Backoff(base=0.5, cap=4.0, rng=lambda: 0.0)
    assert [low.delay() for _ in range(3)] == [0.25, 0.5, 1.0]
    top.reset()
    assert top.delay() == 0.5


def test_spool_is_durable_and_survives_a_restart(tmp_path):
    spool = Spool(str(tmp_path / "s"))
    first = spool.put("http://x", {"task_index": 1}, 1)
    second = spool.put("http://x", {"task_index": 2}, 2)
    assert not [n for n in os.listdir(spool.path) if n.endswith(".tmp")]
    with open(os.path.join(spool.path, "1-task3.json.tmp"), "w") as fh:
        fh.write('{"server": "http://x", "bo')          # a run that died mid-put
    reopened = Spool(spool.path)
    assert reopened.pending() == [first, second]
    assert second == ping_client.Spooled(second.path, "http://x", {"task_index": 2})
    assert sorted(os.listdir(spool.path)) == sorted(os.path.basename(s.path)
                                                    for s in (first, second))
    reopened.drop(first.path)
    reopened.drop(first.path)                 # already gone: no error
    assert Spool(spool.path).pending() == [second]


def test_spool_sets_aside_a_corrupt_file(tmp_path, serve, capsys):
    server = serve({})
    client = make_client(server, tmp_path, [])
    spool = client.spool
    with open(os.path.join(spool.path, "0-task1.json"), "w") as fh:
        fh.write("{torn")
    with open(os.path.join(spool.path, "0-task2.json"), "w") as fh:
        fh.write('{"server": 7, "body": {}}')
    client.flush_spool()
    assert sorted(os.listdir(spool.path)) == ["0-task1.json.bad", "0-task2.json.bad"]
    assert capsys.readouterr().err.count("unreadable spool file") == 2
    assert server.requests == []


# --- the HTTP layer ---------------------------------------------------------------------------

def test_api_statuses(serve):
    server = serve({("GET", "/get_task"): [(200, task()), (503, {"error": "busy"}),
                                           (409, {"error": "taken"}), (404, b"<html>no</html>"),
                                           (200, b"not json"), (429, {"error": "slow down"})]})
    api = Api(server.url + "/")
    assert api.get("/get_task") == (200, task())
    with pytest.raises(TransientError, match="503"):
        api.get("/get_task")
    assert api.get("/get_task") == (409, {"error": "taken"})
    assert api.get("/get_task") == (404, {"error": "<html>no</html>"})
    with pytest.raises(TransientError):
        api.get("/get_task")
    with pytest.raises(TransientError, match="429"):
        api.get("/get_task")


def test_api_connection_refused_is_transient(serve):
    server = serve({})
    server.shutdown()
    server.server_close()
    with pytest.raises(TransientError):
        Api(server.url, timeout=2).get("/get_task")


def make_client(server, tmp_path, sleeps):
    options = ping_client.SweepOptions(0, 1, 0.0, None, (ipaddress.IPv4Network("127.0.0.0/8"),), ())
    return ping_client.Client(Api(server.url), Spool(str(tmp_path / "spool")), options,
                              ping_client.Console(), name="t", sleep=sleeps.append)


@pytest.mark.parametrize("answers, accepted, kept", [
    ([(503, {"error": "x"}), (502, b"bad gateway"), OK], True, False),
    ([(200, {"success": True, "duplicate": True})], True, False),
    ([(409, {"success": False, "error": "task already done"})], False, False),
    ([(400, {"success": False, "error": "bad result data"})], False, False),
    ([(200, {"success": False, "error": "bad result data"})], False, False),
    ([(401, {"error": "who are you"})], False, True),
])
def test_submit_retries_5xx_and_drops_refusals(tmp_path, serve, capsys, answers, accepted, kept):
    server = serve({("POST", "/submit_result"): answers})
    sleeps = []
    client = make_client(server, tmp_path, sleeps)
    body = {"task_index": 7, "result": {"success": True, "result_data": "0"}}
    record = client.spool.put(server.url, body, 7)
    assert client.submit(record) is accepted
    assert os.path.exists(record.path) is kept
    retries = sum(1 for status, _ in answers if status >= 500)
    assert len(server.calls("POST", "/submit_result")) == retries + 1
    assert len(sleeps) == retries and sleeps == sorted(sleeps)
    err = capsys.readouterr().err
    if not accepted:
        assert answers[-1][1]["error"] in err       # the reason is logged


# --- the loop ---------------------------------------------------------------------------------

def test_once_sweeps_and_submits(tmp_path, serve, monkeypatch):
    sweep = FakeSweep(replied=(1, 2, 300))
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0 and spooled(tmp_path) == []
    [(_, _, body)] = server.calls("POST", "/submit_result")
    assert [k for k, c in enumerate(ping_client.string_form(body)["result"]["result_data"]) if c == "1"] == [1, 2, 300]
    assert list(ping_client.decode_rtt(body["rtt_us"])) == [101, 102, 400]
    assert (body["lease"], body["name"], body["task_index"]) == ("L1", "tester", LOOP_TASK)
    [(targets, kwargs)] = sweep.calls
    assert targets == ipaddress.IPv4Network(LOOP)
    assert kwargs["allow"] == (ipaddress.IPv4Network("127.0.0.0/8"),)
    assert (kwargs["rate"], kwargs["probes"], kwargs["cooldown"]) == (10000, 1, icmp.DEFAULT_COOLDOWN)


def test_compact_form_first_then_the_string_form_for_a_server_without_it(tmp_path, serve,
                                                                         monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(replied=(1, 2, 300)))
    old = (400, {"error": "result_data must be a string of 65536 characters"})
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [old, OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0 and spooled(tmp_path) == []
    [(_, _, compact), (_, _, string)] = server.calls("POST", "/submit_result")
    assert "result_data" not in compact["result"] and "bitmap" not in string["result"]
    assert string["result"]["result_data"] == ping_client.string_form(compact)["result"]["result_data"]
    assert [k for k, c in enumerate(string["result"]["result_data"]) if c == "1"] == [1, 2, 300]
    assert string["rtt_us"] == compact["rtt_us"] and string["lease"] == "L1"


@pytest.mark.parametrize("asked", [10**7, 1e-9, "fast"])
def test_server_adds_exclusions_and_cannot_change_the_rate(tmp_path, serve, monkeypatch, asked):
    sweep = FakeSweep()
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task(exclude=["127.0.1.0/24"], rate=asked,
                                                      allow=["0.0.0.0/0"]))],
                    ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", "--rate", "500",
                         "--probes", "3", "--cooldown", "0.25", "--timeout", "9",
                         "--exclude", "127.0.9.0/24")
    assert code == 0
    [(_, kwargs)] = sweep.calls
    assert kwargs["rate"] == 500
    assert set(kwargs["exclude"]) == {ipaddress.IPv4Network("127.0.9.0/24"),
                                      ipaddress.IPv4Network("127.0.1.0/24")}
    assert kwargs["allow"] == (ipaddress.IPv4Network("127.0.0.0/8"),)
    assert (kwargs["probes"], kwargs["cooldown"], kwargs["timeout"]) == (3, 0.25, 9.0)


def test_only_excludes_the_rest_of_the_block(tmp_path, serve, monkeypatch):
    sweep = FakeSweep()
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8",
                         "--only", "127.0.0.0/17")
    assert code == 0
    [(_, kwargs)] = sweep.calls
    assert set(kwargs["exclude"]) == {ipaddress.IPv4Network("127.0.128.0/17")}


def test_real_sweep_skips_both_exclusion_lists_and_tags_every_probe(tmp_path, serve,
                                                                   monkeypatch):
    fake = RecordingSocket()
    monkeypatch.setattr(icmp.IcmpSocket, "open", classmethod(lambda cls, *a, **kw: fake))
    server = serve({("GET", "/get_task"): [(200, task(exclude=["127.0.1.0/24"]))],
                    ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", "--rate", "0",
                         "--cooldown", "0", "--exclude", "127.0.2.0/24")
    assert code == 0
    targets = [addr for addr, _ in fake.sent]
    skipped = {int(ipaddress.IPv4Address("127.0.1.0")) + k for k in range(512)}
    base = int(ipaddress.IPv4Address("127.0.0.0"))
    assert sorted(targets) == [a for a in range(base, base + 65536) if a not in skipped]
    assert all(packet[8:8 + len(icmp.TAG)] == icmp.TAG for _, packet in fake.sent)
    [(_, _, body)] = server.calls("POST", "/submit_result")
    assert ping_client.string_form(body)["result"]["result_data"] == "0" * 65536
    assert body["stats"] == {"probed": 65024, "excluded": 512, "unreachable": 0, "sent": 65024}


def test_the_no_packets_guard_catches_icmp_sockets(no_packets):
    with pytest.raises(AssertionError):
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with pytest.raises(AssertionError):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    assert len(no_packets) == 2


def test_refuses_a_reserved_block_and_sends_nothing(tmp_path, serve, no_packets, capsys):
    # 10.0.0.0/16 is task 2560; the "server" even claims to allow everything.
    server = serve({("GET", "/get_task"): [(200, task(2560, allow=["0.0.0.0/0"]))],
                    ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 1
    assert no_packets == []
    assert server.calls("POST", "/submit_result") == []
    assert [b for _, _, b in server.calls("POST", "/release")] == [{"task_index": 2560,
                                                                    "lease": "L1"}]
    assert "refusing task 2560" in capsys.readouterr().err


def test_loop_refuses_then_waits(tmp_path, serve, no_packets):
    server = serve({("GET", "/get_task"): [(200, task(2560))], ("POST", "/release"): [OK]})
    sleep, waits = interrupt_after(3)
    code, _ = run_client(server, tmp_path, sleep=sleep)
    assert code == 130 and no_packets == []
    assert len(server.calls("POST", "/release")) == 3
    assert waits == sorted(waits)


@pytest.mark.parametrize("answer", [
    task(LOOP_TASK, network="10.0.0.0/16"),            # the name disagrees with the number
    task(LOOP_TASK, exclude=["not a network"]),        # an exclusion we cannot honour
])
def test_refuses_an_inconsistent_task(tmp_path, serve, no_packets, answer):
    server = serve({("GET", "/get_task"): [(200, answer)], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 1 and no_packets == []
    assert len(server.calls("POST", "/release")) == 1


@pytest.mark.parametrize("flags, theirs, why", [
    (["--allow", "127.0.0.0/8", "--exclude", "127.0.0.0/12"], [], "inside your own --exclude"),
    (["--allow", "127.0.0.0/8"], ["127.0.0.0/16"], "by the server's exclusions for it"),
    (["--allow", "127.0.0.0/8", "--exclude", "127.0.0.0/17"], ["127.0.128.0/17"],
     "by your --exclude and the server's exclusions together"),
    (["--allow", "127.0.128.0/17"], ["127.0.128.0/17"],      # the rest is reserved, not allowed
     "by the server's exclusions and reserved space --allow does not open together"),
    (["--allow", "127.0.0.0/8", "--only", "127.1.0.0/16"], [], "outside --only 127.1.0.0/16"),
    (["--allow", "127.0.0.0/8", "--only", "127.0.0.0/17"], ["127.0.0.0/17"],
     "by the server's exclusions and the part outside --only together"),
])
def test_exclusions_covering_the_block_refuse(tmp_path, serve, no_packets, capsys, flags, theirs,
                                              why):
    server = serve({("GET", "/get_task"): [(200, task(exclude=theirs))],
                    ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", *flags)
    assert code == 1 and no_packets == []
    assert len(server.calls("POST", "/release")) == 1
    assert server.calls("POST", "/submit_result") == []
    [line] = [line for line in capsys.readouterr().err.splitlines() if "refusing task" in line]
    assert line.endswith(why)                      # the one reason that applies, and only it


def test_restart_submits_the_spool_first(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [OK]})
    old = {"task_index": 99, "result": {"success": True, "result_data": "1" * 65536}}
    spool = Spool(str(tmp_path / "spool"))
    spool.put(server.url.replace("http", "HTTP") + "/", old, 99)    # spelled differently
    spool.put("http://elsewhere:8001", old, 99)
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0
    order = [(method, path) for method, path, _ in server.requests]
    assert order == [("POST", "/submit_result"), ("GET", "/get_task"), ("POST", "/submit_result")]
    assert server.requests[0][2] == old
    assert len(spooled(tmp_path)) == 1            # the other server's result waits for it
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning: " in line and "elsewhere:8001" in line]


def test_loop_submits_the_spool_before_every_task(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task()), (200, NO_TASK)],
                    ("POST", "/submit_result"): [(401, {"error": "who are you"}), OK]})

    def sleep(seconds):
        if server.calls("GET", "/get_task")[1:]:
            raise KeyboardInterrupt

    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8", sleep=sleep)
    assert code == 130 and spooled(tmp_path) == []
    order = [(method, path) for method, path, _ in server.requests]
    assert order == [("GET", "/get_task"), ("POST", "/submit_result"),
                     ("POST", "/submit_result"), ("GET", "/get_task"), ("GET", "/get_progress")]


def test_result_is_spooled_before_it_is_submitted(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task())],
                    ("POST", "/submit_result"): [(503, {"error": "down"})]})

    def sleep(seconds):           # while the server is failing, the result is on disk
        [name] = spooled(tmp_path)
        with open(tmp_path / "spool" / name) as fh:
            assert json.load(fh)["body"]["task_index"] == LOOP_TASK
        raise KeyboardInterrupt

    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", sleep=sleep)
    assert code == 130 and len(spooled(tmp_path)) == 1
    assert server.calls("POST", "/release") == []     # the result will still be submitted
    assert "interrupted; 1 result(s)" in capsys.readouterr().err


def test_no_task_waits_with_backoff_and_says_so(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, NO_TASK), (200, NO_TASK), (200, NO_TASK),
                                           (200, task())],
                    ("POST", "/submit_result"): [OK]})
    code, sleeps = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0 and len(sleeps) == 3
    assert sleeps[0] < sleeps[2]
    assert capsys.readouterr().err.count("no task available") == 3


def test_original_server_shapes(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, {"task_index": LOOP_TASK, "task_status": 1})],
                    ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0
    [(_, _, body)] = server.calls("POST", "/submit_result")
    assert "lease" not in body and body["task_index"] == LOOP_TASK


def test_get_task_refused_is_an_error(tmp_path, serve, no_packets, capsys):
    server = serve({("GET", "/get_task"): [(404, {"error": "unknown path"})]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 1 and "unknown path" in capsys.readouterr().err
    assert no_packets == []


@pytest.mark.parametrize("result, flags, why", [
    ({"replied": (1,), "sent": 100}, ["--timeout", "1"], "--timeout"),           # cut short
    ({"sent": 0, "send_errors": 65536}, [], "could not be sent"),  # e.g. ENETUNREACH on each
], ids=["cut-short", "sends-failed"])
def test_an_incomplete_sweep_is_not_submitted(tmp_path, serve, monkeypatch, capsys, result,
                                              flags, why):
    incomplete = fake_result(LOOP, **result)
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(result=incomplete))
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", *flags)
    assert code == 1 and server.calls("POST", "/submit_result") == []
    assert len(server.calls("POST", "/release")) == 1 and spooled(tmp_path) == []
    assert why in capsys.readouterr().err


def test_ctrl_c_before_the_result_is_spooled_releases(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())

    def put(self, server, body, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(Spool, "put", put)
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 130 and server.calls("POST", "/submit_result") == []
    assert len(server.calls("POST", "/release")) == 1


def test_get_task_retries_when_the_server_is_down(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(500, {"error": "x"}), (503, b""), (200, task())],
                    ("POST", "/submit_result"): [OK]})
    code, sleeps = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0 and len(sleeps) == 2


def test_ctrl_c_mid_sweep_releases_and_exits_130(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(error=KeyboardInterrupt()))
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 130
    assert [b for _, _, b in server.calls("POST", "/release")] == [{"task_index": LOOP_TASK,
                                                                    "lease": "L1"}]
    assert server.calls("POST", "/submit_result") == [] and spooled(tmp_path) == []


def test_sigterm_mid_sweep_releases_and_exits_143(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(error=ping_client.Terminated()))
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8")
    assert code == 143 and len(server.calls("POST", "/release")) == 1
    assert "terminated" in capsys.readouterr().err


@pytest.mark.parametrize("once", [True, False])
def test_no_icmp_permission_releases_and_exits_1(tmp_path, serve, monkeypatch, capsys, once):
    error = icmp.IcmpPermissionError("run me with sudo")
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(error=error))
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, *(["--once"] if once else []), "--allow", "127.0.0.0/8")
    assert code == 1 and len(server.calls("POST", "/release")) == 1
    assert "run me with sudo" in capsys.readouterr().err


def test_a_failing_sweep_is_retried_in_loop_mode(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(error=OSError(100, "Network is down")))
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/release"): [OK]})
    sleep, waits = interrupt_after(3)
    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8", sleep=sleep)
    assert code == 130 and waits == sorted(waits)
    assert len(server.calls("POST", "/release")) == 3
    assert capsys.readouterr().err.count("Network is down") == 3
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 1 and len(server.calls("POST", "/release")) == 4


class FakeClock:
    """A clock that the client's sleep moves on."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        assert sum(self.sleeps) < 4 * ping_client.ONCE_PATIENCE, "the client never gave up"


def test_once_gives_up_on_a_silent_server_and_keeps_the_result(tmp_path, serve, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task())],
                    ("POST", "/submit_result"): [(503, {"error": "down"})]})
    clock = FakeClock()
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", sleep=clock.sleep,
                         clock=clock)
    assert code == 1 and len(spooled(tmp_path)) == 1
    assert ping_client.ONCE_PATIENCE <= sum(clock.sleeps) < ping_client.ONCE_PATIENCE + 61
    assert server.calls("POST", "/release") == []      # the result will still be submitted
    assert "sent at the next start" in capsys.readouterr().err
    server.script[("POST", "/submit_result")] = [OK]
    server.script[("GET", "/get_task")] = [(500, {"error": "down"})]
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", sleep=clock.sleep,
                         clock=clock)
    assert code == 1 and spooled(tmp_path) == []       # submitted first, then gave up on tasks


@pytest.mark.parametrize("progress, waits", [
    ({"available_tasks": 0, "in_progress": 0, "done_tasks": 1}, 0),   # the census is done
    ({"available_tasks": 0, "in_progress": 1, "done_tasks": 0}, 1),   # someone holds the last
])
def test_once_with_the_census_complete_exits_0(tmp_path, serve, monkeypatch, capsys, progress,
                                               waits):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, NO_TASK), (200, task())],
                    ("GET", "/get_progress"): [(200, progress)],
                    ("POST", "/submit_result"): [OK]})
    code, sleeps = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8")
    assert code == 0 and len(sleeps) == waits
    assert len(server.calls("POST", "/submit_result")) == waits
    assert ("census on this server is complete" in capsys.readouterr().err) is (not waits)


@pytest.mark.parametrize("progress, complete", [
    ({"available_tasks": 0, "in_progress": 0, "error_tasks": 0, "done_tasks": 3}, True),
    ({"available_tasks": 0, "in_progress": 0, "error_tasks": 2, "done_tasks": 1}, False),
    ({"available_tasks": 0, "in_progress": 1, "error_tasks": 0, "done_tasks": 2}, False),
], ids=["complete", "errored-tasks", "in-progress"])
@pytest.mark.parametrize("once", [False, True], ids=["loop", "once"])
def test_a_complete_census_ends_the_client_with_0_and_errored_tasks_are_not_done(
        tmp_path, serve, no_packets, capsys, progress, complete, once):
    server = serve({("GET", "/get_task"): [(200, NO_TASK)], ("GET", "/get_progress"): [(200, progress)]})
    sleep, waits = interrupt_after(2)
    code, _ = run_client(server, tmp_path, *(["--once"] if once else []), sleep=sleep)
    err = capsys.readouterr().err
    assert code == (0 if complete else 130) and no_packets == []
    assert ("the census on this server is complete" in err) is complete
    if not complete:
        assert ("in error, waiting for the operator" in err) is bool(progress["error_tasks"])


def test_the_summary_line_says_the_rate_and_the_cpu_per_probe():
    result = fake_result(LOOP, replied=range(100), excluded=range(65536 - 16, 65536), sent=2 * 65520,
                         rounds=2, send_seconds=13.104, cpu_seconds=1.3104, elapsed=21.1, kind="raw")
    line = ping_client.summary("task 32512 127.0.0.0/16", result)
    assert line == ("task 32512 127.0.0.0/16: 65,520 targets, 100 replied (0.2 %), 0 unreachable, "
                    "16 excluded; 131,040 probes in 13.1 s (10,000/s, raw socket), 21.1 s with the "
                    "cooldown; sweep CPU 1.31 s (10.0 us a probe, 0.66 s per 65,536 probes)")


class CoolingSweep(FakeSweep):
    """Sweeps whose cooldown does not end by itself: a wait for one to end is a Ctrl-C, the
    first `interrupts` times; after that every cooldown ends. The last probe of each is out
    at once, but the `sending`-th (1, 2, ...) is still being sent."""

    def __init__(self, interrupts=math.inf, sending=0):
        super().__init__()
        self.jobs, self.interrupts, self.left, self.sending = [], 0, interrupts, sending

    def start(self, targets, **kwargs):
        job = super().start(targets, **kwargs)
        self.jobs.append(job)
        job.done, job.all_sent = False, len(self.jobs) != self.sending
        return job

    def wait_for(self, predicate, timeout=None):
        if predicate():
            return True
        if self.interrupts < self.left:
            self.interrupts += 1
            raise KeyboardInterrupt
        for job in self.jobs:
            job.done = True
        return predicate()


def test_the_next_task_starts_while_the_last_cools_down_and_a_second_ctrl_c_releases_both(
        tmp_path, serve, monkeypatch, capsys):
    sweep = CoolingSweep()             # Ctrl-C at the first wait for a cooldown, and again at the next
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task(LOOP_TASK)), (200, task(LOOP_TASK + 1, lease="L2")),
                                           (200, NO_TASK)],
                    ("POST", "/release"): [OK]})
    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8")
    assert code == 130
    order = [(method, path) for method, path, _ in server.requests]
    assert order[:3] == [("GET", "/get_task")] * 3          # leased again while the first listened on
    assert server.calls("POST", "/submit_result") == []
    released = sorted((b["task_index"], b["lease"]) for _, _, b in server.calls("POST", "/release"))
    assert released == [(LOOP_TASK, "L1"), (LOOP_TASK + 1, "L2")]   # every lease in hand goes back
    assert all(job.cancelled for job in sweep.jobs) and spooled(tmp_path) == []
    assert sweep.interrupts == 2                    # the first one let both listen on
    assert "listening up to 8 s more for late replies to task(s) 32512, 32513" in capsys.readouterr().err


@pytest.mark.parametrize("answer, kept", [(OK, 0), ((503, {"error": "down"}), 1)], ids=["accepted", "server-down"])
def test_ctrl_c_gives_back_the_task_being_sent_and_submits_the_one_cooling_down(
        tmp_path, serve, monkeypatch, capsys, answer, kept):
    sweep = CoolingSweep(interrupts=1, sending=2)
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task(LOOP_TASK)), (200, task(LOOP_TASK + 1, lease="L2"))],
                    ("POST", "/release"): [OK], ("POST", "/submit_result"): [answer]})
    code, sleeps = run_client(server, tmp_path, "--allow", "127.0.0.0/8")
    assert code == 130 and sleeps == []                      # one try on the way out, no backoff
    [(_, _, body)] = server.calls("POST", "/submit_result")
    assert (body["task_index"], body["lease"]) == (LOOP_TASK, "L1")
    assert [(b["task_index"], b["lease"]) for _, _, b in server.calls("POST", "/release")] == [(LOOP_TASK + 1, "L2")]
    assert [job.cancelled for job in sweep.jobs] == [False, True]
    assert len(spooled(tmp_path)) == kept                    # a result the server did not take waits
    err = capsys.readouterr().err
    assert "listening up to 8 s more for late replies to task(s) 32512" in err
    assert ("the server did not answer" in err) is bool(kept)
    assert ("1 result(s) in" in err) is bool(kept)


def test_ctrl_c_while_waiting_for_the_last_cooldown_still_submits(tmp_path, serve, monkeypatch, capsys):
    sweep = CoolingSweep(interrupts=1)
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    server = serve({("GET", "/get_task"): [(200, task(LOOP_TASK)), (200, NO_TASK)],
                    ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8")
    assert code == 130 and server.calls("POST", "/release") == []
    [(_, _, body)] = server.calls("POST", "/submit_result")
    assert body["task_index"] == LOOP_TASK and spooled(tmp_path) == []
    err = capsys.readouterr().err
    assert err.index("waiting up to 8 s for late replies") < err.index("stopping: listening up to 8 s")


# --- first contact, checks before any lease, what the client tells the server -----------------

def test_a_server_never_reached_fails_fast_and_says_what_to_check(tmp_path, serve, no_packets,
                                                                capsys):
    server = serve({})
    server.shutdown()
    server.server_close()                          # connection refused from the first try on
    clock = FakeClock()
    code, _ = run_client(server, tmp_path, sleep=clock.sleep, clock=clock)
    assert code == 1 and no_packets == []
    assert ping_client.FIRST_CONTACT_PATIENCE <= clock.now - 1000 <= ping_client.FIRST_CONTACT_PATIENCE + 1
    err = capsys.readouterr().err
    assert f"cannot reach {server.url}: " in err and "(is the server running? is the URL right?)" in err


def test_a_server_that_answered_before_gets_the_patient_retry_and_the_spool(tmp_path, serve,
                                                                          monkeypatch, capsys):
    server = serve({("GET", "/get_task"): [(200, task())]})
    sweep = FakeSweep()
    real_start = sweep.start

    def start_then_lose_the_server(targets, **kwargs):
        server.shutdown()
        server.server_close()
        return real_start(targets, **kwargs)

    sweep.start = start_then_lose_the_server
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    clock = FakeClock()
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", sleep=clock.sleep,
                         clock=clock)
    assert code == 1 and len(spooled(tmp_path)) == 1           # kept for the next start
    assert clock.now - 1000 >= ping_client.ONCE_PATIENCE        # patient, not 30 s
    err = capsys.readouterr().err
    assert "cannot reach" not in err and "sent at the next start" in err


@pytest.mark.parametrize("status", [404, 200])
def test_a_web_server_that_is_not_a_census_server_fails_at_once(tmp_path, serve, no_packets,
                                                                capsys, status):
    server = serve({("GET", "/get_task"): [(status, b"<html><body>It works!</body></html>")]})
    server.content_type = "text/html; charset=utf-8"
    code, sleeps = run_client(server, tmp_path)
    assert code == 1 and sleeps == [] and no_packets == []
    err = capsys.readouterr().err
    assert f"{server.url} does not look like a census server (HTTP {status}, text/html)" in err
    assert "<html>" not in err


def test_no_icmp_permission_is_found_before_any_task_is_leased(tmp_path, serve, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(open_error=icmp.IcmpPermissionError("run me with sudo")))
    server = serve({("GET", "/get_task"): [(200, task())]})
    code, _ = run_client(server, tmp_path, "--allow", "127.0.0.0/8")
    assert code == 1 and server.requests == []
    assert "run me with sudo" in capsys.readouterr().err


def test_an_unusable_spool_folder_is_found_before_any_request(tmp_path, serve, no_packets, capsys):
    server = serve({("GET", "/get_task"): [(200, task())]})
    (tmp_path / "spool").write_text("a file, not a folder")
    code, _ = run_client(server, tmp_path)
    assert code == 1 and server.requests == []
    assert f"cannot use the spool folder {tmp_path / 'spool'}" in capsys.readouterr().err
    assert ping_client.main(["--server", server.url, "--spool", "/proc/no/such/folder"]) == 1
    assert "choose another with --spool DIR" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_scan_checks_its_output_file_before_any_probe(tmp_path, monkeypatch, capsys, where):
    sweep = FakeSweep()
    monkeypatch.setattr(icmp, "Sweeper", sweep)
    target = tmp_path / "no" / "such" / "out.csv" if where == "missing-folder" else tmp_path
    assert ping_client.main(["--scan", "127.0.0.0/30", "--allow", "127.0.0.0/8", "-o", str(target)]) == 1
    assert sweep.calls == [] and f"cannot write {target}" in capsys.readouterr().err


@pytest.mark.parametrize("only, query", [
    ([], "lease=required&name=tester"),
    (["--only", "127.0.0.0/9,127.128.0.0/9"],
     "lease=required&name=tester&within=127.0.0.0/9,127.128.0.0/9"),
])
def test_get_task_says_what_the_client_accepts(tmp_path, serve, monkeypatch, only, query):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", *only)
    assert code == 0
    assert [p for p in server.paths if p.startswith("/get_task")] == [f"/get_task?{query}"]


def test_without_a_name_a_stable_pseudonym_not_user_at_host(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep())
    server = serve({("GET", "/get_task"): [(200, task())], ("POST", "/submit_result"): [OK]})

    def name_sent(spool):
        ping_client.main(["--server", server.url, "--spool", str(spool), "--once",
                          "--allow", "127.0.0.0/8", "-q"], sleep=lambda s: None)
        return server.calls("POST", "/submit_result")[-1][2]["name"]

    first = name_sent(tmp_path / "a")
    assert re.fullmatch(r"volunteer-[0-9a-f]{8}", first)
    assert name_sent(tmp_path / "a") == first                 # stable: the id stays in the spool
    assert (tmp_path / "a" / ping_client.PSEUDONYM_FILE).exists()
    assert name_sent(tmp_path / "b") != first                 # another volunteer, another name
    assert socket.gethostname() not in first


def test_print_systemd_unit(tmp_path, serve, capsys):
    server = serve({})
    argv = ["--server", server.url, "--name", "alice", "--rate", "5000", "--cooldown", "60",
            "--print-systemd-unit"]
    assert ping_client.main(argv) == 0 and server.requests == []
    unit = capsys.readouterr().out
    assert "[Service]" in unit and "Restart=on-failure" in unit and "[Install]" in unit
    assert "TimeoutStopSec=90" in unit           # a stop waits for the last cooldown
    [command] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert command.endswith(f"ping_client.py --server {server.url} --name alice --rate 5000 "
                            f"--cooldown 60 --spool {ping_client.UNIT_SPOOL}")
    assert os.path.isabs(command.split("=", 1)[1].split()[0])
    with pytest.raises(SystemExit):
        ping_client.main(["--scan", "127.0.0.0/30", "--print-systemd-unit"])


@pytest.mark.parametrize("sent, carried, warned", [
    ("census@example.org", b"census@example.org ", False),
    ("x" * 41, b"", True),                                   # too long: left out
    ("caf\u00e9@example.org", b"", True),                    # not ASCII: left out
    ("line\nbreak", b"", True),                              # not printable: left out
])
def test_probes_carry_the_servers_contact_after_the_tag(tmp_path, serve, monkeypatch, capsys,
                                                         sent, carried, warned):
    fake = RecordingSocket()
    monkeypatch.setattr(icmp.IcmpSocket, "open", classmethod(lambda cls, *a, **kw: fake))
    server = serve({("GET", "/get_task"): [(200, task(contact=sent))], ("POST", "/submit_result"): [OK]})
    code, _ = run_client(server, tmp_path, "--once", "--allow", "127.0.0.0/8", "--only",
                         "127.0.0.0/24", "--rate", "0", "--cooldown", "0")
    assert code == 0 and len(fake.sent) == 256
    prefix = icmp.TAG + carried
    assert all(packet[8:].startswith(prefix) and len(packet) <= 8 + 66 for _, packet in fake.sent)
    assert all(packet[8 + len(icmp.Signer(contact=carried.strip()).prefix):][:4] == addr.to_bytes(4, "big")
               for addr, packet in fake.sent)
    err = capsys.readouterr().err
    assert ("probes carry the tag 'ipv4-census' and the contact 'census@example.org'" in err) is not warned
    assert ("was left out" in err) is warned


# --- standalone scan --------------------------------------------------------------------------

def test_scan_writes_zmap_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(icmp, "Sweeper", FakeSweep(replied=(1, 3)))
    out = tmp_path / "out.csv"
    assert ping_client.main(["--scan", "127.0.0.0/30", "--allow", "127.0.0.0/8",
                             "-o", str(out)]) == 0
    assert "2 replied" in capsys.readouterr().err
    assert out.read_text() == "saddr,rtt_ms\n127.0.0.1,0.101\n127.0.0.3,0.103\n"
    assert ping_client.main(["--scan", "127.0.0.0/30", "--allow", "127.0.0.0/8", "-o", "-",
                             "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == out.read_text() and captured.err == ""


def test_scan_refuses_reserved_space_without_allow(no_packets, capsys):
    assert ping_client.main(["--scan", "10.0.0.0/16", "-o", "-"]) == 2
    assert ping_client.main(["--scan", "127.0.0.0/16", "--allow", "10.0.0.0/8"]) == 2
    assert no_packets == []
    assert "refusing to scan 10.0.0.0/16" in capsys.readouterr().err


# --- command line and display -----------------------------------------------------------------

def test_help_explains_every_flag_with_its_default(capsys):
    parser = ping_client.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        ping_client.main(["--help"])
    assert exit_.value.code == 0
    assert "exit codes" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    [], ["--server", "http://x", "--scan", LOOP], ["--server", "x:8001"],
    ["--server", "http://x", "--rate", "-1"], ["--server", "http://x", "--probes", "0"],
    ["--server", "http://x", "-o", "f"], ["--scan", LOOP, "--once"],
    ["--scan", "127.0.0.1/16"], ["--server", "http://x", "--allow", "nonsense"],
    ["--server", "http://x", "-q", "-v"], ["--server", "http://x", "--rate", "inf"],
    ["--server", "http://x", "--timeout", "0"], ["--server", "http://x", "--cooldown", "nan"],
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_:
        ping_client.main(argv)
    assert exit_.value.code == 2


def test_defaults():
    args = ping_client.parse_args(["--server", "http://x"])
    assert (args.rate, args.probes, args.once, args.verbosity) == (10000, 1, False, 1)
    assert args.name is None and args.allow == [] and args.exclude == []
    assert args.cooldown == icmp.DEFAULT_COOLDOWN >= 5
    args = ping_client.parse_args(["--scan", LOOP, "--allow", "127.0.0.0/8,10.1.0.0/16",
                                   "10.2.0.0/16", "--allow", "10.3.0.0/16"])
    assert args.allow == [ipaddress.IPv4Network(n) for n in
                          ("127.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16")]


def test_progress_on_a_terminal_is_one_line():
    stream = io.StringIO()
    console = ping_client.Console(stream, tty=True, columns=lambda: 200)
    console.begin(LOOP)
    console.progress(icmp.Progress(16384, 65536, 1000, 0, 1.6, 10000.0))
    console.progress(icmp.Progress(32768, 65536, 2000, 0, 3.2, 10000.0))
    console.info("task done")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("task done\n")
    assert "\r127.0.0.0/16   50.0 %  10,000 probes/s  2,000 replies  ETA 3 s\x1b[K" in text


def test_progress_on_a_narrow_terminal_is_cut_not_wrapped():
    stream = io.StringIO()
    console = ping_client.Console(stream, tty=True, columns=lambda: 30)
    console.begin(LOOP)
    console.progress(icmp.Progress(32768, 65536, 2000, 0, 3.2, 10000.0))
    assert stream.getvalue() == "\r127.0.0.0/16   50.0 %  10,000\x1b[K"


def test_progress_off_a_terminal_is_plain_lines_now_and_then():
    stream, now = io.StringIO(), [0.0]
    console = ping_client.Console(stream, tty=False, clock=lambda: now[0])
    console.begin(LOOP)
    for sent in range(0, 65536, 4096):
        now[0] += 1.0
        console.progress(icmp.Progress(sent, 65536, 0, 0, now[0], 4096.0))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in stream.getvalue() and "127.0.0.0/16" in lines[0]


def test_quiet_shows_only_problems():
    stream = io.StringIO()
    console = ping_client.Console(stream, verbosity=0, tty=True)
    console.progress(icmp.Progress(1, 2, 0, 0, 1.0, 1.0))
    console.info("hello")
    console.warn("careful")
    assert stream.getvalue() == "warning: careful\n"


# --- in the lab: several tasks in a row with the default cooldown -----------------------------

def test_lab_tasks_in_a_row_overlap_their_cooldowns_and_end_on_a_complete_census(tmp_path, lab):
    """Four /16s at 40,000 probes/s (1.6 s of sending each) with the default 8 s cooldown,
    which their silent addresses keep running to the end: one after the other that would be
    ~39 s; overlapped, the sends follow each other closely and the whole census takes ~15 s."""
    net = lab(drop=True)
    server, url = _lab_server(net, tmp_path, "127.0.0.0/14")
    try:
        client = _lab_client(net, tmp_path, url, "--rate", "40000")
        assert client.wait() == 0, client.output()             # a loop that ends: the census is complete
        output = client.output()
        assert "the census on this server is complete" in output and "cooldown 8 s" in output
        waiting = [line for line in output.splitlines() if "waiting up to 8 s for late replies" in line]
        assert waiting and "32515" in waiting[-1]          # the last cooldown is not silence
        starts = [_stamp(line) for line in output.splitlines() if ": sweeping 127." in line]
        assert len(starts) == 4 and output.count("result accepted") == 4
        assert starts[-1] - starts[0] <= 3 * 1.64 * 2 + 3      # loose; one after the other: >= 29 s
        for index in range(32512, 32516):
            fetched = net.run([sys.executable, "-c", FETCH, f"{url}/result?id={index}"], check=True)
            stored = json.loads(fetched.stdout)["result_data"]
            base = index << 16
            alive = net.alive(ping_client.task_network(index))
            assert stored == "".join("1" if base + k in alive else "0" for k in range(65536))
    finally:
        server.stop()


def _lab_server(net, tmp_path, scope: str):
    """ping_server.py in the lab, scoped to `scope`: (the process, its URL)."""
    server = Proc([sys.executable, "-u", "ping_server.py", "--host", "127.0.0.1", "--port", "0",
                   "--scope", scope, "--data", str(tmp_path / "data")], popen=net.popen)
    return server, server.wait_for("listening on http://").split("listening on ", 1)[1].strip().rstrip("/")


def _lab_client(net, tmp_path, url: str, *flags):
    """A looping ping_client.py in the lab, probing only loopback."""
    return Proc([sys.executable, "-u", "ping_client.py", "--server", url, "--allow", "127.0.0.0/8",
                 "--only", "127.0.0.0/8", "--spool", str(tmp_path / "spool"), "--name", "lab", *flags],
                popen=net.popen)


def _stamp(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))


def test_lab_sigterm_gives_back_the_task_being_sent_and_submits_the_one_cooling_down(tmp_path, lab):
    """A real client, stopped (SIGTERM, as systemd does) while its second /16 is being sent:
    the first, all its probes out, listens to the end of its cooldown and its exact result
    is submitted; the second's lease goes back at once."""
    net = lab(drop=True)
    server, url = _lab_server(net, tmp_path, "127.0.0.0/15")
    try:
        client = _lab_client(net, tmp_path, url, "--rate", "10000", "--cooldown", "5")
        client.wait_for("task 32513: sweeping 127.1.0.0/16")
        client.proc.send_signal(signal.SIGTERM)
        assert client.wait() == 143, client.output()
        output = client.output()
        assert "listening up to 5 s more for late replies to task(s) 32512" in output
        assert "task 32512: result accepted" in output and "task 32513: lease released" in output
        fetched = net.run([sys.executable, "-c", FETCH, f"{url}/result?id=32512"], check=True)
        alive = net.alive(ping_client.task_network(32512))
        assert json.loads(fetched.stdout)["result_data"] == "".join(
            "1" if (32512 << 16) + k in alive else "0" for k in range(65536))
        progress = json.loads(net.run([sys.executable, "-c", FETCH, f"{url}/get_progress"], check=True).stdout)
        assert (progress["available_tasks"], progress["in_progress"]) == (1, 0)
    finally:
        server.stop()
