"""The census server's connection machinery: one selectors loop owns every socket, a fixed pool
of worker threads runs the requests, and the same loop feeds every event stream.

    listener --accept--> Channel: the loop reads its head, then its body, under deadlines
                            ^                                   |
                            |                                   v  a whole request
          parked in the     |                            queue of (Channel, Message)
          selector (idle    |                                   |
          keep-alive, holds |                                   v
          no thread)        +--- handed back: KEEP / CLOSE --- worker: handler(channel, message),
                                  or SUBSCRIBE                  and the peer's next request if
                                        |                       it comes within HOT_WAIT
                                        v
                                  Broadcaster: the loop writes every publish() to each
                                  subscriber, non-blocking, a batch per turn

Front is the loop (accept, caps, channels, deadlines, hand-off), Workers the pool, Broadcaster
the event streams; Channel is one connection. Only the loop unregisters and closes sockets, so
the connection counts (overall and by remote address) are plain dicts; a worker owns a channel
only while it runs its requests, writes what the socket takes at once (the loop sends the rest)
and, where the selector allows it (epoll), parks the channel itself when it is done. Nothing
here knows the routes.

Limits: the head within ``head_timeout`` and at most MAX_HEAD bytes of header fields (431); the
body at MIN_BODY_RATE after that; an idle keep-alive connection ``idle_timeout``; beyond a
connection cap (overall, or per remote address) the peer gets 503 + Retry-After and is closed;
an accept() that fails for want of descriptors pauses accepting a moment (logged) instead of
spinning; a subscriber whose buffer stays full is dropped.
"""

import errno
import os
import re
import resource
import select
import selectors
import socket
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, NamedTuple

MAX_URL = 8192
MAX_HEAD = 65536                    # bytes of header fields after the request line -> 431
MAX_HEADERS = 100
MAX_BODY = 4 << 20                  # 4 MiB: a result is 64 KiB of '0'/'1' plus a few fields
HEAD_TIMEOUT = 10.0                 # seconds for a whole request head
IDLE_TIMEOUT = 30.0                 # seconds a keep-alive connection may wait for its next request
MIN_BODY_RATE = 8192                # bytes a second a body must keep up, past a head's time
WORKERS = 32                        # the store waits on fsync: requests in flight batch a commit
MAX_PER_ADDRESS = 256
RESERVED_FDS = 64                   # descriptors kept for the store, logs, the wake-up pipe
RETRY_AFTER = 5                     # seconds, in a 503 for a full server
SUBSCRIBER_BUFFER = 65536           # bytes an event stream may fall behind before it is dropped
FANOUT_BATCH = 1000                 # subscribers written per turn of the loop
LINGER = 1.0                        # seconds to drain a peer's input after our last answer
ACCEPT_PAUSE = 0.5
HOT_WAIT = 0.003                    # seconds a worker waits for a keep-alive peer's next request
METHODS = frozenset("GET HEAD POST PUT DELETE PATCH OPTIONS TRACE CONNECT".split())
KEEP, CLOSE, SUBSCRIBE = "keep", "close", "subscribe"    # what a handler returns

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")         # RFC 9110 5.6.2
_HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")


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


class Message(NamedTuple):
    """A whole request as it came: what a worker's handler is given."""
    method: str
    target: str             # the request-target, "//" folded to "/"
    version: str            # "HTTP/1.0" or "HTTP/1.1"
    headers: Headers
    body: bytes
    keep_alive: bool        # the client lets the connection live on after the answer
    peer: str               # the remote address of the socket


class HeadError(Exception):
    """A request head refused before any route sees it; the connection closes after."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = HTTPStatus(status), message


@dataclass(frozen=True)
class Limits:
    workers: int = WORKERS
    max_connections: int | None = None      # None: what the descriptor limit allows
    max_per_address: int = MAX_PER_ADDRESS
    head_timeout: float = HEAD_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit that results."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def capacity(limits: Limits) -> int:
    """Connections the server will hold: the cap asked for, else what the fd limit leaves."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = max(16, (1 << 20 if soft == resource.RLIM_INFINITY else soft) - RESERVED_FDS)
    return limits.max_connections or room


