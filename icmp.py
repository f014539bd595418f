"""ICMP echo for the IPv4 census: a pure codec, one socket class and a fast, validated sweep.

The codec (checksum, build, parse) does no I/O and never raises on what comes off the wire:
anything truncated, corrupt or not an answer to an echo request parses to None. Every probe
carries TAG, and its identifier, sequence number and payload MAC are a keyed hash of its
destination under a per-sweep secret (`Signer`), so a reply counts only when it proves it
answers our probe to that very address; an unreachable or time
exceeded is credited to the address its quote names. `IcmpSocket` is a raw ICMP socket, or the
unprivileged datagram ICMP socket when raw ones are not allowed (Linux, macOS).

A `Sweeper` owns one socket and one receiver thread; each `Sweep` it starts sends its rounds
in a worker thread, in a random permutation (ZMap's cyclic group), with sendmmsg(2) where ctypes
finds it (flat out: on two cores). Several sweeps may be in flight at once, so the next one
sends while the last one still listens for late replies:

    worker A   |== send round ==|.......... cooldown ..........|  -> A.result()
    worker B                    |== send round ==|...... cooldown ......|
    receiver   select() ... credit each reply to the sweep whose secret it proves ...

A sweep builds all its probes, and on a raw socket the exact echo replies they expect, at
the start, column by column over whole blocks of bytes (Signer.probes): no Python runs per
probe. recvmmsg(2) leaves each received packet's IPv4 header in one buffer, the echo reply
a sweep expects back to back with the others in a second, and what is left in a third
(_Batch): so a run of echo replies is proven at once, the replies its sources should have
sent, joined, being byte for byte what the kernel put there. Whatever is not exactly such a
reply (errors, strays, IP options, a checksum folded the other way) goes through parse()
and Signer.check().

At a limited rate the sender wakes every BATCH_SECONDS and sends what its token bucket holds
in one call; while replies flow the receiver takes them every RECV_TICK, with the kernel's
timestamp of each (so RTTs stay exact), and when none do it sleeps in select(). So pacing
costs about a hundred and twenty wake-ups a second, not thousands. `sweep()` is one sweep,
start to end. Standard library only: a volunteer copies this file with ping_client.py.
"""
import argparse
import array
import bisect
import errno
import functools
import hashlib
import ipaddress
import json
import math
import operator
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, NamedTuple, Optional, Sequence

__all__ = [
    "TAG", "RESERVED", "Status", "IcmpType", "Reply", "Verdict", "Signer", "Progress",
    "SweepStats", "SweepResult", "IcmpSocket", "IcmpPermissionError", "Outbox", "checksum",
    "echo_request", "parse", "wholly_reserved", "wholly_excluded", "is_excluded", "permutation", "sweep",
    "Sweeper", "Sweep", "DEFAULT_COOLDOWN", "CONTACT_MAX", "is_contact",
]

TAG = b"ipv4-census "  # starts every probe payload, so a network operator can tell who we are
RESERVED = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "255.255.255.255/32"))

IP_HEADER = struct.Struct("!BBHHHBBH4s4s")  # RFC 791: version/IHL ... source, destination
ICMP_HEADER = struct.Struct("!BBHHH")       # RFC 792: type, code, checksum, identifier, sequence
ADDRESS = struct.Struct("!I")
_IDENT_SEQ = struct.Struct("!HH")            # the probe's identifier and sequence number
DIGEST_SIZE = 12                            # identifier, sequence number, an 8-byte MAC
PAYLOAD_SIZE = len(TAG) + ADDRESS.size + DIGEST_SIZE - _IDENT_SEQ.size   # without a contact
PACKET_SIZE = ICMP_HEADER.size + PAYLOAD_SIZE
CONTACT_MAX = 40         # bytes of the server's contact a probe may carry after TAG

# Linux constants the socket module does not export
SOL_RAW = 255            # linux/socket.h: the level of ICMP_FILTER
ICMP_FILTER = 1          # linux/icmp.h: a bit mask of ICMP types the kernel must not deliver
SO_RCVBUFFORCE = 33      # linux/socket.h: root may exceed net.core.rmem_max with it
SO_TIMESTAMP = 29        # asm-generic/socket.h: each packet's arrival (CLOCK_REALTIME, a timeval) as a cmsg
IP_RECVERR = 11          # linux/in.h
SO_MEMINFO = 55          # linux/socket.h: a socket's memory counters (u32 each) ...
MEMINFO_DROPS = 8        # ... of which SK_MEMINFO_DROPS counts the packets its full queue dropped
SO_EE_ORIGIN_ICMP = 2    # linux/errqueue.h: the error came from an ICMP message
EXTENDED_ERR = struct.Struct("=IBBBBII")   # struct sock_extended_err, then the offender's sockaddr

SEND_CHUNK = 256         # packets per send call when not rate limited
OUTBOX_PACKETS = 4096    # probes gathered at a time into one Outbox
# ZMap's default, and long on purpose: most echo replies come within a second, but a GEO
# satellite link adds ~0.6 s before any queue, a cellular modem that must wake its radio 1-3 s,
# a bloated buffer seconds more; a shorter wait biases the census against exactly those
# networks. A client overlaps it with its next task (Sweeper), so it costs no throughput, and
# a cooldown ends early once every target has answered.
DEFAULT_COOLDOWN = 8.0
# A paced sender wakes this often and sends what its bucket holds in one call: 100 probes at
# 10,000/s, to addresses spread over the whole block (a /24 sees one of them in 2.5 batches);
# fewer wake-ups a second are most of what pacing costs.
BATCH_SECONDS = 0.01
BUCKET_BATCHES = 2       # the most one send call carries: two batches (a late wake-up)
CATCH_UP = 1.08          # time a busy machine took from the sender is made up at most this much faster
CATCH_UP_SECONDS = 0.5   # ... and no more than this much of it (a longer stall is not made up)
PACER_NAP = 0.05         # the pacer's longest sleep, so a stop is seen soon even at a low rate
LANE_RATE = 50_000       # below this a paced sweep sends on one lane: a core does it with ease
RECV_IDLE = 1.0          # the receiver's longest wait in select(); packets or wake() end it sooner
# While replies flow, a receiver whose socket timestamps them takes them every RECV_TICK,
# hundreds at a time, rather than waking for the first of each few: the kernel's timestamp,
# not the moment recv() ran, is when a reply arrived, so its RTT stays exact.
RECV_TICK = 0.05
FLAT_OUT_RATE = 400_000  # replies a second a sweep flat out may bring (2 lanes on lo), for the tick
QUEUED_BYTES = 2048      # what the kernel charges a queued reply (832 B on lo, up to 2 KB from a NIC)
RECV_BATCH = 256         # packets taken per recv(); fewer means the socket's queue was emptied
RECV_SLOT = 2048         # bytes kept of a received packet: an echo reply or an error with its quote
RUN_MIN = 4              # a run of packets the fast path could not prove at once is halved down to this
HEAD = IP_HEADER.size    # a received packet's first bytes, kept apart (see _Batch)
ECHO_MAX = PACKET_SIZE + CONTACT_MAX + 2   # the longest echo reply's ICMP message (a padded contact)
DRAIN_MAX = 5.0          # how long a cooldown's end waits for the receiver to catch up with the queue
# A send that fails with these found the socket's buffer full (ENOBUFS: the interface queue,
# which BSD and macOS report on a datagram socket): wait and send again, skip nothing.
_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS})
PROGRESS_EVERY = 0.25    # seconds between progress callbacks
PERMISSION_HELP = (
    "ICMP needs a raw socket (run with sudo) or unprivileged ICMP sockets, which this system "
    'does not allow for your group; enable them with: sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"')


class IcmpType(IntEnum):
    ECHO_REPLY = 0
    DEST_UNREACHABLE = 3
    ECHO_REQUEST = 8
    TIME_EXCEEDED = 11


# what the receiving raw socket lets through ICMP_FILTER: the answers a probe can get
_ANSWERS = (1 << IcmpType.ECHO_REPLY) | (1 << IcmpType.DEST_UNREACHABLE) | (1 << IcmpType.TIME_EXCEEDED)


class Status(IntEnum):
    NO_ANSWER = 0
    ECHO_REPLY = 1
    UNREACHABLE = 2
    EXCLUDED = 3
    TIME_EXCEEDED = 4


class Verdict(IntEnum):
    OK = 0
    STRAY = 1          # not one of our probes: another ping, garbage, a target we never had
    BAD_PAYLOAD = 2    # carries our tag but not the keyed hash we sent
    WRONG_SOURCE = 3   # a genuine echo reply of ours, but it came from another address


class Reply(NamedTuple):
    """An ICMP answer to an echo request. `target` is the address that was probed: the source
    of an echo reply, the quoted destination of an error. `payload` is the echoed data (for an
    error, whatever part of our payload the quote holds)."""
    source: int
    target: int
    icmp_type: int
    code: int
    ident: int
    seq: int
    payload: bytes


class Progress(NamedTuple):
    sent: int
    total: int
    replies: int
    unreachable: int   # unreachable and time exceeded answers
    elapsed: float
    pps: float


class SweepStats(NamedTuple):
    sent: int
    replies: int
    unreachable: int
    excluded: int
    stray: int
    wrong_source: int
    bad_payload: int
    duplicates: int
    rounds: int
    elapsed: float
    kind: str
    time_exceeded: int = 0
    send_errors: int = 0
    send_seconds: float = 0.0   # time spent sending (first to last send of each round)
    cpu_seconds: float = 0.0    # CPU (user + system) of its sender threads and its share of the receiver's
    # packets the kernel dropped on the socket, its queue full, while the sweep was in flight:
    # perhaps its own replies, so a silent target may not be silent
    dropped: int = 0


class SweepResult(NamedTuple):
    """Per target, same index as `addresses`: `status` (a Status), `code` (the ICMP code of
    an unreachable / time exceeded), `rtt_us` (echo replies only; from the start of the send
    call that carried the probe, so flat out up to a chunk's send time, ~1-2 ms, high, to the
    kernel's timestamp of the reply, or where the socket gives none to when recv() took it)."""
    addresses: Sequence[int]
    status: bytearray
    code: bytearray
    rtt_us: array.array
    stats: SweepStats


