"""Tests of ping_server.py as a command: --demo, the start-up banner and shutdown line, --help,
start-up errors as one line, the /join line, pseudonyms, and the README's Quick start.

Servers here are subprocesses scoped to loopback (the demo to 127.0.0.0/16). The demo runs in
the loopback-only lab when root (else on the host's loopback, where unprivileged ICMP is
allowed); user nobody (setpriv) stands in for an ordinary user where root would be let through.
"""

import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import ping_server
import store
import views
from conftest import lab_missing, listening_port
from test_e2e import FETCH, Proc, procs  # noqa: F401 (procs: a fixture)
from test_server import submission
from test_icmp import NOBODY, _python_for_nobody, as_user

HERE = Path(__file__).resolve().parent
SERVER = str(HERE / "ping_server.py")
LOOP = ipaddress.IPv4Network("127.0.0.0/16")
LOOP_JOIN = ("curl -fO {origin}/ping.zip && unzip -o ping.zip && sudo python3 ping_client.py "
             "--server {origin} --allow 127.0.0.0/16 --only 127.0.0.0/16 --name YOUR_NAME")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PING_")}


def may_ping() -> bool:
    return ping_server._icmp_problem() == ""


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # even where the test runner ignores it


# -- the demo -------------------------------------------------------------------------------------

@pytest.fixture
def place(request):
    """Where the demo runs: (popen, fetch(url) -> JSON, live addresses of 127.0.0.0/16 or None
    for all), in the lab when it can be built, else on the host if this user may ping."""
    if not lab_missing():
        box = request.getfixturevalue("lab")(drop=True)
        return (box.popen,
                lambda url: json.loads(box.run([sys.executable, "-c", FETCH, url],
                                               check=True).stdout),
                len(box.alive(LOOP)))
    if not may_ping():
        pytest.skip("no lab here, and this user may not send ICMP on the host (the demo's "
                    "refusal is tested instead)")
    return subprocess.Popen, lambda url: json.load(urllib.request.urlopen(url, timeout=10)), None


def test_demo_does_its_block_serves_until_ctrl_c_and_cleans_up(place, procs):
    popen, fetch, alive = place
    demo = procs(Proc([sys.executable, "-u", SERVER, "--demo", "--port", "0"],
                      popen=lambda argv, **kw: popen(argv, preexec_fn=default_sigint, **kw)))
    url = demo.wait_for("listening on http://").split("listening on ", 1)[1].strip()
    folder = Path(demo.wait_for("data folder:").split(":", 1)[1].strip())
    assert url.startswith("http://127.0.0.1:") and folder.is_dir()
    assert "REAL" not in demo.output() and "nothing public" in demo.output()
    done = demo.wait_for("demo block 127.0.0.0/16 done in")
    progress = fetch(url + "get_progress")
    assert progress["done_tasks"] == progress["total_tasks"] == 1
    assert progress["responders"] == (alive or 65536)
    assert f"{progress['responders']:,} of 65,536 addresses answered" in done
    assert [c["name"] for c in fetch(url + "contributors")["contributors"]] == ["demo"]
    assert fetch(url + "join")["command"] == LOOP_JOIN
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait() == 0, demo.output()
    assert demo.closed                  # EOF on the pipe: the volunteer holds it no more
    assert f"demo stopped (Ctrl-C); its temporary folder {folder} is removed" in demo.output()
    assert not folder.exists()
    assert "Traceback" not in demo.output()


def test_demo_without_icmp_permission_says_how_to_enable_it(request):
    """For real: as user nobody, with unprivileged ICMP refused to every group (the lab's own
    sysctl); or as this user, where the host refuses it."""
    if not lab_missing():
        box = request.getfixturevalue("lab")(drop=True)
        box.run(["sysctl", "-qw", "net.ipv4.ping_group_range=1 0"], check=True)
        done = box.run(as_user(NOBODY, [_python_for_nobody(box), SERVER, "--demo"]), timeout=30)
    elif not may_ping():
        done = subprocess.run([sys.executable, SERVER, "--demo"], capture_output=True, text=True,
                              timeout=30)
    else:
        pytest.skip("no lab here and this user may send ICMP: nothing to refuse")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert 'sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"' in done.stderr
    assert "sudo python3 ping_server.py --demo" in done.stderr


def test_demo_takes_no_data_scope_or_host():
    for flags in (["--data", "/tmp/x"], ["--scope", "10.0.0.0/8"], ["--host", "0.0.0.0"]):
        with pytest.raises(SystemExit) as caught:
            ping_server._parse_args(["--demo", *flags])
        assert caught.value.code == 2