class Channel:
    """One connection: its socket, what came in and what waits to go out. Owned by the loop while
    parked, reading or draining, by one worker while that runs its request."""
    __slots__ = ("sock", "fd", "peer", "state", "buf", "out", "deadline", "pending", "closing",
                 "events", "idle", "seen")

    def __init__(self, sock, peer, deadline):
        self.sock, self.fd, self.peer = sock, sock.fileno(), peer
        self.state = "reading"          # reading | busy | subscribed | closing | linger | closed
        self.buf, self.out = bytearray(), bytearray()
        self.deadline, self.pending, self.closing, self.events = deadline, None, False, 0
        self.idle, self.seen = True, 0     # seen: the number of the latest message it was given

    def send(self, data: bytes) -> None:
        """Send what the socket takes now; the loop sends the rest (a worker never waits)."""
        if not self.out:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                self.closing = True         # the peer left: nothing more to say
                return
        self.out += data

    def send_all(self, data: bytes, timeout: float) -> None:
        """Send all of it, waiting for the peer up to ``timeout`` a send (a streamed body);
        OSError (TimeoutError, ConnectionError) when the peer leaves or stalls."""
        self.sock.settimeout(timeout)
        if self.out:
            self.sock.sendall(self.out)
            self.out.clear()
        self.sock.sendall(data)

    def receive(self) -> bytes | None:
        """What the peer sent, b"" once it has left, None when nothing is there yet."""
        try:
            return self.sock.recv(262144)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def take_request(self, head_timeout: float):
        """The next whole request in ``buf``, head and body, or None while it is still coming
        (its deadlines set as it comes); HeadError for a head that is refused. Called by the
        loop, or by the worker that holds the channel."""
        now = time.monotonic()
        if self.pending is None:
            if self.idle:                               # the first byte of a request
                self.idle = False
                self.deadline = now + head_timeout
            parsed = parse_head(self.buf, self.peer)
            if parsed is None:
                return None
            message, used, length, expects_continue = parsed
            del self.buf[:used]
            self.pending = message, length
            self.deadline = now + head_timeout + length / MIN_BODY_RATE
            if expects_continue and len(self.buf) < length:
                try:
                    self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")    # 25 bytes: it fits
                except OSError:
                    pass                                # the peer left: its read will say so
        message, length = self.pending
        if len(self.buf) < length:
            return None
        if len(self.buf) == length:                     # the usual case: one copy, not two
            body = bytes(self.buf)
            self.buf.clear()
        else:
            body = bytes(self.buf[:length])
            del self.buf[:length]
        self.pending, self.idle = None, True
        return message._replace(body=body)


