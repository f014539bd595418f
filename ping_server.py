"""The census task server: hands out /16 blocks to volunteers and keeps what they find.

An ``http.server.ThreadingHTTPServer`` speaking HTTP/1.1 keep-alive, with one handler class and
a route table keyed on (method, path). Route functions return ``(HTTPStatus, body)``; a dict or
list body is serialised as JSON in one place, and every refusal is an ``HttpError`` turned into
``{"error": ...}`` there too. State lives in ``store.Store`` (crash-safe, answers only once a change
is durable). Also serves the dashboard (``dashboard.html`` beside this file), its data endpoints,
Prometheus metrics and the client download ``/ping.zip``.

    python3 ping_server.py [--host H] [--port P] [--data DIR] [--scope CIDR[,CIDR]]
                           [--exclude FILE] [--lease SECONDS] [--admin-token T]
"""

import argparse
import hmac
import html
import io
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, NamedTuple
from urllib.parse import parse_qs, urlsplit

from store import Refused, Store, network_of, parse_blocklist, remembered_scope
from trust import FRACTION

MAX_BODY = 4 << 20                  # 4 MiB: a result is 64 KiB of '0'/'1' plus a few fields
MAX_URL = 8192
MAX_HEADER_LINE = 65536             # the same limits as http.client
MAX_HEADERS = 100
IDLE_TIMEOUT = 30.0                 # seconds a connection may sit silent before it is dropped
KEEPALIVE_EVERY = 15.0              # SSE comment interval
EVENTS_MIN_GAP = 1.0                # an SSE stream sends at most one update a second
JSON_TYPE = "application/json"
HERE = Path(__file__).resolve().parent
# The peer went away, or stalled past the idle timeout (BlockingIOError: see Handler.setup).
_GONE = (ConnectionError, TimeoutError, BlockingIOError)


class HttpError(Exception):
    """A refusal: answered as JSON ``{..extra, "error": message}`` with ``status``."""

    def __init__(self, status: HTTPStatus, message: str, *, headers=(), **extra):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.headers = tuple(headers)
        self.extra = extra

    def body(self) -> dict:
        return {**self.extra, "error": self.message}


class Headers(dict):
    """Request headers by lower-cased name; a repeated one has its values joined with ", "
    (RFC 9110 5.3), so that a second Content-Length cannot hide behind the first. (The stdlib's
    email.message.Message scans every header on each lookup.)"""

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        super().__setitem__(key, f"{self[key]}, {value}" if key in self else value)

    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def tokens(self, name) -> set:
        """The lower-cased items of a comma-separated header (Connection: keep-alive, TE)."""
        return {item.strip(" \t") for item in self.get(name, "").lower().split(",")}

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return super().__contains__(name.lower())


class Request(NamedTuple):
    method: str
    path: str
    query: dict             # first value of each parameter
    body: bytes
    client: str             # remote address
    headers: Headers


class Raw(NamedTuple):
    """A non-JSON body."""
    content_type: str
    data: bytes
    headers: tuple = ()


class Stream(NamedTuple):
    """A body written as it is produced; the connection closes at its end."""
    content_type: str
    chunks: Iterable[bytes]


def is_loopback(client: str) -> bool:
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def check_admin(token: str | None, authorization: str | None, client: str,
                fetch_site: str | None = None) -> None:
    """Raise HttpError unless the request may use admin actions.

    With a token configured it must come as ``Authorization: Bearer <token>``, from anywhere,
    loopback included; with none configured only loopback clients are admitted. The admin
    actions are GETs (as in the original system), so a web page open in the operator's browser
    could fire them at a loopback server: a request a browser marks as coming from another site
    (``Sec-Fetch-Site``) is refused whatever else it carries.
    """
    if (fetch_site or "").strip().lower() in ("cross-site", "same-site"):
        raise HttpError(HTTPStatus.FORBIDDEN, "admin actions are refused from other web sites")
    if token:
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HttpError(HTTPStatus.UNAUTHORIZED, "admin token required",
                            headers=[("WWW-Authenticate", "Bearer")])
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HttpError(HTTPStatus.FORBIDDEN, "wrong admin token")
    elif not is_loopback(client):
        raise HttpError(HTTPStatus.FORBIDDEN,
                        "admin actions need a token (none is set: loopback only)")


