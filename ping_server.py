"""The census task server: hands out /16 blocks to volunteers and keeps what they find.

HTTP/1.0 and 1.1 with keep-alive, served by ``http_front`` (one selectors loop owns every socket,
a fixed pool of worker threads runs the requests, one broadcaster feeds every /events stream).
A route table keyed on (method, path) of route functions ``(Request) -> (HTTPStatus, body)``
(volunteers, admin, reading the census, pictures and pages), and one ``Handler`` class, the
plumbing: it routes a request and serialises a dict or list body as JSON in one place, where
every refusal, an ``HttpError``, is turned into ``{"error": ...}`` too. State lives in
``store.Store`` (crash-safe, answers only once a change is durable). Also serves the dashboard
(``dashboard.html`` beside this file), its data endpoints, Prometheus metrics and the client
download ``/ping.zip``.

    python3 ping_server.py [--host H] [--port P] [--data DIR] [--scope CIDR[,CIDR]]
                           [--exclude FILE] [--lease SECONDS] [--admin-token T]
                           [--workers N] [--max-connections N] [--max-per-address N]
                           [--proxy ADDR[,ADDR]]
"""

import argparse
import base64
import errno
import email.utils
import functools
import hashlib
import hmac
import html
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from http import HTTPStatus
from pathlib import Path
from typing import Iterable, NamedTuple
from urllib.parse import parse_qs, urlsplit

import http_front
import pictures
import views
from http_front import CLOSE, KEEP, SUBSCRIBE, Headers
from store import (LEASE_SECONDS, LOG_FILE, RESERVED, SCOPE_FILE, SNAPSHOT_FILE, Refused, Store,
                   network_of, parse_blocklist, remembered_scope)
from trust import FRACTION

try:
    from store import StoreError        # one line saying what is wrong with --data, what to do
except ImportError:                     # a store.py without it: OSError/ValueError say it instead
    class StoreError(Exception):
        pass

IDLE_TIMEOUT = http_front.IDLE_TIMEOUT      # seconds a connection may sit silent before it is dropped
KEEPALIVE_EVERY = 15.0              # SSE comment interval
EVENTS_MIN_GAP = 1.0                # an SSE stream sends at most one update a second
WARN_EVERY = 10.0                   # seconds between two operator warnings of one kind
JSON_TYPE = "application/json"
MAX_CONTACT = 40                    # bytes of --contact: it rides in every probe's payload
MAX_ABOUT = 1 << 16                 # characters of --about shown
HERE = Path(__file__).resolve().parent
DEFAULT_PORT = 8001
DEMO_PORT = 8002                    # not the default: a demo and a real census are not confused
DEMO_SCOPE = ipaddress.IPv4Network("127.0.0.0/16")
PSEUDONYM_KEY_FILE = "census.key"


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


class Request(NamedTuple):
    method: str
    path: str
    query: dict             # first value of each parameter
    body: bytes
    client: str             # remote address (the forwarded one from a --proxy peer)
    headers: Headers
    server: "CensusServer"  # the census answering: its store, site, admin token


class Raw(NamedTuple):
    """A non-JSON body."""
    content_type: str
    data: bytes
    headers: tuple = ()


class Stream(NamedTuple):
    """A body written as it is produced (by the worker); the connection closes at its end."""
    content_type: str
    chunks: Iterable[bytes]
    headers: tuple = ()


class Subscription(NamedTuple):
    """An event stream: the head and the latest update are sent, then the connection joins the
    broadcaster (no thread of its own)."""
    content_type: str = "text/event-stream"


def is_loopback(client: str) -> bool:
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def is_loopback_host(host: str | None) -> bool:
    """A Host header naming this machine: localhost or a loopback address, any port."""
    name = (host or "").strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name in ("localhost", "localhost.") or is_loopback(name)


FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def check_admin(token: str | None, authorization: str | None, client: str,
                fetch_site: str | None = None, *, host: str | None = None,
                forwarded: bool = False) -> None:
    """Raise HttpError unless the request may use admin actions.

    With a token configured it must come as ``Authorization: Bearer <token>``, from anywhere,
    loopback included. With none configured only a loopback client is admitted, and only when
    the request names this machine (``Host`` is localhost or a loopback address: a page on
    another name that resolves to 127.0.0.1, DNS rebinding, is refused; a request without Host
    comes from no browser) and was not relayed (``forwarded``: a Forwarded, X-Forwarded-For or
    X-Real-IP header, as a same-host reverse proxy adds). The admin actions are GETs (as in the
    original system), so a web page open in the operator's browser could fire them: a request a
    browser marks as coming from another site (``Sec-Fetch-Site``) is refused whatever else it
    carries.
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
    elif forwarded or (host is not None and not is_loopback_host(host)):
        raise HttpError(HTTPStatus.FORBIDDEN, "admin actions without a token need a direct "
                        "request to localhost (no proxy, Host naming a loopback address)")


def check_same_site(headers: Headers) -> None:
    """Refuse what a browser sends on behalf of another web site: ``Sec-Fetch-Site`` cross-site
    or same-site, or an ``Origin`` that is not this server (``Host``). Programs send neither."""
    site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
    origin = headers.get("Origin")
    if site in ("cross-site", "same-site") or (
            origin is not None and not _same_origin(origin, headers.get("Host"))):
        raise HttpError(HTTPStatus.FORBIDDEN, "refused: a request from another web site")


def client_address(peer: str, headers: Headers, proxies: frozenset) -> str:
    """The client a request is from: the peer, or from a --proxy peer the nearest address in
    X-Forwarded-For that is not itself a trusted proxy (each proxy appends its own peer)."""
    if peer not in proxies:
        return peer
    for hop in reversed(headers.get("X-Forwarded-For", "").split(",")):
        hop = hop.strip()
        if hop and hop not in proxies:
            try:
                return ipaddress.ip_address(hop).compressed
            except ValueError:
                return peer                     # garbage from the proxy: it is the client
    return peer


class Warnings:
    """What the operator must see on stderr, -v or not: storage failures, internal errors,
    refusals by a cap. Each kind at most once every ``every`` seconds, with a count of the ones
    held back (a flood must not become a flood of log lines)."""

    def __init__(self, every=WARN_EVERY, clock=time.monotonic, stream=None):
        self.every, self.clock, self.stream = every, clock, stream
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, kind: str, text: str) -> None:
        with self._lock:
            now = self.clock()
            last, held = self._seen.get(kind, (None, 0))
            if last is not None and now - last < self.every:
                self._seen[kind] = (last, held + 1)
                return
            self._seen[kind] = (now, 0)
        more = f" ({held} more like it held back)" if held else ""
        print(f"ping_server: {text}{more}", file=self.stream or sys.stderr, flush=True)


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


class EventFeed:
    """Store changes as /events messages, each formatted once for every subscriber: an update
    on a change (at most one a second), a keepalive comment when idle. One thread; the front
    writes what it publishes to every open stream."""

    def __init__(self, store: Store, front: http_front.Front, stopping: threading.Event):
        self.store, self.front, self.stopping = store, front, stopping

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._feed()
            except Exception:
                self.front.warn("internal", "the /events feed failed:\n" + traceback.format_exc())
                self.stopping.wait(EVENTS_MIN_GAP)

    def _feed(self) -> None:
        version = None
        while not self.stopping.is_set():
            if self.store.version != version:
                version = self.store.version
                self.front.publish(b"event: update\ndata: " + _json(self.store.progress())
                                   + b"\n\n", latest=True)
                self.stopping.wait(EVENTS_MIN_GAP)
            elif self.store.wait_change(version, KEEPALIVE_EVERY) == version:
                self.front.publish(b": keepalive\n\n")


class CensusServer:
    """The census over HTTP: ROUTES behind an ``http_front.Front`` (see its docstring for the
    connection limits). ``serve_forever`` / ``shutdown`` / ``server_close`` as socketserver's."""

    pseudonym_key = secrets.token_bytes(16)     # main() puts the one kept in --data here

    def __init__(self, address, store: Store, *, admin_token=None, idle_timeout=IDLE_TIMEOUT,
                 static_dir=HERE, verbose=False, workers=http_front.WORKERS,
                 max_connections=None, max_per_address=http_front.MAX_PER_ADDRESS, proxies=(),
                 head_timeout=http_front.HEAD_TIMEOUT, warn=None, site=views.Site()):
        self.store = store
        self.site = site                # --about, --contact, the opt-out list, the scope
        self.maps = {}                  # size -> pictures.CensusMap, made on first request
        self.admin_token = admin_token or None
        self.static_dir = Path(static_dir)
        self.verbose = verbose
        self.proxies = frozenset(ipaddress.ip_address(p).compressed for p in proxies)
        self.warn = Warnings() if warn is None else warn
        self.metrics = Metrics()
        self.stopping = threading.Event()
        limits = http_front.Limits(workers, max_connections, max_per_address, head_timeout,
                                   idle_timeout)
        self.front = http_front.Front(address, self._handle, _refusal_bytes, self.warn, limits,
                                      self.proxies)
        self.server_address = self.front.address
        self.events = EventFeed(store, self.front, self.stopping)

    def serve_forever(self, poll_interval=0.5):
        threading.Thread(target=self.events.run, name="events", daemon=True).start()
        self.front.serve_forever(poll_interval)

    def shutdown(self):
        self.stopping.set()
        self.front.shutdown()

    def server_close(self):
        self.stopping.set()
        self.front.close()

    def _handle(self, channel, message):
        return Handler(self, channel, message).run()


class Handler:
    """The plumbing of one request, in a worker thread: routed through ROUTES to a route
    function (below the class), whose (HTTPStatus, body) is answered on the channel: JSON made
    here, a refusal turned into JSON here, caching headers and 304s here."""

    def __init__(self, server: CensusServer, channel: http_front.Channel,
                 message: http_front.Message):
        self.server, self.channel, self.message = server, channel, message
        self.command, self.path, self.headers = message.method, message.target, message.headers
        self.close_connection = not message.keep_alive
        self.client = client_address(message.peer, message.headers, server.proxies)
        self.after = None                       # SUBSCRIBE once an event stream is open

    def run(self) -> str:
        """Route and answer; what the connection does next (http_front KEEP, CLOSE, SUBSCRIBE)."""
        self._dispatch()
        return self.after or (CLOSE if self.close_connection else KEEP)

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
        except OSError as exc:                  # the store cannot write: try again later
            self.server.warn("storage", f"storage error on {self.command} {path}: {exc}")
            status, body = HTTPStatus.SERVICE_UNAVAILABLE, {"error": "storage unavailable"}
        except Exception:                       # a bug, not the client's fault: still JSON
            self.server.warn("internal", f"internal error on {self.command} {path}:\n"
                                         f"{traceback.format_exc().rstrip()}")
            self.close_connection = True
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        status, body = self._cached(path, status, body)
        self._send(status, body)
        self.server.metrics.observe(endpoint, status, time.perf_counter() - started)
        if self.server.verbose:
            print(f'{self.client} - - [{_http_date()}] "{self.command} {self.path[:200]} '
                  f'{self.message.version}" {int(status)} -', file=sys.stderr, flush=True)

    def _route(self):
        try:
            url = urlsplit(self.path)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad URL") from None
        reads = self.command == "HEAD" and url.path not in CHANGES_STATE
        method = "GET" if reads else self.command
        route = ROUTES.get((method, _route_path(url.path)))
        if route is None:
            allowed = sorted(m for m, p in ROUTES if p == _route_path(url.path))
            if "GET" in allowed and url.path not in CHANGES_STATE:
                allowed.append("HEAD")
            if allowed:
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {' or '.join(allowed)}",
                                headers=[("Allow", ", ".join(allowed))])
            raise HttpError(HTTPStatus.NOT_FOUND, "no such path")
        if url.path in CHANGES_STATE:
            check_same_site(self.headers)
        try:
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True,
                                                  max_num_fields=32).items()}
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad query string") from None
        return route(Request(method, url.path, query, self.message.body, self.client,
                             self.headers, self.server))

    def _cached(self, path, status, body):
        """Read endpoints: Cache-Control beside an ETag (the body's digest), and 304 for a
        client or proxy that holds this body already. Routes that change state: no-store."""
        if path in CHANGES_STATE:
            return status, _with_headers(body, ("Cache-Control", "no-store"))
        policy = CACHE_CONTROL.get(path)
        if policy is None or status not in (HTTPStatus.OK, HTTPStatus.NOT_MODIFIED):
            return status, body
        if not isinstance(body, (Raw, Stream)):
            body = Raw(JSON_TYPE, _json(body))
        headers = [(k, v) for k, v in body.headers if k.lower() != "cache-control"]
        etag = dict((k.lower(), v) for k, v in headers).get("etag")
        if etag is None and status == HTTPStatus.OK:
            etag = (f'W/"v{self.server.store.version}"' if isinstance(body, Stream) else
                    '"' + hashlib.blake2b(body.data, digest_size=12).hexdigest() + '"')
            headers.append(("ETag", etag))
        headers.append(("Cache-Control", policy))
        if etag and self.headers.get("If-None-Match", "").strip() == etag:
            close = getattr(body, "chunks", None) and getattr(body.chunks, "close", None)
            if close:
                close()                         # a stream not begun: nothing to send
            status, body = HTTPStatus.NOT_MODIFIED, Raw(body.content_type, b"")
        return status, body._replace(headers=tuple(headers))

    def _send(self, status, body):
        """The one place answers are written; dict/list bodies become JSON here."""
        if isinstance(body, Stream):
            return self._send_stream(status, body)
        if isinstance(body, Subscription):
            return self._subscribe(status, body)
        if not isinstance(body, Raw):
            body = Raw(JSON_TYPE, _json(body))
        head_only = self.command == "HEAD" or status == HTTPStatus.NOT_MODIFIED
        self.channel.send(_answer(status, body, self.close_connection, self.message.version,
                                  head_only))

    def _send_stream(self, status, body):
        self.close_connection = True
        headers = body.headers or (("Cache-Control", "no-cache"),)
        head = _answer(status, Raw(body.content_type, b"", tuple(headers)), True,
                       self.message.version, head_only=True, length=False)
        try:
            self.channel.send_all(head, self.server.front.limits.idle_timeout)
            if self.command != "HEAD":
                for chunk in body.chunks:
                    self.channel.send_all(chunk, self.server.front.limits.idle_timeout)
        except OSError:
            pass                                # the reader went away or stalled
        finally:
            close = getattr(body.chunks, "close", None)
            if close:
                close()

    def _subscribe(self, status, body):
        head = _answer(status, Raw(body.content_type, b"", (("Cache-Control", "no-cache"),
                                                            ("X-Accel-Buffering", "no"))),
                       True, self.message.version, head_only=True, length=False)
        if self.command == "HEAD" or status != HTTPStatus.OK:
            self.close_connection = True
            return self.channel.send(head)
        seen, latest = self.server.front.latest
        self.channel.seen = seen
        self.channel.send(head + b"retry: 3000\n\n" + latest)
        self.after = SUBSCRIBE