class Front:
    """The connection loop. Listens on ``address``; ``handler(channel, message)`` runs each
    request in a worker (``Workers``), answers with ``channel.send`` and returns KEEP, CLOSE or
    SUBSCRIBE (the channel then joins ``events``, the ``Broadcaster``). ``refusal(status,
    message, headers)`` makes the bytes of an answer the loop gives itself (bad head, full
    server), ``warn(key, text)`` tells the operator (rate-limited by the caller).

    The loop accepts (caps, a pause on EMFILE), reads heads and bodies, hands whole requests to
    the workers, takes channels back, writes what workers left unsent, and keeps the deadlines."""

    def __init__(self, address, handler: Callable, refusal: Callable, warn: Callable,
                 limits: Limits = Limits(), trusted=frozenset()):
        host = address[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server(address, family=family, backlog=1024)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.refusal, self.warn = refusal, warn
        self.limits, self.trusted = limits, frozenset(trusted)
        self.capacity = capacity(limits)
        self._selector = selectors.DefaultSelector()
        self._direct = type(self._selector).__name__ in ("EpollSelector", "KqueueSelector")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self.listener, _READ, None)
        self._selector.register(self._wake_r, _READ, "wake")
        self._channels: dict[int, Channel] = {}
        self._per_address: dict[str, int] = {}
        self._returns = deque()                         # (channel, KEEP/CLOSE/SUBSCRIBE)
        self.events = Broadcaster(self._wake, self._watch, self._close, warn)
        self.workers = Workers(limits.workers, handler, warn, self._give_back, limits.head_timeout)
        self._stop = False
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._accept_paused_until = None

    # -- public, any thread -----------------------------------------------------------------------

    def serve_forever(self, poll_interval=0.5) -> None:
        self.workers.start()
        self._running.set()
        next_sweep = 0.0
        try:
            while not self._stop:
                timeout = 0 if self.events.busy() else min(poll_interval, 0.25)
                for key, mask in self._selector.select(timeout):
                    self._event(key.data, mask)
                self._take_returns()
                self.events.fan_out()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.25
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait until it has."""
        self._stop = True
        self._wake()
        if self._running.is_set():
            self._stopped.wait()

    def close(self) -> None:
        """Close every socket and let the workers go (after serve_forever has returned)."""
        self.workers.stop()
        for channel in list(self._channels.values()):
            self._close(channel)
        self._selector.close()
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def publish(self, data: bytes, latest=False) -> None:
        """Write ``data`` to every event stream, from any thread (Broadcaster.publish)."""
        self.events.publish(data, latest)

    @property
    def latest(self) -> tuple[int, bytes]:
        return self.events.latest

    def counts(self) -> dict:
        return {"connections": len(self._channels), "subscribers": len(self.events.subscribers),
                "capacity": self.capacity}

    # -- the loop ---------------------------------------------------------------------------------

    def _event(self, channel, mask):
        if channel is None:
            return self._accept()
        if channel == "wake":
            return self._drain_wake()
        if mask & _WRITE:
            self._write(channel)
        if mask & _READ and channel.state not in ("closed", "busy"):
            self._read(channel)

    def _accept(self):
        for _ in range(64):                             # then let the others have a turn
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._pause_accept(exc)
                    return
                continue                                # the peer left before it was taken
            self._admit(sock, address[0])

    def _pause_accept(self, exc):
        self.warn("accept", f"cannot accept connections: {exc.strerror}; pausing {ACCEPT_PAUSE}"
                            f" s (open: {len(self._channels)}; raise the fd limit or lower "
                            "--max-connections)")
        self._selector.unregister(self.listener)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _admit(self, sock, peer):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        channel = Channel(sock, peer, now + min(self.limits.head_timeout, self.limits.idle_timeout))
        count = self._per_address.get(peer, 0)
        self._channels[channel.fd] = channel
        self._per_address[peer] = count + 1
        if len(self._channels) > self.capacity:
            reason = f"{self.capacity} connections open (--max-connections)"
        elif count >= self.limits.max_per_address and peer not in self.trusted:
            reason = f"{count} connections open from {peer} (--max-per-address)"
        else:
            return self._watch(channel, _READ)
        self.warn("cap", f"connection refused with 503: {reason}")
        if len(self._channels) > self.capacity + RESERVED_FDS // 2:
            return self._close(channel)                 # no room even to say so
        self._refuse(channel, HeadError(HTTPStatus.SERVICE_UNAVAILABLE, "server busy, retry later"),
                     [("Retry-After", str(RETRY_AFTER))])

    def _read(self, channel):
        data = channel.receive()
        if data is None:
            return
        if not data:
            return self._close(channel)
        if channel.state == "reading":
            channel.buf += data
            self._advance(channel)
        # a subscriber, or a connection we are done with, has nothing more to say: dropped

    def _advance(self, channel):
        """Hand a whole request to the workers once its head and body are in."""
        if channel.out or not channel.buf:
            return                                      # answers go out in order
        try:
            message = channel.take_request(self.limits.head_timeout)
        except HeadError as exc:
            return self._refuse(channel, exc)
        if message is not None:
            channel.state = "busy"
            self._watch(channel, 0)
            self.workers.put(channel, message)

    def _take_returns(self):
        while self._returns:
            channel, after = self._returns.popleft()
            if after == SUBSCRIBE and not channel.closing:
                self.events.join(channel)
            elif after == KEEP and not channel.closing:
                channel.state = "reading"
                if channel.idle:                        # else a request's deadline runs
                    channel.deadline = time.monotonic() + self.limits.idle_timeout
                self._watch(channel, _READ | (_WRITE if channel.out else 0))
                self._advance(channel)                  # a pipelined request
            else:
                self._finish(channel)

    def _write(self, channel):
        try:
            sent = channel.sock.send(channel.out)
        except BlockingIOError:
            return
        except OSError:
            return self._close(channel)
        del channel.out[:sent]
        if channel.out:
            if channel.state != "subscribed":
                channel.deadline = time.monotonic() + self.limits.idle_timeout
            return
        if channel.state == "closing":
            return self._linger(channel)
        self._watch(channel, _READ)
        if channel.state == "reading":
            self._advance(channel)

    def _sweep(self, now):
        """Deadlines: heads, bodies, idle keep-alive, stalled writes, lingering closes."""
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self.listener, _READ, None)
        for channel in list(self._channels.values()):
            if channel.deadline < now and channel.state in ("reading", "closing", "linger"):
                if channel.state == "reading" and not channel.idle and not channel.out:
                    self._refuse(channel, HeadError(HTTPStatus.REQUEST_TIMEOUT,
                                                    "request not received in time"))
                else:
                    self._close(channel)

    # -- closing ----------------------------------------------------------------------------------

    def _refuse(self, channel, exc: HeadError, headers=()):
        channel.out += self.refusal(exc.status, exc.message, headers)
        self._finish(channel)

    def _finish(self, channel):
        """Send what is left, then close (after a linger)."""
        channel.state = "closing"
        channel.deadline = time.monotonic() + self.limits.idle_timeout
        if channel.out:
            self._watch(channel, _WRITE)
        else:
            self._linger(channel)

    def _linger(self, channel):
        """Half-close and drain the peer's input a moment: closing a socket with unread input
        sends a RST, which can destroy the answer before the peer has read it."""
        try:
            channel.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(channel)
        channel.state, channel.deadline = "linger", time.monotonic() + LINGER
        self._watch(channel, _READ)

    def _close(self, channel):
        if channel.state == "closed":
            return
        self._watch(channel, 0)
        channel.sock.close()
        channel.state = "closed"
        del self._channels[channel.fd]
        self.events.leave(channel)
        left = self._per_address[channel.peer] - 1
        if left:
            self._per_address[channel.peer] = left
        else:
            del self._per_address[channel.peer]

    def _watch(self, channel, events):
        """Register (or change, or end) what the selector watches for. ``channel.events`` is set
        first: once registered, the loop may act on the channel at once (see _rearm)."""
        old, channel.events = channel.events, events
        if events == old:
            return
        try:
            if not old:
                self._selector.register(channel.sock, events, channel)
            elif not events:
                self._selector.unregister(channel.sock)
            else:
                self._selector.modify(channel.sock, events, channel)
        except BaseException:
            channel.events = old
            raise

    # -- from the workers -------------------------------------------------------------------------

    def _give_back(self, channel, after):
        """A worker is done with ``channel``: parked at once where it can be, else by the loop."""
        if not (after == KEEP and self._rearm(channel)):
            self._returns.append((channel, after))
            self._wake()

    def _rearm(self, channel) -> bool:
        """Park a channel that is done and has nothing pending straight from the worker: epoll
        (like kqueue) takes a new socket while another thread waits in it, which saves the
        loop a wake-up, and the next request a wait, on every request."""
        if not self._direct or channel.closing or channel.out or channel.buf:
            return False
        channel.deadline = time.monotonic() + self.limits.idle_timeout
        channel.state = "reading"
        try:
            self._watch(channel, _READ)
        except (ValueError, KeyError, OSError):     # the selector is closing
            return False
        return True

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass                                        # already woken, or closed

    def _drain_wake(self):
        try:
            os.read(self._wake_r, 65536)
        except BlockingIOError:
            pass


class Workers:
    """The fixed pool of request threads. Each takes a whole request from the queue and runs
    ``handler(channel, message)``; while the peer keeps the connection and sends its next
    request within HOT_WAIT, and no other request waits for a worker, it runs that one too (a
    busy connection stays with its thread, as with a thread per connection, without the
    hand-off to the loop and back: a wake-up each way). Then ``give_back(channel, after)``.
    An idle connection holds no thread: HOT_WAIT is a few milliseconds."""

    def __init__(self, count: int, handler: Callable, warn: Callable, give_back: Callable,
                 head_timeout: float):
        self.handler, self.warn, self.give_back = handler, warn, give_back
        self.head_timeout = head_timeout
        self._requests = queue.SimpleQueue()
        self._hot = hasattr(select, "poll") and HOT_WAIT > 0
        self._threads = [threading.Thread(target=self._work, name=f"worker-{n}", daemon=True)
                         for n in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def put(self, channel: Channel, message: Message) -> None:
        self._requests.put((channel, message))

    def stop(self) -> None:
        """Let every thread go once it is done with what it runs."""
        for _ in self._threads:
            self._requests.put(None)

    def _work(self):
        while (item := self._requests.get()) is not None:
            channel, message = item
            after = self._run(channel, message)
            while after == KEEP and (message := self._next_request(channel)) is not None:
                after = self._run(channel, message)
            self.give_back(channel, after)

    def _run(self, channel, message):
        try:
            return self.handler(channel, message)
        except Exception as exc:                        # the handler answers its own errors
            self.warn("handler", f"request handler failed: {exc!r}")
            return CLOSE

    def _next_request(self, channel):
        """The peer's next request if it is here or comes within HOT_WAIT, else None: the
        channel goes back with what has been read (the loop goes on with it, and refuses a bad
        head)."""
        if channel.closing or channel.out or not self._hot or not self._requests.empty():
            return None
        poller, deadline = select.poll(), time.monotonic() + HOT_WAIT
        poller.register(channel.fd, select.POLLIN)
        while True:
            if channel.buf:
                try:
                    message = channel.take_request(self.head_timeout)
                except HeadError:
                    return None
                if message is not None:
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            data = channel.receive()
            if data == b"":
                channel.closing = True                  # the peer left: the loop closes
                return None
            channel.buf += data or b""


class Broadcaster:
    """Every /events stream, written by the loop. ``publish()`` (any thread) queues an update;
    each turn the loop writes it to FANOUT_BATCH more subscribers, non-blocking. What a socket
    does not take waits in its channel (the loop sends it when it can), and a subscriber more
    than SUBSCRIBER_BUFFER behind is dropped. ``latest`` is the current state, which a handler
    sends first to a new subscriber (its number in ``channel.seen``)."""

    def __init__(self, wake: Callable, watch: Callable, close: Callable, warn: Callable):
        self._wake, self._watch, self._close, self._warn = wake, watch, close, warn
        self.subscribers: dict[int, Channel] = {}
        self.latest = (0, b"")          # (number, bytes) of the latest publish(latest=True)
        self._published = deque()
        self._fanout = None                             # (data, channels, next index)

    def publish(self, data: bytes, latest=False) -> None:
        """Write ``data`` to every subscriber (from any thread); ``latest``: it is the current
        state, sent too to one that joins having been given an older one."""
        if latest:
            self.latest = (self.latest[0] + 1, data)
        self._published.append(data)
        self._wake()

    def busy(self) -> bool:
        """Updates are still to be written (the loop should not sleep)."""
        return bool(self._fanout or self._published)

    def join(self, channel: Channel) -> None:
        """(loop) A stream whose head is sent becomes a subscriber."""
        channel.state = "subscribed"
        self.subscribers[channel.fd] = channel
        self._watch(channel, _READ | (_WRITE if channel.out else 0))
        number, data = self.latest
        if number != channel.seen:
            self._feed(channel, data)

    def leave(self, channel: Channel) -> None:
        """(loop) The channel closed."""
        self.subscribers.pop(channel.fd, None)

    def fan_out(self) -> None:
        """(loop) Write the oldest update to the next FANOUT_BATCH subscribers."""
        if self._fanout is None:
            if not self._published:
                return
            self._fanout = self._published.popleft(), list(self.subscribers.values()), 0
        data, targets, start = self._fanout
        for channel in targets[start:start + FANOUT_BATCH]:
            if channel.state == "subscribed":
                self._feed(channel, data)
        start += FANOUT_BATCH
        self._fanout = (data, targets, start) if start < len(targets) else None

    def _feed(self, channel, data):
        if channel.out:
            if len(channel.out) + len(data) > SUBSCRIBER_BUFFER:
                self._warn("slow", f"event stream to {channel.peer} dropped: it stopped reading")
                return self._close(channel)
            channel.out += data
            return
        try:
            sent = channel.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self._close(channel)
        if sent < len(data):
            channel.out += data[sent:]
            self._watch(channel, _READ | _WRITE)


# -- parsing --------------------------------------------------------------------------------------

def parse_head(buf: bytearray, peer: str):
    """(Message without its body, bytes used, body length, expects 100-continue), or None while
    the head is incomplete. HeadError for a head that is refused: a bad request line (400), an
    unknown method (501), a version other than 1.x (505), a long URL (414), header fields over
    MAX_HEAD bytes or MAX_HEADERS lines (431), a bad header line (400, RFC 9112 2.2 and 5: no
    folding, names are tokens, no stray CR or NUL), or a body this server will not read."""
    start = 2 if buf.startswith(b"\r\n") else 1 if buf.startswith(b"\n") else 0  # RFC 9112 2.2
    line_end = buf.find(b"\n", start)
    if line_end < 0:
        if len(buf) - start > MAX_URL + 64:
            raise HeadError(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long")
        return None
    crlf = buf.find(b"\n\r\n", line_end)     # then a bare "\n\n" only before it: not in the body
    lf = buf.find(b"\n\n", line_end, len(buf) if crlf < 0 else crlf + 1)
    ends = [i for i in (crlf, lf) if i >= 0]
    if not ends:
        if len(buf) - line_end > MAX_HEAD:
            raise HeadError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        if line_end - start > MAX_URL + 64:
            raise HeadError(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long")
        return None
    end = min(ends)
    used = end + (3 if buf[end + 1] == 13 else 2)
    method, target, version = _request_line(bytes(buf[start:line_end]))
    if end - line_end > MAX_HEAD:
        raise HeadError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    headers = _header_fields(bytes(buf[line_end + 1:end + 1]))
    connection = headers.tokens("Connection")
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    length = body_length(headers)
    expects = "100-continue" in headers.tokens("Expect") and version == "HTTP/1.1" and length > 0
    return Message(method, target, version, headers, b"", keep_alive, peer), used, length, expects


def body_length(headers: Headers) -> int:
    """Content-Length, checked: decimal, at most MAX_BODY, and no Transfer-Encoding (this server
    decodes none: RFC 9112 6.1)."""
    length = headers.get("Content-Length", "0")
    digits = length.lstrip("0")                 # int() refuses over 4,300 digits
    if "Transfer-Encoding" in headers:
        raise HeadError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not a Transfer-Encoding")
    if not (length.isascii() and length.isdigit()):
        raise HeadError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
    if len(digits) > 9 or int(digits or "0") > MAX_BODY:
        raise HeadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
    return int(digits or "0")


def _request_line(line: bytes):
    text = line.decode("iso-8859-1").rstrip("\r\n")
    words = text.split()
    version = _HTTP_VERSION.fullmatch(words[-1]) if len(words) == 3 else None
    if version is None or not _TOKEN.fullmatch(words[0]):
        raise HeadError(HTTPStatus.BAD_REQUEST, f"bad request line {text[:80]!r}")
    if int(version[1]) != 1:
        raise HeadError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{words[-1]} not supported")
    if words[0] not in METHODS:
        raise HeadError(HTTPStatus.NOT_IMPLEMENTED, f"method {words[0][:20]} not implemented")
    if len(words[1]) > MAX_URL:
        raise HeadError(HTTPStatus.REQUEST_URI_TOO_LONG, "URL too long")
    target = "/" + words[1].lstrip("/") if words[1].startswith("//") else words[1]
    return words[0], target, "HTTP/1.0" if int(version[2]) == 0 else "HTTP/1.1"


def _header_fields(block: bytes) -> Headers:
    headers = Headers()
    lines = block.split(b"\n")[:-1]
    if len(lines) > MAX_HEADERS:
        raise HeadError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    for line in lines:
        text = line.decode("iso-8859-1").removesuffix("\r")
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or "\r" in value or "\0" in value:
            raise HeadError(HTTPStatus.BAD_REQUEST, f"bad header line {line[:80]!r}")
        headers.add(name, value.strip(" \t"))
    return headers