class Metrics:
    """Request counts and latency by endpoint, for /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            total = self.latency.setdefault(endpoint, [0, 0.0])
            total[0] += 1
            total[1] += seconds

    def copy(self):
        with self._lock:
            return dict(self.requests), {k: tuple(v) for k, v in self.latency.items()}


class CensusServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024       # listen backlog: a burst of volunteers must not be refused

    def __init__(self, address, store: Store, *, admin_token=None, idle_timeout=IDLE_TIMEOUT,
                 static_dir=HERE, verbose=False):
        self.store = store
        self.admin_token = admin_token or None
        self.idle_timeout = idle_timeout
        self.static_dir = Path(static_dir)
        self.verbose = verbose
        self.metrics = Metrics()
        self.stopping = threading.Event()
        super().__init__(address, Handler)

    def server_close(self):
        self.stopping.set()
        super().server_close()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exception(), _GONE):     # a peer that left is no error
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ipv4-census/1"
    disable_nagle_algorithm = True  # Nagle + delayed ACK costs 40 ms a request on keep-alive
    wbufsize = 1 << 16              # headers and body leave in one send, at the flush
    _date = (None, "")              # (second, Date header) of the latest answer

    def setup(self):
        super().setup()
        # The idle timeout as kernel socket options, not socket.settimeout(): that costs a
        # poll() before every recv and send, each one more hand-off of the GIL between busy
        # threads. A recv that times out reads as the end of the stream (the connection is
        # closed); a send that times out raises BlockingIOError.
        if self.server.idle_timeout:
            seconds, fraction = divmod(self.server.idle_timeout, 1)
            limit = struct.pack("ll", int(seconds), int(fraction * 1e6))
            for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
                self.connection.setsockopt(socket.SOL_SOCKET, option, limit)

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request, but the header block is read by _read_headers
        (2 us) instead of the email package (http.client.parse_headers: 13 us, and each lookup
        scans every header): a volunteer's get/submit cycle costs about 150 us of the GIL."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        line = self.raw_requestline
        if line in (b"\r\n", b"\n"):          # RFC 9112 2.2: ignore an empty line first
            line = self.raw_requestline = self.rfile.readline(65537)
        if not line.endswith(b"\n"):          # cut short: the peer left or stalled
            return False
        self.requestline = str(line, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        version = _HTTP_VERSION.fullmatch(words[-1]) if len(words) == 3 else None
        if version is None:
            self.send_error(HTTPStatus.BAD_REQUEST, f"bad request line {self.requestline[:80]!r}")
            return False
        if int(version[1]) != 1:
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{words[-1]} not supported")
            return False
        self.command, self.path = words[:2]
        self.request_version = "HTTP/1.0" if int(version[2]) == 0 else "HTTP/1.1"
        if self.path.startswith("//"):      # as the stdlib: no //host paths (open redirects)
            self.path = "/" + self.path.lstrip("/")
        self.headers = self._read_headers()
        if self.headers is None:
            return False
        connection = self.headers.tokens("Connection")
        self.close_connection = "close" in connection or (
            self.request_version == "HTTP/1.0" and "keep-alive" not in connection)
        if "100-continue" in self.headers.tokens("Expect") and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def handle_expect_100(self):
        """Refuse a body the client has not sent yet (too long, chunked, ...), else 100."""
        try:
            self._check_url()
            self._body_length()
        except HttpError as exc:
            self._send(exc.status, _refusal(exc))
            return False
        super().handle_expect_100()
        self.wfile.flush()                  # the client waits for this before it sends the body
        return True

    def send_error(self, code, message=None, explain=None):
        """Protocol errors (bad request line, headers, URL over 64 KiB) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer in HTTP/1.x
            self.request_version = "HTTP/1.0"
        try:
            message = message or HTTPStatus(code).phrase
        except ValueError:
            message = message or "error"
        self.log_error("code %d, message %s", code, message)
        self._send(code, {"error": message})

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    def date_time_string(self, timestamp=None):
        # formatdate() costs 3 us a response; the Date header changes once a second
        second = int(time.time() if timestamp is None else timestamp)
        cached = Handler._date
        if cached[0] != second:
            cached = Handler._date = (second, super().date_time_string(second))
        return cached[1]

    def _read_headers(self):
        """The header block as Headers; None once a 4xx is answered, or when the block is cut
        short (never act on half a request). Folded lines, names that are not tokens and stray
        CR or NUL are refused, as RFC 9112 2.2 and 5 allow."""
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long")
                return None
            if line in (b"\r\n", b"\n"):
                return headers
            if not line.endswith(b"\n"):
                return None
            text = line.decode("iso-8859-1")[:-1].removesuffix("\r")
            name, colon, value = text.partition(":")
            if not colon or not _TOKEN.fullmatch(name) or "\r" in value or "\0" in value:
                self.send_error(HTTPStatus.BAD_REQUEST, f"bad header line {line[:80]!r}")
                return None
            headers.add(name, value.strip(" \t"))
        self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        return None

    # -- dispatch ---------------------------------------------------------------------------------

    def _dispatch(self):
        started = time.perf_counter()
        path = self.path.split("?", 1)[0]
        endpoint = path if path in PATHS else "other"
        try:
            status, body = self._route()
        except HttpError as exc:
            status, body = exc.status, _refusal(exc)
        except Refused as exc:
            status, body = exc.status, {"error": exc.message}
        except _GONE:
            self.close_connection = True        # the client went away mid-request
            return
        except OSError as exc:                  # the store cannot write: try again later
            self.log_error("storage error: %s", exc)
            status, body = HTTPStatus.SERVICE_UNAVAILABLE, {"error": "storage unavailable"}
        except Exception:                       # a bug, not the client's fault: still JSON
            self.log_error("internal error:\n%s", traceback.format_exc())
            self.close_connection = True
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        try:
            self._send(status, body)
        except _GONE:
            self.close_connection = True
            return
        self.server.metrics.observe(endpoint, status, time.perf_counter() - started)

    def _route(self):
        self._check_url()
        body = self._read_body()
        try:
            url = urlsplit(self.path)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad URL") from None
        method = "GET" if self.command == "HEAD" else self.command
        route = ROUTES.get((method, url.path))
        if route is None:
            allowed = sorted(m for m, p in ROUTES if p == url.path)
            if allowed:
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {' or '.join(allowed)}",
                                headers=[("Allow", ", ".join(allowed))])
            raise HttpError(HTTPStatus.NOT_FOUND, "no such path")
        try:
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True,
                                                  max_num_fields=32).items()}
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad query string") from None
        return route(self, Request(method, url.path, query, body, self.client_address[0],
                                   self.headers))

    def _check_url(self):
        if len(self.path) > MAX_URL:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long")

    def _body_length(self) -> int:
        """Content-Length, checked: decimal, at most MAX_BODY, and no Transfer-Encoding (this
        server decodes none: RFC 9112 6.1)."""
        length = self.headers.get("Content-Length", "0")
        digits = length.lstrip("0")                 # int() refuses over 4,300 digits
        if "Transfer-Encoding" in self.headers:
            problem = HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not a Transfer-Encoding"
        elif not (length.isascii() and length.isdigit()):
            problem = HTTPStatus.BAD_REQUEST, "bad Content-Length"
        elif len(digits) > 9 or int(digits or "0") > MAX_BODY:
            problem = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes"
        else:
            return int(digits or "0")
        self.close_connection = True                # the body is not read: the stream is lost
        raise HttpError(*problem)

    def _read_body(self) -> bytes:
        length = self._body_length()
        data = self.rfile.read(length) if length else b""  # None: the idle timeout struck
        if data is None or len(data) < length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length")
        return data

    def _send(self, status, body):
        """The one place answers are written; dict/list bodies become JSON here."""
        if isinstance(body, Stream):
            return self._send_stream(status, body)
        if not isinstance(body, Raw):
            body = Raw(JSON_TYPE, _json(body))
        self.send_response(status)
        self.send_header("Content-Type", body.content_type)
        if status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Length", str(len(body.data)))
        for name, value in body.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status != HTTPStatus.NOT_MODIFIED:
            self.wfile.write(body.data)

    def _send_stream(self, status, body):
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", body.content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.flush()
            if self.command == "HEAD":
                return
            for chunk in body.chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except _GONE:
            pass                                # the reader went away
        finally:
            close = getattr(body.chunks, "close", None)
            if close:
                close()

    # -- volunteers -------------------------------------------------------------------------------

    def get_task(self, req):
        lease = req.query.get("lease")
        if lease not in (None, "", "required"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "lease must be 'required' (or absent)")
        try:
            handout = self.server.store.get_task(req.client, within=_within(req.query),
                                                 lease_required=lease == "required",
                                                 name=(req.query.get("name") or "").strip()[:64] or None)
        except Refused as exc:
            raise _store_refusal(exc) from None
        if handout is None:
            return HTTPStatus.OK, {"error": "No tasks available"}
        lease_seconds = self.server.store.lease_seconds
        return HTTPStatus.OK, {
            "task_index": handout.task, "task_status": 1, "lease": handout.lease.token,
            "deadline": handout.lease.deadline,
            "lease_seconds": int(lease_seconds) if lease_seconds.is_integer() else lease_seconds,
            "network": handout.network, "exclude": handout.exclude}

    def submit_result(self, req):
        data = _submission(req.body)
        task = _task_index(data.get("task_index"), success=False)
        result = data.get("result")
        if not isinstance(result, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "result must be an object", success=False)
        failure = None
        if result.get("success") is not True:
            failure = str(result.get("error") or result.get("message") or "no result")
        fields = {key: _optional_str(data, key)
                  for key in ("lease", "name", "rtt_us", "icmp_errors")}
        stats = data.get("stats")
        if stats is not None and not isinstance(stats, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "stats must be an object", success=False)
        name = (fields["name"] or "").strip()[:64] or None
        try:
            duplicate = self.server.store.submit(
                task, result.get("result_data"), holder=req.client, token=fields["lease"],
                name=name, rtt=fields["rtt_us"], stats=stats, failure=failure,
                bitmap=result.get("bitmap"), icmp_errors=fields["icmp_errors"],
                skipped=data.get("skipped"))
        except Refused as exc:
            raise _store_refusal(exc, success=False) from None
        return HTTPStatus.OK, ({"success": True, "duplicate": True} if duplicate
                               else {"success": True})

    def release(self, req):
        data = _json_object(req.body, success=False)
        task = _task_index(data.get("task_index"), success=False)
        try:
            self.server.store.release(task, holder=req.client, token=_optional_str(data, "lease"))
        except Refused as exc:
            raise _store_refusal(exc, success=False) from None
        return HTTPStatus.OK, {"success": True}

    def ping(self, req):
        return HTTPStatus.OK, {}

    # -- admin ------------------------------------------------------------------------------------

    def _admin(self, req):
        check_admin(self.server.admin_token, req.headers.get("Authorization"), req.client,
                    req.headers.get("Sec-Fetch-Site"))

    def add_task(self, req):
        self._admin(req)
        data = _json_object(req.body, success=False)
        status = _task_index(data.get("task_status", 0), "task_status")
        wanted = data.get("task_index")                 # optional: that task, else the first
        task = self.server.store.add_task(status, req.client,
                                          None if wanted is None else _task_index(wanted))
        return HTTPStatus.OK, {"success": True, "task_index": task}

    def revise(self, req):
        self._admin(req)
        task = _task_index(req.query.get("id"), "id")
        code = _task_index(req.query.get("code"), "code")
        force = req.query.get("force", "").lower() in ("1", "true", "yes", "on")
        self.server.store.revise(task, code, force=force, holder=req.client)
        return HTTPStatus.OK, {"success": True, "task_index": task, "task_status": code}

    def reset_errors(self, req):
        self._admin(req)
        ident = req.query.get("id")
        task = -1 if ident is not None and ident.strip() == "-1" else _task_index(ident, "id")
        count = self.server.store.reset_errors(task)
        return HTTPStatus.OK, {"success": True, "reset": count}

    # -- reading the census -----------------------------------------------------------------------

    def error_list(self, req):
        return HTTPStatus.OK, [{"task_index": t, "error": e} for t, e in self.server.store.errors()]

    def error_page(self, req):
        rows = "".join(f"<tr><td>{t}</td><td>{html.escape(str(network_of(t)))}</td>"
                       f"<td>{html.escape(e)}</td></tr>\n" for t, e in self.server.store.errors())
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Census errors</title>"
                f"</head><body><h1>Tasks in error</h1><p><a href='/'>dashboard</a></p>"
                f"<table border='1'><tr><th>task</th><th>network</th><th>error</th></tr>\n"
                f"{rows}</table></body></html>\n")
        return HTTPStatus.OK, Raw("text/html; charset=utf-8", page.encode())

    def get_pending(self, req):
        return HTTPStatus.OK, {str(t): 1 for t in self.server.store.pending()}

    def get_latest_task(self, req):
        task = self.server.store.latest_available()
        if task is None:
            return HTTPStatus.OK, {"error": "No tasks available"}
        return HTTPStatus.OK, {"task_index": task, "task_status": 0}

    def get_progress(self, req):
        return HTTPStatus.OK, self.server.store.progress()

    def rate(self, req):
        return HTTPStatus.OK, self.server.store.rate()

    def result(self, req):
        return HTTPStatus.OK, self.server.store.result(_task_index(req.query.get("id"), "id"))

    def task(self, req):
        return HTTPStatus.OK, self.server.store.task_info(_task_index(req.query.get("id"), "id"))

    def contributors(self, req):
        store = self.server.store
        ranked = [{"rank": rank, "name": c.name, "tasks_done": c.tasks_done,
                   "addresses_probed": c.addresses_probed, "responders": c.responders,
                   "first_seen": c.first_seen, "last_seen": c.last_seen, **store.standing(c.name)}
                  for rank, c in enumerate(store.contributors(), 1)]
        name = req.query.get("name")
        if name is not None:
            ranked = [c for c in ranked if c["name"] == name]
            if not ranked:
                raise HttpError(HTTPStatus.NOT_FOUND, "no such contributor")
        return HTTPStatus.OK, {"contributors": ranked}

    def census_map(self, req):
        version, data = self.server.store.map_bytes()
        etag = f'"{version}"'
        headers = (("ETag", etag), ("Cache-Control", "no-cache"))
        if req.headers.get("If-None-Match", "").strip() == etag:
            return HTTPStatus.NOT_MODIFIED, Raw("application/octet-stream", b"", headers)
        return HTTPStatus.OK, Raw("application/octet-stream", data, headers)

    def export_csv(self, req):
        return HTTPStatus.OK, Stream("text/csv; charset=utf-8", _csv_chunks(self.server.store))

    def events(self, req):
        return HTTPStatus.OK, Stream("text/event-stream", _event_chunks(self.server))

    def metrics(self, req):
        text = _prometheus(self.server.store.counters(), *self.server.metrics.copy())
        return HTTPStatus.OK, Raw("text/plain; version=0.0.4; charset=utf-8", text.encode())

    def healthz(self, req):
        return HTTPStatus.OK, {"status": "ok"}

    def ping_zip(self, req):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in ("ping_client.py", "icmp.py"):
                path = self.server.static_dir / name
                if not path.is_file():
                    raise HttpError(HTTPStatus.NOT_FOUND, f"{name} is missing on the server")
                archive.write(path, name)
        return HTTPStatus.OK, Raw("application/zip", buffer.getvalue(),
                                  (("Content-Disposition", 'attachment; filename="ping.zip"'),))

    def dashboard(self, req):
        path = self.server.static_dir / "dashboard.html"
        page = path.read_bytes() if path.is_file() else _FALLBACK_PAGE
        return HTTPStatus.OK, Raw("text/html; charset=utf-8", page)


