"""A real nginx in front of the server, with the site config from README.md (its listen and
upstream lines pointed at loopback ports): volunteers are seen with their forwarded address,
/events streams through unbuffered, token-less admin is refused for a forwarded client.
Skips, saying why, where nginx is not installed (.ci/run installs it with apt-get)."""

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import result_string

HERE = Path(__file__).resolve().parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
VOLUNTEER = "127.0.0.5"             # the test's source address, as nginx sees it


def site_config(upstream_port: int, listen_port: int) -> str:
    """The README's nginx block, on loopback ports and without TLS."""
    readme = (HERE / "README.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", readme, re.S)[1]
    block = block.replace("server 127.0.0.1:8001;", f"server 127.0.0.1:{upstream_port};")
    return re.sub(r"listen 443 ssl;.*", f"listen 127.0.0.1:{listen_port};", block)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def behind_nginx(census_server, tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/run installs it with apt-get)")
    running = census_server(proxies=["127.0.0.1"])
    port = free_port()
    temp = {name: tmp_path / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\nevents {{}}\nhttp {{\naccess_log off;\n"
        + "".join(f"{name}_temp_path {path};\n" if name != "body" else
                  f"client_body_temp_path {path};\n" for name, path in temp.items())
        + site_config(running.port, port) + "}\n")
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(conf), "-e",
                              str(tmp_path / "error.log")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if nginx.poll() is not None or time.monotonic() > deadline:
                nginx.kill()
                pytest.fail(f"nginx did not start: {nginx.stderr.read().decode()}"
                            f"{(tmp_path / 'error.log').read_text()}")
            time.sleep(0.05)
    yield running, port
    nginx.terminate()
    nginx.wait(10)


def through(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(VOLUNTEER, 0))
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data.startswith((b"{", b"[")) else data)


def test_volunteers_seen_with_their_forwarded_address(behind_nginx):
    running, port = behind_nginx
    seen = []
    leased = running.store.get_task
    running.store.get_task = lambda who, **options: seen.append(who) or leased(who)
    status, task = through(port, "GET", "/get_task")
    assert status == 200 and seen == [VOLUNTEER]
    submission = {"task_index": task["task_index"], "lease": task["lease"],
                  "result": {"success": True, "result_data": result_string()}}
    assert through(port, "POST", "/submit_result", submission) == (200, {"success": True})


def test_events_stream_through_nginx(behind_nginx):
    running, port = behind_nginx
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = b""
        while b"event: update" not in got:
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in got
        status, task = through(port, "GET", "/get_task")
        submission = {"task_index": task["task_index"], "lease": task["lease"],
                      "result": {"success": True, "result_data": result_string()}}
        assert through(port, "POST", "/submit_result", submission)[0] == 200
        while b'"done_tasks":1' not in got:             # arrives while the stream stays open
            chunk = sock.recv(65536)
            assert chunk, "the stream ended"
            got += chunk


def test_token_less_admin_is_refused_for_a_forwarded_client(behind_nginx):
    running, port = behind_nginx
    assert through(port, "GET", "/error/reset?id=-1")[0] == 403
    assert through(port, "GET", "/error/reset?id=-1", headers={"Host": "localhost"})[0] == 403
    assert running.call("GET", "/error/reset?id=-1")[0] == 200       # straight to it: allowed
