"""pytest fixtures: a loopback-only ICMP lab in a network namespace of its own, and a census
server in a thread (with the fake clock and result strings the store and server tests share).

    def test_x(lab):
        box = lab(drop=True, unreach=False, loss=0.0)     # -> Lab, torn down after the test
        box.run(["python3", "icmp.py", ...])              # runs inside the namespace
        box.alive("127.0.0.0/16")                         # the addresses that should answer

`Lab.name` is the namespace (unique per test: pid + counter); `Lab.run(argv, **kw)` and
`Lab.popen(argv, **kw)` wrap subprocess.run / Popen with `ip netns exec NAME` in front (run
defaults to capture_output=True, text=True, timeout=120); `Lab.alive(network)` and
`Lab.unreachable(network)` are the expected sets as ints.

The namespace holds only `lo`, up, with only 127.0.0.1/8 (checked before the lab is handed
out), so nothing sent inside it can leave the machine. Rules in its iptables INPUT chain act
on echo requests only:
  drop     requests to 127.0.128.0/17 and to every address whose last octet % 7 == 0 vanish
           (28,032 of 127.0.0.0/16 answer)
  unreach  with drop: the "% 7" addresses outside 127.0.128.0/17 answer ICMP host-unreachable
           (the namespace's ICMP rate limit is lifted so every one does); still not alive
  loss     a further fraction (0..1) of requests dropped at random (-m statistic)

Marker: `needs_root` skips where we are not root. The `lab` fixture skips by itself where
root, `ip netns` or iptables is missing, saying which.

    def test_y(census_server):
        srv = census_server("127.0.0.0/16")  # -> Running: .port .store .clock .call(), stopped after
"""
import http.client
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import threading

import pytest

from ping_server import CensusServer
from store import Store

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
DEAD_BLOCK = ipaddress.IPv4Network("127.0.128.0/17")
DEAD_MOD = 7


class Lab:
    """One sealed namespace with a known dead set."""

    def __init__(self, name: str, drop: bool = True, unreach: bool = False, loss: float = 0.0):
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss is a fraction in [0, 1)")
        self.name, self.drop, self.unreach, self.loss = name, drop or unreach, unreach, loss
        self._children = []

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(self._wrap(argv), **kw)

    def popen(self, argv, **kw) -> subprocess.Popen:
        child = subprocess.Popen(self._wrap(argv), **kw)
        self._children.append(child)
        return child

    def alive(self, network) -> set:
        """Addresses of `network` that answer echo requests in this lab."""
        return {a for a in _addresses(network) if not self._dead(a)}

    def unreachable(self, network) -> set:
        """Addresses of `network` that answer with ICMP host-unreachable in this lab."""
        if not self.unreach:
            return set()
        return {a for a in _addresses(network) if a & 0xFF in _SEVENS and not _in_dead_block(a)}

    def up(self) -> "Lab":
        _must(["ip", "netns", "add", self.name])
        try:
            self._must(["ip", "link", "set", "lo", "up"])
            # REJECT answers are ICMP errors, globally rate limited per namespace: lift that
            self._must(["sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=10000000",
                        "net.ipv4.icmp_msgs_burst=1000000"])
            self.check_sealed()
            self._rules()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
                child.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def check_sealed(self) -> None:
        links = self._must(["ip", "-o", "link", "show"]).stdout.split("\n")
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in links if line)
        addrs = self._must(["ip", "-o", "-4", "addr", "show"]).stdout.split()
        v4 = [addrs[k + 1] for k, word in enumerate(addrs) if word == "inet"]
        if names != ["lo"] or v4 != ["127.0.0.1/8"]:
            raise RuntimeError(f"namespace {self.name} is not sealed: links {names}, IPv4 {v4}")

    def _rules(self) -> None:
        echo = ["iptables", "-w", "5", "-A", "INPUT", "-p", "icmp", "--icmp-type", "echo-request"]
        if self.drop:
            self._must(echo + ["-d", str(DEAD_BLOCK), "-j", "DROP"])
            verdict = ["-j", "REJECT", "--reject-with", "icmp-host-unreachable"] if self.unreach else ["-j", "DROP"]
            for k in range(0, len(_SEVENS), 10):   # xt_u32 takes at most 10 values per test
                octets = ",".join(map(str, _SEVENS[k:k + 10]))
                self._must(echo + ["-m", "u32", "--u32", f"16&0xFF={octets}"] + verdict)
        if self.loss:
            self._must(echo + ["-m", "statistic", "--mode", "random",
                               "--probability", f"{self.loss:.6f}", "-j", "DROP"])

    def _dead(self, addr: int) -> bool:
        return self.drop and (_in_dead_block(addr) or addr & 0xFF in _SEVENS)

    def _wrap(self, argv) -> list:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def _must(self, argv) -> subprocess.CompletedProcess:
        return _must(self._wrap(argv))