# -- routes: volunteers ---------------------------------------------------------------------------

def get_task(req):
    lease = req.query.get("lease")
    if lease not in (None, "", "required"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "lease must be 'required' (or absent)")
    options = {"within": _within(req.query), "lease_required": lease == "required",
               "name": (req.query.get("name") or "").strip()[:64] or None}
    try:
        handout = req.server.store.get_task(req.client,
                                             **{k: v for k, v in options.items() if v})
    except Refused as exc:
        raise _store_refusal(exc) from None
    if handout is None:
        return HTTPStatus.OK, {"error": "No tasks available"}
    lease_seconds = req.server.store.lease_seconds
    return HTTPStatus.OK, {
        "task_index": handout.task, "task_status": 1, "lease": handout.lease.token,
        "deadline": handout.lease.deadline,
        "lease_seconds": int(lease_seconds) if lease_seconds.is_integer() else lease_seconds,
        "network": handout.network, "exclude": handout.exclude,
        **({"contact": req.server.site.contact} if req.server.site.contact else {})}


def submit_result(req):
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
    name = ((fields["name"] or "").strip()[:64]
            or pseudonym(req.server.pseudonym_key, req.client))
    try:
        duplicate = req.server.store.submit(
            task, result.get("result_data"), holder=req.client, token=fields["lease"],
            name=name, rtt=fields["rtt_us"], stats=stats, failure=failure,
            bitmap=result.get("bitmap"), icmp_errors=fields["icmp_errors"],
            skipped=data.get("skipped"))
    except Refused as exc:
        raise _store_refusal(exc, success=False) from None
    return HTTPStatus.OK, ({"success": True, "duplicate": True} if duplicate
                           else {"success": True})


def release(req):
    data = _json_object(req.body, success=False)
    task = _task_index(data.get("task_index"), success=False)
    try:
        req.server.store.release(task, holder=req.client, token=_optional_str(data, "lease"))
    except Refused as exc:
        raise _store_refusal(exc, success=False) from None
    return HTTPStatus.OK, {"success": True}


def ping(req):
    return HTTPStatus.OK, {}


def join(req):
    return HTTPStatus.OK, {"command": join_command(req.server.site.scope)}


# -- routes: admin --------------------------------------------------------------------------------

def _admin(req):
    check_admin(req.server.admin_token, req.headers.get("Authorization"), req.client,
                req.headers.get("Sec-Fetch-Site"), host=req.headers.get("Host"),
                forwarded=any(name in req.headers for name in FORWARDING_HEADERS))


def add_task(req):
    _admin(req)
    data = _json_object(req.body, success=False)
    status = _task_index(data.get("task_status", 0), "task_status")
    wanted = data.get("task_index")                 # optional: that task, else the first
    task = req.server.store.add_task(status, req.client,
                                      None if wanted is None else _task_index(wanted))
    return HTTPStatus.OK, {"success": True, "task_index": task}


def revise(req):
    _admin(req)
    task = _task_index(req.query.get("id"), "id")
    code = _task_index(req.query.get("code"), "code")
    force = req.query.get("force", "").lower() in ("1", "true", "yes", "on")
    req.server.store.revise(task, code, force=force, holder=req.client)
    return HTTPStatus.OK, {"success": True, "task_index": task, "task_status": code}


def reset_errors(req):
    _admin(req)
    ident = req.query.get("id")
    task = -1 if ident is not None and ident.strip() == "-1" else _task_index(ident, "id")
    count = req.server.store.reset_errors(task)
    return HTTPStatus.OK, {"success": True, "reset": count}


# -- routes: reading the census -------------------------------------------------------------------

def error_list(req):
    return HTTPStatus.OK, [{"task_index": t, "error": e} for t, e in req.server.store.errors()]