# -- banner, shutdown line --------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_one_banner_on_stderr_and_a_shutdown_line(tmp_path, stop):
    data = tmp_path / "data"
    server = subprocess.Popen([sys.executable, SERVER, "--host", "127.0.0.1", "--port", "0",
                               "--scope", "127.0.0.0/16", "--data", str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(), preexec_fn=default_sigint)
    try:
        lines = []
        for line in server.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        port = int(lines[-1].rsplit(":", 1)[1].strip(" /\n"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/join", timeout=10) as answer:
            assert json.load(answer)["command"] == LOOP_JOIN
        server.send_signal(stop)
        out, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    banner = "".join(lines)
    assert server.returncode == 0 and out == ""
    assert banner.startswith("ping_server.py: a census of reserved address space only")
    for field in ("scope:       127.0.0.0/16: 1 block of /16", f"data folder: {data}",
                  "lease:       600 s", "admin token: none", "listening on http://127.0.0.1:"):
        assert field in banner, field
    why = "SIGTERM" if stop == signal.SIGTERM else "Ctrl-C"
    assert err == f"ping_server.py: stopped ({why}); the census is kept in {data}\n"


def test_a_public_scope_is_announced_as_a_real_census():
    """The banner alone (no server on a public scope is ever started by a test)."""
    class Args:
        data, lease, admin_token = "/srv/census", 600.0, "secret"

    url = "http://0.0.0.0:8001/"
    for scope in (None, [], [ipaddress.IPv4Network("8.0.0.0/8")],
                  [ipaddress.IPv4Network("126.0.0.0/7")]):
        banner = ping_server._banner(url, scope, None, Args, 58000)
        assert banner.startswith("ping_server.py: a REAL census: its scope reaches public")
        assert "admin token: set" in banner and "data folder: /srv/census" in banner
        assert "lease:       600 s" in banner and "listening on http://0.0.0.0:8001/" in banner
        assert "opt-out contact" in banner
    assert "the public Internet" in ping_server._banner(url, [], None, Args, 58000)
    quiet = ping_server._banner(url, [LOOP, ipaddress.IPv4Network("10.1.0.0/16")],
                                [LOOP], Args, 2)
    assert "reserved address space only" in quiet and "REAL" not in quiet
    assert "(changed from 127.0.0.0/16)" in quiet


# -- --help, flags ------------------------------------------------------------------------------------

def test_help_shows_defaults_metavars_files_exit_codes_and_examples(capsys):
    with pytest.raises(SystemExit) as caught:
        ping_server._parse_args(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1].split("\n\n", 1)[0])[1:]
    assert len(options) >= 10
    for option in (" ".join(option.split()) for option in options):
        if not option.startswith("-h"):
            assert "(default: " in option, option
    for metavar in ("--host ADDR", "--port PORT", "--data DIR", "--scope CIDR[,CIDR]",
                    "--exclude FILE", "--lease SECONDS", "--admin-token TOKEN"):
        assert metavar in text
    for needed in ("census.json", "census.log", "census.scope", "census.key", "exit codes:",
                   "examples:", "ping_server.py --demo", "the public Internet", "8001", "8002"):
        assert needed in text, needed


@pytest.mark.parametrize("port", ["80000", "-1", "http", "65536"])
def test_a_port_out_of_range_exits_2(port, monkeypatch):
    with pytest.raises(SystemExit) as caught:
        ping_server._parse_args(["--port", port])
    assert caught.value.code == 2
    monkeypatch.setenv("PING_PORT", port)
    with pytest.raises(SystemExit) as caught:
        ping_server._parse_args([])
    assert caught.value.code == 2


# -- start-up errors: one line, exit 1 ------------------------------------------------------------

def start_fails(*args, user=None, run=subprocess.run) -> str:
    """ping_server.py's stderr where it must refuse to start: exit 1, no traceback, and a last
    line saying why (the store may say what it found first). `user`: run as that uid (with an
    interpreter it may run); `run`: e.g. a lab's."""
    argv = [sys.executable, SERVER, "--host", "127.0.0.1", "--scope", "127.0.0.0/16", *args]
    assert "--scope" not in args            # a test's server is always scoped to loopback
    if user is not None:
        host = type("Host", (), {"run": staticmethod(lambda a: subprocess.run(a, capture_output=True))})
        argv = as_user(user, [_python_for_nobody(host), *argv[1:]])
    done = run(argv, capture_output=True, text=True, timeout=30, env=clean_env())
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("ping_server.py: "), done.stderr
    return last


def test_a_taken_port_is_one_line_and_leaves_the_data_folder_untouched(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = start_fails("--port", str(port), "--data", str(tmp_path / "data"))
    assert f"cannot listen on 127.0.0.1:{port}: the port is taken" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("problem", ["a file", "a file on the way"])
def test_a_bad_data_folder_is_one_line(tmp_path, problem):
    (tmp_path / "file").write_text("not a folder")
    data = tmp_path / "file" / ("" if problem == "a file" else "data")
    assert str(data).rstrip("/") in start_fails("--port", "0", "--data", str(data))


def test_an_unwritable_data_folder_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    data = str(folder / "data")
    if os.geteuid() == 0:                        # root writes anywhere: as user nobody
        err = start_fails("--port", "0", "--data", data, user=NOBODY)
    else:
        err = start_fails("--port", "0", "--data", data)
    assert "data folder" in err or data in err


def test_a_privileged_port_is_one_line(request):
    if os.geteuid() != 0:
        err = start_fails("--port", "80", "--data", "/nonexistent/never-made")
    elif not lab_missing():                      # a fresh namespace: ports below 1024 privileged
        box = request.getfixturevalue("lab")(drop=False)
        err = start_fails("--port", "80", "--data", "/nonexistent/never-made", user=NOBODY,
                          run=box.run)
    else:
        pytest.skip("root, and no lab to be someone else in")
    assert "cannot listen on 127.0.0.1:80: ports below 1024 need root" in err


@pytest.mark.skipif(not hasattr(store, "StoreError"),
                    reason="needs store.py's folder lock and StoreError (issue 10)")
def test_a_folder_held_by_another_server_is_one_line(tmp_path):
    data = tmp_path / "data"
    first = subprocess.Popen([sys.executable, SERVER, "--host", "127.0.0.1", "--port", "0",
                              "--scope", "127.0.0.0/16", "--data", str(data)],
                             stderr=subprocess.PIPE, env=clean_env())
    try:
        listening_port(first.stderr)
        err = start_fails("--port", "0", "--data", str(data))
        assert str(first.pid) in err
    finally:
        first.kill()
        first.wait()


# -- join line, pseudonyms ----------------------------------------------------------------------------

def test_join_line_fits_the_scope(census_server):
    srv = census_server("127.0.0.0/16")
    srv.server.site = views.Site(scope=(LOOP,))
    assert srv.call("GET", "/join")[::2] == (200, {"command": LOOP_JOIN})
    public = ping_server.join_command(None)
    assert "--allow" not in public and "--only" not in public and "unzip -o" in public
    assert ping_server.join_command([]) == public
    assert ping_server.join_command([ipaddress.IPv4Network("0.0.0.0/0")]) == public
    assert ping_server.join_command([ipaddress.IPv4Network("8.0.0.0/8")]).endswith(
        "--server {origin} --only 8.0.0.0/8 --name YOUR_NAME")


def test_a_volunteer_without_a_name_gets_a_pseudonym_never_its_address(census_server, tmp_path):
    srv = census_server("127.0.0.0/15")
    for source in ("127.0.0.1", "127.0.0.2"):   # two addresses: the whole of 127/8 is local
        conn = http_from(srv.port, source)
        task = json.loads(call_on(conn, "GET", "/get_task"))
        body = submission(task["task_index"], [1], lease=task["lease"])
        assert json.loads(call_on(conn, "POST", "/submit_result", body)) == {"success": True}
    names = [c["name"] for c in srv.call("GET", "/contributors")[2]["contributors"]]
    expected = [ping_server.pseudonym(srv.server.pseudonym_key, a)
                for a in ("127.0.0.1", "127.0.0.2")]
    assert sorted(names) == sorted(expected) and len(set(names)) == 2
    assert all(re.fullmatch(r"volunteer-[0-9a-f]{8}", name) for name in names)
    (tmp_path / "keep").mkdir()
    key = ping_server.load_pseudonym_key(tmp_path / "keep")  # made once, then kept
    assert ping_server.load_pseudonym_key(tmp_path / "keep") == key
    assert (tmp_path / "keep" / "census.key").stat().st_mode & 0o777 == 0o600


def http_from(port, source):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.connect()
    except OSError as exc:                      # macOS configures only 127.0.0.1
        pytest.skip(f"cannot send from {source}: {exc}")
    return conn


def call_on(conn, method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body))
    return conn.getresponse().read()


# -- README: the Quick start ------------------------------------------------------------------------

def test_quick_start_is_the_demo_and_the_test_command_ci_runs():
    readme = (HERE / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    commands = [line.split("  #", 1)[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].endswith("python3 ping_server.py --demo")
    ci = (HERE / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci and "-rs" in commands[1].split()
    venv = re.search(r"python3 -m venv (\S+)", commands[1])[1]
    assert f"{venv}/" in (HERE / ".gitignore").read_text().split()