class IcmpPermissionError(PermissionError):
    """Neither a raw nor an unprivileged ICMP socket may be opened; the message says what to do."""


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (odd lengths padded with a zero byte).

    The one's-complement sum of 16-bit words equals the whole buffer read as one big-endian
    integer modulo 0xFFFF (since 2**16 == 1 mod 0xFFFF), which Python does in C."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return _complement(int.from_bytes(data, "big"))


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request in network byte order, checksum filled in."""
    return _icmp_message(IcmpType.ECHO_REQUEST, 0, ident, seq, payload)


def parse(packet: bytes, source: Optional[int] = None) -> Optional[Reply]:
    """Parse what an ICMP socket returned into a Reply, or None if it is not a well-formed
    answer to an echo request. With `source` None the packet starts with its IPv4 header (raw
    sockets); otherwise it is the bare ICMP message of a datagram socket sent by `source`."""
    if source is None:
        header = _ip_header(packet)
        if header is None:
            return None
        start, source, _ = header
        packet = packet[start:]
    if len(packet) < ICMP_HEADER.size or not _sums_to_ones(packet):
        return None
    icmp_type, code, _, ident, seq = ICMP_HEADER.unpack_from(packet)
    if icmp_type == IcmpType.ECHO_REPLY:
        return Reply(source, source, icmp_type, code, ident, seq, packet[ICMP_HEADER.size:])
    if icmp_type in (IcmpType.DEST_UNREACHABLE, IcmpType.TIME_EXCEEDED):
        return _parse_quote(packet[ICMP_HEADER.size:], source, icmp_type, code)
    return None


class Signer:
    """The per-sweep secret: a keyed hash of each destination gives its probe's identifier,
    sequence number and payload MAC, and a reply counts only if it carries exactly those for
    the address it claims to answer.

    The keyed hash is SHAKE-128 of the secret and a /24's number, read as 256 digests of 12
    bytes, one per address of the /24 in order (identifier, sequence number, MAC). A sweep of
    a /16 thus hashes 256 times, not 65,536, and probes() builds every probe and the reply it
    expects column by column, with a few dozen C-speed operations on whole blocks of bytes:
    no Python runs per probe.

    A probe's payload is TAG, then the census's contact and a space or two when there is one (a
    network operator who sees the probe learns whom to ask; padded to an even length), then the
    destination and the MAC: at most 12 + 42 + 4 + 8 = 66 bytes.

        "ipv4-census " ["abuse@example.org  "] | destination (4) | MAC (8)

    An unreachable or time exceeded may quote only the 8 bytes RFC 792 requires: type, code,
    checksum, identifier and sequence number. Both come from the hash of the quoted target, so
    a forged error must guess 32 keyed bits even when it knows the identifier of every other
    probe (a fixed per-sweep identifier left only the 16-bit sequence); each byte quoted
    beyond the 8 must match too. On a datagram socket the kernel chooses the identifier
    (check_ident=False): there the sequence number and the quoted payload are what is left.
    Concurrent sweeps are told apart by their secrets alone."""

    def __init__(self, secret: Optional[bytes] = None, contact: bytes = b"",
                 covers: Callable[[int], bool] = lambda addr: True):
        if not is_contact(contact):
            raise ValueError(f"a contact is printable ASCII of at most {CONTACT_MAX} bytes: {contact!r:.60}")
        self.secret = secret if secret is not None else secrets.token_bytes(16)
        self.prefix = TAG + contact + b" " if contact else TAG
        self.prefix += b" " * (len(self.prefix) % 2)   # even, so what follows sits on 16-bit words
        self.payload_size = len(self.prefix) + ADDRESS.size + DIGEST_SIZE - _IDENT_SEQ.size
        self.packet_size = ICMP_HEADER.size + self.payload_size
        self._keyed = hashlib.shake_128(self.secret)
        self._streams = {}                 # a /24's number -> its 256 digests, once hashed
        # check() hashes only the addresses a sweep probes: a packet naming any other (which
        # whoever sends it chooses) costs no hash and leaves no /24 in _streams
        self.covers = covers
        # the sum of the words every echo request shares (type/code, the prefix), as a
        # one's-complement residue in 1..0xFFFF: small enough for a lane of probes()
        self._fixed_sum = _residue((IcmpType.ECHO_REQUEST << 8) + int.from_bytes(self.prefix, "big"))

    def sign(self, addr: int) -> tuple[int, int, bytes]:
        """(identifier, sequence number, payload) of the probe to `addr`."""
        digest = self._digest(addr)
        ident, seq = _IDENT_SEQ.unpack_from(digest)
        return ident, seq, self.prefix + ADDRESS.pack(addr) + digest[_IDENT_SEQ.size:]

    def request(self, addr: int) -> bytes:
        """echo_request(*self.sign(addr))."""
        return self.requests((addr,))[0]

    def requests(self, addresses) -> list:
        """[self.request(addr) for addr in addresses], built by probes()."""
        return self.probes(addresses, replies=False)[0]

    def probes(self, addresses, replies: bool = True) -> tuple[list, bytes]:
        """(requests, replies) for `addresses`, in their order: requests[k] is
        echo_request(*self.sign(addresses[k])), and the k-th `packet_size` bytes of replies
        (when asked for) are the ICMP message of the echo reply that target sends when it
        answers as RFC 792 says: the request with type 0 and the checksum of that (computed
        from scratch, as Linux and the BSDs send it).

        Built column by column: each checksum is the fold of a lane of one big integer that
        sums the word columns of every probe at once, and each varying byte of a probe is one
        strided slice assignment over all of them."""
        count = len(addresses)
        digests, dests = self.digests(addresses), _big_endian(addresses)
        digest_bytes = [digests[at::DIGEST_SIZE] for at in range(DIGEST_SIZE)]
        dest_bytes = [dests[at::ADDRESS.size] for at in range(ADDRESS.size)]
        sums = _word_sums(digests, DIGEST_SIZE, count) + _word_sums(dests, ADDRESS.size, count)
        tail = 8 + len(self.prefix)       # where the destination starts in a request

        def rows(icmp_type: int, summed: int) -> bytes:
            template = bytes([icmp_type, 0]) + bytes(6) + self.prefix + bytes(ADDRESS.size + DIGEST_SIZE - 4)
            ck = _checksums(sums, summed, count)
            columns = [(2, ck[0::2]), (3, ck[1::2])]
            columns += [(4 + at, digest_bytes[at]) for at in range(_IDENT_SEQ.size)]
            columns += [(tail + at, dest_bytes[at]) for at in range(ADDRESS.size)]
            columns += [(tail + ADDRESS.size + at, digest_bytes[_IDENT_SEQ.size + at])
                        for at in range(DIGEST_SIZE - _IDENT_SEQ.size)]
            return _fill(template, count, columns)

        requests = _split(rows(IcmpType.ECHO_REQUEST, self._fixed_sum), self.packet_size)
        if not replies:
            return requests, b""
        # RFC 1624: a reply's sum is its request's less the type word
        return requests, rows(IcmpType.ECHO_REPLY, _residue(self._fixed_sum - (IcmpType.ECHO_REQUEST << 8)))

    def digests(self, addresses) -> bytes:
        """The 12-byte digests of `addresses`, back to back: a range of addresses is a slice
        of its /24s' streams."""
        if isinstance(addresses, range) and addresses.step == 1 and addresses:
            first = addresses[0]
            streams = b"".join(map(self._stream, range(first >> 8, (addresses[-1] >> 8) + 1)))
            skip = DIGEST_SIZE * (first & 0xFF)
            return streams[skip:skip + DIGEST_SIZE * len(addresses)]
        return b"".join(map(self._digest, addresses))

    def check(self, reply: Reply, check_ident: bool = True) -> tuple[Verdict, int]:
        """(verdict, probed address). Datagram sockets pass check_ident=False: there the
        kernel chose the identifier and only delivers replies that carry it. An error
        (unreachable, time exceeded) may come from any router on the path, so only its quote
        is checked; an echo reply must come from the address its payload names. What shows
        neither our tag nor our hash (another program's ping, another sweep's 8-byte quote)
        is a stray."""
        if reply.icmp_type != IcmpType.ECHO_REPLY:
            return self._check_quote(reply, check_ident), reply.target
        payload, start = reply.payload, len(self.prefix)
        if len(payload) != self.payload_size or not payload.startswith(self.prefix):
            return Verdict.STRAY, reply.target
        probed = int.from_bytes(payload[start:start + ADDRESS.size], "big")
        if not self.covers(probed):
            return Verdict.BAD_PAYLOAD, probed
        digest = self._digest(probed)
        ident, seq = _IDENT_SEQ.unpack_from(digest)
        # what sign(probed) would give, compared in place: this runs once per reply
        if ((check_ident and reply.ident != ident) or reply.seq != seq
                or payload[start + ADDRESS.size:] != digest[_IDENT_SEQ.size:]):
            return Verdict.BAD_PAYLOAD, probed
        return (Verdict.OK if probed == reply.source else Verdict.WRONG_SOURCE), probed

    def _check_quote(self, reply: Reply, check_ident: bool) -> Verdict:
        quoted = reply.payload[:self.payload_size]
        if self.covers(reply.target):
            ident, seq, expected = self.sign(reply.target)
            if ((reply.ident == ident or not check_ident) and reply.seq == seq
                    and quoted == expected[:len(quoted)]):
                return Verdict.OK
        tagged = len(quoted) > 0 and quoted[:len(TAG)] == TAG[:len(quoted)]
        return Verdict.BAD_PAYLOAD if tagged else Verdict.STRAY

    def _digest(self, addr: int) -> bytes:
        at = DIGEST_SIZE * (addr & 0xFF)
        return self._stream(addr >> 8)[at:at + DIGEST_SIZE]

    def _stream(self, block: int) -> bytes:
        """The digests of the 256 addresses of /24 number `block` (its first address >> 8)."""
        stream = self._streams.get(block)
        if stream is None:            # two threads may hash the same /24 at once: same bytes
            keyed = self._keyed.copy()
            keyed.update(block.to_bytes(3, "big"))
            stream = self._streams[block] = keyed.digest(256 * DIGEST_SIZE)
        return stream


def is_contact(value: bytes) -> bool:
    """True if `value` may follow TAG in a probe: printable ASCII, at most CONTACT_MAX bytes."""
    return isinstance(value, bytes) and len(value) <= CONTACT_MAX and all(0x20 <= b < 0x7F for b in value)


def wholly_reserved(network, allow=()) -> bool:
    """True if every address of `network` lies in RESERVED minus the `allow` networks."""
    return _wholly_in(_reserved_spans(allow), network)