def error_page(req):
    rows = "".join(f"<tr><td>{t}</td><td>{html.escape(str(network_of(t)))}</td>"
                   f"<td>{html.escape(e)}</td></tr>\n" for t, e in req.server.store.errors())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Census errors</title>"
            f"</head><body><h1>Tasks in error</h1><p><a href='/'>dashboard</a></p>"
            f"<table border='1'><tr><th>task</th><th>network</th><th>error</th></tr>\n"
            f"{rows}</table></body></html>\n")
    return HTTPStatus.OK, Raw("text/html; charset=utf-8", page.encode())


def get_pending(req):
    return HTTPStatus.OK, {str(t): 1 for t in req.server.store.pending()}


def get_latest_task(req):
    task = req.server.store.latest_available()
    if task is None:
        return HTTPStatus.OK, {"error": "No tasks available"}
    return HTTPStatus.OK, {"task_index": task, "task_status": 0}


def get_progress(req):
    return HTTPStatus.OK, req.server.store.progress()


def rate(req):
    return HTTPStatus.OK, req.server.store.rate()


def result(req):
    return HTTPStatus.OK, req.server.store.result(_task_index(req.query.get("id"), "id"))


def task(req):
    info = req.server.store.task_info(_task_index(req.query.get("id"), "id"))
    if info["state"] == 4:
        info["reason"] = views.exclusion_reason(info["task_index"], req.server.site)
    return HTTPStatus.OK, info


def contributors(req):
    store = req.server.store
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


def census_map(req):
    version, data = req.server.store.map_bytes()
    etag = f'"{version}"'
    headers = (("ETag", etag), ("Cache-Control", "no-cache"))
    if req.headers.get("If-None-Match", "").strip() == etag:
        return HTTPStatus.NOT_MODIFIED, Raw("application/octet-stream", b"", headers)
    return HTTPStatus.OK, Raw("application/octet-stream", data, headers)


def export_csv(req):
    try:
        fields = views.parse_fields(req.query.get("fields"))
        network = views.parse_network(req.query.get("network"))
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    chunks = views.csv_chunks(req.server.store, fields, network)
    headers = (("Vary", "Accept-Encoding"),)
    if views.wants_gzip(req.headers.get("Accept-Encoding")):
        chunks, headers = views.gzipped(chunks), headers + (("Content-Encoding", "gzip"),)
    return HTTPStatus.OK, Stream("text/csv; charset=utf-8", chunks, headers)


def events(req):
    return HTTPStatus.OK, Subscription()


def metrics(req):
    text = _prometheus(req.server.store.counters(), *req.server.metrics.copy())
    return HTTPStatus.OK, Raw("text/plain; version=0.0.4; charset=utf-8", text.encode())


def healthz(req):
    degraded = getattr(req.server.store, "degraded", None)
    reason = degraded() if callable(degraded) else degraded
    if isinstance(reason, str) and reason:
        return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded", "error": reason}
    return HTTPStatus.OK, {"status": "ok"}


def ping_zip(req):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("ping_client.py", "icmp.py"):
            path = req.server.static_dir / name
            if not path.is_file():
                raise HttpError(HTTPStatus.NOT_FOUND, f"{name} is missing on the server")
            archive.write(path, name)
    return HTTPStatus.OK, Raw("application/zip", buffer.getvalue(),
                              (("Content-Disposition", 'attachment; filename="ping.zip"'),))


def dashboard(req):
    path = req.server.static_dir / "dashboard.html"
    page = path.read_bytes() if path.is_file() else _FALLBACK_PAGE
    return HTTPStatus.OK, Raw("text/html; charset=utf-8", page)


# -- routes: pictures and pages for people (pictures.py, views.py) --------------------------------

def block_png(req):
    task = _task_index(req.query.get("id"), "id")
    info = req.server.store.task_info(task)
    etag = f'"{task}-{info["state"]}-{info["finished_at"]}"'
    headers = (("ETag", etag),)             # Cache-Control: CACHE_CONTROL's
    if req.headers.get("If-None-Match", "").strip() == etag:
        return HTTPStatus.NOT_MODIFIED, Raw("image/png", b"", headers)
    result = req.server.store.result(task)             # 404 unless done
    not_probed = pictures.excluded_ranges(task, info["exclude"])
    return HTTPStatus.OK, Raw("image/png", pictures.block_png(result["result_data"],
                                                              not_probed), headers)


def map_png(req):
    size = req.query.get("size", "4096").strip()
    if not size.isdecimal() or int(size) not in pictures.MAP_SIZES:
        raise HttpError(HTTPStatus.BAD_REQUEST, "size must be one of "
                        + ", ".join(map(str, pictures.MAP_SIZES)))
    size = int(size)
    painter = req.server.maps.get(size) or req.server.maps.setdefault(
        size, pictures.CensusMap(size))
    wanted = req.headers.get("If-None-Match", "").strip()
    if wanted == f'"{req.server.store.version}-{size}"':
        return HTTPStatus.NOT_MODIFIED, Raw("image/png", b"", (("ETag", wanted),))
    version, data = painter.render(req.server.store)
    return HTTPStatus.OK, Raw("image/png", data, (("ETag", f'"{version}-{size}"'),))


def block_list(req):
    page = _task_index(req.query.get("page", "1"), "page")
    state = req.query.get("state")
    state = None if state in (None, "") else _task_index(state, "state")
    if page < 1 or state not in (None, 0, 1, 2, 3, 4):
        raise HttpError(HTTPStatus.BAD_REQUEST, "page counts from 1; state is 0..4")
    version, states = req.server.store.map_bytes()
    if req.query.get("format") == "json":
        return HTTPStatus.OK, views.list_json(states, version, page, state)
    return HTTPStatus.OK, _html(views.list_page(states, version, page, state))


def details(req):
    task = _task_index(req.path.removeprefix("/details/"), "the block in /details/<id>")
    info = req.server.store.task_info(task)
    result = req.server.store.result(task) if info["state"] == 2 else None
    reason = (views.exclusion_reason(task, req.server.site) if info["state"] == 4
              else None)
    return HTTPStatus.OK, _html(views.details_page(info, result, reason))


def about(req):
    return HTTPStatus.OK, _html(views.about_page(req.server.site))


def about_json(req):
    site = req.server.site
    return HTTPStatus.OK, {"about": site.about, "contact": site.contact,
                           "scope": [str(net) for net in site.scope] or "all"}


def history(req):
    store = req.server.store
    return HTTPStatus.OK, views.history(store.finished_times(), store.clock())