def lab_missing() -> str:
    """Why a lab cannot be built here ('' when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, raw sockets, iptables)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` for network namespaces"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` does not work here"
    if shutil.which("iptables") is None:
        return "needs iptables (apt-get install -y iptables)"
    return ""


def new_lab_name() -> str:
    return f"icmplab-{os.getpid()}-{next(_COUNTER)}"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_root: needs root (raw ICMP sockets)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_root") and os.geteuid() != 0:
        pytest.skip("needs root (raw ICMP sockets)")


@pytest.fixture
def lab():
    """A factory: lab(drop=True, unreach=False, loss=0.0) -> Lab, each torn down afterwards."""
    why = lab_missing()
    if why:
        pytest.skip(why)
    made = []

    def make(drop: bool = True, unreach: bool = False, loss: float = 0.0) -> Lab:
        box = Lab(new_lab_name(), drop=drop, unreach=unreach, loss=loss)
        made.append(box)
        return box.up()

    yield make
    for box in made:
        box.down()


class Clock:
    """A settable time.time()."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def result_string(ones=()) -> str:
    """A result: '1' at the indexes in `ones`, '0' elsewhere."""
    data = bytearray(b"0" * 65536)
    for k in ones:
        data[k] = ord("1")
    return data.decode()


class Running:
    """A CensusServer on ('127.0.0.1', 0) in a thread, with its store and clock."""

    def __init__(self, data_dir, scope, clock, lease_seconds, store_kw=None, **server_kw):
        self.clock = clock
        self.store = Store(data_dir, scope=[ipaddress.IPv4Network(scope)], clock=clock,
                           lease_seconds=lease_seconds, **(store_kw or {}))
        self.server = CensusServer(("127.0.0.1", 0), self.store, **server_kw)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def call(self, method, path, body=None, headers=None):
        """(status, response, JSON or bytes) on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            return answer(conn, method, path, body, headers)
        finally:
            conn.close()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.store.close()


def listening_port(stream, drain=True) -> int:
    """The port of a ping_server.py subprocess, from the "listening on http://HOST:PORT/" line
    of its banner (stderr, bytes or text); with `drain` the rest of the stream is then read and
    dropped in a thread, so that the server never blocks on a full pipe (else the caller reads
    it). AssertionError if the stream ends first."""
    seen = []
    for line in stream:
        text = line.decode() if isinstance(line, bytes) else line
        seen.append(text)
        if "listening on http://" in text:
            if drain:
                threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
            return int(text.rsplit(":", 1)[1].strip().rstrip("/"))
    raise AssertionError("the server did not start:\n" + "".join(seen))


def answer(conn, method, path, body=None, headers=None):
    """One request on `conn`: (status, response, JSON or bytes); a dict or list body as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    if response.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return response.status, response, data


@pytest.fixture
def census_server(tmp_path):
    """A factory: census_server(scope="127.0.0.0/8", clock=Clock(), lease_seconds=60,
    store_kw=None (more Store options), static_dir=tmp_path, **CensusServer options) ->
    Running, each stopped afterwards."""
    made = []

    def make(scope="127.0.0.0/8", *, clock=None, lease_seconds=60, store_kw=None,
             **server_kw) -> Running:
        server_kw.setdefault("static_dir", tmp_path)
        running = Running(tmp_path / f"data{len(made)}", scope, clock or Clock(), lease_seconds,
                          store_kw, **server_kw)
        made.append(running)
        return running

    yield make
    for running in made:
        running.stop()


_COUNTER = itertools.count()
_SEVENS = tuple(range(0, 256, DEAD_MOD))


def _in_dead_block(addr: int) -> bool:
    return int(DEAD_BLOCK.network_address) <= addr <= int(DEAD_BLOCK.broadcast_address)


def _addresses(network) -> range:
    net = ipaddress.IPv4Network(network, strict=False)
    if not net.subnet_of(LOOPBACK):
        raise ValueError(f"the lab only knows 127.0.0.0/8, not {net}")
    return range(int(net.network_address), int(net.broadcast_address) + 1)


def _must(argv) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done