def wholly_excluded(network, allow=(), exclude=()) -> bool:
    """True if no address of `network` would be probed under these rules: all of it is
    reserved space that `allow` does not open, or `exclude`d."""
    return _wholly_in(_excluded_spans(allow, exclude), network)


def is_excluded(addr: int, allow=(), exclude=()) -> bool:
    """True if `addr` is reserved (and not allowed) or lies in `exclude`."""
    return _span_holding(_excluded_spans(allow, exclude), int(addr)) is not None


def permutation(count: int, rng=secrets.SystemRandom()) -> list:
    """0..count-1 in a random order: the walk x, xg, xg^2, ... modulo a prime p > count, with
    g a random generator of the multiplicative group and x a random start, as ZMap does.
    Neighbours in the output are far apart, so no /24 gets a burst. The walk is computed a
    block at a time (the next block is the last one times g^len(block)), not a step at a time."""
    if count <= 1:
        return list(range(count))
    prime = _next_prime(count + 1)
    factors = _prime_factors(prime - 1)
    while True:
        gen = rng.randrange(2, prime) if prime > 3 else 2
        if all(pow(gen, (prime - 1) // f, prime) != 1 for f in factors):
            break
    start, step = rng.randrange(1, prime), min(256, prime - 1)
    block = [start * pow(gen, k, prime) % prime for k in range(step)]
    jump, walk = pow(gen, step, prime), []
    while len(walk) < prime - 1:
        walk += block
        block = [x * jump % prime for x in block]
    return [x - 1 for x in walk[:prime - 1] if x <= count]


@dataclass(frozen=True)
class Outbox:
    """A block of a round's packets, all `size` bytes long, back to back in send order."""
    data: bytes
    addrs: array.array   # 'I': the destination of each packet
    size: int = PACKET_SIZE

    def __post_init__(self):
        # sendmmsg is handed raw pointers into `data`: a short one would send stray memory
        if len(self.data) != self.size * len(self.addrs):
            raise ValueError("an Outbox holds exactly one packet of `size` bytes per address")


class IcmpSocket:
    """An ICMP socket: raw if allowed, else the unprivileged datagram kind.

    A raw one also has send-only companions (`lanes` in all): sending is where the kernel
    spends its time (on loopback it answers the probe inside the send call), and two threads
    sending on one socket only fight over its lock, while on two sockets they use two cores."""

    def __init__(self, sock: socket.socket, kind: str, companions=()):
        self.sock = sock
        self.kind = kind
        self.lanes = 1 + len(companions)
        self._senders = [sock, *companions]
        # Linux datagram ICMP sockets hand over the bare ICMP message; BSD/macOS ones and raw
        # sockets keep the IPv4 header in front of it.
        self.has_ip_header = kind == "raw" or not sys.platform.startswith("linux")
        self._mmsg = _Mmsg.load()
        # one receiver thread calls recv(), so one set of receive buffers serves; a datagram
        # socket needs each packet's source, which recvfrom gives, so it keeps that path
        self._recv_mmsg = _RecvMmsg.load() if self.has_ip_header else None
        self._stamping = self._recv_mmsg is not None and _timestamps_on(sock)
        # the ICMP message size of the echo replies recv() lays out back to back (see _Batch):
        # the receiver sets it to that of the newest sweep's replies (Sweeper._lay_out)
        self.echo_size = PACKET_SIZE
        # how many replies its queue holds before the kernel drops them (the receiver's tick
        # must not be longer than it takes to fill)
        self.queue_packets = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // QUEUED_BYTES
        self._vectors = []     # [(outbox, its sendmmsg vectors)], the newest first, built once per outbox
        self._lock = threading.Lock()
        # wake() makes a recv() waiting in select return at once: a receiver can block for
        # long (no tick while nothing arrives) and still stop the moment it is told to
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)

    @property
    def stamps(self) -> bool:
        """recv() gives each packet's age from the kernel's timestamp (recvmmsg's control
        slots); without recvmmsg it gives 0.0, the packet timed when recv() took it."""
        return self._recv_mmsg is not None and self._stamping

    @classmethod
    def open(cls, rcvbuf: int = 32 << 20, lanes: int = 2) -> "IcmpSocket":
        try:
            sock, kind = _raw_socket(_ANSWERS), "raw"
        except PermissionError:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
                kind = "dgram"
            except OSError:
                raise IcmpPermissionError(PERMISSION_HELP) from None
            if sys.platform.startswith("linux"):
                # Linux keeps ICMP errors away from a datagram socket's data; with IP_RECVERR
                # it queues them (with the probe they quote) on the socket's error queue
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        _set_rcvbuf(sock, rcvbuf)     # root may be refused more than net.core.rmem_max (no CAP_NET_ADMIN)
        sock.setblocking(False)
        # a companion must not receive: only Linux can filter every ICMP type away from it
        parallel = kind == "raw" and sys.platform.startswith("linux")
        return cls(sock, kind, [_raw_socket(0) for _ in range(lanes - 1)] if parallel else [])

    def send(self, outbox: Outbox, start: int, stop: int, lane: int = 0) -> int:
        """Send outbox packets start..stop-1 in order (through companion `lane`); return how
        many the kernel took (0 when its buffer is full). Raises OSError when the packet at
        `start` itself is refused. Lanes may be used from different threads at once."""
        if not 0 <= start <= stop <= len(outbox.addrs):
            # sendmmsg would read destinations from memory past the outbox
            raise IndexError(f"packets {start}..{stop} of an outbox of {len(outbox.addrs)}")
        sender = self._senders[lane]
        # On a Linux datagram socket with IP_RECVERR, an ICMP error that came in since the
        # last send (sk_err) fails the next send once, whatever its destination. The failure
        # clears it, but another may land meanwhile: try thrice before blaming the packet.
        tries = 1 if self.has_ip_header else 3
        for attempt in range(1, tries + 1):
            try:
                return self._send(sender, outbox, start, stop)
            except OSError:
                if attempt == tries:
                    raise

    def recv(self, timeout: float, settle: bool = False):
        """Wait up to `timeout` s (or until wake()) for packets, then take what is queued (up
        to RECV_BATCH): a _Batch when packets start with their IP header (valid until the next
        call: it may lie in recvmmsg's buffers), else a list of (packet, source, age), age
        being how long the packet had waited in the kernel (0.0 if not `stamps`). With
        `settle` the wait is the whole `timeout` (or until wake())."""
        ready = select.select([self._wake_in] if settle else [self.sock, self._wake_in], [], [], timeout)[0]
        if self._wake_in in ready:
            try:
                self._wake_in.recv(4096)
            except OSError:
                pass
        if not settle and self.sock not in ready:
            return []
        if self._recv_mmsg is not None:
            try:
                return self._recv_mmsg.recv(self.sock.fileno(), self.echo_size)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:   # as below: an error ends this batch, not the receiver
                    return []
                self._recv_mmsg = None          # a kernel or sandbox without recvmmsg
        got = []
        for _ in range(RECV_BATCH):
            try:
                if self.has_ip_header:
                    got.append(self.sock.recv(RECV_SLOT))
                else:
                    packet, (host, _) = self.sock.recvfrom(RECV_SLOT)
                    got.append((packet, int.from_bytes(socket.inet_aton(host), "big"), 0.0))
            except OSError:   # none left, or an ICMP error pending: that is on the error queue
                break
        if self.has_ip_header:
            return _Batch.of(got, echo_size=self.echo_size)
        return got + self._queued_errors()

    def drops(self) -> int:
        """How many packets the kernel has dropped on this socket so far, its queue full:
        replies the census would read as silence (0 where it cannot tell: not Linux, or
        before Linux 4.4)."""
        if not sys.platform.startswith("linux"):
            return 0
        try:
            counters = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (MEMINFO_DROPS + 1))
        except OSError:
            return 0
        return int.from_bytes(counters[4 * MEMINFO_DROPS:4 * MEMINFO_DROPS + 4], sys.byteorder)

    def wake(self) -> None:
        """Make a recv() that is waiting (or the next one) return at once."""
        try:
            self._wake_out.send(b"!")
        except OSError:           # its buffer is full: a wake-up is pending anyway
            pass

    def close(self) -> None:
        self._vectors = []
        for sender in (*self._senders, self._wake_in, self._wake_out):
            sender.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, sender: socket.socket, outbox: Outbox, start: int, stop: int) -> int:
        if self._mmsg is not None:
            try:
                return self._mmsg.send(sender.fileno(), self._vectors_for(outbox), start, stop - start)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:   # a kernel or sandbox without sendmmsg
                    raise
                self._mmsg = None
        size = outbox.size
        for k in range(start, stop):
            dest = (socket.inet_ntoa(ADDRESS.pack(outbox.addrs[k])), 0)
            try:
                sender.sendto(outbox.data[k * size:(k + 1) * size], dest)
            except OSError as exc:
                if k == start and exc.errno not in _BUSY:
                    raise
                return k - start
        return stop - start

    def _queued_errors(self) -> list:
        """ICMP errors from a Linux datagram socket's error queue, rebuilt as the ICMP
        message that carried them (from the offender, quoting our probe) so that parse()
        and Signer.check() treat them as they do on a raw socket."""
        got = []
        for _ in range(256):
            try:
                quoted, ancillary, _, probed = self.sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
            except OSError:   # BlockingIOError: the queue is empty
                break
            for level, cmsg_type, data in ancillary:
                if (level != socket.IPPROTO_IP or cmsg_type != IP_RECVERR or not isinstance(probed, tuple)
                        or len(data) < EXTENDED_ERR.size + 8):
                    continue
                _, origin, icmp_type, code, _, _, _ = EXTENDED_ERR.unpack_from(data)
                if origin == SO_EE_ORIGIN_ICMP:
                    offender = int.from_bytes(data[EXTENDED_ERR.size + 4:EXTENDED_ERR.size + 8], "big")
                    got.append((_error_message(icmp_type, code, probed[0], quoted), offender, 0.0))
        return got

    def _vectors_for(self, outbox: Outbox):
        # each send lane of each sweep sending at once has an outbox in use: keep a few
        with self._lock:
            for known, vectors in self._vectors:
                if known is outbox:
                    return vectors
            vectors = self._mmsg.vectors(outbox)
            self._vectors = [(outbox, vectors), *self._vectors[:3]]
            return vectors


