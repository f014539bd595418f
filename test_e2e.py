"""End to end: the real ping_server.py and ping_client.py as subprocesses, on loopback only.

The server is scoped to 127.0.0.0/16 (task 32512) and the client is allowed into 127.0.0.0/8,
so every probe goes to the host's own `lo` or to the `lo` of the lab's network namespace; the
client is also told to probe nothing outside 127.0.0.0/8 (`--only`), whatever a server says.
Needs root (raw ICMP sockets); the lab test also needs `ip netns` and iptables (conftest.py).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

import ping_client

HERE = os.path.dirname(os.path.abspath(__file__))
LOOP = "127.0.0.0/16"
LOOP_TASK = 32512
WAIT = 30.0             # seconds any one step may take before the test gives up

pytestmark = pytest.mark.needs_root        # conftest.py skips it, saying so, when not root

FETCH = ("import sys, urllib.request\n"
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n")


class Proc:
    """A subprocess whose output lines a thread collects, so a test can wait for a line."""

    def __init__(self, argv, popen=subprocess.Popen):
        self.proc = popen(argv, cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
        self.lines, self.closed, self._seen = [], False, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.closed = True
            self._seen.notify_all()

    def wait_for(self, text: str) -> str:
        """The first output line containing `text` (waiting for it), or fail with the output."""
        with self._seen:
            self._seen.wait_for(lambda: self.closed or any(text in line for line in self.lines),
                                timeout=WAIT)
            for line in self.lines:
                if text in line:
                    return line
            pytest.fail(f"no {text!r} from {self.proc.args}:\n{self.output()}")

    def wait(self) -> int:
        """The exit code, once all the output is in."""
        code = self.proc.wait(timeout=WAIT)
        with self._seen:
            self._seen.wait_for(lambda: self.closed, timeout=WAIT)
        return code

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Server(Proc):
    """ping_server.py scoped to 127.0.0.0/16, its data in `data`."""

    def __init__(self, data, port=0, popen=subprocess.Popen):
        super().__init__([sys.executable, "-u", "ping_server.py", "--host", "127.0.0.1",
                          "--port", str(port), "--scope", LOOP, "--data", str(data)], popen)
        line = self.wait_for("listening on http://")
        self.url = line.split("listening on ", 1)[1].strip().rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])


@pytest.fixture
def procs():
    started = []

    def track(proc):
        started.append(proc)
        return proc

    yield track
    for proc in started:
        proc.stop()


def client_argv(url, tmp_path, *flags):
    """The client for one task, kept to loopback by its own --only; two probes a target, so a
    reply lost on a busy machine is asked again rather than read as silence."""
    return [sys.executable, "-u", "ping_client.py", "--server", url, "--once",
            "--allow", "127.0.0.0/8", "--only", "127.0.0.0/8", "--probes", "2",
            "--spool", str(tmp_path / "spool"), "--name", "e2e", *flags]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_loopback_census(tmp_path, procs):
    server = procs(Server(tmp_path / "data"))
    client = procs(Proc(client_argv(server.url, tmp_path, "--rate", "0", "--cooldown", "0.5")))
    assert client.wait() == 0, client.output()
    result = get(f"{server.url}/result?id={LOOP_TASK}")
    assert result["result_data"] == "1" * 65536
    assert len(ping_client.decode_rtt(result["rtt_us"])) == 65536
    assert result["contributor"] == "e2e"
    assert get(f"{server.url}/task?id={LOOP_TASK}")["state"] == 2
    assert os.listdir(tmp_path / "spool") == []


@pytest.mark.parametrize("profile", [{"drop": True}, {"unreach": True}], ids=["drop", "unreach"])
def test_lab_census_matches_the_live_set(tmp_path, procs, lab, profile):
    net = lab(**profile)             # unreach: the "% 7" addresses answer host-unreachable
    server = procs(Server(tmp_path / "data", popen=net.popen))
    client = procs(Proc(client_argv(server.url, tmp_path, "--rate", "0", "--cooldown", "0.5"),
                        popen=net.popen))
    assert client.wait() == 0, client.output()
    # The host cannot reach the namespace's loopback: read the result from inside it.
    fetched = net.run([sys.executable, "-c", FETCH, f"{server.url}/result?id={LOOP_TASK}"],
                      capture_output=True, text=True, check=True)
    stored = json.loads(fetched.stdout)["result_data"]
    alive = net.alive(ping_client.task_network(LOOP_TASK))
    base = int(ping_client.task_network(LOOP_TASK).network_address)
    expected = "".join("1" if base + k in alive else "0" for k in range(65536))
    assert stored.count("1") == len(alive)
    assert stored == expected


def test_server_killed_mid_task_result_lands_once(tmp_path, procs):
    server = procs(Server(tmp_path / "data"))
    client = procs(Proc(client_argv(server.url, tmp_path, "--rate", "20000",
                                    "--cooldown", "0.5")))
    client.wait_for(f"task {LOOP_TASK}: sweeping")            # the client holds the lease
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    client.wait_for("retrying")                               # its submission failed
    server = procs(Server(tmp_path / "data", port=server.port))
    assert client.wait() == 0, client.output()
    assert client.output().count("result accepted") == 1
    assert get(f"{server.url}/result?id={LOOP_TASK}")["result_data"] == "1" * 65536
    assert get(f"{server.url}/get_progress")["done_tasks"] == 1
    [me] = get(f"{server.url}/contributors?name=e2e")["contributors"]
    assert me["tasks_done"] == 1


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_mid_sweep_releases_the_lease(tmp_path, procs, signum, code):
    server = procs(Server(tmp_path / "data"))
    client = procs(Proc(client_argv(server.url, tmp_path, "--rate", "500")))  # ~2 min sweep
    client.wait_for(f"task {LOOP_TASK}: sweeping")       # from here on the task is given back
    assert get(f"{server.url}/task?id={LOOP_TASK}")["state"] == 1
    client.proc.send_signal(signum)
    assert client.wait() == code, client.output()
    assert "lease released" in client.output()
    assert get(f"{server.url}/task?id={LOOP_TASK}")["state"] == 0
    assert get(f"{server.url}/get_task")["task_index"] == LOOP_TASK