ROUTES = {
    ("GET", "/get_task"): get_task,
    ("POST", "/submit_result"): submit_result,
    ("POST", "/release"): release,
    ("GET", "/ping"): ping,
    ("GET", "/join"): join,
    ("POST", "/add_task"): add_task,
    ("GET", "/revise"): revise,
    ("GET", "/error/reset"): reset_errors,
    ("GET", "/error"): error_list,
    ("GET", "/errors"): error_page,
    ("GET", "/get_pending"): get_pending,
    ("GET", "/get_latest_task"): get_latest_task,
    ("GET", "/get_progress"): get_progress,
    ("GET", "/rate"): rate,
    ("GET", "/result"): result,
    ("GET", "/task"): task,
    ("GET", "/contributors"): contributors,
    ("GET", "/map"): census_map,
    ("GET", "/export.csv"): export_csv,
    ("GET", "/events"): events,
    ("GET", "/metrics"): metrics,
    ("GET", "/healthz"): healthz,
    ("GET", "/ping.zip"): ping_zip,
    ("GET", "/"): dashboard,
    ("GET", "/dashboard.html"): dashboard,
    ("GET", "/block.png"): block_png,
    ("GET", "/map.png"): map_png,
    ("GET", "/list"): block_list,
    ("GET", "/details/"): details,
    ("GET", "/about"): about,
    ("GET", "/about.json"): about_json,
    ("GET", "/history"): history,
}
PATHS = frozenset(path for _, path in ROUTES)
# /get_task and every route that changes state: no HEAD, no browser requests from other sites,
# never cached
CHANGES_STATE = frozenset({"/get_task", "/submit_result", "/release", "/add_task", "/revise",
                           "/error/reset"})
# Read endpoints a proxy may serve from its cache for that long (each has an ETag too)
CACHE_CONTROL = {"/": "public, max-age=60", "/dashboard.html": "public, max-age=60",
                 "/get_progress": "public, max-age=2", "/map": "public, max-age=2",
                 "/contributors": "public, max-age=10", "/export.csv": "public, max-age=60",
                 "/map.png": "public, max-age=10", "/block.png": "public, max-age=60",
                 "/list": "public, max-age=10", "/history": "public, max-age=60",
                 "/about": "public, max-age=60", "/about.json": "public, max-age=60"}
SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer"))
CSP_DATA = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SERVER_NAME = "ipv4-census/1"
_JSON = json.JSONEncoder(separators=(",", ":"))   # one encoder: json.dumps builds one a call

_FALLBACK_PAGE = (b"<!doctype html><html><head><meta charset='utf-8'><title>IPv4 census</title>"
                  b"</head><body><h1>IPv4 census</h1><p>The dashboard page is missing; the data: "
                  b"<a href='/get_progress'>progress</a>, "
                  b"<a href='/contributors'>contributors</a>, "
                  b"<a href='/errors'>errors</a>, <a href='/ping.zip'>the client</a>.</p>"
                  b"</body></html>\n")


def join_command(scope) -> str:
    """The line a volunteer pastes to join a census of ``scope`` (None or []: all), with
    "{origin}" where the page showing it puts its own address. A scope inside reserved space
    (the demo's loopback) needs the client's --allow, which it never takes from a server; --only
    keeps the volunteer to the scope whatever a server hands out later."""
    flags = ""
    if scope:
        reserved = [net for net in scope if any(net.subnet_of(r) for r in RESERVED)]
        if reserved:
            flags += " --allow " + ",".join(map(str, reserved))
        only = ",".join(map(str, ipaddress.collapse_addresses(scope)))
        if only != "0.0.0.0/0":
            flags += " --only " + only
    return ("curl -fO {origin}/ping.zip && unzip -o ping.zip && "
            "sudo python3 ping_client.py --server {origin}" + flags + " --name YOUR_NAME")


def pseudonym(key: bytes, address: str) -> str:
    """The public name of a volunteer who sent none: never its address. Keyed, because a plain
    hash of an IPv4 address is undone by hashing all 2**32 of them."""
    return "volunteer-" + hmac.new(key, address.encode(), "sha256").hexdigest()[:8]


def load_pseudonym_key(directory) -> bytes:
    """The census's pseudonym key, made (0600) in ``directory`` at its first start, so that a
    volunteer keeps one name across restarts."""
    path = Path(directory) / PSEUDONYM_KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_hex(16).encode()
    partial = path.with_name(path.name + ".tmp")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    return key



# -- private helpers ------------------------------------------------------------------------------

def _route_path(path: str) -> str:
    """The route-table key of a path: itself, or "/details/" for /details/<id>."""
    return "/details/" if path.startswith("/details/") else path


def _html(page: str) -> Raw:
    return Raw("text/html; charset=utf-8", page.encode())


def _refusal(exc: HttpError) -> Raw:
    return Raw(JSON_TYPE, _json(exc.body()), exc.headers)


def _json(body) -> bytes:
    return _JSON.encode(body).encode()


def _answer(status, body: Raw, close: bool, version: str, head_only=False, length=True) -> bytes:
    """The bytes of an answer: status line, headers (the security ones on every answer), body."""
    status = HTTPStatus(status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Server: {SERVER_NAME}",
             f"Date: {_http_date()}", f"Content-Type: {body.content_type}"]
    if length and status != HTTPStatus.NOT_MODIFIED:
        lines.append(f"Content-Length: {len(body.data)}")
    lines += [f"{name}: {value}" for name, value in body.headers + SECURITY_HEADERS]
    lines.append("Content-Security-Policy: " + (_page_policy(body.data)
                 if body.content_type.startswith("text/html") else CSP_DATA))
    if close:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body.data


def _refusal_bytes(status, message: str, headers=()) -> bytes:
    """An answer the front gives by itself (a bad head, a full server): JSON, then close."""
    return _answer(status, Raw(JSON_TYPE, _json({"error": message}), tuple(headers)), True,
                   "HTTP/1.1")


_INLINE = re.compile(rb"<script\b([^>]*)>(.*?)</script\s*>", re.S | re.I)