def sweep(targets, *, rate=0, probes=1, cooldown=DEFAULT_COOLDOWN, timeout=None, allow=(), exclude=(),
          progress: Optional[Callable[[Progress], None]] = None, sock=None) -> SweepResult:
    """Ping every target and return per target: echo reply (with RTT), unreachable (with its
    code), time exceeded, excluded, or no answer. One sweep, start to end: Sweeper.start()
    then Sweep.result().

    targets: an IPv4Network, or a sequence of int or dotted addresses. rate: probes/s at most
    (0 = as fast as the machine goes). probes: rounds; each later round re-probes the targets
    still silent. cooldown: seconds to wait after a round's last send, ended early once every
    probe is answered. timeout: a wall-clock budget for the whole sweep (None = none).
    allow/exclude: CIDRs. progress: called with a Progress a few times a second and at the end.
    sock: an open IcmpSocket to use (else one is opened and closed here).
    Reserved-and-not-allowed and `exclude`d targets are marked EXCLUDED before any socket
    is opened, and no round ever sends to a target that is not NO_ANSWER. An `allow` entry with
    host bits set raises ValueError rather than opening more than it names."""
    with Sweeper(sock) as sweeper:
        return sweeper.start(targets, rate=rate, probes=probes, cooldown=cooldown, timeout=timeout,
                             allow=allow, exclude=exclude, progress=progress).result()


class Sweeper:
    """One ICMP socket shared by any number of sweeps in flight, and the one receiver thread
    that credits every reply to the sweep whose secret it proves (each sweep has its own).

        with Sweeper() as sweeper:
            a = sweeper.start(net_a, rate=10000)   # a worker thread sends a's rounds
            a.wait_sent()                          # a's last probe is out; a listens on
            b = sweeper.start(net_b, rate=10000)   # b sends while a cools down
            result_a = a.result()                  # a's cooldown is over (or all answered)

    The socket is opened on the first start() that has something to probe (or by open()),
    so a sweep of excluded space opens none. The receiver blocks in select() until packets
    come, then, while they flow on a socket that timestamps them, takes them every RECV_TICK
    (no tick while nothing comes); close() wakes it."""

    def __init__(self, sock=None, *, clock=time.monotonic, sleep=time.sleep):
        self.sock, self._own = sock, sock is None
        self.clock, self.sleep = clock, sleep
        self.failure = None               # what stopped the receiver; start() raises it
        self._active = []                 # sweeps the receiver credits, oldest first
        self._lock = threading.Lock()     # held while a batch of replies is credited
        self._changed = threading.Condition()
        self._receiver, self._workers, self._closing = None, [], False
        self._drained = threading.Condition()
        self._drained_at = -math.inf      # when the receiver last found the socket's queue empty

    def open(self) -> "Sweeper":
        """Open the socket (IcmpPermissionError says how when it may not be) and start the
        receiver; start() does this by itself."""
        if self.sock is None:
            self.sock = IcmpSocket.open()
        if self._receiver is None:
            self._receiver = threading.Thread(target=self._receive, name="icmp-receiver", daemon=True)
            self._receiver.start()
        return self

    def start(self, targets, *, rate=0, probes=1, cooldown=DEFAULT_COOLDOWN, timeout=None,
              allow=(), exclude=(), progress: Optional[Callable[[Progress], None]] = None,
              contact: bytes = b"") -> "Sweep":
        """Start sweeping `targets` (the parameters of sweep(); `contact` goes after TAG in
        every probe, see Signer) in a worker thread; the Sweep returned says when it is sent
        and finished, and gives its result."""
        addresses = _addresses(targets)
        if probes < 1 or rate < 0 or cooldown < 0:
            raise ValueError("probes must be >= 1, rate and cooldown >= 0")
        if not is_contact(contact):
            raise ValueError(f"a contact is printable ASCII of at most {CONTACT_MAX} bytes")
        job = Sweep(self, addresses, rate, probes, cooldown, timeout, progress)
        job.excluded = _mark_excluded(addresses, _excluded_spans(allow, exclude), job.status)
        if job.excluded == len(addresses):
            job._close("none", report=False)        # nothing to probe: no socket needed
            return job
        self.open()
        with self._lock:
            if self.failure is not None:
                raise self.failure
            # its own secret, so replies find their sweep; it hashes only the sweep's targets
            job.signer = Signer(contact=contact, covers=lambda addr: job.index(addr) is not None)
            job.drops_before = self._drops()
            self._active.append(job)
        worker = threading.Thread(target=job._run, args=(self.sock,), name="icmp-sweep", daemon=True)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()
        return job

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Block until predicate() holds, checked each time a sweep is sent or finishes (and
        every `timeout` s at most); its last value. Ctrl-C interrupts the wait."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def close(self) -> None:
        """Cancel the sweeps in flight, stop the threads, close the socket if it is ours."""
        for job in list(self._active):
            job.cancel()
        for worker in self._workers:
            _join(worker)
        self._closing = True
        if self._receiver is not None:
            self.sock.wake()
            _join(self._receiver)
        if self._own and self.sock is not None:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _receive(self) -> None:
        try:
            got = []
            while not self._closing:
                begun = time.thread_time()
                self._lay_out()
                if len(got) == RECV_BATCH:               # more is queued: take it now
                    got = self.sock.recv(0.0)
                elif got and self.sock.stamps:           # replies flow: take them a tick at a time
                    got = self.sock.recv(self._tick(), settle=True)
                else:                                    # quiet: sleep until something comes
                    got = self.sock.recv(RECV_IDLE)
                if got:
                    self._dispatch(got, begun)
                if len(got) < RECV_BATCH:
                    with self._drained:
                        self._drained_at = self.clock()
                        self._drained.notify_all()
        except BaseException as exc:    # a broken socket stops every sweep in flight
            with self._lock:
                self.failure, active = exc, list(self._active)
            for job in active:
                job.fail(exc)

    def _lay_out(self) -> None:
        """Have the socket lay out echo replies of the size the newest sweep that looks them
        up expects (see _Batch): most replies answer it."""
        newest = next((job for job in reversed(self._active) if job.expecting), None)
        if newest is not None:
            self.sock.echo_size = newest.size

    def _tick(self) -> float:
        """RECV_TICK, or less when the socket's queue would not hold a tick of replies at the
        rate of the sweeps in flight (with half of it to spare): a full queue drops replies,
        which the census would read as silence. A sweep flat out counts as FLAT_OUT_RATE."""
        rate = sum(job.rate or FLAT_OUT_RATE for job in self._active)
        return min(RECV_TICK, self.sock.queue_packets / 2 / rate) if rate else RECV_TICK

    def _dispatch(self, got: list, begun: float) -> None:
        now = self.clock()
        with self._lock:
            active = self._active[::-1]   # the newest first: most replies answer the sweep sending now
            if not active:
                return
            credited = self._credit_batch(active, got, now)
        share = (time.thread_time() - begun) / len(got)   # this batch's CPU, shared by packet
        for job, count in credited.items():
            job.receive_cpu += share * count

    @classmethod
    def _credit_batch(cls, active: list, got, now: float) -> dict:
        """Credit each packet of `got` (IcmpSocket.recv) to its sweep; how many each got. The
        echo replies _claim_echoes() proves are credited first, a batch at a time, then the
        rest in order by the full path (_take): an echo outranks an error, whichever came first."""
        credited = dict.fromkeys(active, 0)
        claims = {job: ([], []) for job in active}     # the targets it answers, their ages (us)
        if isinstance(got, _Batch):
            rest = [(got.packet(i), None, got.ages[i] / 1e6) for i in cls._claim_echoes(active, got, claims)]
        else:
            rest = got
        for job, (targets, ages) in claims.items():
            if targets:
                job._credit_echoes(targets, ages, now)
                credited[job] += len(targets)
        for packet, source, age in rest:
            credited[cls._take(active, packet, source, now - age)] += 1
        return credited

    @classmethod
    def _claim_echoes(cls, active: list, got: "_Batch", claims: dict) -> list:
        """The fast path, for a raw socket: an echo reply exactly as RFC 792 answers one of our
        probes (IPv4 header without options) is, after the header, byte for byte the reply its
        sweep built for the target its source names. That proves it (source, checksum,
        identifier, sequence number, payload and MAC); a checksum folded the other way does not.
        Most replies answer the newest sweep, so each run of packets that could (the right size,
        a source among its targets) is proven at once: the replies it expects, joined, are the
        batch's echoes where the kernel put them (_claim_run). Files (targets, ages) in
        claims[sweep]; returns the indices of the other packets, in order."""
        newest, count = active[0], len(got)
        if not newest.expecting or newest.size != got.echo_size:
            return cls._claim_each(active, got, range(count), claims)
        whole, first, end = HEAD + newest.size, newest.first, newest.first + newest.expecting
        sizes, sources = got.sizes, got.sources
        if sizes.count(whole) == count and first <= min(sources, default=first) and max(sources, default=first) < end:
            others = []                                 # the usual batch: all could be the newest's
        else:
            others = [i for i in range(count) if sizes[i] != whole or not first <= sources[i] < end]
        rest, edges = [], [-1, *others, count]
        for before, after in zip(edges, edges[1:]):
            if after - before > 1:
                cls._claim_run(active, got, before + 1, after, claims, rest)
            if after < count:
                rest += cls._claim_each(active, got, (after,), claims)
        return rest

    @classmethod
    def _claim_run(cls, active: list, got: "_Batch", lo: int, hi: int, claims: dict, rest: list) -> None:
        """Packets lo..hi-1, each the size of the newest sweep's replies and from one of its
        targets: claim them all when they are exactly its replies, with one comparison; else
        halve the run, down to a few packets checked one by one (another sweep's reply, a stray)."""
        job = active[0]
        size, targets = job.size, [source - job.first for source in got.sources[lo:hi]]
        if (got.versions[lo:hi].count(0x45) == hi - lo
                and b"".join(_gather(job.replies, targets)) == got.echoes[size * lo:size * hi]):
            claimed, ages = claims[job]
            claimed += targets
            ages += got.ages[lo:hi]
        elif hi - lo > max(RUN_MIN, 1):
            middle = (lo + hi) // 2
            cls._claim_run(active, got, lo, middle, claims, rest)
            cls._claim_run(active, got, middle, hi, claims, rest)
        else:
            rest += cls._claim_each(active, got, range(lo, hi), claims)

    @staticmethod
    def _claim_each(active: list, got: "_Batch", indices, claims: dict) -> list:
        """_claim_echoes() packet by packet, against every sweep: the indices none claims."""
        rest = []
        for i in indices:
            source, size = got.sources[i], got.sizes[i] - HEAD
            for job in active if got.versions[i] == 0x45 else ():
                k = source - job.first
                if 0 <= k < job.expecting and size == job.size and got.message(i) == job.replies[k]:
                    claims[job][0].append(k)
                    claims[job][1].append(got.ages[i])
                    break
            else:
                rest.append(i)
        return rest

    @staticmethod
    def _take(active: list, packet: bytes, source: Optional[int], now: float) -> "Sweep":
        """Credit one packet to the sweep whose secret it proves; what none can claim counts
        against the one whose tag it carries with a bad hash (BAD_PAYLOAD), else the newest (STRAY)."""
        reply = parse(packet, source)
        blamed, verdict = active[0], Verdict.STRAY
        if reply is not None:
            for job in active:
                said, target = job.signer.check(reply, job.check_ident)
                if said in (Verdict.OK, Verdict.WRONG_SOURCE):
                    job._credit(reply, said, target, now)
                    return job
                if said == Verdict.BAD_PAYLOAD and verdict == Verdict.STRAY:
                    blamed, verdict = job, said
        blamed._count(verdict)
        return blamed

    def _caught_up(self, since: float, timeout: float) -> bool:
        """Wait (up to `timeout` s) until the receiver has emptied the socket's queue after
        `since`: what arrived by then is credited, even when a busy machine kept it waiting."""
        self.sock.wake()                  # a receiver idle in select() looks again now
        with self._drained:
            return self._drained.wait_for(lambda: self._drained_at > since or self._closing, timeout)

    def _finish(self, job: "Sweep") -> None:
        with self._lock:                  # after this no reply reaches the job
            if job in self._active:
                self._active.remove(job)
        job.dropped = self._drops() - job.drops_before
        job._close(self.sock.kind)
        self._notify()

    def _drops(self) -> int:
        """The socket's count of packets dropped so far (0 from a socket that cannot tell)."""
        counter = getattr(self.sock, "drops", None)
        return counter() if callable(counter) else 0

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