ROUTES = {
    ("GET", "/get_task"): Handler.get_task,
    ("POST", "/submit_result"): Handler.submit_result,
    ("POST", "/release"): Handler.release,
    ("GET", "/ping"): Handler.ping,
    ("POST", "/add_task"): Handler.add_task,
    ("GET", "/revise"): Handler.revise,
    ("GET", "/error/reset"): Handler.reset_errors,
    ("GET", "/error"): Handler.error_list,
    ("GET", "/errors"): Handler.error_page,
    ("GET", "/get_pending"): Handler.get_pending,
    ("GET", "/get_latest_task"): Handler.get_latest_task,
    ("GET", "/get_progress"): Handler.get_progress,
    ("GET", "/rate"): Handler.rate,
    ("GET", "/result"): Handler.result,
    ("GET", "/task"): Handler.task,
    ("GET", "/contributors"): Handler.contributors,
    ("GET", "/map"): Handler.census_map,
    ("GET", "/export.csv"): Handler.export_csv,
    ("GET", "/events"): Handler.events,
    ("GET", "/metrics"): Handler.metrics,
    ("GET", "/healthz"): Handler.healthz,
    ("GET", "/ping.zip"): Handler.ping_zip,
    ("GET", "/"): Handler.dashboard,
    ("GET", "/dashboard.html"): Handler.dashboard,
}
PATHS = frozenset(path for _, path in ROUTES)
_JSON = json.JSONEncoder(separators=(",", ":"))   # one encoder: json.dumps builds one a call
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")         # RFC 9110 5.6.2
_HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")