@functools.lru_cache(maxsize=16)
def _page_policy(page: bytes) -> str:
    """The CSP of an HTML page: its own inline scripts allowed by their SHA-256 (nothing else
    inline runs), styles from the page itself ('unsafe-inline': the page uses style attributes,
    and CSS runs no script), everything else from this server only, never framed."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m[2]).digest()).decode() + "'"
                      for m in _INLINE.finditer(page) if b"src=" not in m[1].lower())
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


_DATE = [None, ""]                  # (second, Date header) of the latest answer


def _http_date() -> str:
    second = int(time.time())       # formatdate() costs 3 us; the Date changes once a second
    if _DATE[0] != second:
        _DATE[:] = second, email.utils.formatdate(second, usegmt=True)
    return _DATE[1]


def _same_origin(origin: str, host: str | None) -> bool:
    """An Origin header naming the host the request was sent to (default ports aside)."""
    try:
        url = urlsplit(origin.strip())
    except ValueError:
        return False
    default = {"http": ":80", "https": ":443"}.get(url.scheme, "")
    given = url.netloc.lower().removesuffix(default)
    return bool(url.netloc) and given == (host or "").strip().lower().removesuffix(default)


def _with_headers(body, *headers):
    if isinstance(body, (dict, list)):
        body = Raw(JSON_TYPE, _json(body))
    if isinstance(body, (Raw, Stream)):
        return body._replace(headers=tuple(body.headers) + headers)
    return body


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


def _prometheus(counters: dict, requests: dict, latency: dict) -> str:
    lines = ["# HELP census_tasks Tasks by state.", "# TYPE census_tasks gauge"]
    lines += [f'census_tasks{{state="{s}"}} {n}' for s, n in counters["states"].items()]
    for name, key, text in (("census_submissions_total", "submissions", "Results accepted."),
                            ("census_rejects_total", "rejects", "Requests the store refused."),
                            ("census_leases_expired_total", "leases_expired", "Leases expired."),
                            ("census_damaged_results_total", "damaged_results",
                             "Stored results that failed their CRC when read (task re-queued).")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {counters[key]}"]
    for name, key, text in (("census_damaged_records", "damaged_records",
                             "Log records found damaged at start (reported, tasks re-queued)."),
                            ("census_store_degraded", "degraded", "1 while the disk refuses "
                             "writes."),
                            ("census_contributors_flagged", "flagged",
                             "Contributors flagged for disagreeing too often.")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {counters[key]}"]
    for name, key, text in (("census_verification_agreements_total", "agreements",
                             "Results found to agree with the kept result of their block."),
                            ("census_verification_disputes_total", "disputes",
                             "Results found to disagree with the kept result of their block.")):
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


SERVER_EPILOG = f"""\
files kept in --data:
  {SNAPSHOT_FILE:14}snapshot of the state (rewritten from time to time)
  {LOG_FILE:14}journal and results (about 0.5 GB for a whole census)
  {SCOPE_FILE:14}the scope the census was started with (a restart keeps it)
  {PSEUDONYM_KEY_FILE:14}the key of the volunteer-XXXXXXXX names of volunteers who send none

environment: PING_HOST, PING_PORT, PING_DATA, PING_SCOPE, PING_EXCLUDE, PING_LEASE,
PING_ADMIN_TOKEN, PING_MAX_LEASES, PING_VERIFY, PING_WORKERS, PING_MAX_CONNECTIONS, PING_MAX_PER_ADDRESS,
PING_PROXY, PING_ABOUT and PING_CONTACT set the defaults of the matching options (--demo takes
none of the first seven).

exit codes:
  0  stopped by Ctrl-C or SIGTERM (with --demo: after its block was done)
  1  could not start: port taken or privileged, data folder unusable or held by another
     server, no ICMP permission for the demo's volunteer (one line says what to do)
  2  bad flags

examples:
  sudo python3 ping_server.py --demo            # safe: a census of 127.0.0.0/16, this machine only
  python3 ping_server.py --host 127.0.0.1 --port 8002 --scope 127.0.0.0/16 --data /tmp/census
  PING_ADMIN_TOKEN=SECRET python3 ping_server.py --data /var/lib/census --exclude optout.txt
                                                # a REAL census of the public Internet
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ping_server.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The IPv4 census task server: hands out /16 blocks to volunteers, keeps\n"
                    "their results and serves the dashboard.",
        epilog=SERVER_EPILOG)
    for add_options in (_census_options, _volunteer_options, _connection_options,
                        _site_options):
        add_options(parser)
    return parser


def _census_options(parser) -> None:
    """Where the census listens, keeps its files, and which networks it covers."""
    parser.add_argument("--demo", action="store_true",
                        help="a safe local demo: a census of 127.0.0.0/16 on 127.0.0.1 in a "
                             "temporary folder (removed at exit), with one built-in volunteer "
                             "(ping_client.py); nothing leaves 127.0.0.0/8 (default: off)")
    parser.add_argument("--host", metavar="ADDR",
                        help="address to listen on; 0.0.0.0 = every interface (default: "
                             "$PING_HOST, else 0.0.0.0)")
    parser.add_argument("--port", type=_port, metavar="PORT",
                        help="TCP port, 0 = any free one (default: $PING_PORT, else "
                             f"{DEFAULT_PORT}; with --demo {DEMO_PORT})")
    parser.add_argument("--data", metavar="DIR",
                        help="folder of the census files, created if missing (default: "
                             "$PING_DATA, else the current folder)")
    parser.add_argument("--scope", metavar="CIDR[,CIDR]",
                        help="the networks in the census; naming reserved space allows it. "
                             "'all' = every /16 outside reserved space: the public Internet. "
                             "Remembered in --data (default: $PING_SCOPE, else the remembered "
                             "scope, else all)")
    parser.add_argument("--exclude", metavar="FILE",
                        help="opt-out list, ZMap blocklist format: one CIDR a line, '#' "
                             "comments (default: $PING_EXCLUDE, else none)")


def _volunteer_options(parser) -> None:
    """How long a volunteer holds a block, who may act as admin, what one address may hold,
    how much of a contributor's work is checked."""
    parser.add_argument("--lease", type=float, metavar="SECONDS",
                        help="seconds a volunteer holds a block before it goes back to the "
                             f"pool (default: $PING_LEASE, else {LEASE_SECONDS:g})")
    parser.add_argument("--admin-token", metavar="TOKEN",
                        help="Bearer token for the admin actions (default: $PING_ADMIN_TOKEN, "
                             "else none: admin actions from loopback only)")
    env = os.environ.get
    parser.add_argument("--max-leases", type=int, metavar="N", default=env("PING_MAX_LEASES", "16"),
                        help="live leases one client address may hold, beyond that 429; 0 = no "
                             "limit (default: %(default)s)")
    parser.add_argument("--verify", type=float, metavar="FRACTION",
                        default=env("PING_VERIFY", str(FRACTION)),
                        help="share of a trusted contributor's results sent to a second "
                             "holder to check (a new or flagged one's: all of them); 0 = off "
                             "(default: %(default)s)")