class Sweep:
    """One sweep in flight, made by Sweeper.start(): its targets' status, its secret, its
    rounds of sends (in a worker thread of its own, with a helper thread per extra send lane)
    and its cooldowns. The Sweeper's receiver credits replies to it; only the receiver writes
    status/code/rtt_us and the reply counters, and the send counters take `lock`.

    `all_sent`: the last probe of the last round is out (the sweep still listens for late
    replies). `done`: the last cooldown is over, every target answered, or the sweep
    failed or was cancelled; result() then gives the SweepResult (or raises the failure)."""

    def __init__(self, sweeper: Sweeper, addresses, rate, probes, cooldown, timeout, progress):
        count = len(addresses)
        self.sweeper, self.addresses, self.rate, self.probes = sweeper, addresses, rate, probes
        self.cooldown, self.on_progress = cooldown, progress
        self.clock, self.sleep = sweeper.clock, sweeper.sleep
        self.started = self.last_report = self.clock()
        self.deadline = self.started + timeout if timeout is not None else math.inf
        self.status, self.code = bytearray(count), bytearray(count)
        self.rtt_us = array.array("I", bytes(4 * count))
        self.sent_at = [0.0] * count     # a list: storing and reading a float costs half what an array's does
        self.index = _indexer(addresses)
        self.signer, self.check_ident = None, True      # the Sweeper gives it its secret
        # target k's probe, and the ICMP message of the echo reply it expects at
        # replies[k] (`size` bytes each), built by _run; for a range of addresses on a raw
        # socket, target k is address first + k for k < expecting (see Sweeper._claim_echoes)
        self.requests, self.replies, self.size = (), (), 0
        self.first, self.expecting = addresses[0] if isinstance(addresses, range) and addresses else 0, 0
        self.excluded = self.rounds = self.sent = self.send_errors = 0
        self.stray = self.wrong_source = self.bad_payload = self.duplicates = 0
        self.send_seconds = self.send_cpu = self.receive_cpu = 0.0
        self.drops_before = self.dropped = 0     # the socket's drop count at the start; drops since
        self.round_sent = self.round_answered = 0
        self.sending, self.stopping, self.failure, self._result = False, False, None, None
        self.quiet = threading.Event()
        self.lock = threading.Lock()    # the send counters, shared by the send lanes
        self._sent, self._finished = threading.Event(), threading.Event()

    @property
    def all_sent(self) -> bool:
        return self._sent.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait_sent(self, timeout: Optional[float] = None) -> bool:
        return self._sent.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> SweepResult:
        """Wait for the end of the sweep; its result, or raise what stopped it."""
        if not self._finished.wait(timeout):
            raise TimeoutError("the sweep has not finished")
        if self.failure is not None:
            raise self.failure
        return self._result

    def cancel(self) -> None:
        """Stop sending and listening as soon as possible (result() then gives what is in)."""
        self.stopping = True
        self.quiet.set()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.cancel()

    # --- the worker thread ------------------------------------------------------------------

    def _run(self, sock) -> None:
        begun = time.thread_time()
        try:
            # a datagram socket's kernel owns the identifier (and so the reply's bytes)
            raw = self.check_ident = sock.kind == "raw"
            expect = raw and isinstance(self.addresses, range)
            # every probe and the reply it expects, built at once; each round sends some
            self.size = self.signer.packet_size
            self.requests, replies = self.signer.probes(self.addresses, replies=expect)
            self.replies = _split(replies, self.size)
            self.expecting = len(self.addresses) if expect else 0   # now the receiver may look them up
            order = permutation(len(self.addresses))
            for round_number in range(1, self.probes + 1):
                todo = self._silent(order, first=round_number == 1)
                if not todo or self.clock() >= self.deadline or self.stopping:
                    break
                self.rounds += 1
                self._send_round(sock, todo)
                if round_number == self.probes:
                    self._report(final=True)      # 100 %: from here on it only listens
                    self._sent.set()
                    self.sweeper._notify()
                self._cool_down()
        except BaseException as exc:    # Ctrl-C in a progress callback, a socket error
            self.fail(exc)
        finally:
            with self.lock:
                self.send_cpu += time.thread_time() - begun
            self.sweeper._finish(self)

    def _silent(self, order: list, first: bool) -> list:
        """The targets of `order` with no answer yet: before the first round, all but the
        excluded ones (NO_ANSWER is 0; comparing items with the IntEnum costs ~10 ms a /16)."""
        if first and not self.excluded:
            return order
        status = self.status
        return [k for k in order if not status[k]]

    def _close(self, kind: str, report: bool = True) -> None:
        if report and self.failure is None:
            try:
                self._report(final=True)
            except BaseException as exc:
                self.failure = exc
        count = self.status.count
        stats = SweepStats(
            sent=self.sent, replies=count(Status.ECHO_REPLY), unreachable=count(Status.UNREACHABLE),
            excluded=self.excluded, stray=self.stray, wrong_source=self.wrong_source,
            bad_payload=self.bad_payload, duplicates=self.duplicates, rounds=self.rounds,
            elapsed=self.clock() - self.started, kind=kind, time_exceeded=count(Status.TIME_EXCEEDED),
            send_errors=self.send_errors, send_seconds=self.send_seconds,
            cpu_seconds=self.send_cpu + self.receive_cpu, dropped=self.dropped)
        self._result = SweepResult(self.addresses, self.status, self.code, self.rtt_us, stats)
        self.requests, self.replies, self.expecting = (), (), 0   # no reply reaches it any more
        self._sent.set()
        self._finished.set()

    def _send_round(self, sock, todo: list) -> None:
        """Send one probe to each of `todo`; flat out (or above LANE_RATE) split over the
        socket's send lanes, each paced at its share of the rate."""
        lanes = sock.lanes if not self.rate or self.rate >= LANE_RATE else 1
        bounds = [len(todo) * n // lanes for n in range(lanes + 1)]
        self.round_sent = self.round_answered = 0
        self.quiet.clear()
        self.sending = True
        first = self.clock()

        def lane_args(n: int) -> tuple:
            return sock, todo[bounds[n]:bounds[n + 1]], n, self.rate / lanes

        helpers = [threading.Thread(target=self._helper_lane, args=lane_args(n), name=f"icmp-sender-{n}",
                                    daemon=True) for n in range(1, lanes)]
        for helper in helpers:
            helper.start()
        try:
            self._send_lane(*lane_args(0))
        finally:
            for helper in helpers:
                helper.join()
        self.send_seconds += self.clock() - first

    def _send_lane(self, sock, todo: list, lane: int, rate: float) -> None:
        """Send to `todo`, `rate` a second, one send call per batch; lane 0 (the worker's
        thread) reports progress. The probes are gathered OUTBOX_PACKETS at a time."""
        begun = time.thread_time()
        pacer = _Pacer(rate, self.clock, self.sleep)
        chunk, sent_at = pacer.bucket or SEND_CHUNK, self.sent_at
        for first in range(0, len(todo), OUTBOX_PACKETS):
            part = todo[first:first + OUTBOX_PACKETS]
            addrs = array.array("I", _gather(self.addresses, part))
            outbox = Outbox(b"".join(_gather(self.requests, part)), addrs, self.size)
            pos = 0
            while pos < len(part) and self.clock() < self.deadline and not self.stopping:
                want = pacer.take(min(chunk, len(part) - pos))
                if not want:
                    continue
                now = self.clock()
                for k in part[pos:pos + want]:
                    sent_at[k] = now         # before the send: the receiver may see the reply first
                pos += self._send_chunk(sock, outbox, pos, want, pacer, lane)
                if not lane:
                    self._report()
        if lane:                         # lane 0's time is the worker's own, counted in _run
            with self.lock:
                self.send_cpu += time.thread_time() - begun

    def _helper_lane(self, *args) -> None:
        try:
            self._send_lane(*args)
        except BaseException as exc:     # stops lane 0 too; result() raises it
            self.fail(exc)

    def _send_chunk(self, sock, outbox: Outbox, pos: int, want: int, pacer: "_Pacer", lane: int) -> int:
        """Send up to `want` packets from `pos`; return how far to advance."""
        try:
            taken = sock.send(outbox, pos, pos + want, lane)
        except OSError:              # this one destination refused (e.g. EACCES): skip it
            with self.lock:
                self.send_errors += 1
            pacer.give_back(want - 1)
            return 1
        with self.lock:
            self.sent += taken
            self.round_sent += taken
        pacer.give_back(want - taken)
        if not taken:
            time.sleep(0.0005)       # the send buffer is full; the receiver keeps draining
        return taken

    def _cool_down(self) -> None:
        """Wait for stragglers: up to `cooldown` s, but no longer than it takes every probe of
        the round to be answered; then until the receiver has caught up. After the last round
        only the final progress is reported: by then the next sweep may be the one on the
        user's screen."""
        end = min(self.clock() + self.cooldown, self.deadline)
        self.sending = False
        while self.round_answered < self.round_sent and not self.stopping and (left := end - self.clock()) > 0:
            self.quiet.wait(min(left, PROGRESS_EVERY))
            if not self.all_sent:
                self._report()
        if self.round_answered < self.round_sent and not self.stopping:
            # replies that came in time may still wait in the socket's queue, behind a busy
            # receiver (and on a shared lo, behind everyone else's): let it catch up first
            self.sweeper._caught_up(self.clock(), DRAIN_MAX)

    # --- the receiver thread ----------------------------------------------------------------

    def _credit(self, reply: Reply, verdict: Verdict, target: int, now: float) -> None:
        k = self.index(target) if verdict == Verdict.OK else None
        if k is None or self.status[k] == Status.EXCLUDED:
            self._count(verdict)                # OK but not ours to credit: a stray
        elif reply.icmp_type == IcmpType.ECHO_REPLY:
            self._credit_echo(k, now)
        elif self.status[k] != Status.NO_ANSWER:
            self.duplicates += 1                # an error after any answer adds nothing
        else:
            unreachable = reply.icmp_type == IcmpType.DEST_UNREACHABLE
            self.status[k] = Status.UNREACHABLE if unreachable else Status.TIME_EXCEEDED
            self.code[k] = reply.code
            self._answered()

    def _credit_echo(self, k: int, now: float) -> None:
        self._credit_echoes([k], [0], now)

    def _credit_echoes(self, targets: list, ages: list, now: float) -> None:
        """Echo replies from `targets`, taken at `now` after waiting `ages` (microseconds) in
        the kernel: an echo outranks an error that came first, a second echo is a duplicate.
        Its loop runs once per reply, so it holds what it uses in locals."""
        status, rtt_us, sent_at = self.status, self.rtt_us, self.sent_at
        echo, answered = int(Status.ECHO_REPLY), len(targets)     # NO_ANSWER is 0
        for k, age in zip(targets, ages):
            if status[k]:
                answered -= 1
                if not self._echo_after(k):
                    continue
            status[k] = echo
            rtt = int((now - sent_at[k]) * 1e6) - age
            # a late answer to an earlier round can beat the re-probe's send time: never < 0
            rtt_us[k] = rtt if 0 <= rtt <= 0xFFFFFFFF else min(max(rtt, 0), 0xFFFFFFFF)
        if answered:
            self._answered(answered)

    def _echo_after(self, k: int) -> bool:
        """Whether an echo from target k, which has an answer, counts: over an error it does;
        a second echo is a duplicate, one from an excluded target (never probed, so no reply
        of ours) a stray."""
        if self.status[k] == Status.ECHO_REPLY:
            self.duplicates += 1
            return False
        if self.status[k] == Status.EXCLUDED:
            self.stray += 1
            return False
        return True

    def _answered(self, count: int = 1) -> None:
        self.round_answered += count
        if not self.sending and self.round_answered >= self.round_sent:
            self.quiet.set()

    def _count(self, verdict: Verdict) -> None:
        if verdict == Verdict.WRONG_SOURCE:
            self.wrong_source += 1
        elif verdict == Verdict.BAD_PAYLOAD:
            self.bad_payload += 1
        else:
            self.stray += 1

    def _report(self, final: bool = False) -> None:
        now = self.clock()
        if self.on_progress is None or (not final and now - self.last_report < PROGRESS_EVERY):
            return
        self.last_report = now
        elapsed = now - self.started
        total = len(self.addresses) - self.excluded
        count = self.status.count       # 50 us for a /16, at most 4 times a second
        self.on_progress(Progress(sent=self.sent, total=total, replies=count(Status.ECHO_REPLY),
                                  unreachable=count(Status.UNREACHABLE) + count(Status.TIME_EXCEEDED),
                                  elapsed=elapsed,
                                  pps=self.sent / elapsed if elapsed > 0 else 0.0))


# ---------------------------------------------------------------------------------------------
# private helpers

def _ip_header(packet: bytes):
    """(header length, source, destination) of an IPv4 packet carrying ICMP, or None. The
    fields are read by index (RFC 791 offsets) rather than through IP_HEADER: this runs once
    per reply."""
    if len(packet) < IP_HEADER.size:
        return None
    vihl = packet[0]
    start = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or start < IP_HEADER.size or packet[9] != socket.IPPROTO_ICMP or len(packet) < start:
        return None
    return start, int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")


def _sums_to_ones(message: bytes) -> bool:
    """checksum(message) == 0, tested the cheap way: a message whose checksum is right sums
    to 0xFFFF in one's complement (RFC 1071), i.e. its big-endian value is a non-zero
    multiple of 0xFFFF (see checksum())."""
    total = int.from_bytes(message + b"\0" if len(message) % 2 else message, "big")
    return total != 0 and total % 0xFFFF == 0


def _parse_quote(quote: bytes, source: int, icmp_type: int, code: int) -> Optional[Reply]:
    """An error quotes the IP header and at least 8 bytes of the datagram that caused it
    (RFC 792); credit it to that datagram's destination when it was an echo request."""
    header = _ip_header(quote)
    if header is None or len(quote) < header[0] + ICMP_HEADER.size:
        return None
    start, _, target = header
    quoted_type, _, _, ident, seq = ICMP_HEADER.unpack_from(quote, start)
    if quoted_type != IcmpType.ECHO_REQUEST:
        return None
    return Reply(source, target, icmp_type, code, ident, seq, quote[start + ICMP_HEADER.size:])


def _error_message(icmp_type: int, code: int, target: str, quoted: bytes) -> bytes:
    """An ICMP error as on the wire: its header, then the IPv4 header of our probe to
    `target` (rebuilt; the kernel keeps only the probe's ICMP part) and the probe."""
    inner = IP_HEADER.pack(0x45, 0, IP_HEADER.size + len(quoted), 0, 0, 64, socket.IPPROTO_ICMP, 0,
                           bytes(4), socket.inet_aton(target)) + quoted
    return _icmp_message(icmp_type, code, 0, 0, inner)


def _icmp_message(icmp_type: int, code: int, ident: int, seq: int, body: bytes) -> bytes:
    unsummed = ICMP_HEADER.pack(icmp_type, code, 0, ident, seq) + body
    return ICMP_HEADER.pack(icmp_type, code, checksum(unsummed), ident, seq) + body


def _complement(total: int) -> int:
    """The RFC 1071 checksum of data whose big-endian value is `total` (any sum of its
    16-bit words will do): the one's-complement sum folded to 16 bits, inverted. A non-zero
    sum folds to 1..0xFFFF (one's complement has no +0 for it), an empty one to 0."""
    return ~_residue(total) & 0xFFFF if total else 0xFFFF


def _residue(total: int) -> int:
    """A positive one's-complement sum folded to 16 bits: 1..0xFFFF, the same value mod 0xFFFF."""
    return (total - 1) % 0xFFFF + 1


def _big_endian(addresses) -> bytes:
    """The addresses as 4-byte big-endian values, back to back."""
    words = array.array("I", addresses)
    if words.itemsize != ADDRESS.size:
        return b"".join(map(ADDRESS.pack, addresses))
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def _word_sums(rows: bytes, width: int, count: int) -> int:
    """The sum of the 16-bit big-endian words of each of the `count` rows of `width` bytes
    in `rows`, as one big integer of 32-bit lanes (row 0 in the top lane): one strided copy
    per byte column and one big-integer addition per word column, all of it in C."""
    lanes, total = bytearray(4 * count), 0
    for at in range(0, width, 2):
        lanes[2::4] = rows[at::width]
        lanes[3::4] = rows[at + 1::width]
        total += int.from_bytes(lanes, "big")
    return total


def _checksums(sums: int, fixed: int, count: int) -> bytes:
    """The RFC 1071 checksum of each lane of `sums` (_word_sums) plus `fixed` (1..0xFFFF), as
    `count` 2-byte big-endian values back to back. A lane holds less than 2**20, so two
    end-around-carry folds bring it to 1..0xFFFF (never 0: `fixed` is not), as _complement does."""
    ones = int.from_bytes(b"\0\0\xff\xff" * count, "big")     # 0xFFFF in every lane
    total = sums + fixed * (ones // 0xFFFF)                     # fixed added to every lane
    for _ in range(2):
        total = (total & ones) + ((total >> 16) & ones)
    lanes = (ones - total).to_bytes(4 * count, "big")          # ~folded, lane by lane
    return bytes(_fill(b"\0\0", count, [(0, lanes[2::4]), (1, lanes[3::4])]))


def _fill(template: bytes, count: int, columns) -> bytes:
    """`count` copies of `template`, where for each (offset, column) byte `offset` of copy k
    is column[k]."""
    rows, width = bytearray(template * count), len(template)
    for offset, column in columns:
        rows[offset::width] = column
    return bytes(rows)


def _split(rows: bytes, width: int) -> list:
    return [rows[at:at + width] for at in range(0, len(rows), width)]


def _gather(items, indices) -> tuple:
    """(items[k] for k in indices), gathered in C."""
    if len(indices) < 2:
        return tuple(items[k] for k in indices)
    return operator.itemgetter(*indices)(items)


def _network(value, strict: bool = False) -> ipaddress.IPv4Network:
    return value if isinstance(value, ipaddress.IPv4Network) else ipaddress.IPv4Network(value, strict=strict)


def _spans(networks, strict: bool = False) -> list:
    """Sorted, merged, inclusive (first, last) integer spans covering `networks`."""
    if isinstance(networks, (str, ipaddress.IPv4Network)):
        networks = [networks]
    nets = [_network(n, strict) for n in networks]
    return _merge((int(n.network_address), int(n.broadcast_address)) for n in nets)


def _merge(spans) -> list:
    merged = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _subtract(spans: list, holes: list) -> list:
    """The parts of `spans` outside `holes` (both sorted and merged)."""
    out = []
    for first, last in spans:
        for hole_first, hole_last in holes:
            if hole_last < first or hole_first > last:
                continue
            if hole_first > first:
                out.append((first, hole_first - 1))
            first = hole_last + 1
            if first > last:
                break
        if first <= last:
            out.append((first, last))
    return out


def _reserved_spans(allow) -> list:
    # an allow with host bits set ("127.0.0.1/1") is refused, not widened into 0.0.0.0/1
    return _subtract(_spans(RESERVED), _spans(allow, strict=True))


def _excluded_spans(allow, exclude) -> list:
    return _merge(_reserved_spans(allow) + _spans(exclude))   # a widened exclusion is harmless


def _wholly_in(spans: list, network) -> bool:
    net = _network(network)
    span = _span_holding(spans, int(net.network_address))
    return span is not None and int(net.broadcast_address) <= span[1]


def _span_holding(spans: list, addr: int) -> Optional[tuple]:
    """The span of the sorted, merged `spans` that holds `addr`, or None."""
    k = bisect.bisect_right(spans, (addr, 0xFFFFFFFF)) - 1
    return spans[k] if k >= 0 and addr <= spans[k][1] else None


def _join(thread: threading.Thread) -> None:
    """Join a thread whose start() a signal may have cut short: Ctrl-C or SIGTERM raised in the
    main thread inside Thread.start() leaves a thread join() refuses ("cannot join thread before
    it is started"); such a thread is a daemon whose sweep close() has already cancelled."""
    try:
        thread.join()
    except RuntimeError:
        pass


def _addresses(targets) -> Sequence[int]:
    """Targets as a sequence of int addresses: a range for a network."""
    if isinstance(targets, str):
        targets = ipaddress.IPv4Network(targets, strict=False)
    if isinstance(targets, ipaddress.IPv4Network):
        return range(int(targets.network_address), int(targets.broadcast_address) + 1)
    if isinstance(targets, range):
        if targets and (targets[0] < 0 or targets[-1] > 0xFFFFFFFF or targets.step != 1):
            raise ValueError("an address range must be ascending IPv4 integers")
        return targets
    return [int(ipaddress.IPv4Address(t)) for t in targets]


def _mark_excluded(addresses: Sequence[int], spans: list, status: bytearray) -> int:
    """Set Status.EXCLUDED in `status` for every excluded address; return how many."""
    if isinstance(addresses, range):
        base, count = addresses.start, len(addresses)
        for first, last in spans:
            lo, hi = max(first - base, 0), min(last - base + 1, count)
            if lo < hi:
                status[lo:hi] = bytes([Status.EXCLUDED]) * (hi - lo)
    else:
        for k, addr in enumerate(addresses):
            if _span_holding(spans, addr) is not None:
                status[k] = Status.EXCLUDED
    return status.count(Status.EXCLUDED)


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """A big receive buffer, so replies to a fast burst of probes are not dropped; the
    FORCE variant (Linux only) lets root go past net.core.rmem_max."""
    linux = sys.platform.startswith("linux")
    for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF) if linux else (socket.SO_RCVBUF,):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def _timestamps_on(sock: socket.socket) -> bool:
    """Ask the kernel to timestamp every packet it queues on `sock` (Linux)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        return True
    except OSError:
        return False


def _raw_socket(wanted: int) -> socket.socket:
    """A raw ICMP socket that is delivered only the ICMP types in the bit mask `wanted`.
    Linux hands a raw socket every ICMP packet, including (on lo) each echo request we send,
    looped back as input; ICMP_FILTER makes the kernel drop the rest before copying them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if sys.platform.startswith("linux"):
        sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", 0xFFFFFFFF & ~wanted))
    sock.setblocking(False)
    return sock


def _next_prime(n: int) -> int:
    while n < 2 or any(n % k == 0 for k in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _prime_factors(n: int) -> list:
    factors, k = [], 2
    while k * k <= n:
        if n % k == 0:
            factors.append(k)
            while n % k == 0:
                n //= k
        k += 1
    return factors + ([n] if n > 1 else [])


class _Mmsg:
    """sendmmsg(2) through ctypes: one system call sends a whole chunk of a round. Only on
    64-bit little-endian Linux, where struct mmsghdr is eight 8-byte words; anywhere else
    (macOS, no ctypes, no libc) load() gives None and IcmpSocket uses plain sendto."""
    WORDS = 8   # msg_name, msg_namelen, msg_iov, msg_iovlen, control, controllen, flags, msg_len

    def __init__(self, libc, ctypes):
        self.ctypes = ctypes
        self.sendmmsg = libc.sendmmsg
        self.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self.sendmmsg.restype = ctypes.c_int

    @classmethod
    def load(cls):
        return _load_libc(cls, "sendmmsg")

    def vectors(self, outbox: Outbox):
        """The iovec, sockaddr_in and mmsghdr arrays for a whole outbox, filled with slice
        assignments (C speed) rather than a Python loop per packet."""
        count = len(outbox.addrs)
        data = self.ctypes.create_string_buffer(outbox.data, len(outbox.data) or 1)
        names = array.array("I", bytes(16 * count))     # struct sockaddr_in, 16 bytes
        names[0::4] = array.array("I", [socket.AF_INET]) * count   # family; port 0
        wire = array.array("I", outbox.addrs)
        wire.byteswap()                                   # network byte order in memory
        names[1::4] = wire
        iov = array.array("Q", bytes(16 * count))         # struct iovec: base, length
        iov[0::2] = _pointers(self.ctypes.addressof(data), outbox.size, count)
        iov[1::2] = array.array("Q", [outbox.size]) * count
        msgs = array.array("Q", bytes(8 * self.WORDS * count))
        msgs[0::self.WORDS] = _pointers(names.buffer_info()[0], 16, count)
        msgs[1::self.WORDS] = array.array("Q", [16]) * count
        msgs[2::self.WORDS] = _pointers(iov.buffer_info()[0], 16, count)
        msgs[3::self.WORDS] = array.array("Q", [1]) * count
        return data, names, iov, msgs   # keep the buffers alive with the pointers into them

    def send(self, fd: int, vectors, start: int, count: int) -> int:
        msgs = vectors[3]
        taken = self.sendmmsg(fd, msgs.buffer_info()[0] + 8 * self.WORDS * start, count, socket.MSG_DONTWAIT)
        if taken >= 0:
            return taken
        err = self.ctypes.get_errno()
        if err in _BUSY:
            return 0
        raise OSError(err, os.strerror(err))


class _RecvMmsg:
    """recvmmsg(2) through ctypes: one system call takes up to RECV_BATCH packets from a raw
    socket (a receive tick finds hundreds queued), with a control slot each for its
    SO_TIMESTAMP message, all laid out once. Each packet is scattered over three iovecs:
    its first HEAD bytes (the IPv4 header, without options) into a buffer of headers, the next
    `echo_size` (the ICMP message of the echo reply a sweep expects) into a buffer where those
    lie back to back, and the rest into a slot of a third (see _Batch):

        heads   |hdr 0|hdr 1|hdr 2|...          HEAD bytes each
        echoes  |echo 0|echo 1|echo 2|...       echo_size bytes each, dense
        rest    |rest 0 ...  |rest 1 ...  |...  an error's longer quote, whatever is left

    So a batch's echo replies can be checked with one comparison for all of them. Same
    platforms as _Mmsg; elsewhere load() gives None and IcmpSocket uses recv."""
    WORDS = _Mmsg.WORDS
    STAMP_WORDS = 4    # a control slot: struct cmsghdr (length, level, type) then a timeval
    IOV_WORDS = 6      # three struct iovec (base, length) per packet

    def __init__(self, libc, ctypes):
        self.recvmmsg = libc.recvmmsg
        self.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        self.recvmmsg.restype = ctypes.c_int
        self.get_errno = ctypes.get_errno
        self.heads, self.echoes = bytearray(HEAD * RECV_BATCH), bytearray(ECHO_MAX * RECV_BATCH)
        self.rest = bytearray(RECV_SLOT * RECV_BATCH)
        # the kernel is handed raw pointers into them: these views keep them from being resized
        self._pinned = [(ctypes.c_char * len(b)).from_buffer(b) for b in (self.heads, self.echoes, self.rest)]
        self.iov = array.array("Q", bytes(8 * self.IOV_WORDS * RECV_BATCH))
        self.iov[0::self.IOV_WORDS] = _pointers(ctypes.addressof(self._pinned[0]), HEAD, RECV_BATCH)
        self.iov[1::self.IOV_WORDS] = array.array("Q", [HEAD]) * RECV_BATCH
        self.iov[4::self.IOV_WORDS] = _pointers(ctypes.addressof(self._pinned[2]), RECV_SLOT, RECV_BATCH)
        self._echoes_at, self.echo_size = ctypes.addressof(self._pinned[1]), -1
        self.lay_out(PACKET_SIZE)
        self.stamps = array.array("q", bytes(8 * self.STAMP_WORDS * RECV_BATCH))
        self.msgs = array.array("Q", bytes(8 * self.WORDS * RECV_BATCH))   # no name
        self.msgs[2::self.WORDS] = _pointers(self.iov.buffer_info()[0], 8 * self.IOV_WORDS, RECV_BATCH)
        self.msgs[3::self.WORDS] = array.array("Q", [3]) * RECV_BATCH
        self.msgs[4::self.WORDS] = _pointers(self.stamps.buffer_info()[0], 8 * self.STAMP_WORDS, RECV_BATCH)
        # the kernel writes back how much control it filled in: set them again before each call
        self.control_sizes = array.array("Q", [8 * self.STAMP_WORDS]) * RECV_BATCH
        self.no_stamps = array.array("q", bytes(8 * RECV_BATCH))
        self.emptied = -math.inf        # when a call last found the queue empty (monotonic)

    @classmethod
    def load(cls):
        return _load_libc(cls, "recvmmsg")

    def lay_out(self, echo_size: int) -> None:
        """Make the second iovec of each packet `echo_size` bytes (at most ECHO_MAX)."""
        echo_size = min(max(echo_size, 0), ECHO_MAX)
        if echo_size != self.echo_size:
            self.echo_size, words = echo_size, self.IOV_WORDS
            self.iov[2::words] = _pointers(self._echoes_at, echo_size, RECV_BATCH)
            self.iov[3::words] = array.array("Q", [echo_size]) * RECV_BATCH
            self.iov[5::words] = array.array("Q", [RECV_SLOT - HEAD - echo_size]) * RECV_BATCH

    def recv(self, fd: int, echo_size: int = PACKET_SIZE) -> "_Batch":
        """What is queued, up to RECV_BATCH packets (none: an empty batch), laid out for echo
        replies of `echo_size` bytes, each with the microseconds since the kernel timestamped
        it (0 for a packet without a timestamp). The batch lives in this object's buffers: it
        is valid until the next call."""
        self.lay_out(echo_size)
        self.msgs[5::self.WORDS] = self.control_sizes
        self.stamps[2::self.STAMP_WORDS] = self.no_stamps    # tv_sec 0: no timestamp came
        called = time.monotonic()     # the queue, if this call empties it, was empty after this
        taken = self.recvmmsg(fd, self.msgs.buffer_info()[0], RECV_BATCH, socket.MSG_DONTWAIT, None)
        if taken < 0:
            err = self.get_errno()
            if err in _BUSY:
                taken = 0
            else:
                raise OSError(err, os.strerror(err))
        # msg_len, the last word of each mmsghdr, is a 32-bit count: the kernel leaves the
        # word's upper half as we zeroed it
        sizes = self.msgs[self.WORDS - 1:self.WORDS * taken:self.WORDS].tolist()
        return _Batch(self.heads, self.echoes, self.echo_size, self.rest, RECV_SLOT, sizes, self._ages(taken, called))

    def _ages(self, taken: int, called: float) -> list:
        """Each packet's age in microseconds: now less its timestamp (a timeval), both
        CLOCK_REALTIME. None waited longer than since the queue was last found empty (by a
        call made at `called`, monotonic), so an age out of that range means the wall clock
        stepped (NTP, a resume) in between; such a packet, or one without a stamp (tv_sec 0),
        is timed now (age 0)."""
        now, wall, words = time.monotonic(), time.time_ns() // 1000, self.STAMP_WORDS
        oldest = (now - self.emptied + 0.001) * 1e6
        if taken < RECV_BATCH:
            self.emptied = called
        secs, usecs = self.stamps[2:words * taken:words], self.stamps[3:words * taken:words]
        # the usual batch was stamped within one second: then an age is one subtraction (and
        # the checks are on the list made, as touching an array's items costs an int each)
        if secs and secs[0] and secs.tobytes() == secs[:1].tobytes() * taken:
            since = wall - secs[0] * 1_000_000
            ages = [since - usec for usec in usecs]
            if min(ages) >= 0 and max(ages) <= oldest:
                return ages
        return [age if sec and 0 <= (age := wall - sec * 1_000_000 - usec) <= oldest else 0
                for sec, usec in zip(secs, usecs)]


class _Batch:
    """Packets a raw socket took at once, laid out as recvmmsg(2) leaves them (_RecvMmsg):
    packet i's first HEAD bytes (its IPv4 header when it has no options) at heads[HEAD * i:],
    its next `echo_size` bytes at echoes[echo_size * i:], the rest at rest[stride * i:];
    sizes[i] bytes in all, ages[i] how long the kernel held it (microseconds). `sources` and
    `versions` are every packet's source address and version/IHL byte, read for all at once.
    Iterating gives (packet, None, age in seconds), as IcmpSocket.recv does for a datagram
    socket."""

    def __init__(self, heads, echoes, echo_size: int, rest, stride: int, sizes: list, ages: list):
        self.heads, self.echoes, self.echo_size, self.rest = heads, echoes, echo_size, rest
        self.stride, self.sizes, self.ages = stride, sizes, ages
        count = len(sizes)
        words = bytearray(ADDRESS.size * count)
        for at in range(ADDRESS.size):       # bytes 12..15 of each header, as big-endian words
            words[at::ADDRESS.size] = heads[12 + at:HEAD * count:HEAD]
        self.sources = _words(words)
        self.versions = heads[0:HEAD * count:HEAD]

    @classmethod
    def of(cls, packets: list, ages=None, echo_size: int = PACKET_SIZE) -> "_Batch":
        """A batch of whole `packets` (each starting with its IPv4 header, `ages` in seconds),
        copied into place."""
        stride = max([0] + [len(p) - HEAD - echo_size for p in packets])
        heads = b"".join(p[:HEAD].ljust(HEAD, b"\0") for p in packets)
        echoes = b"".join(p[HEAD:HEAD + echo_size].ljust(echo_size, b"\0") for p in packets)
        rest = b"".join(p[HEAD + echo_size:].ljust(stride, b"\0") for p in packets)
        ages = [int(age * 1e6) for age in ages] if ages else [0] * len(packets)
        return cls(heads, echoes, echo_size, rest, stride, [len(p) for p in packets], ages)

    def message(self, i: int) -> bytes:
        """Packet i after its first HEAD bytes (after the IPv4 header, if it has no options)."""
        size, echo_size = self.sizes[i] - HEAD, self.echo_size
        at, more = echo_size * i, self.stride * i
        return bytes(self.echoes[at:at + min(max(size, 0), echo_size)] + self.rest[more:more + max(size - echo_size, 0)])

    def packet(self, i: int) -> bytes:
        return bytes(self.heads[HEAD * i:HEAD * i + min(self.sizes[i], HEAD)]) + self.message(i)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return ((self.packet(i), None, age / 1e6) for i, age in enumerate(self.ages))


def _words(data: bytes) -> list:
    """4-byte big-endian values, back to back, as a list of ints."""
    words = array.array("I")
    if words.itemsize != ADDRESS.size:
        return [value for value, in ADDRESS.iter_unpack(data)]
    words.frombytes(data)
    if sys.byteorder == "little":
        words.byteswap()
    return words.tolist()


def _load_libc(cls, function: str):
    """cls(libc, ctypes) where libc has `function` on 64-bit little-endian Linux, else None."""
    if not sys.platform.startswith("linux") or sys.byteorder != "little" or array.array("I").itemsize != 4:
        return None   # vectors() lays out sockaddr_in as four 'I' words
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if ctypes.sizeof(ctypes.c_void_p) != 8 or not hasattr(libc, function):
            return None
        return cls(libc, ctypes)
    except (ImportError, OSError):
        return None


def _pointers(base: int, step: int, count: int) -> array.array:
    """base, base + step, ... (`count` of them) as 8-byte words: one big integer holds them
    all, a 64-bit lane each, so no Python runs per word (an array made from a range of such
    large ints costs ~80 ns a word, and an outbox needs three)."""
    lanes = base * _lanes_of(count, 1) + step * _lanes_of(count, 0)
    words = array.array("Q")
    words.frombytes(lanes.to_bytes(8 * count, sys.byteorder))
    return words


@functools.lru_cache(maxsize=8)
def _lanes_of(count: int, ones: bool) -> int:
    """A big integer of `count` 64-bit lanes (lane k at bit 64k): each 1, or each k."""
    values = array.array("Q", [1] * count if ones else range(count))
    return int.from_bytes(values.tobytes(), sys.byteorder)


class _Pacer:
    """Two token buckets that pace in batches: `rate` probes a second (0 = no limit).

    take() sleeps until a batch (BATCH_SECONDS worth) may go, then hands out what both buckets
    allow, which one send call carries. The rate bucket fills at `rate` and keeps up to
    CATCH_UP_SECONDS of debt: time a busy machine took from the sender is made up, so the rate
    over the sweep is the one asked. The ceiling bucket fills at CATCH_UP times `rate` and holds
    BUCKET_BATCHES batches: debt is paid back no faster than that, so no second sees more than
    ~CATCH_UP x rate and no send call more than the ceiling (no burst a target network sees)."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep, interval: float = BATCH_SECONDS):
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.batch = max(1, round(rate * interval)) if rate else 0
        self.bucket = BUCKET_BATCHES * self.batch          # the most one call may carry
        self.debt = max(float(self.bucket), rate * CATCH_UP_SECONDS)
        self.tokens = self.ceiling = float(self.batch)     # the first batch goes at once
        self.last = clock()

    def take(self, want: int) -> int:
        """How many of `want` probes may go now; sleeps first until a batch may. 0 only when
        the sleep was cut short (at most PACER_NAP at a time, so a stop is seen soon)."""
        if not self.rate:
            return want
        self._fill()
        need = min(want, self.batch)
        wait = max(need - self.tokens, (need - self.ceiling) / CATCH_UP, 0.0) / self.rate
        if wait > 0:
            self.sleep(min(wait, PACER_NAP))
            self._fill()
        allowed = min(want, int(min(self.tokens, self.ceiling) + 1e-9))
        self.tokens -= allowed
        self.ceiling -= allowed
        return allowed

    def give_back(self, count: int) -> None:
        """`count` probes taken but not sent (a full send buffer): they may go again."""
        self.tokens += count
        self.ceiling += count

    def _fill(self) -> None:
        now = self.clock()
        elapsed, self.last = now - self.last, now
        self.tokens = min(self.debt, self.tokens + elapsed * self.rate)
        self.ceiling = min(self.bucket, self.ceiling + elapsed * self.rate * CATCH_UP)


def _indexer(addresses: Sequence[int]) -> Callable[[int], Optional[int]]:
    """addr -> its index in `addresses`, or None."""
    if isinstance(addresses, range):
        base, count = addresses.start, len(addresses)
        return lambda addr: addr - base if 0 <= addr - base < count else None
    return {addr: k for k, addr in enumerate(addresses)}.get


def _max_rss_kb() -> int:
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv=None) -> int:
    """Sweep one network and print a JSON line: the stats, and the status of every address
    as a string of digits (Status values, character k for the k-th address)."""
    parser = argparse.ArgumentParser(description="Ping every address of a network once (or --probes times).")
    parser.add_argument("network", type=ipaddress.IPv4Network)
    parser.add_argument("--allow", type=ipaddress.IPv4Network, action="append", default=[],
                        help="CIDR to allow inside reserved space")
    parser.add_argument("--exclude", type=ipaddress.IPv4Network, action="append", default=[],
                        help="CIDR never to probe")
    parser.add_argument("--rate", type=float, default=0.0, help="probes per second, 0 = unlimited")
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--cooldown", type=float, default=DEFAULT_COOLDOWN)
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        result = sweep(args.network, rate=args.rate, probes=args.probes, cooldown=args.cooldown,
                       timeout=args.timeout, allow=args.allow, exclude=args.exclude)
    except IcmpPermissionError as exc:
        print(f"icmp.py: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:     # --probes 0, a negative --rate, an --allow with host bits
        parser.error(str(exc))
    digits = bytes(result.status).translate(bytes.maketrans(bytes(range(5)), b"01234")).decode()
    report = {"stats": result.stats._asdict(), "status": digits, "max_rss_kb": _max_rss_kb()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
