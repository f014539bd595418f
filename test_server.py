"""Tests of ping_server.py over real loopback sockets: the original API verbatim, the new
endpoints, leases, admin rules, bad input, and a kill -9 in the middle of a burst."""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

import ping_server
from conftest import answer, listening_port, result_string
from ping_server import HttpError, check_admin, is_loopback

LOOP = 32512
HERE = Path(__file__).resolve().parent


def raw_exchange(port, data: bytes) -> tuple[int, dict]:
    """Send raw bytes; (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())


def submission(task, ones=(), **extra):
    return {"task_index": task, "result": {"success": True, "result_data": result_string(ones)},
            **extra}


@pytest.fixture
def srv(census_server):
    return census_server()


# -- the original API, verbatim -------------------------------------------------------------------

def test_original_volunteer_cycle_with_string_index(srv):
    status, _, task = srv.call("GET", "/get_task")
    assert status == 200 and task["task_status"] == 1 and isinstance(task["task_index"], int)
    assert task["network"] == "127.0.0.0/16" and task["lease_seconds"] == 60
    assert set(task) == {"task_index", "task_status", "lease", "deadline", "lease_seconds",
                         "network", "exclude"}
    body = submission(str(task["task_index"]), [1, 2, 3])         # no lease: by address
    assert srv.call("POST", "/submit_result", body)[::2] == (200, {"success": True})
    assert srv.call("POST", "/submit_result", body)[::2] == (200, {"success": True,
                                                                   "duplicate": True})
    status, _, got = srv.call("GET", f"/result?id={task['task_index']}")
    assert status == 200 and got["result_data"] == result_string([1, 2, 3])
    assert got["contributor"].startswith("volunteer-") and got["rtt_us"] is None   # no address


def test_original_read_endpoints(srv):
    assert srv.call("GET", "/ping")[::2] == (200, {})
    _, _, task = srv.call("GET", "/get_task")
    assert srv.call("GET", "/get_pending")[2] == {str(task["task_index"]): 1}
    assert srv.call("GET", "/get_latest_task")[2] == {"task_index": LOOP + 255, "task_status": 0}
    progress = srv.call("GET", "/get_progress")[2]
    assert {"progress", "done_tasks", "total_tasks", "in_progress", "error_tasks",
            "excluded_tasks", "available_tasks", "addresses_probed", "responders",
            "tasks_per_min", "probes_per_min", "eta_seconds", "contributors",
            "version", "verified_tasks", "unverified_tasks", "checks_waiting", "disputed_tasks",
            "verified_share", "verify_fraction"} == set(progress)
    assert (progress["total_tasks"], progress["in_progress"]) == (256, 1)
    assert set(srv.call("GET", "/rate")[2]) == {"rate", "submissions_last_hour"}
    assert srv.call("GET", "/healthz")[::2] == (200, {"status": "ok"})


def test_none_left_keeps_the_original_answer(census_server):
    running = census_server("127.0.0.0/16")
    assert running.call("GET", "/get_task")[2]["task_index"] == LOOP
    assert running.call("GET", "/get_task")[::2] == (200, {"error": "No tasks available"})
    none_left = (200, {"error": "No tasks available"})
    assert running.call("GET", "/get_latest_task")[::2] == none_left


def test_bad_result_goes_to_error_list_and_page_escapes(srv):
    _, _, task = srv.call("GET", "/get_task")
    body = submission(task["task_index"], lease=task["lease"])
    body["result"]["result_data"] = "01" * 100
    status, _, got = srv.call("POST", "/submit_result", body)
    assert status == 400 and got["success"] is False and "65536" in got["error"]
    assert srv.call("GET", "/error")[2] == [{"task_index": task["task_index"],
                                             "error": got["error"]}]
    _, _, again = srv.call("GET", "/get_task")
    hostile = {"task_index": again["task_index"], "lease": again["lease"],
               "result": {"success": False, "error": "<script>alert(1)</script>"}}
    assert srv.call("POST", "/submit_result", hostile)[0] == 400
    status, response, page = srv.call("GET", "/errors")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in page and b"<script>" not in page
    assert srv.call("GET", "/error/reset?id=-1")[::2] == (200, {"success": True, "reset": 2})


def test_admin_endpoints_from_loopback_without_token(srv):
    status, _, got = srv.call("POST", "/add_task", {"task_status": 0})
    assert (status, got) == (200, {"success": True, "task_index": 256})   # 1.0.0.0/16
    status, _, got = srv.call("POST", "/add_task", {"task_status": 1, "task_index": "300"})
    assert (status, got) == (200, {"success": True, "task_index": 300})
    assert srv.call("GET", "/task?id=300")[2]["state"] == 1
    status, _, got = srv.call("POST", "/add_task", {"task_status": 0, "task_index": 300})
    assert status == 409 and "error" in got
    assert srv.call("GET", f"/revise?id={LOOP}&code=2&force=0")[::2] == (
        200, {"success": True, "task_index": LOOP, "task_status": 2})
    _, _, task = srv.call("GET", "/get_task")
    assert srv.call("GET", f"/revise?id={task['task_index']}&code=0")[0] == 409
    assert srv.call("GET", f"/revise?id={task['task_index']}&code=0&force=1")[0] == 200
    assert srv.call("GET", f"/revise?id={LOOP}&code=0")[0] == 409      # done: would discard it
    assert srv.call("GET", f"/revise?id={LOOP}&code=0&force=1")[0] == 200


def test_admin_token_required_even_from_loopback(census_server):
    running = census_server(admin_token="s3cret")
    assert running.call("POST", "/add_task", {"task_status": 0})[0] == 401
    bad = {"Authorization": "Bearer wrong"}
    for method, path in (("POST", "/add_task"), ("GET", "/revise?id=1&code=0"),
                         ("GET", "/error/reset?id=-1")):
        status, _, got = running.call(method, path, {"task_status": 0}, headers=bad)
        assert status == 403 and "error" in got
    good = {"Authorization": "Bearer s3cret"}
    assert running.call("POST", "/add_task", {"task_status": 1}, headers=good)[0] == 200


def test_loopback_rule_through_the_address_check():
    for client in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(client)
        check_admin(None, None, client)
    for client in ("192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "", "garbage"):
        assert not is_loopback(client)
        with pytest.raises(HttpError) as caught:
            check_admin(None, None, client)
        assert caught.value.status == 403
    check_admin("t", "Bearer t", "192.0.2.1")             # a token works from anywhere
    with pytest.raises(HttpError):
        check_admin("t", "Basic t", "127.0.0.1")
    check_admin(None, None, "127.0.0.1", "same-origin")
    check_admin(None, None, "127.0.0.1", "none")           # typed in the address bar
    for site in ("cross-site", "same-site"):              # a page elsewhere firing a GET at us
        with pytest.raises(HttpError) as caught:
            check_admin("t", "Bearer t", "127.0.0.1", site)
        assert caught.value.status == 403


# -- leases over HTTP -----------------------------------------------------------------------------

def test_64_concurrent_get_task_get_64_tasks(srv):
    got, barrier = [], threading.Barrier(64)

    def take():
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
        barrier.wait()
        got.append(answer(conn, "GET", "/get_task")[2]["task_index"])
        conn.close()

    threads = [threading.Thread(target=take) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 64 and len(set(got)) == 64


def test_lease_expiry_late_duplicate_forged_and_wrong_token(census_server):
    running = census_server("127.0.0.0/16")
    _, _, first = running.call("GET", "/get_task")
    forged = submission(LOOP, lease="forged-token")
    assert running.call("POST", "/submit_result", forged)[0] == 403
    assert running.call("POST", "/release", {"task_index": LOOP, "lease": "x"})[0] == 403
    running.clock.now += 61                              # the lease expires, lazily
    _, _, second = running.call("GET", "/get_task")
    assert second["task_index"] == LOOP and second["lease"] != first["lease"]
    late = submission(LOOP, [9], lease=first["lease"], name="late")
    assert running.call("POST", "/submit_result", late)[::2] == (200, {"success": True})
    assert running.call("POST", "/submit_result", late)[2]["duplicate"] is True
    status, _, got = running.call("POST", "/submit_result",
                                  submission(LOOP, lease=second["lease"]))
    assert (status, got["success"]) == (409, False)
    assert running.call("GET", f"/result?id={LOOP}")[2]["contributor"] == "late"
    assert running.call("GET", "/metrics")[2].count(b"census_leases_expired_total 1") == 1


def test_release_puts_the_task_back(srv):
    _, _, task = srv.call("GET", "/get_task")
    body = {"task_index": str(task["task_index"]), "lease": task["lease"]}
    assert srv.call("POST", "/release", body)[::2] == (200, {"success": True})
    assert srv.call("GET", "/get_task")[2]["task_index"] == task["task_index"]


# -- new endpoints --------------------------------------------------------------------------------

def test_map_task_contributors_export(srv):
    _, _, task = srv.call("GET", "/get_task")
    body = submission(task["task_index"], [0, 258], lease=task["lease"], name="alice")
    srv.call("POST", "/submit_result", body)
    status, response, data = srv.call("GET", "/map")
    assert status == 200 and len(data) == 131072
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert data[2 * LOOP:2 * LOOP + 2] == bytes([2, 1]) and data[0] == 4
    assert data[2 * (LOOP + 1)] == 0
    etag = response.getheader("ETag")
    assert srv.call("GET", "/map", headers={"If-None-Match": etag})[0] == 304
    info = srv.call("GET", f"/task?id={LOOP}")[2]
    assert (info["state"], info["state_name"], info["contributor"], info["responders"]) == (
        2, "done", "alice", 2)
    people = srv.call("GET", "/contributors")[2]["contributors"]
    assert [(p["rank"], p["name"], p["tasks_done"], p["responders"]) for p in people] == [
        (1, "alice", 1, 2)]
    assert srv.call("GET", "/contributors?name=alice")[2]["contributors"][0]["name"] == "alice"
    status, response, data = srv.call("GET", "/export.csv")
    assert response.getheader("Content-Type").startswith("text/csv")
    assert data == b"saddr\n127.0.0.0\n127.0.1.2\n"


def test_ping_zip_and_dashboard(srv, tmp_path):
    assert srv.call("GET", "/ping.zip")[0] == 404                # files not beside it yet
    (tmp_path / "ping_client.py").write_text("# client\n")
    (tmp_path / "icmp.py").write_text("# engine\n")
    status, response, data = srv.call("GET", "/ping.zip")
    assert status == 200 and response.getheader("Content-Type") == "application/zip"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.read("icmp.py") == b"# engine\n"
        assert sorted(archive.namelist()) == ["icmp.py", "ping_client.py"]
    status, response, page = srv.call("GET", "/")
    assert status == 200 and b"<html" in page                    # the fallback page
    (tmp_path / "dashboard.html").write_text("<html>dash</html>")
    assert srv.call("GET", "/")[2] == b"<html>dash</html>"


# -- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("POST", "/submit_result", "not json", 400),
    ("POST", "/submit_result", "[1, 2]", 400),
    ("POST", "/submit_result", {"task_index": "abc", "result": {}}, 400),
    ("POST", "/submit_result", {"task_index": 1.5, "result": {}}, 400),
    ("POST", "/submit_result", {"task_index": True, "result": {}}, 400),
    ("POST", "/submit_result", {"task_index": "-1", "result": {}}, 400),
    ("POST", "/submit_result", {"task_index": 99999999, "result": {"success": True}}, 404),
    ("POST", "/submit_result", {"task_index": LOOP, "result": "yes"}, 400),
    ("POST", "/submit_result", {"task_index": LOOP, "result": {}, "lease": 5}, 400),
    ("POST", "/submit_result", {"task_index": LOOP, "result": {}, "stats": []}, 400),
    ("POST", "/submit_result", submission(LOOP, lease="\u00e9t\u00e9"), 403),
    ("POST", "/release", {"task_index": LOOP, "lease": "\u00e9"}, 409),
    ("POST", "/submit_result", '{"task_index": ' + "[" * 100000, 400),
    ("POST", "/release", {"task_index": None}, 400),
    ("POST", "/add_task", {"task_status": 7}, 400),
    ("POST", "/add_task", {"task_status": "x"}, 400),
    ("GET", "/nope", None, 404),
    ("POST", "/get_task", None, 405),
    ("DELETE", "/ping", None, 405),
    ("GET", "/result?id=abc", None, 400),
    ("GET", "/result", None, 400),
    ("GET", f"/result?id={LOOP}", None, 404),
    ("GET", "/task?id=99999999", None, 404),
    ("GET", "/contributors?name=nobody", None, 404),
    ("GET", "/revise?id=1&code=9", None, 400),
    ("GET", "/revise?id=1&code=", None, 400),
    ("GET", "/error/reset?id=x", None, 400),
    ("GET", "/error/reset", None, 400),
    ("GET", "/get_task?" + "a" * 9000, None, 414),
]


@pytest.mark.parametrize("method,path,body,status", BAD_REQUESTS)
def test_bad_input_gets_4xx_json(srv, method, path, body, status):
    got_status, response, got = srv.call(method, path, body)
    assert got_status == status and isinstance(got, dict) and isinstance(got["error"], str)
    assert srv.call("GET", "/ping")[::2] == (200, {})


RAW_BAD = [
    (b"GET /ping HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /submit_result HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /submit_result HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /ping HTTP/9.9\r\n\r\n", 505),
    (b"GET http://[bad/ping HTTP/1.1\r\n\r\n", 400),
    (b"GET /ping\r\n\r\n", 400),                                       # HTTP/0.9
    (b"GET /ping HTTP/0.9\r\n\r\n", 505),
    (b"GET /ping HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nX-A: a\rContent-Length: 2\r\n\r\n", 400),        # a bare CR
    (b"GET /ping HTTP/1.1\r\nX\x00: a\r\n\r\n", 400),
    (b"POST /release HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n2\r\n{}\r\n", 411),
    (b"POST /release HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}", 413),
    (b"POST /release HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"2\r\n\r\n{}", 400),
    (b"POST /release HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\n{}", 400),
    (b"POST /release HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}", 400),
    (b"GET /ping HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\n" + b"X-A: a\r\n" * 101 + b"\r\n", 431),
    (b"GET /ping HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", 431),
]


@pytest.mark.parametrize("data,status", RAW_BAD)
def test_protocol_errors_are_json(srv, data, status):
    got_status, got = raw_exchange(srv.port, data)
    assert got_status == status and "error" in got
    assert srv.call("GET", "/ping")[0] == 200


SUBMISSIONS = [
    # (body, result_data as the handler sees it): bytes when taken out undecoded
    (b'{"task_index":1,"result":{"success":true,"result_data":"0110"}}', b"0110"),
    (b'{"task_index":1,"result":{"result_data":"01\\u0030","success":true}}', "010"),
    (b'{"result":{"result_data":"00","result_data" : "11"}}', "11"),          # last one wins
    (b'{"result":{"result_data" : "11","result_data":"00"}}', b"00"),
    (b'{"stats":{"result_data":"00"},"result":{"result_data" : "11"}}', "11"),
    (b'{"result_data":"00","result":{"result_data":""}}', ""),               # the key twice
    (b'{"result":{"result_data":"\\u0000"}}', "\0"),
    (b'{"result":{"result_data":"01"},"name":"a\\"b"}', "01"),              # a backslash
    (b'{"result":{"result_data":"0\xc3\xa91"}}', "0\u00e91"),                 # not ASCII
]


@pytest.mark.parametrize("body,expected", SUBMISSIONS)
def test_submission_decodes_as_json_would(body, expected):
    data = ping_server._submission(body)
    assert data["result"]["result_data"] == expected
    as_json = json.loads(body)
    as_json["result"]["result_data"] = expected
    assert data == as_json


def test_submission_refuses_what_json_refuses():
    for body in (b'{"result":{"result_data":"01"', b'["result_data":"01"]', b"[1]"):
        with pytest.raises(HttpError) as caught:
            ping_server._submission(body)
        assert caught.value.status == 400


def test_expect_continue_keep_alive_and_http_1_0(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /release HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 17\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b'{"task_index":-1}')
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 404 and json.loads(response.read())["error"] == "no such task"
        sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")         # 1.0: answered, then closed
        answer = b"".join(iter(lambda: sock.recv(4096), b""))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in answer


def exchange(port, data: bytes) -> bytes:
    """Send raw bytes, end the sending side, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_half_a_request_is_never_acted_on(srv):
    _, _, task = srv.call("GET", "/get_task")
    body = submission(task["task_index"], lease=task["lease"])
    body["result"]["result_data"] = "01"
    assert srv.call("POST", "/submit_result", body)[0] == 400            # one error listed
    for cut in (b"GET /error/reset?id=-1 HTTP/1.1", b"GET /error/reset?id=-1 HTTP/1.1\r\nX: a",
                b"GET /ping HTTP/1.1\r\nX: a\r\n"):
        assert exchange(srv.port, cut) == b""
    assert len(srv.call("GET", "/error")[2]) == 1                        # not reset
    # a blank line before a request is skipped (RFC 9112 2.2); a second one is a bad request
    assert exchange(srv.port, b"\r\nGET /ping HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\n{}")
    assert exchange(srv.port, b"\r\n\r\nGET /ping HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("connection", [b"close", b"Keep-Alive, close", b"close\r\nConnection: x"])
def test_connection_close_in_any_form_closes(srv, connection):
    answer = exchange(srv.port, b"GET /ping HTTP/1.1\r\nConnection: " + connection +
                      b"\r\n\r\nGET /ping HTTP/1.1\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 1 and b"\r\nConnection: close\r\n" in answer


def test_expect_continue_refuses_a_body_before_it_is_sent(srv):
    answer = exchange(srv.port, b"POST /release HTTP/1.1\r\nExpect: 100-continue\r\n"
                                b"Content-Length: 99999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b" 100 " not in answer


def test_idle_connections_neither_block_nor_linger(census_server):
    running = census_server(idle_timeout=0.5)
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(200)]
    try:
        assert running.call("GET", "/ping")[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert answer(conn, "GET", "/ping")[0] == answer(conn, "GET", "/healthz")[0] == 200
        conn.close()
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""                   # dropped after the idle timeout
    finally:
        for sock in idle:
            sock.close()


# -- crash safety ---------------------------------------------------------------------------------

@pytest.fixture
def server_process():
    """A factory: server_process(data_dir) -> (Popen, port) of ping_server.py on loopback, scoped
    to 127.0.0.0/8, with no PING_* setting of ours leaking in; any left running is killed."""
    started = []

    def start(data_dir):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PING_")}
        process = subprocess.Popen(
            [sys.executable, str(HERE / "ping_server.py"), "--host", "127.0.0.1", "--port", "0",
             "--data", str(data_dir), "--scope", "127.0.0.0/8"], stderr=subprocess.PIPE, env=env)
        started.append(process)
        return process, listening_port(process.stderr)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_kill_9_in_a_burst_keeps_every_acknowledged_result(tmp_path, server_process):
    data_dir = tmp_path / "data"
    first, port = server_process(data_dir)
    acked, exited, changed, stop = {}, [], threading.Condition(), threading.Event()

    def volunteer(me):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while not stop.is_set():
                _, _, task = answer(conn, "GET", "/get_task")
                ones = [me, task["task_index"] & 0xFFFF]
                body = submission(task["task_index"], ones, lease=task["lease"], name=f"v{me}")
                if answer(conn, "POST", "/submit_result", body)[0] == 200:
                    with changed:
                        acked[task["task_index"]] = ones
                        changed.notify_all()
        except (OSError, http.client.HTTPException, KeyError):
            pass
        finally:
            with changed:
                exited.append(me)
                changed.notify_all()

    threads = [threading.Thread(target=volunteer, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    with changed:                                         # 30 s: a bound, not a speed goal
        changed.wait_for(lambda: len(acked) >= 60 or len(exited) == len(threads), 30)
    assert len(acked) >= 60
    first.send_signal(signal.SIGKILL)                     # mid-burst: 8 clients still going
    stop.set()
    first.wait()
    for t in threads:
        t.join()
    second, port = server_process(data_dir)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert answer(conn, "GET", "/get_progress")[2]["done_tasks"] >= len(acked)
    for task, ones in acked.items():
        status, _, got = answer(conn, "GET", f"/result?id={task}")
        assert status == 200 and got["result_data"] == result_string(ones)
    conn.close()
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0
    assert json.loads((data_dir / "census.json").read_bytes())["states"].count("2") >= len(acked)


def test_command_line_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as caught:
        ping_server._parse_args(["--scope", "not-a-cidr"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit):
        ping_server._parse_args(["--exclude", str(tmp_path / "missing.txt")])