def _connection_options(parser) -> None:
    """The HTTP front: worker threads, connection caps, trusted reverse proxies."""
    env = os.environ.get
    parser.add_argument("--workers", type=int, metavar="N",
                        default=env("PING_WORKERS", http_front.WORKERS),
                        help="request worker threads (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, metavar="N",
                        default=env("PING_MAX_CONNECTIONS"),
                        help="connections held at once, beyond that 503 (default: what the fd "
                             f"limit allows, less {http_front.RESERVED_FDS})")
    parser.add_argument("--max-per-address", type=int, metavar="N",
                        default=env("PING_MAX_PER_ADDRESS", http_front.MAX_PER_ADDRESS),
                        help="connections from one remote address, beyond that 503 "
                             "(default: %(default)s; --proxy peers are not counted)")
    parser.add_argument("--proxy", metavar="ADDR[,ADDR]", default=env("PING_PROXY", ""),
                        help="reverse proxies whose X-Forwarded-For is trusted for the client "
                             "address (default: none)")


def _site_options(parser) -> None:
    """What people are told about the census, and the request log."""
    env = os.environ.get
    parser.add_argument("--about", metavar="FILE", default=env("PING_ABOUT"),
                        help="a text file about this census (who runs it, why, how to opt out), "
                             "shown at /about (default: none)")
    parser.add_argument("--contact", metavar="URL_OR_EMAIL", default=env("PING_CONTACT"),
                        help=f"URL or e-mail of the operator (printable ASCII, at most "
                             f"{MAX_CONTACT} bytes): shown on the dashboard and /about, and "
                             f"carried in every probe's payload by the clients (default: none)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every request (default: off)")


def _parse_args(argv):
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        given = [f"--{name}" for name in ("host", "data", "scope", "exclude")
                 if getattr(args, name) is not None]
        if given:
            parser.error(f"--demo runs on 127.0.0.1, scoped to {DEMO_SCOPE}, in a temporary "
                         f"folder: leave out {' '.join(given)}")
        args.lease = LEASE_SECONDS if args.lease is None else args.lease
        return _checked(parser, args)
    env = os.environ.get
    try:
        args.host = env("PING_HOST", "0.0.0.0") if args.host is None else args.host
        args.port = _port(env("PING_PORT", str(DEFAULT_PORT))) if args.port is None else args.port
        args.data = env("PING_DATA", ".") if args.data is None else args.data
        args.lease = float(env("PING_LEASE", LEASE_SECONDS)) if args.lease is None else args.lease
        args.admin_token = env("PING_ADMIN_TOKEN") if args.admin_token is None else args.admin_token
        args.scope = _parse_scope(env("PING_SCOPE") if args.scope is None else args.scope)
        exclude = env("PING_EXCLUDE") if args.exclude is None else args.exclude
        args.exclude = parse_blocklist(Path(exclude).read_text()) if exclude else ()
    except (ValueError, OSError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    return _checked(parser, args)


def _checked(parser, args):
    if not args.lease > 0:
        parser.error("--lease must be positive")
    try:
        args.proxy = [ipaddress.ip_address(p.strip()).compressed
                      for p in args.proxy.split(",") if p.strip()]
    except ValueError as exc:
        parser.error(f"--proxy: {exc}")
    if args.max_leases < 0:
        parser.error("--max-leases must be 0 or more")
    if not 0.0 <= args.verify <= 1.0:
        parser.error("--verify is a fraction from 0 (off) to 1")
    if args.workers < 1 or (args.max_connections or 1) < 1 or args.max_per_address < 1:
        parser.error("--workers, --max-connections and --max-per-address must be positive")
    _check_site(parser, args)
    return args


def _port(text: str) -> int:
    """An argparse type: a TCP port number, 0 (any free port) to 65535."""
    if not text.strip().isdecimal() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"port {text!r}: expected a number from 0 to 65535")
    return int(text)


def _check_site(parser, args):
    """--contact printable ASCII and short (it goes into every probe); --about read as text."""
    if args.contact is not None:
        args.contact = args.contact.strip()
        if not (args.contact.isascii() and args.contact.isprintable() and args.contact) \
                or len(args.contact) > MAX_CONTACT:
            parser.error(f"--contact must be 1..{MAX_CONTACT} printable ASCII characters")
    try:
        args.about = Path(args.about).read_text(encoding="utf-8")[:MAX_ABOUT] if args.about else ""
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--about: {exc}")


def _parse_scope(text):
    """None (not given), [] ('all': the whole census) or the list of networks."""
    if not text:
        return None
    if text.strip().lower() == "all":
        return []
    return [ipaddress.IPv4Network(part.strip()) for part in text.split(",") if part.strip()]


def _describe(scope) -> str:
    return ",".join(map(str, scope)) if scope else "all"


def _reaches_public(scope) -> bool:
    """Whether a census of ``scope`` (None or []: all) pings anything outside reserved space."""
    return not scope or any(not any(net.subnet_of(r) for r in RESERVED) for net in scope)


def _banner(url, scope, before, args, blocks, capacity="") -> str:
    """The one start-up banner (stderr): what this census is, where its data is, who may admin."""
    if _reaches_public(scope):
        head = ("ping_server.py: a REAL census: its scope reaches public address space, so "
                "volunteers who join will ping other people's networks on the Internet")
    else:
        head = "ping_server.py: a census of reserved address space only: nothing public is probed"
    what = "all (every /16 outside reserved space: the public Internet)" if not scope else \
        _describe(scope)
    if before is not None and sorted(before) != sorted(scope or []):
        what += f" (changed from {_describe(before)})"
    token = "set" if args.admin_token else \
        "none (admin actions only from this machine, never through a proxy)"
    lines = [head, f"  scope:       {what}: {blocks:,} block{'' if blocks == 1 else 's'} of /16",
             f"  data folder: {Path(args.data).resolve()}", f"  lease:       {args.lease:g} s",
             f"  admin token: {token}", *([f"  capacity:    {capacity}"] if capacity else ()),
             f"  listening on {url}"]
    if _reaches_public(scope):
        lines.append("  before anyone joins, publish an about page and an opt-out contact "
                     "(README: Running a real census)")
    return "\n".join(lines)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cannot_start(problem: str) -> int:
    _say(f"ping_server.py: {problem}")
    return 1