_FALLBACK_PAGE = (b"<!doctype html><html><head><meta charset='utf-8'><title>IPv4 census</title>"
                  b"</head><body><h1>IPv4 census</h1><p>The dashboard page is missing; the data: "
                  b"<a href='/get_progress'>progress</a>, "
                  b"<a href='/contributors'>contributors</a>, "
                  b"<a href='/errors'>errors</a>, <a href='/ping.zip'>the client</a>.</p>"
                  b"</body></html>\n")


# -- private helpers ------------------------------------------------------------------------------

def _refusal(exc: HttpError) -> Raw:
    return Raw(JSON_TYPE, _json(exc.body()), exc.headers)


def _json(body) -> bytes:
    return _JSON.encode(body).encode()


def _json_object(raw: bytes, **extra) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise HttpError(HTTPStatus.BAD_REQUEST, "body is not valid JSON", **extra) from None
    if not isinstance(data, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object", **extra)
    return data


_RESULT_KEY = b'"result_data":"'


def _submission(raw: bytes) -> dict:
    """The /submit_result body, its 64 KiB result_data left as the bytes that came (decoding it
    into a str and encoding it back costs 20 us, an eighth of a whole cycle). Taken out only
    from a body in the plain form (no backslash anywhere, so the key cannot be inside a string,
    and the key once, its value ASCII): "\\u0000" stands in while the rest is decoded, and must
    come back as result.result_data; any other body is decoded whole. (A raw control character
    in the value, which json.loads refuses, is left for the digit check to refuse.)"""
    start = raw.find(_RESULT_KEY) + len(_RESULT_KEY)
    end = raw.find(b'"', start) if start >= len(_RESULT_KEY) else -1
    if (end < 0 or b"\\" in raw or raw.find(_RESULT_KEY, end) >= 0
            or not raw[start:end].isascii()):
        return _json_object(raw, success=False)
    data = _json_object(raw[:start] + b"\\u0000" + raw[end:], success=False)
    result = data.get("result")
    if not isinstance(result, dict) or result.get("result_data") != "\0":
        return _json_object(raw, success=False)
    result["result_data"] = raw[start:end]
    return data


def _task_index(value, field="task_index", **extra) -> int:
    """An int, or a decimal string (the original client sends strings)."""
    if isinstance(value, str) and value.strip().isdecimal() and len(value) <= 12:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise HttpError(HTTPStatus.BAD_REQUEST, f"{field} must be an integer", **extra)


def _within(query: dict):
    """``?within=CIDR,CIDR``: the networks a client takes blocks from (None: anywhere)."""
    text = query.get("within")
    if text is None:
        return None
    try:
        return [ipaddress.IPv4Network(part.strip(), strict=False)
                for part in text.split(",") if part.strip()] or None
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"within must be CIDR[,CIDR], not {text[:80]!r}")


