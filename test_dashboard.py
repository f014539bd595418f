"""Tests of the dashboard and the endpoints it reads: page, content types, /map bytes, escaping,
the Prometheus text of /metrics and the /events stream.

Each test runs a real ``ping_server.CensusServer`` on ('127.0.0.1', 0) in a thread, over a
``tmp_path`` store whose scope is 127.0.0.0/14 (tasks 32512..32515; everything else excluded),
and talks to it through real sockets.
"""

import http.client
import io
import json
import math
import re
import socket
import time
import zipfile
from pathlib import Path

import pytest

import ping_server
from store import RESULT_LEN, TASKS

HERE = Path(__file__).resolve().parent
IN_SCOPE = range(32512, 32516)                 # 127.0.0.0/14
EVIL = "<script>alert(1)</script>"


@pytest.fixture
def census(census_server):
    """The real dashboard.html, a real clock and the default lease."""
    return census_server("127.0.0.0/14", clock=time.time, lease_seconds=600,
                         static_dir=ping_server.HERE)


def call(census, method, path, body=None, headers=None):
    """One request on a fresh connection: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", census.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def get_json(census, path):
    status, _, body = call(census, "GET", path)
    assert status == 200, (path, body)
    return json.loads(body)


def lease(census) -> dict:
    handout = get_json(census, "/get_task")
    assert handout["task_index"] in IN_SCOPE, handout
    return handout


def submit(census, handout, responders=0, name=None, error=None):
    """Submit a result with ``responders`` ones (or a client-reported ``error``)."""
    result = ({"success": False, "error": error} if error is not None else
              {"success": True, "result_data": "1" * responders + "0" * (RESULT_LEN - responders)})
    body = {"task_index": handout["task_index"], "lease": handout["lease"], "result": result}
    if name is not None:
        body["name"] = name
    return call(census, "POST", "/submit_result", body)


# -- the page and its content types --------------------------------------------------------------

def test_root_serves_the_dashboard_file(census):
    status, headers, body = call(census, "GET", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == (HERE / "dashboard.html").read_bytes()


@pytest.mark.parametrize("path, content_type", [
    ("/get_progress", "application/json"),
    ("/contributors", "application/json"),
    ("/task?id=32512", "application/json"),
    ("/healthz", "application/json"),
    ("/map", "application/octet-stream"),
    ("/metrics", "text/plain; version=0.0.4"),
    ("/ping.zip", "application/zip"),
    ("/errors", "text/html"),
])
def test_data_endpoints_answer_with_their_content_type(census, path, content_type):
    status, headers, _ = call(census, "GET", path)
    assert status == 200
    assert headers["Content-Type"].replace(" ", "").startswith(content_type.replace(" ", ""))


def test_progress_and_task_have_the_fields_the_page_reads(census):
    progress = get_json(census, "/get_progress")
    for key in ("progress", "done_tasks", "total_tasks", "in_progress", "error_tasks",
                "excluded_tasks", "available_tasks", "addresses_probed", "responders",
                "tasks_per_min", "probes_per_min", "eta_seconds", "contributors", "version"):
        assert key in progress, key
    assert progress["total_tasks"] == len(IN_SCOPE)
    assert progress["excluded_tasks"] == TASKS - len(IN_SCOPE)
    task = get_json(census, "/task?id=32513")
    assert task["network"] == "127.1.0.0/16" and task["state"] == 0
    for key in ("task_index", "state_name", "contributor", "finished_at", "responders", "probed"):
        assert key in task, key


def test_ping_zip_holds_the_client_and_the_engine(census):
    _, _, body = call(census, "GET", "/ping.zip")
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert sorted(archive.namelist()) == ["icmp.py", "ping_client.py"]
        assert archive.read("icmp.py") == (HERE / "icmp.py").read_bytes()


# -- the map -------------------------------------------------------------------------------------

def test_map_bytes_match_the_store(census):
    done, failed, busy = lease(census), lease(census), lease(census)
    assert submit(census, done, responders=1000, name="alice")[0] == 200
    assert submit(census, failed, error="probe socket died")[0] == 400
    status, headers, data = call(census, "GET", "/map")
    assert status == 200 and len(data) == 2 * TASKS
    free = (set(IN_SCOPE) - {done["task_index"], failed["task_index"], busy["task_index"]}).pop()
    expected = {done["task_index"]: 2, failed["task_index"]: 3, busy["task_index"]: 1, free: 0,
                0: 4, 32511: 4, 32516: 4, 65535: 4}
    for task, state in expected.items():
        assert data[2 * task] == state == census.store.state_of(task), task
    info = get_json(census, f"/task?id={done['task_index']}")
    assert (info["state"], info["contributor"], info["responders"]) == (2, "alice", 1000)
    assert data[2 * done["task_index"] + 1] == math.ceil(255 * 1000 / info["probed"])
    assert all(data[2 * t + 1] == 0 for t in expected if t != done["task_index"])


def test_map_etag_answers_304_until_something_changes(census):
    _, headers, _ = call(census, "GET", "/map")
    etag = headers["ETag"]
    status, _, body = call(census, "GET", "/map", headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    handout = lease(census)
    status, headers, data = call(census, "GET", "/map", headers={"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
    assert data[2 * handout["task_index"]] == 1


# -- escaping ------------------------------------------------------------------------------------

SIDE_EFFECTS = {"/get_task", "/revise", "/error/reset", "/events"}


def html_pages(census):
    """(path, body) of every GET route that answers text/html."""
    for method, path in ping_server.ROUTES:
        if method != "GET" or path in SIDE_EFFECTS:
            continue
        status, headers, body = call(census, "GET", path)
        if status == 200 and headers["Content-Type"].startswith("text/html"):
            yield path, body.decode()


def test_a_hostile_name_is_escaped_in_every_html_page(census):
    assert submit(census, lease(census), responders=5, name=EVIL)[0] == 200
    assert submit(census, lease(census), error=EVIL, name=EVIL)[0] == 400
    assert get_json(census, "/contributors")["contributors"][0]["name"] == EVIL
    pages = dict(html_pages(census))
    assert {"/", "/errors"} <= set(pages)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages["/errors"]
    for path, text in pages.items():
        assert EVIL not in text, path
        assert "alert(1)</script>" not in text, path


def dashboard_script() -> str:
    page = (HERE / "dashboard.html").read_text()
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    return scripts[0]


# Every way a script can turn a string into markup, code or a URL the browser follows. The page
# must put data in with textContent only.
HTML_SINK = re.compile(r"""innerHTML | outerHTML | insertAdjacentHTML | document\.write | DOMParser
    | srcdoc | createContextualFragment | \beval\s*\( | new\s+Function\b | setAttribute(?:NS)?\s*\(
    | \.(?:href|src|action|formAction)\s*=(?!=) | \blocation\s*=(?!=)
    | location\.(?:href\s*=(?!=)|assign|replace)\b""", re.X)
# Lines of dashboard.html that may use a sink because what they write is a constant or a number,
# exactly as written there (the ping.zip links are static markup, and the join command built from
# location.origin is set with textContent). Add a line here only with a reason:
# - the pinned block's details link: a path of our own and a task number, nothing from data.
ALLOWED_SINKS = frozenset({'$("pinned-link").href = "/details/" + Number(task);'})


def html_sinks(text: str) -> list:
    """The lines of ``text`` that use an HTML/URL sink and are not in ALLOWED_SINKS."""
    return [line.strip() for line in text.splitlines()
            if HTML_SINK.search(line) and line.strip() not in ALLOWED_SINKS]


def test_dashboard_inserts_data_as_text_only():
    assert html_sinks((HERE / "dashboard.html").read_text()) == []
    code = dashboard_script()
    assert "textContent" in code and "createElement" in code


@pytest.mark.parametrize("line", [
    "box.innerHTML = c.name;", "row.outerHTML = html;", "t.insertAdjacentHTML('beforeend', s);",
    "document.write(s);", "document.writeln(s);", "new DOMParser().parseFromString(s, 'text/html');",
    "frame.srcdoc = s;", "range.createContextualFragment(s);", "eval(s);", "new Function(s)();",
    "a.setAttribute('href', url);", "a.setAttributeNS(null, 'href', url);", "a.href = url;",
    "img.src=url;", "form.action = url;", "location = url;", "location.href = url;",
    "location.assign(url);", "window.location.replace(url);",
])
def test_the_sink_scan_finds_each_sink(line):
    assert html_sinks("  " + line + "\n  x.textContent = y;") == [line]


def test_the_sink_scan_leaves_text_and_comparisons_alone():
    harmless = """node.textContent = String(text);
    if (a.href === b.href || img.src == other) {}
    history.replaceState(null, "", location.pathname + location.search + hash);
    const origin = location.origin;
    <a class="download" id="zip" href="/ping.zip" download>Download ping.zip</a>"""
    assert html_sinks(harmless) == []


def test_dashboard_is_self_contained_and_reads_the_contract_endpoints():
    page = (HERE / "dashboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page)
    code = dashboard_script()
    for endpoint in ('"/get_progress"', '"/map"', '"/task?id="', '"/contributors"',
                     '"/contributors?name="', 'EventSource("/events")', "If-None-Match",
                     '"/history"', '"/about.json"', '"/details/"',
                     "arrayBuffer", "location.origin"):
        assert endpoint in code, endpoint
    assert 'href="/errors"' in page and 'href="/ping.zip"' in page
    for link in ("/about", "/list", "/map.png", "/export.csv"):
        assert f'href="{link}"' in page, link
    assert "sudo python3 ping_client.py --server " in code
    assert 'has("snapshot")' in code and "else listen()" in code   # the stream waits only there


def test_every_element_the_script_uses_is_in_the_page():
    page = (HERE / "dashboard.html").read_text()
    defined = set(re.findall(r'\bid="([\w-]+)"', page))
    used = set(re.findall(r'(?:\$|setText)\("([\w-]+)"', dashboard_script()))
    assert used and used <= defined, used - defined


# -- /metrics ------------------------------------------------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN"
HELP_RE = re.compile(rf"# HELP ({NAME}) [^\n]*")
TYPE_RE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SAMPLE_RE = re.compile(rf"({NAME})(\{{(?:{LABEL}(?:,{LABEL})*,?)?\}})? ({VALUE})(?: -?\d+)?")
SUFFIXES = {"summary": ("_sum", "_count", ""), "histogram": ("_bucket", "_sum", "_count")}


def parse_prometheus(text: str) -> list:
    """Check the text format line by line; return the samples as (name, labels, value)."""
    assert text.endswith("\n")
    types, samples = {}, []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            assert HELP_RE.fullmatch(line), where
        elif line.startswith("# TYPE "):
            match = TYPE_RE.fullmatch(line)
            assert match and match[1] not in types, where
            types[match[1]] = match[2]
        elif line.startswith("#") or not line.strip():
            continue
        else:
            match = SAMPLE_RE.fullmatch(line)
            assert match, where
            assert family(match[1], types), f"{where}: no TYPE before it"
            samples.append((match[1], match[2] or "", float(match[3])))
    return samples


def family(name: str, types: dict):
    if name in types:
        return name
    for base, kind in types.items():
        if any(name == base + suffix for suffix in SUFFIXES.get(kind, ())):
            return base
    return None


def test_metrics_parse_as_prometheus_text(census):
    assert submit(census, lease(census), responders=3, name="bob")[0] == 200
    lease(census)
    get_json(census, "/get_progress")
    assert call(census, "GET", "/nope")[0] == 404
    _, _, body = call(census, "GET", "/metrics")
    samples = parse_prometheus(body.decode())
    assert samples
    states = {labels: value for _, labels, value in samples if 'state="' in labels}
    assert any('state="done"' in labels and value == 1 for labels, value in states.items())
    assert any('state="in_progress"' in labels and value == 1 for labels, value in states.items())
    assert any('"/get_progress"' in labels for _, labels, _ in samples)
    assert any(name == "census_http_requests_total" and 'endpoint="other"' in labels
               and 'code="404"' in labels and value == 1 for name, labels, value in samples)


def test_the_prometheus_checker_refuses_bad_lines():
    for bad in ("census_x 1\n", "# TYPE census_x gauge\ncensus_x one\n",
                "# TYPE census_x gauge\ncensus_x{state=done} 1\n",
                "# TYPE census_x gauge\n# TYPE census_x gauge\n", "# TYPE census_x gauge\ncensus_x 1"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


# -- /events -------------------------------------------------------------------------------------

def read_events(sock):
    """Yield (event, data) of each SSE block; comments and retry lines come as (None, None)."""
    buffer = b""
    while True:
        while b"\n\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buffer += chunk
        block, buffer = buffer.split(b"\n\n", 1)
        fields = dict(line.split(": ", 1) for line in block.decode().split("\n")
                      if ": " in line and not line.startswith(":"))
        yield fields.get("event"), fields.get("data")


def open_events(census):
    sock = socket.create_connection(("127.0.0.1", census.port), timeout=10)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "stream closed before its headers"
        head += chunk
    return sock, head.decode("latin-1")


def test_an_events_client_sees_a_submission(census):
    sock, head = open_events(census)
    with sock:
        assert head.startswith("HTTP/1.1 200")
        assert re.search(r"(?im)^content-type: text/event-stream", head)
        events = read_events(sock)
        first = next(data for event, data in events if event == "update")
        assert json.loads(first)["done_tasks"] == 0
        assert submit(census, lease(census), responders=7, name="carol")[0] == 200
        deadline = time.monotonic() + 30            # a bound, not a speed requirement
        for event, data in events:
            assert time.monotonic() < deadline, "no update after the submission"
            if event == "update" and json.loads(data)["done_tasks"] == 1:
                update = json.loads(data)
                break
        else:
            pytest.fail("the stream ended")
    assert update["responders"] == 7
    assert update["version"] > json.loads(first)["version"]