def _bind_problem(host, port, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if isinstance(exc, socket.gaierror):
        return f"{where}: no such address {host!r} (--host takes an address of this machine)"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is taken (another census server?): stop it or pick another --port"
    if exc.errno == errno.EACCES:
        return f"{where}: ports below 1024 need root: use --port {DEFAULT_PORT} or another above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine (see --host)"
    return f"{where}: {exc.strerror or exc}"


def _store_problem(directory, exc: Exception) -> str:
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, OSError):
        return (f"cannot use the data folder {Path(directory).resolve()}: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "") + "; see --data")
    return f"cannot read the census in {Path(directory).resolve()}: {exc}"


def _listen(host, port, args) -> CensusServer:
    """The bound server, with no store yet (see _attach): nothing is written into --data before
    the port is known to be free."""
    return CensusServer((host, port), None, admin_token=args.admin_token, verbose=args.verbose,
                        workers=args.workers, max_connections=args.max_connections,
                        max_per_address=args.max_per_address, proxies=args.proxy)


def _attach(server: CensusServer, store: Store) -> None:
    server.store = server.events.store = store


def _url(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def _serve(server) -> str:
    """Serve until Ctrl-C or SIGTERM; which of the two it was."""
    why = ["Ctrl-C"]

    def on_sigterm(*_):
        why[0] = "SIGTERM"
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return why[0]


class _Demo:
    """--demo's volunteer: the real client as a child process, kept to 127.0.0.0/8, doing the
    one block; and the line that says when it is done (or why not)."""

    def __init__(self, url: str, store: Store, folder: Path, started: float):
        self.url, self.store, self.started = url, store, started
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.child = subprocess.Popen(
            [sys.executable, str(HERE / "ping_client.py"), "--server", url.rstrip("/"),
             "--allow", "127.0.0.0/8", "--only", "127.0.0.0/8", "--name", "demo", "--once",
             "--spool", str(folder / "spool")], stdin=subprocess.DEVNULL)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        code = self.child.wait()
        if self.stopping.is_set():
            return
        progress = self.store.progress()
        if code == 0 and progress["done_tasks"]:
            self.done.set()
            _say(f"ping_server.py: demo block {DEMO_SCOPE} done in "
                 f"{time.monotonic() - self.started:.1f} s: {progress['responders']:,} of "
                 f"{progress['addresses_probed']:,} addresses answered; the dashboard stays up "
                 f"at {self.url} (Ctrl-C to stop)")
        else:
            _say(f"ping_server.py: the demo's volunteer stopped (exit {code}) before its block "
                 f"was done: see its messages above; the dashboard stays up at {self.url}")

    def stop(self):
        self.stopping.set()
        if self.child.poll() is None:
            self.child.terminate()              # SIGTERM: the client gives its task back
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()


def _icmp_problem() -> str:
    """'' when this process may send ICMP echo requests (a raw socket, or the unprivileged
    datagram kind that Linux allows to the groups in net.ipv4.ping_group_range, and macOS to
    all); else what to do. Opening a socket sends nothing."""
    for kind in (socket.SOCK_RAW, socket.SOCK_DGRAM):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return ""
        except OSError:
            continue
    return ("the demo's volunteer may not send ICMP here: run the demo with sudo (sudo python3 "
            "ping_server.py --demo), or allow unprivileged ICMP sockets with: "
            'sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"')


def _run_demo(args) -> int:
    """--demo: a census of 127.0.0.0/16 on 127.0.0.1, in a temporary folder, with one volunteer;
    serves until Ctrl-C, then stops the volunteer and removes the folder."""
    started = time.monotonic()
    problem = _icmp_problem()
    if problem:
        return _cannot_start(problem)
    try:
        server = _listen("127.0.0.1", DEMO_PORT if args.port is None else args.port, args)
    except OSError as exc:
        if args.port is not None or exc.errno != errno.EADDRINUSE:
            return _cannot_start(_bind_problem("127.0.0.1", args.port or DEMO_PORT, exc))
        server = _listen("127.0.0.1", 0, args)      # the usual port is taken: any free one
    folder = Path(tempfile.mkdtemp(prefix="census-demo-"))
    demo = None
    try:
        _attach(server, Store(folder, scope=[DEMO_SCOPE], lease_seconds=args.lease,
                              max_leases=args.max_leases))
        server.site = views.Site(args.about, args.contact, (), (DEMO_SCOPE,))
        url = _url(server)
        args.data, args.admin_token = folder, None
        _say(_banner(url, [DEMO_SCOPE], None, args, 1) +
             f"\n  demo:        one volunteer, ping_client.py --name demo, does the block; "
             f"this folder is removed at exit\n  open the dashboard: {url}")
        demo = _Demo(url, server.store, folder, started)
        why = _serve(server)
    finally:
        if demo:
            demo.stop()
        server.server_close()
        if server.store:
            server.store.close()
        shutil.rmtree(folder, ignore_errors=True)
    _say(f"ping_server.py: demo stopped ({why}); its temporary folder {folder} is removed")
    return 0 if demo.done.is_set() else 1


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.demo:
        return _run_demo(args)
    fd_limit = http_front.raise_fd_limit()
    try:
        server = _listen(args.host, args.port, args)
    except OSError as exc:
        return _cannot_start(_bind_problem(args.host, args.port, exc))
    try:
        scope, before = remembered_scope(args.data, args.scope)
        _attach(server, Store(args.data, scope=scope or None, exclude=args.exclude,
                              lease_seconds=args.lease, max_leases=args.max_leases,
                              verify=args.verify))
        server.pseudonym_key = load_pseudonym_key(args.data)
    except (StoreError, OSError, ValueError) as exc:
        server.server_close()
        if server.store:
            server.store.close()
        return _cannot_start(_store_problem(args.data, exc))
    server.site = views.Site(args.about, args.contact, tuple(args.exclude), tuple(scope or ()))
    capacity = (f"{server.front.capacity} connections (fd limit {fd_limit}), "
                f"{args.workers} workers")
    _say(_banner(_url(server), scope, before, args, server.store.progress()["total_tasks"],
                 capacity))
    try:
        why = _serve(server)
    finally:
        server.server_close()
        server.store.close()
    _say(f"ping_server.py: stopped ({why}); the census is kept in {Path(args.data).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