def _store_refusal(exc: Refused, **extra) -> HttpError:
    """The store's refusal as an HttpError; a 429 or 503 says when to try again."""
    headers = [("Retry-After", str(exc.retry_after))] if exc.retry_after else []
    return HttpError(exc.status, exc.message, headers=headers, **extra)


def _optional_str(data: dict, key: str):
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{key} must be a string", success=False)
    return value


_BITS = tuple(tuple(bit for bit in range(8) if byte & (0x80 >> bit)) for byte in range(256))


def _csv_chunks(store: Store):
    """``saddr`` then every responder, one chunk per block."""
    yield b"saddr\n"
    for task, bitmap in store.bitmaps():
        prefix = f"{task >> 8}.{task & 255}."
        lines = [f"{prefix}{k >> 8}.{k & 255}\n" for j, byte in enumerate(bitmap) if byte
                 for k in (8 * j + bit for bit in _BITS[byte])]
        if lines:
            yield "".join(lines).encode()


def _event_chunks(server: CensusServer):
    """An update on every change (at most one a second), a keepalive comment when idle."""
    store = server.store
    version = None
    yield b"retry: 3000\n\n"
    while not server.stopping.is_set():
        if store.version != version:
            version = store.version
            yield b"event: update\ndata: " + _json(store.progress()) + b"\n\n"
            server.stopping.wait(EVENTS_MIN_GAP)
        elif store.wait_change(version, KEEPALIVE_EVERY) == version:
            yield b": keepalive\n\n"


def _prometheus(counters: dict, requests: dict, latency: dict) -> str:
    lines = ["# HELP census_tasks Tasks by state.", "# TYPE census_tasks gauge"]
    lines += [f'census_tasks{{state="{s}"}} {n}' for s, n in counters["states"].items()]
    for name, key, text in (("census_submissions_total", "submissions", "Results accepted."),
                            ("census_rejects_total", "rejects", "Requests the store refused."),
                            ("census_leases_expired_total", "leases_expired", "Leases expired."),
                            ("census_damaged_results_total", "damaged_results",
                             "Stored results that failed their CRC when read (task re-queued)."),
                            ("census_damaged_records", "damaged_records",
                             "Log records found damaged at start (reported, tasks re-queued)."),
                            ("census_store_degraded", "degraded", "1 while the disk refuses "
                             "writes."),
                            ("census_verification_agreements_total", "agreements",
                             "Results found to agree with the kept result of their block."),
                            ("census_verification_disputes_total", "disputes",
                             "Results found to disagree with the kept result of their block."),
                            ("census_contributors_flagged", "flagged",
                             "Contributors flagged for disagreeing too often.")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {counters[key]}"]
    lines += ["# HELP census_blocks_verification Done blocks by verification status.",
              "# TYPE census_blocks_verification gauge"]
    lines += [f'census_blocks_verification{{status="{s}"}} {n}'
              for s, n in counters["verification"].items()]
    lines += ["# HELP census_http_requests_total HTTP requests by endpoint and status.",
              "# TYPE census_http_requests_total counter"]
    lines += [f'census_http_requests_total{{endpoint="{e}",code="{c}"}} {n}'
              for (e, c), n in sorted(requests.items())]
    lines += ["# HELP census_http_request_duration_seconds Time to answer, by endpoint.",
              "# TYPE census_http_request_duration_seconds summary"]
    for endpoint, (count, total) in sorted(latency.items()):
        lines += [f'census_http_request_duration_seconds_sum{{endpoint="{endpoint}"}} {total:.6f}',
                  f'census_http_request_duration_seconds_count{{endpoint="{endpoint}"}} {count}']
    return "\n".join(lines) + "\n"


def _parse_args(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="The IPv4 census task server.",
        epilog="Environment: PING_HOST, PING_PORT, PING_DATA, PING_SCOPE, PING_EXCLUDE, "
               "PING_LEASE, PING_ADMIN_TOKEN set the defaults of the matching options.")
    parser.add_argument("--host", default=env("PING_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=env("PING_PORT", "8001"))
    parser.add_argument("--data", default=env("PING_DATA", "."), help="folder for the state files")
    parser.add_argument("--scope", default=env("PING_SCOPE"),
                        help="CIDR[,CIDR]: limit the census (naming reserved space allows it); "
                             "'all' = every block outside reserved space. Remembered in the data "
                             "folder (default: the remembered scope, else all)")
    parser.add_argument("--exclude", default=env("PING_EXCLUDE"),
                        help="opt-out list, ZMap blocklist format")
    parser.add_argument("--lease", type=float, default=env("PING_LEASE", "600"),
                        help="seconds a volunteer holds a block")
    parser.add_argument("--admin-token", default=env("PING_ADMIN_TOKEN"),
                        help="Bearer token for admin actions (else loopback only)")
    parser.add_argument("--max-leases", type=int, default=env("PING_MAX_LEASES", "16"),
                        help="live leases one client address may hold (0: no limit)")
    parser.add_argument("--verify", type=float, default=env("PING_VERIFY", str(FRACTION)),
                        metavar="FRACTION",
                        help="share of a trusted contributor's results sent to a second "
                             "holder to check (a new or flagged one's: all of them); 0 = off "
                             "(default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.max_leases < 0:
        parser.error("--max-leases must be 0 or more")
    if not 0.0 <= args.verify <= 1.0:
        parser.error("--verify is a fraction from 0 (off) to 1")
    try:
        args.scope = _parse_scope(args.scope)
        args.exclude = parse_blocklist(Path(args.exclude).read_text()) if args.exclude else ()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.lease <= 0:
        parser.error("--lease must be positive")
    return args


def _parse_scope(text):
    """None (not given), [] ('all': the whole census) or the list of networks."""
    if not text:
        return None
    if text.strip().lower() == "all":
        return []
    return [ipaddress.IPv4Network(part.strip()) for part in text.split(",") if part.strip()]


def _describe(scope) -> str:
    return ",".join(map(str, scope)) if scope else "all"


def main(argv=None) -> int:
    args = _parse_args(argv)
    scope, before = remembered_scope(args.data, args.scope)
    if args.scope is not None and before is not None and sorted(before) != sorted(scope):
        print(f"scope changed from {_describe(before)} to {_describe(scope)}", file=sys.stderr)
    store = Store(args.data, scope=scope or None, exclude=args.exclude, lease_seconds=args.lease,
                  max_leases=args.max_leases, verify=args.verify)
    try:
        server = CensusServer((args.host, args.port), store, admin_token=args.admin_token,
                              verbose=args.verbose)
    except OSError as exc:
        store.close()
        print(f"ping_server.py: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    print(f"census scope: {_describe(scope)}", file=sys.stderr)
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
