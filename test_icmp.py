"""Tests of icmp.py: the codec (golden bytes, checksums, a fuzzed parser), reply validation,
the sweep against a fake socket, and, as root, real sweeps on loopback and in lab namespaces
(conftest.py) with a dead set, unreachables, random loss and the unprivileged socket."""
import array
import bisect
import collections
import errno
import hashlib
import ipaddress
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

import pytest

import icmp

HERE = os.path.dirname(os.path.abspath(__file__))
LOOP = int(ipaddress.IPv4Address("127.0.0.0"))
ALLOW = ["127.0.0.0/8"]
SECRET = bytes(range(16))


def addr(dotted: str) -> int:
    return int(ipaddress.IPv4Address(dotted))


def reference_checksum(data: bytes) -> int:
    """RFC 1071 section 4.1, word by word: the oracle for icmp.checksum."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for k in range(0, len(data), 2):
        total += (data[k] << 8) | data[k + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_packet(src: int, dst: int, payload: bytes, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 0, 0, 64, 1, 0,
                         src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
    return header + options + payload


def with_checksum(message: bytes) -> bytes:
    message = message[:2] + b"\0\0" + message[4:]
    return message[:2] + icmp.checksum(message).to_bytes(2, "big") + message[4:]


def echo_reply(request: bytes) -> bytes:
    return with_checksum(b"\0\0" + request[2:])


def unreachable(target: int, request: bytes, code: int = 1, keep: int = 28) -> bytes:
    """Destination unreachable quoting our probe to `target` (RFC 792: IP header + 8 bytes, or more)."""
    quote = ip_packet(LOOP + 1, target, request)[:keep]
    return with_checksum(bytes([3, code, 0, 0, 0, 0, 0, 0]) + quote)


# --- codec -------------------------------------------------------------------------------------

def test_checksum_vectors_even_and_odd():
    assert icmp.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D   # RFC 1071's example
    assert icmp.checksum(b"") == 0xFFFF
    assert icmp.checksum(b"\xff\xff") == 0x0000
    assert icmp.checksum(b"\x01") == 0xFEFF                             # odd: padded with 0
    assert icmp.checksum(b"\x00\x01\xf2") == 0x0DFE
    rng = random.Random(1071)
    for length in range(0, 80):
        data = bytes(rng.randrange(256) for _ in range(length))
        assert icmp.checksum(data) == reference_checksum(data), data.hex()
    assert icmp.checksum(b"\xff" * 1501) == reference_checksum(b"\xff" * 1501)


def test_echo_request_golden_bytes():
    packet = icmp.echo_request(0x1234, 0x0001, b"abc")
    assert packet == bytes.fromhex("0800216812340001616263")
    assert icmp.checksum(packet) == 0


def test_probe_layout_golden_bytes():
    signer = icmp.Signer(SECRET)
    probe = signer.request(addr("127.0.0.7"))
    ident, seq, payload = signer.sign(addr("127.0.0.7"))
    assert probe == icmp.echo_request(ident, seq, payload)
    assert len(probe) == icmp.PACKET_SIZE == 32
    assert probe[:2] == b"\x08\x00" and probe[4:8] == struct.pack("!HH", ident, seq)
    assert probe[8:20] == icmp.TAG == b"ipv4-census "
    assert probe[20:24] == bytes([127, 0, 0, 7])
    # identifier, sequence number and MAC: the 8th digest of SHAKE-128(SECRET, the /24 127.0.0)
    digest = hashlib.shake_128(SECRET + bytes([127, 0, 0])).digest(256 * 12)[7 * 12:8 * 12]
    assert probe[4:8] + probe[24:] == digest == bytes.fromhex("7098229571d5506fb2ccb99b")
    assert probe.hex() == "08005e1170982295697076342d63656e737573207f00000771d5506fb2ccb99b"
    assert icmp.checksum(probe) == 0


def test_a_block_of_requests_is_each_request_built_alone():
    signer = icmp.Signer(SECRET, contact=b"census@example.org")
    targets = range(LOOP, LOOP + 4096)
    built = signer.requests(array.array("I", targets))
    assert built == [icmp.echo_request(*signer.sign(target)) for target in targets]
    assert built == signer.requests(targets) and signer.request(LOOP + 9) == built[9]
    assert all(icmp.checksum(probe) == 0 for probe in built)


def test_probe_with_a_contact_golden_bytes_and_bounded():
    signer = icmp.Signer(SECRET, contact=b"census@example.org")
    probe = signer.request(addr("127.0.0.7"))
    assert probe.hex() == ("0800c33170982295" "697076342d63656e73757320"                # TAG
                           "63656e737573406578616d706c652e6f7267" "2020"              # contact, padded even
                           "7f000007" "71d5506fb2ccb99b")                             # destination, MAC
    assert probe == icmp.echo_request(*signer.sign(addr("127.0.0.7")))
    assert icmp.checksum(probe) == 0 and probe[8:].startswith(icmp.TAG + b"census@example.org ")
    reply = icmp.parse(ip_packet(addr("127.0.0.7"), LOOP + 1, echo_reply(probe)))
    assert signer.check(reply) == (icmp.Verdict.OK, addr("127.0.0.7"))
    assert icmp.Signer(SECRET).check(reply)[0] == icmp.Verdict.STRAY   # not our layout
    longest = icmp.Signer(SECRET, contact=b"~" * icmp.CONTACT_MAX).request(addr("127.0.0.7"))
    assert len(longest) == 8 + 66 and icmp.checksum(longest) == 0
    for bad in (b"~" * (icmp.CONTACT_MAX + 1), "text", b"tab\there", "caf\u00e9".encode(), b"\x7f"):
        assert not icmp.is_contact(bad)
        with pytest.raises(ValueError):
            icmp.Signer(contact=bad)


def test_parse_raw_echo_reply_with_ip_options():
    request = icmp.echo_request(7, 9, b"hello")
    for options in (b"", b"\x01\x01\x01\x01", b"\x01" * 40):     # IHL 5, 6 and 15
        reply = icmp.parse(ip_packet(LOOP + 5, LOOP + 1, echo_reply(request), options))
        assert reply == icmp.Reply(LOOP + 5, LOOP + 5, 0, 0, 7, 9, b"hello")


def test_parse_dgram_echo_reply_has_no_ip_header():
    request = icmp.echo_request(7, 9, b"hello")
    assert icmp.parse(echo_reply(request), LOOP + 5) == icmp.Reply(LOOP + 5, LOOP + 5, 0, 0, 7, 9, b"hello")


def test_parse_rejects_requests_corruption_and_truncation():
    request = icmp.echo_request(7, 9, b"hello")
    good = ip_packet(LOOP + 5, LOOP + 1, echo_reply(request))
    assert icmp.parse(ip_packet(LOOP + 5, LOOP + 1, request)) is None        # a looped request
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    assert icmp.parse(bytes(corrupt)) is None                                 # bad checksum
    assert all(icmp.parse(good[:k]) is None for k in range(len(good)))
    udp = bytearray(good)
    udp[9] = 17
    assert icmp.parse(bytes(udp)) is None                                     # not ICMP


def test_unreachable_quote_is_credited_to_the_probed_target():
    signer = icmp.Signer(SECRET)
    target, router = LOOP + 0x0107, LOOP + 0x00FE
    request = signer.request(target)
    for keep in (28, 20 + len(request)):              # RFC 792's 8 bytes, or the whole probe
        packet = ip_packet(router, LOOP + 1, unreachable(target, request, code=1, keep=keep))
        reply = icmp.parse(packet)
        assert (reply.source, reply.target, reply.icmp_type, reply.code) == (router, target, 3, 1)
        assert signer.check(reply) == (icmp.Verdict.OK, target)
    exceeded = with_checksum(b"\x0b\x00" + unreachable(target, request)[2:])
    assert icmp.parse(ip_packet(router, LOOP + 1, exceeded)).icmp_type == icmp.IcmpType.TIME_EXCEEDED
    for keep, verdict in ((28, icmp.Verdict.STRAY), (60, icmp.Verdict.BAD_PAYLOAD)):
        forged = unreachable(target, icmp.Signer(b"x" * 16).request(target), keep=keep)
        assert signer.check(icmp.parse(ip_packet(router, LOOP + 1, forged)))[0] == verdict


def test_a_forged_8_byte_quote_error_is_credited_at_no_more_than_the_2_to_the_minus_32_rate():
    """An attacker who sees the identifier of one real probe (its own address was probed)
    forges unreachables quoting only 8 bytes for random targets of the sweep: the identifier
    must match the target's keyed hash too, so none of 2**20 is credited, where a fixed
    per-sweep identifier left only the 16-bit sequence number to guess (16 expected)."""
    signer = icmp.Signer(SECRET)
    router = LOOP + 0xFFFE
    ident = icmp.parse(ip_packet(router, LOOP + 1, echo_reply(signer.request(router)))).ident
    rng = random.Random(2 ** 32)
    tries, credited = 1 << 20, 0
    check, reply, ok = signer.check, icmp.Reply, icmp.Verdict.OK
    guesses = [divmod(bits, 1 << 16) for bits in map(rng.getrandbits, [32] * tries)]
    for offset, seq in guesses:                      # a random target, a random sequence
        credited += check(reply(router, LOOP + offset, 3, 1, ident, seq, b""))[0] == ok
    assert credited <= tries / 2 ** 32              # i.e. none
    ident_of = [signer.sign(LOOP + offset)[0] for offset in range(1 << 16)]
    ident_matched = sum(ident_of[offset] == ident for offset, _ in guesses)
    # the identifier alone is worth 16 bits: about tries / 2**16 targets share it
    assert 2 <= ident_matched <= 48
    # the full 8 bytes of a real forged packet go through parse() to the same verdict
    target = LOOP + 0x0102
    forged = icmp.echo_request(ident, 0x0001, b"")[:8]
    packet = ip_packet(router, LOOP + 1, unreachable(target, forged + bytes(20), keep=28))
    assert signer.check(icmp.parse(packet)) == (icmp.Verdict.STRAY, target)


def test_parser_never_raises_on_100k_random_and_truncated_packets():
    rng = random.Random(792)
    signer = icmp.Signer(SECRET)
    request = signer.request(LOOP + 3)
    seeds = [ip_packet(LOOP + 3, LOOP + 1, echo_reply(request)),
             ip_packet(LOOP + 9, LOOP + 1, unreachable(LOOP + 3, request, keep=60))]
    tried = 0
    for seed in seeds:                                   # every truncation of a real answer
        for k in range(len(seed) + 1):
            for packet in (seed[:k], seed[k:]):
                tried += _parse_both_ways(packet, signer)
    while tried < 100_000:
        seed = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):             # flip bytes, then maybe cut
            seed[rng.randrange(len(seed))] = rng.randrange(256)
        packet = bytes(seed[:rng.randrange(len(seed) + 1)]) if rng.random() < 0.5 else bytes(seed)
        if rng.random() < 0.3:
            packet = rng.randbytes(rng.randrange(0, 120))
        tried += _parse_both_ways(packet, signer)
    assert tried >= 100_000


def _parse_both_ways(packet: bytes, signer: icmp.Signer) -> int:
    for reply in (icmp.parse(packet), icmp.parse(packet, LOOP + 3)):
        assert reply is None or isinstance(reply, icmp.Reply)
        if reply is not None:
            signer.check(reply)
            signer.check(reply, check_ident=False)
    return 1


# --- validation --------------------------------------------------------------------------------

def test_checksum_lanes_fold_as_checksum_does_for_every_sum():
    """probes() folds a lane per probe: every one's-complement residue (so every checksum
    value, both ends of the fold included) and the largest lanes give _complement()'s value."""
    sums = list(range(0x10000)) + [0x10000, 0x1FFFE, 9 * 0xFFFF, (1 << 20) - 1 - 0xFFFF]
    lanes = int.from_bytes(b"".join(value.to_bytes(4, "big") for value in sums), "big")
    for fixed in (1, 0x0800, 0xFFFF):
        got = icmp._checksums(lanes, fixed, len(sums))
        assert list(struct.unpack(f"!{len(sums)}H", got)) == [icmp._complement(value + fixed) for value in sums]


def test_pointer_words_are_the_range_they_stand_for():
    for base, step, count in ((1 << 40, 16, 4096), (0x7F12_3456_7000, 2048, 256), (5, 3, 1), (0, 1, 0)):
        assert icmp._pointers(base, step, count) == array.array("Q", range(base, base + step * count, step))


def test_expected_echo_replies_are_what_a_raw_socket_gets():
    """The replies the fast path compares against, against replies built from scratch, for
    a range across 17 /24s and for a list in no order."""
    signer = icmp.Signer(SECRET, contact=b"abuse@example.org")
    size = signer.packet_size
    for targets in (range(LOOP + 200, LOOP + 200 + 4096), [LOOP + 0x0309, LOOP + 7, LOOP + 0xFFFF]):
        requests, replies = signer.probes(targets)
        assert len(requests) == len(targets) and len(replies) == size * len(targets)
        for k, (target, request) in enumerate(zip(targets, requests)):
            assert request == icmp.echo_request(*signer.sign(target))
            assert replies[k * size:(k + 1) * size] == ip_packet(target, LOOP + 1, echo_reply(request))[20:]
    assert signer.probes(range(LOOP, LOOP)) == ([], b"")


def test_plain_echo_replies_take_the_fast_path_and_the_rest_the_full_one(monkeypatch):
    """A sweep on a raw socket credits an exact echo reply without parse() or check(); a
    duplicate is still counted, and one with IP options is still credited, by the full path."""
    checked = collections.Counter()
    check = icmp.Signer.check
    monkeypatch.setattr(icmp.Signer, "check", lambda self, *a, **k: checked.update([1]) or check(self, *a, **k))

    def respond(target, request):
        reply = echo_reply(request)
        if target & 0xFF == 9:
            return [ip_packet(target, LOOP + 1, reply, options=b"\x01\x01\x01\x00")]
        if target & 0xFF == 10:
            return [ip_packet(target, LOOP + 1, reply)] * 2
        return [ip_packet(target, LOOP + 1, reply)]

    result = icmp.sweep(range(LOOP, LOOP + 256), cooldown=0.5, allow=ALLOW, sock=FakeSocket(respond))
    assert set(result.status) == {icmp.Status.ECHO_REPLY} and result.stats.duplicates == 1
    assert checked[1] == 1      # the reply with options; the duplicate is told on the fast path


def expecting(sweeper, addresses, contact=b""):
    """A sweep as _run leaves it on a raw socket, its probes built, before it sends."""
    job = icmp.Sweep(sweeper, addresses, 0, 1, 1.0, None, None)
    job.signer = icmp.Signer(contact=contact)
    job.size = job.signer.packet_size
    job.requests, replies = job.signer.probes(addresses)
    job.replies, job.expecting = icmp._split(replies, job.size), len(addresses)
    return job


def test_a_batch_is_proven_a_run_at_a_time_and_what_breaks_a_run_takes_the_full_path(monkeypatch):
    """Runs of the newest sweep's exact replies are claimed at once; an older sweep's reply
    of the same size, an error, a forged MAC, a corrupt checksum, a reply signed with another
    secret and one with IP options break the runs (a run that fails is halved), and each is
    told apart, and timed, exactly as packet by packet."""
    parsed, each = collections.Counter(), []
    parse, claim_each = icmp.parse, icmp.Sweeper._claim_each
    monkeypatch.setattr(icmp, "parse", lambda *a: parsed.update([1]) or parse(*a))
    monkeypatch.setattr(icmp.Sweeper, "_claim_each", staticmethod(
        lambda active, got, indices, claims: each.extend(indices) or claim_each(active, got, indices, claims)))
    sweeper = icmp.Sweeper(sock=FakeSocket())
    older = expecting(sweeper, range(LOOP, LOOP + 256), contact=b"abuse@example.org")    # the same targets
    newest = expecting(sweeper, range(LOOP, LOOP + 256), contact=b"abuse@example.org")
    newest.sent_at = [9.99] * 256

    def reply(job, k, options=b""):
        return ip_packet(job.addresses[k], LOOP + 1, echo_reply(job.requests[k]), options)

    forged = bytearray(echo_reply(newest.requests[40]))
    forged[-1] ^= 1                                   # the MAC, under a right checksum
    corrupt = bytearray(reply(newest, 43))
    corrupt[-1] ^= 1                                  # a wrong checksum: not an answer at all
    stranger = icmp.Signer(contact=b"abuse@example.org").request(LOOP + 41)
    long_run = [reply(newest, k) for k in range(60, 200)]
    long_run[70:70] = [reply(older, 7), bytes(corrupt), reply(newest, 61)]      # inside a run
    packets = ([reply(newest, k) for k in range(30)]
               + [ip_packet(LOOP + 0x99, LOOP + 1, unreachable(LOOP + 50, newest.requests[50]))]
               + [ip_packet(LOOP + 40, LOOP + 1, with_checksum(bytes(forged))), reply(newest, 3)]
               + [ip_packet(LOOP + 41, LOOP + 1, echo_reply(stranger))]
               + [reply(newest, 42, options=b"\x01\x01\x01\x00")] + long_run)
    batch = icmp._Batch.of(packets, [0.001] * len(packets), echo_size=newest.size)
    credited = sweeper._credit_batch([newest, older], batch, 10.0)
    echoes = {k for k, status in enumerate(newest.status) if status == icmp.Status.ECHO_REPLY}
    assert echoes == set(range(30)) | {42} | set(range(60, 200))
    assert newest.status[50] == icmp.Status.UNREACHABLE and newest.status[40] == icmp.Status.NO_ANSWER
    assert (newest.duplicates, newest.bad_payload, newest.stray) == (2, 2, 1)      # 3 and 61 twice
    assert [k for k, status in enumerate(older.status) if status] == [7]
    assert credited == {newest: len(packets) - 1, older: 1}
    assert parsed[1] == 5     # the error, the forged MAC, the corrupt one, the stranger and the one with options
    # the run of 143 with two strangers in it was halved: few of its packets went one by one
    assert len([i for i in each if i >= len(packets) - len(long_run)]) <= 4 * icmp.RUN_MIN
    # 10 s less 9.99 s sent less 1 ms in the kernel, on the fast path and the full one alike
    # (to the microsecond: each truncates its float once)
    assert {newest.rtt_us[k] for k in (0, 29, 42, 60, 199)} <= {8999, 9000}


def test_only_a_reply_proving_our_probe_to_that_address_counts():
    signer = icmp.Signer(SECRET)
    target = LOOP + 0x0203
    request = signer.request(target)

    def check(packet_icmp, src=target):
        return signer.check(icmp.parse(ip_packet(src, LOOP + 1, packet_icmp)))

    assert check(echo_reply(request)) == (icmp.Verdict.OK, target)
    wrong_seq = bytearray(echo_reply(request))
    wrong_seq[7] ^= 1
    assert check(with_checksum(bytes(wrong_seq)))[0] == icmp.Verdict.BAD_PAYLOAD
    wrong_mac = bytearray(echo_reply(request))
    wrong_mac[-1] ^= 1
    assert check(with_checksum(bytes(wrong_mac)))[0] == icmp.Verdict.BAD_PAYLOAD
    other_sweep = icmp.Signer(b"another secret!!").request(target)
    assert check(echo_reply(other_sweep))[0] == icmp.Verdict.BAD_PAYLOAD     # a replay
    assert check(echo_reply(request), src=LOOP + 0x0204) == (icmp.Verdict.WRONG_SOURCE, target)
    ident, seq, payload = signer.sign(target)
    wrong_ident = icmp.echo_request(ident ^ 1, seq, payload)                # our tag, not our hash
    assert check(echo_reply(wrong_ident))[0] == icmp.Verdict.BAD_PAYLOAD
    foreign = icmp.echo_request(ident, seq, b"abcdefghijklmnopqrstuvwx")   # our hash, not our tag
    assert check(echo_reply(foreign))[0] == icmp.Verdict.STRAY
    dgram = icmp.parse(echo_reply(icmp.echo_request(0x1111, seq, payload)), target)
    assert signer.check(dgram, check_ident=False) == (icmp.Verdict.OK, target)
    assert signer.check(dgram)[0] == icmp.Verdict.BAD_PAYLOAD              # the kernel's ident


def test_reserved_ranges_and_exclusions():
    assert len(icmp.RESERVED) == 16
    assert icmp.wholly_reserved("127.0.0.0/16")
    assert not icmp.wholly_reserved("127.0.0.0/16", allow=ALLOW)
    assert icmp.wholly_reserved("127.0.0.0/16", allow=["127.1.0.0/16"])
    assert icmp.wholly_reserved(ipaddress.IPv4Network("100.64.0.0/10"))
    assert not icmp.wholly_reserved("100.0.0.0/8")                 # only partly reserved
    assert icmp.is_excluded(addr("255.255.255.255"))
    assert icmp.is_excluded(addr("198.19.255.255")) and not icmp.is_excluded(addr("198.20.0.0"))
    assert not icmp.is_excluded(addr("127.0.0.1"), allow=ALLOW)
    assert icmp.is_excluded(addr("127.0.0.1"), allow=ALLOW, exclude=["127.0.0.0/24"])


def test_permutation_is_a_permutation_without_bursts():
    for count in (0, 1, 2, 3, 10, 256, 1000):
        assert sorted(icmp.permutation(count)) == list(range(count))
    order = list(icmp.permutation(65536))
    assert sorted(order) == list(range(65536))
    same_24 = sum(1 for a, b in zip(order, order[1:]) if a >> 8 == b >> 8)
    assert same_24 < 65536 * 0.02                    # random order: ~1/256 of neighbours


class FakeTime:
    """An injected clock and sleep: each sleep wakes up to `late` s late, and every
    `stall_every` s of sending the machine takes `stall` s away from the sender."""

    def __init__(self, late=0.0, stall=0.0, stall_every=1.0, seed=14):
        self.now, self.rng, self.late = 1000.0, random.Random(seed), late
        self.stall, self.stall_every, self.next_stall = stall, stall_every, 1000.0 + stall_every
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds + self.rng.uniform(0, self.late)
        if self.stall and self.now >= self.next_stall:
            self.now += self.stall
            self.next_stall += self.stall_every


def paced(rate, count, fake):
    """(pacer, [(time, probes)] of each send) for `count` probes paced on `fake` time."""
    pacer = icmp._Pacer(rate, fake.clock, fake.sleep)
    sends = []
    while count:
        allowed = pacer.take(min(pacer.bucket, count))
        if allowed:
            sends.append((fake.now, allowed))
            count -= allowed
        fake.now += 20e-6                       # the send call itself
    return pacer, sends


def worst_second(sends, rate):
    """The largest relative deviation from `rate` of any one-second window starting at a send."""
    times = [t for t, _ in sends]
    counts = list(itertools.accumulate(n for _, n in sends))
    worst = 0.0
    for k, start in enumerate(times):
        end = bisect.bisect_left(times, start + 1.0)
        if end == len(times):
            break
        worst = max(worst, abs((counts[end - 1] - (counts[k - 1] if k else 0)) / rate - 1))
    return worst


@pytest.mark.parametrize("late, stall", [(0.0, 0.0), (0.003, 0.0), (0.003, 0.04)],
                         ids=["exact", "late-wakeups", "stalls"])
def test_pacer_batches_hold_the_rate_over_the_sweep_and_every_second(late, stall):
    fake = FakeTime(late=late, stall=stall)
    pacer, sends = paced(10_000, 65536, fake)
    batch = round(10_000 * icmp.BATCH_SECONDS)               # BATCH_SECONDS worth a call
    assert (pacer.batch, pacer.bucket) == (batch, 2 * batch)  # ... and at most twice that
    assert sum(n for _, n in sends) == 65536
    assert max(n for _, n in sends) <= pacer.bucket           # no burst beyond the bucket
    assert len(sends) <= 65536 / batch + 1 and len(fake.sleeps) <= len(sends) + 1
    duration = sends[-1][0] - sends[0][0]
    assert abs(65536 / duration / 10_000 - 1) < 0.03            # the rate over the sweep
    assert worst_second(sends, 10_000) < 0.10                  # ... and over any one second
    if not late:
        assert {n for _, n in sends[:-1]} == {batch}           # exact batches (the last: the rest)
        assert all(abs(s - icmp.BATCH_SECONDS) < 1e-4 for s in fake.sleeps[:-1])  # one sleep between sends


def test_pacer_at_low_and_no_rate():
    fake = FakeTime()
    pacer, sends = paced(50, 100, fake)                        # one probe a call, 20 ms apart
    assert {n for _, n in sends} == {1} and max(fake.sleeps) <= icmp.PACER_NAP
    assert abs((sends[-1][0] - sends[0][0]) - 99 / 50) < 0.01
    assert icmp._Pacer(0).take(256) == 256


# --- the sweep on a fake socket ------------------------------------------------------------------

class FakeSocket:
    """Answers probes through `respond(addr, request) -> [packets]`, like a raw socket would.
    Refuses (raises) anything outside 127.0.0.0/8: no real packet is ever involved."""
    kind, lanes, stamps = "raw", 1, False

    def __init__(self, respond=None):
        self.respond = respond or (lambda target, request: [ip_packet(target, LOOP + 1, echo_reply(request))])
        self.sent = []
        self.queue = collections.deque()

    def send(self, outbox, start, stop, lane=0):
        for k in range(start, stop):
            target = outbox.addrs[k]
            if target >> 24 != 127:
                raise AssertionError(f"{ipaddress.IPv4Address(target)} handed to the socket")
            request = outbox.data[k * outbox.size:(k + 1) * outbox.size]
            self.sent.append(target)
            self.queue.extend((packet, None, 0.0) for packet in self.respond(target, request))
        return stop - start

    def recv(self, timeout):
        got = []
        while self.queue:
            got.append(self.queue.popleft())
        if not got:
            time.sleep(min(timeout, 0.001))
        return icmp._Batch.of([packet for packet, _, _ in got])    # as a raw socket's recv() gives

    def wake(self):
        pass

    def close(self):
        pass


def mixed_answers(target, request):
    """Unreachable from a router (% 7), silence (% 5), and one each of: an echo reply from the
    wrong host, a corrupt packet, a bad MAC, a duplicate; every other target answers."""
    octet = target & 0xFF
    if octet % 7 == 0:
        return [ip_packet(LOOP + 254, LOOP + 1, unreachable(target, request, code=1))]
    if octet % 5 == 0:
        return []
    reply = ip_packet(target, LOOP + 1, echo_reply(request))
    if octet == 33:
        return [ip_packet(target + 1, LOOP + 1, echo_reply(request))]
    if octet == 44:
        return [reply[:-1] + bytes([reply[-1] ^ 1])]                  # parse gives None
    if octet == 46:
        bad = bytearray(echo_reply(request))
        bad[-1] ^= 1
        return [ip_packet(target, LOOP + 1, with_checksum(bytes(bad)))]
    return [reply, reply] if octet == 52 else [reply]


def test_sweep_credits_each_answer_once_and_counts_the_rest():
    fake = FakeSocket(mixed_answers)
    seen = []
    result = icmp.sweep(ipaddress.IPv4Network("127.0.0.0/24"), allow=ALLOW, cooldown=0.2,
                        sock=fake, progress=seen.append)
    status = {LOOP + k: icmp.Status(s) for k, s in enumerate(result.status)}
    expect = {}
    for k in range(256):
        if k % 7 == 0:
            expect[LOOP + k] = icmp.Status.UNREACHABLE
        elif k % 5 == 0 or k in (33, 44, 46):
            expect[LOOP + k] = icmp.Status.NO_ANSWER
        else:
            expect[LOOP + k] = icmp.Status.ECHO_REPLY
    assert status == expect
    assert sorted(fake.sent) == list(range(LOOP, LOOP + 256))        # each once, in random order
    assert fake.sent != sorted(fake.sent)
    assert all(result.code[k] == 1 for k in range(0, 256, 7))
    assert all(result.rtt_us[k] == 0 for k in range(256) if expect[LOOP + k] != icmp.Status.ECHO_REPLY)
    s = result.stats
    assert (s.sent, s.wrong_source, s.bad_payload, s.stray, s.duplicates) == (256, 1, 1, 1, 1)
    assert (s.replies, s.unreachable, s.excluded, s.rounds) == (list(expect.values()).count(1), 37, 0, 1)
    assert seen and seen[-1].sent == seen[-1].total == 256


def test_sweep_reprobes_only_the_silent():
    answered = collections.Counter()

    def respond(target, request):          # every target ignores its first two probes
        answered[target] += 1
        return [ip_packet(target, LOOP + 1, echo_reply(request))] if answered[target] >= 3 else []

    fake = FakeSocket(respond)
    result = icmp.sweep(range(LOOP, LOOP + 100), probes=3, cooldown=0.05, allow=ALLOW, sock=fake)
    assert set(result.status) == {icmp.Status.ECHO_REPLY}
    assert result.stats.rounds == 3 and len(fake.sent) == 300


def test_excluded_targets_never_reach_the_socket():
    fake = FakeSocket()
    targets = ["127.0.0.1", "10.0.0.1", "192.168.1.1", "127.0.0.2", "224.0.0.1"]
    result = icmp.sweep(targets, allow=ALLOW, exclude=["127.0.0.2/32"], cooldown=0.1, sock=fake)
    assert list(result.status) == [1, 3, 3, 3, 3]
    assert fake.sent == [LOOP + 1] and result.stats.excluded == 4
    for network, allow in (("127.0.0.0/24", ()), ("10.0.0.0/16", ALLOW)):
        fake = FakeSocket()
        result = icmp.sweep(ipaddress.IPv4Network(network), allow=allow, sock=fake)
        assert fake.sent == [] and set(result.status) == {icmp.Status.EXCLUDED}


class GuardSocket(FakeSocket):
    """A silent fake socket of either kind, with one or two send lanes, that raises on any
    destination an independent oracle (ipaddress, not icmp's spans) says must never be probed."""

    def __init__(self, kind, allow, exclude, lanes=1):
        super().__init__()
        self.kind, self.lanes = kind, lanes
        self.allow = [ipaddress.IPv4Network(n) for n in allow]
        self.exclude = [ipaddress.IPv4Network(n, strict=False) for n in exclude]
        self.sent = collections.Counter()

    def forbidden(self, target: int) -> bool:
        ip = ipaddress.IPv4Address(target)
        reserved = any(ip in net for net in icmp.RESERVED) and not any(ip in net for net in self.allow)
        return reserved or any(ip in net for net in self.exclude) or target >> 24 != 127

    def send(self, outbox, start, stop, lane=0):
        assert 0 <= lane < self.lanes
        for k in range(start, stop):
            target = outbox.addrs[k]
            if self.forbidden(target):
                raise AssertionError(f"{ipaddress.IPv4Address(target)} handed to the socket")
            packet = outbox.data[k * outbox.size:(k + 1) * outbox.size]
            assert packet[8 + len(icmp.TAG):12 + len(icmp.TAG)] == target.to_bytes(4, "big")
            self.sent[target] += 1
        return stop - start


@pytest.mark.parametrize("kind,lanes", [("raw", 1), ("raw", 2), ("dgram", 1)])
def test_no_round_of_either_socket_kind_probes_an_excluded_target(kind, lanes):
    allow, exclude = ["127.0.0.0/23"], ["127.0.1.0/25", "127.0.0.77/32", "127.0.3.0/24"]
    network = ipaddress.IPv4Network("127.0.0.0/22")       # 127.0.2.0/23 stays reserved
    for targets in (network, [str(ip) for ip in network]):
        guard = GuardSocket(kind, allow, exclude, lanes)
        result = icmp.sweep(targets, probes=3, cooldown=0, allow=allow, exclude=exclude, sock=guard)
        allowed = {int(ip) for ip in network if not guard.forbidden(int(ip))}
        assert len(allowed) == 256 + 128 - 1
        assert guard.sent == {target: 3 for target in allowed}     # every round, only these
        assert result.stats.excluded == 1024 - len(allowed) and result.stats.rounds == 3
        assert {LOOP + k for k, s in enumerate(result.status) if s == icmp.Status.EXCLUDED} \
            == set(range(LOOP, LOOP + 1024)) - allowed


def test_cli_sweeps_only_what_it_may(monkeypatch, capsys):
    guard = GuardSocket("dgram", ["127.0.0.0/8"], ["127.0.0.128/25"])
    monkeypatch.setattr(icmp.IcmpSocket, "open", classmethod(lambda cls, *a, **kw: guard))
    assert icmp.main(["127.0.0.0/24", "--allow", "127.0.0.0/8", "--exclude", "127.0.0.128/25",
                      "--probes", "2", "--cooldown", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "0" * 128 + "3" * 128 and report["stats"]["kind"] == "dgram"
    assert guard.sent == {LOOP + k: 2 for k in range(128)}
    assert icmp.main(["127.0.0.0/24", "--probes", "2"]) == 0                # no --allow: all reserved
    assert set(json.loads(capsys.readouterr().out)["status"]) == {"3"}
    with pytest.raises(SystemExit):                                         # a widened allow is refused
        icmp.main(["127.0.0.0/24", "--allow", "127.0.0.1/1"])
    assert sum(guard.sent.values()) == 256


def test_an_allow_with_host_bits_is_refused_not_widened():
    with pytest.raises(ValueError):
        icmp.sweep(range(LOOP, LOOP + 4), allow=["127.0.0.1/1"], sock=GuardSocket("raw", [], []))
    with pytest.raises(ValueError):
        icmp.wholly_reserved("127.0.0.0/16", allow=["127.0.0.1/8"])


def test_a_socket_never_sends_outside_its_outbox():
    addrs = array.array("I", [LOOP + 1, LOOP + 2])
    with pytest.raises(ValueError):
        icmp.Outbox(bytes(icmp.PACKET_SIZE), addrs)                   # one packet for two addresses
    outbox = icmp.Outbox(bytes(2 * icmp.PACKET_SIZE), addrs)
    left, right = socket.socketpair()                                 # a stand-in; nothing is sent
    with left, right:
        sock = icmp.IcmpSocket(left, "raw")
        for start, stop in ((0, 3), (-1, 1), (2, 1)):
            with pytest.raises(IndexError):
                sock.send(outbox, start, stop)


class DgramFake(FakeSocket):
    """A datagram socket's view: the kernel puts its own identifier in every probe (so all
    sweeps on the socket share it) and hands over bare ICMP messages with their source."""
    kind = "dgram"

    def __init__(self):
        super().__init__(lambda target, request: [echo_reply(request[:4] + b"\x42\x42" + request[6:])])

    def recv(self, timeout):     # the source: the probed address, read from the payload
        return [(packet, int.from_bytes(packet[-12:-8], "big"), age) for packet, _, age in super().recv(timeout)]


@pytest.mark.parametrize("kind", ["raw", "dgram"])
def test_overlapping_sweeps_on_one_socket_each_get_their_own_replies(kind):
    fake = FakeSocket() if kind == "raw" else DgramFake()
    net = range(LOOP, LOOP + 2048)
    with icmp.Sweeper(fake) as sweeper:
        first = sweeper.start(net, rate=40_000, cooldown=0.3, allow=ALLOW)
        second = sweeper.start(net, rate=40_000, cooldown=0.3, allow=ALLOW)   # both send at once
        assert sweeper.wait_for(lambda: first.all_sent and second.all_sent, timeout=10)
        results = [first.result(timeout=10), second.result(timeout=10)]
    assert first.signer.secret != second.signer.secret     # what tells their replies apart
    for result in results:
        assert set(result.status) == {icmp.Status.ECHO_REPLY}
        s = result.stats
        assert (s.sent, s.replies, s.duplicates, s.bad_payload, s.stray) == (2048, 2048, 0, 0, 0)
        assert s.cpu_seconds > 0


class StampingSocket(FakeSocket):
    """A raw socket whose packets carry kernel timestamps: its receiver, while replies flow,
    should take them a tick at a time (settle), not wake for each."""
    stamps, queue_packets = True, 100_000

    def __init__(self):
        super().__init__()
        self.calls = []

    def recv(self, timeout, settle=False):
        if settle:
            time.sleep(min(timeout, 0.002))
        got = super().recv(timeout)
        self.calls.append((timeout, settle, len(got)))
        return got


def test_while_replies_flow_a_stamping_receiver_takes_them_a_tick_at_a_time():
    fake = StampingSocket()
    result = icmp.sweep(range(LOOP, LOOP + 2048), rate=10_000, cooldown=0.2, allow=ALLOW, sock=fake)
    assert result.stats.replies == 2048
    after_replies = [(timeout, settle) for (_, _, got), (timeout, settle, _) in zip(fake.calls, fake.calls[1:])
                     if 0 < got < icmp.RECV_BATCH]
    assert after_replies and set(after_replies) == {(icmp.RECV_TICK, True)}


def test_packets_naming_addresses_outside_the_sweep_cost_no_hash():
    """Whoever sends a volunteer ICMP chooses the address an error quotes or an echo's payload
    names: only the sweep's own targets are hashed, so a flood of such packets leaves nothing
    behind (each /24 hashed would keep 3 KB for the sweep's life)."""
    other = icmp.Signer(b"another secret!!")
    outside = [LOOP + (k << 8) + 9 for k in range(1, 200)]

    def respond(target, request):
        forged = [ip_packet(LOOP + 254, LOOP + 1, unreachable(addr, other.request(addr))) for addr in outside]
        echo = ip_packet(outside[0], LOOP + 1, echo_reply(other.request(outside[0])))
        # the flood first: the sweep, all answered, may end as soon as its echoes are in
        return [echo] + forged + [ip_packet(target, LOOP + 1, echo_reply(request))] if target == LOOP else \
            [ip_packet(target, LOOP + 1, echo_reply(request))]

    with icmp.Sweeper(FakeSocket(respond)) as sweeper:
        job = sweeper.start(range(LOOP, LOOP + 16), cooldown=0.5, allow=ALLOW)
        result = job.result(timeout=10)
    assert result.stats.replies == 16 and result.stats.bad_payload + result.stats.stray == 200
    assert set(job.signer._streams) == {LOOP >> 8}         # the sweep's own /24, built by probes()


class BusyReceiver(FakeSocket):
    """A receiver that lags: 10 ms per recv() call (a loaded machine, a shared lo), so the
    replies wait in the queue well past a short cooldown."""

    def recv(self, timeout):
        time.sleep(0.01)
        got = []
        while self.queue and len(got) < icmp.RECV_BATCH:
            got.append(self.queue.popleft())
        return got


def test_a_cooldown_ends_only_after_the_receiver_caught_up_with_the_queue():
    fake = BusyReceiver(lambda target, request: [] if target & 0xFF == 7 else
                        [ip_packet(target, LOOP + 1, echo_reply(request))])
    result = icmp.sweep(range(LOOP, LOOP + 4096), cooldown=0.02, allow=ALLOW, sock=fake)
    assert result.stats.replies == 4096 - 16                 # all in the queue by the deadline: all credited
    assert result.stats.elapsed > 0.1                          # 16 lagging recv() calls, not 20 ms


class IdleSocket(FakeSocket):
    """A silent socket whose recv() blocks for its whole timeout unless woken, like select()."""

    def __init__(self):
        super().__init__(lambda target, request: [])
        self.woken = threading.Event()

    def recv(self, timeout):
        self.woken.wait(timeout)
        self.woken.clear()
        return []

    def wake(self):
        self.woken.set()


def test_the_end_of_a_cooldown_does_not_wait_for_an_idle_receiver():
    result = icmp.sweep(range(LOOP, LOOP + 64), cooldown=0.05, allow=ALLOW, sock=IdleSocket())
    assert result.stats.replies == 0 and result.stats.elapsed < icmp.RECV_IDLE / 2   # woken, not timed out


def test_sweep_stops_at_its_timeout():
    fake = FakeSocket(lambda target, request: [])
    result = icmp.sweep(range(LOOP, LOOP + 1000), rate=20, timeout=0.2, allow=ALLOW, sock=fake)
    assert 1 <= len(fake.sent) < 1000 and result.stats.sent == len(fake.sent)


def test_a_failing_receiver_or_an_interrupt_ends_the_sweep():
    class Broken(FakeSocket):
        def recv(self, timeout):
            raise OSError(5, "receive failed")

    with pytest.raises(OSError, match="receive failed"):
        icmp.sweep(range(LOOP, LOOP + 1000), rate=2000, cooldown=5, allow=ALLOW, sock=Broken())

    def interrupt(progress):
        raise KeyboardInterrupt

    fake = FakeSocket(lambda target, request: [])
    with pytest.raises(KeyboardInterrupt):
        icmp.sweep(range(LOOP, LOOP + 1000), rate=2000, cooldown=5, allow=ALLOW, sock=fake, progress=interrupt)
    assert len(fake.sent) < 1000


# --- real sockets, as root ------------------------------------------------------------------------

@pytest.mark.needs_root
def test_sweep_of_127_0_0_0_16_on_host_loopback_finds_all():
    result = icmp.sweep(ipaddress.IPv4Network("127.0.0.0/16"), allow=ALLOW, cooldown=30)
    assert result.stats.kind == "raw"
    assert result.stats.replies == 65536 and set(result.status) == {icmp.Status.ECHO_REPLY}
    assert min(result.rtt_us) > 0
    assert result.stats.elapsed < 15        # every target answered: the cooldown ended early


@pytest.mark.needs_root
def test_rtts_are_the_kernels_timestamps_not_the_receive_tick():
    """The receiver takes replies every RECV_TICK; timed by recv() the RTTs of a paced sweep
    on lo would be about half a tick, timed by the kernel they are the send call's duration."""
    result = icmp.sweep(ipaddress.IPv4Network("127.0.8.0/22"), rate=20_000, cooldown=1, allow=ALLOW)
    rtts = [rtt for rtt, status in zip(result.rtt_us, result.status) if status == icmp.Status.ECHO_REPLY]
    assert len(rtts) == 1024
    assert statistics.median(rtts) < icmp.RECV_TICK * 1e6 / 10


class NoSendmmsg:
    """A libc whose sendmmsg is missing at run time (ENOSYS), as in some sandboxes."""

    def vectors(self, outbox):
        return None

    def send(self, fd, vectors, start, count):
        raise OSError(errno.ENOSYS, "sendmmsg")


@pytest.mark.needs_root
@pytest.mark.parametrize("mmsg", [None, NoSendmmsg()], ids=["no-ctypes", "enosys"])
def test_plain_sendto_path_without_sendmmsg(mmsg):
    with icmp.IcmpSocket.open() as sock:
        sock._mmsg = mmsg                       # None: as on macOS, or without ctypes
        result = icmp.sweep(ipaddress.IPv4Network("127.0.3.0/24"), allow=ALLOW, cooldown=2, sock=sock)
        assert sock._mmsg is None
    assert set(result.status) == {icmp.Status.ECHO_REPLY}


class NoRecvmmsg:
    """A libc whose recvmmsg is missing at run time (ENOSYS), as in some sandboxes."""

    def recv(self, fd, echo_size):
        raise OSError(errno.ENOSYS, "recvmmsg")


@pytest.mark.needs_root
@pytest.mark.parametrize("recv_mmsg", [None, NoRecvmmsg()], ids=["no-ctypes", "enosys"])
def test_plain_recv_path_without_recvmmsg(recv_mmsg):
    with icmp.IcmpSocket.open() as sock:
        assert sock._recv_mmsg is not None      # raw socket on Linux: recvmmsg by default
        sock._recv_mmsg = recv_mmsg
        assert sock.stamps == (recv_mmsg is not None)   # stamps come with recvmmsg, and go with it
        result = icmp.sweep(ipaddress.IPv4Network("127.0.4.0/24"), allow=ALLOW, cooldown=2, sock=sock)
        assert sock._recv_mmsg is None and not sock.stamps
    assert set(result.status) == {icmp.Status.ECHO_REPLY}


@pytest.mark.needs_root
@pytest.mark.parametrize("echo_size", [icmp.PACKET_SIZE, 0, icmp.ECHO_MAX])
def test_recvmmsg_takes_what_is_queued_byte_for_byte(echo_size):
    """Whatever the echo layout, each packet comes back whole from its three buffers: shorter
    and longer than the echo slot, and one cut at RECV_SLOT."""
    mark = os.urandom(8)   # other tests' pings on the host's lo reach this raw socket too
    with icmp.IcmpSocket.open() as sock:
        sock.echo_size = echo_size
        probes = [icmp.echo_request(0x4242, seq, mark + b"x" * (seq % 80)) for seq in range(600)]
        probes.append(icmp.echo_request(0x4242, 600, mark + b"y" * 2100))
        for probe in probes:
            sock.sock.sendto(probe, ("127.0.0.1", 0))
        time.sleep(0.2)                        # the replies wait in the queue: their age shows it
        ours, ages, deadline = [], [], time.monotonic() + 5
        while len(ours) < len(probes) and time.monotonic() < deadline:
            batch = sock.recv(1.0)
            assert len(batch) <= icmp.RECV_BATCH and all(source is None for _, source, _ in batch)
            mine = [(packet, age) for packet, _, age in batch if packet[28:36] == mark]
            ours += [packet[20:] for packet, _ in mine]
            ages += [age for _, age in mine]
        assert sock.stamps
    cut = icmp.RECV_SLOT - icmp.HEAD
    assert [m[4:] for m in ours] == [probe[4:cut] for probe in probes]   # each whole, in order
    assert all(m[:2] == b"\0\0" and icmp.checksum(m) == 0 for m in ours[:-1])
    assert 0.19 < min(ages) and max(ages) < 5                          # kernel timestamps


def test_an_age_the_wall_clock_stepped_under_is_not_believed():
    """A packet cannot have waited longer than since the queue was last found empty, nor come
    from the future: a timestamp that says so (the wall clock stepped) times the packet now."""
    receiver = icmp._RecvMmsg.load()
    if receiver is None:
        pytest.skip("recvmmsg through ctypes: 64-bit little-endian Linux only")
    receiver.emptied = time.monotonic() - 0.5
    wall = time.time()
    for k, stamp in enumerate((wall - 0.25, wall + 5.0, wall - 100.0)):
        receiver.stamps[4 * k + 2:4 * k + 4] = array.array("q", divmod(int(stamp * 1e6), 10 ** 6))
    ages = receiver._ages(3, time.monotonic())                # microseconds
    assert 240_000 < ages[0] < 300_000 and ages[1:] == [0, 0]
    assert receiver.emptied > time.monotonic() - 0.1         # this call found the queue empty


def test_a_reply_queued_while_the_last_call_waited_for_the_gil_keeps_its_age():
    """A call that emptied the queue bounds the next packets' ages from when it was made, not
    from when it got the interpreter back: a reply queued in between is not timed anew."""
    receiver = icmp._RecvMmsg.load()
    if receiver is None:
        pytest.skip("recvmmsg through ctypes: 64-bit little-endian Linux only")
    receiver._ages(0, time.monotonic() - 0.05)        # made 50 ms ago, found the queue empty
    receiver.stamps[2:4] = array.array("q", divmod(int((time.time() - 0.049) * 1e6), 10 ** 6))
    assert 45_000 < receiver._ages(1, time.monotonic())[0] < 80_000


class Queue(FakeSocket):
    stamps = True

    def __init__(self, queue_packets):
        super().__init__()
        self.queue_packets = queue_packets


def test_the_receive_tick_is_never_longer_than_the_queue_takes_to_fill():
    """While replies flow the receiver sleeps a tick: the socket's queue must hold a tick of
    them (with half to spare), or the kernel drops replies the census would read as silence."""
    for queue, rates, tick in ((100_000, [10_000], icmp.RECV_TICK), (200, [10_000], 0.01),
                               (200, [5_000, 5_000], 0.01), (16_000, [0], 0.02)):     # 0: flat out
        sweeper = icmp.Sweeper(Queue(queue))
        sweeper._active = [icmp.Sweep(sweeper, range(LOOP, LOOP + 16), rate, 1, 1.0, None, None) for rate in rates]
        assert sweeper._tick() == pytest.approx(tick)


@pytest.mark.needs_root
def test_a_socket_knows_how_many_replies_its_queue_holds():
    with icmp.IcmpSocket.open(rcvbuf=204_800) as sock:          # the kernel doubles it: 400 KB
        assert sock.queue_packets == 409_600 // icmp.QUEUED_BYTES


class Dropping(FakeSocket):
    """A socket whose kernel drops `lost` packets while the sweep runs, its queue full."""

    def __init__(self, lost):
        super().__init__()
        self.lost, self.dropped = lost, 100      # drops before the sweep are not its own

    def send(self, outbox, start, stop, lane=0):
        self.dropped += self.lost
        return super().send(outbox, start, stop, lane)

    def drops(self):
        return self.dropped


@pytest.mark.parametrize("lost", [0, 7])
def test_a_sweep_reports_the_packets_the_kernel_dropped_while_it_ran(lost):
    result = icmp.sweep(range(LOOP, LOOP + 16), cooldown=0.2, allow=ALLOW, sock=Dropping(lost))
    assert result.stats.dropped == lost and result.stats.replies == 16


@pytest.mark.needs_root
def test_a_full_queue_is_counted_as_drops():
    mark = os.urandom(8)
    with icmp.IcmpSocket.open(rcvbuf=2048) as sock, icmp.IcmpSocket.open(lanes=1) as other:
        before = sock.drops()
        for seq in range(100):        # the replies to 127.0.0.1, unread: a 4 KB queue holds a few
            other.sock.sendto(icmp.echo_request(0x4343, seq, mark), ("127.0.0.1", 0))
        time.sleep(0.1)
        assert sock.drops() - before > 50


NOBODY = 65534


def as_user(uid: int, argv: list) -> list:
    """`argv` run as user and group `uid`, with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def run_sweep(box, network, *args, user=None, python=sys.executable, script=None) -> dict:
    argv = [python, script or os.path.join(HERE, "icmp.py"), network, "--allow", "127.0.0.0/8", *args]
    if user is not None:
        argv = as_user(user, argv)
    done = box.run(argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def found(report: dict, digit: str, base: int = LOOP) -> set:
    return {base + k for k, c in enumerate(report["status"]) if c == digit}


def test_lab_probes_1_reports_only_live_and_credits_unreachables(lab):
    box = lab(drop=True, unreach=True, loss=0.05)
    report = run_sweep(box, "127.0.0.0/16", "--probes", "1", "--cooldown", "0.5")
    alive, unreach = box.alive("127.0.0.0/16"), box.unreachable("127.0.0.0/16")
    assert len(alive) == 28032 and len(unreach) == 128 * 37
    assert found(report, "1") <= alive
    assert len(found(report, "1")) > 0.9 * len(alive)        # 5 % of the probes were lost
    assert found(report, "2") == unreach                     # REJECT comes before the loss rule
    assert report["stats"]["unreachable"] == len(unreach)
    assert report["stats"]["wrong_source"] == report["stats"]["bad_payload"] == 0


def test_lab_probes_3_recovers_lost_probes(lab):
    """With 5 % independent loss a live address stays silent through 3 probes with probability
    0.05**3: 28,032 live addresses miss ~3.5 on average (0 only ~3 % of the time), so the test
    allows 20 (chance of more ~1e-9), against the ~1,400 a single probe misses."""
    box = lab(drop=True, loss=0.05)
    report = run_sweep(box, "127.0.0.0/16", "--probes", "3", "--cooldown", "0.5")
    alive = box.alive("127.0.0.0/16")
    assert found(report, "1") <= alive
    assert len(alive - found(report, "1")) <= 20
    assert report["stats"]["rounds"] == 3


def test_lab_probes_6_finds_every_live_address_exactly(lab):
    """The exact form of the check above: a live address stays silent through 6 probes at 5 %
    loss with probability 0.05**6 = 1.6e-8, so 28,032 of them miss 4.4e-4 on average; one
    miss in a run (false failure ~1 in 2,300 runs) is far likelier a bug than bad luck."""
    box = lab(drop=True, loss=0.05)
    report = run_sweep(box, "127.0.0.0/16", "--probes", "6", "--cooldown", "0.5")
    assert found(report, "1") == box.alive("127.0.0.0/16")
    assert report["stats"]["rounds"] == 6                      # the dead set keeps every round busy


OVERLAP = """
import ipaddress, json, sys, icmp
first_address = int(ipaddress.IPv4Address(sys.argv[1]))
net, allow = range(first_address, first_address + int(sys.argv[2])), ["127.0.0.0/8"]
with icmp.Sweeper() as sweeper:
    first = sweeper.start(net, rate=20000, cooldown=2.0, allow=allow)
    first.wait_sent()                      # its dead targets keep it listening for 2 s ...
    second = sweeper.start(net, rate=20000, cooldown=0.5, allow=allow)
    second.wait_sent()                     # ... while the second sends to the same targets
    overlapped = not first.done
    results = [first.result(), second.result()]
digits = bytes.maketrans(bytes(range(5)), b"01234")
print(json.dumps({"overlapped": overlapped, "sweeps": [
    {"stats": r.stats._asdict(), "status": bytes(r.status).translate(digits).decode()} for r in results]}))
"""


def test_lab_two_overlapping_sweeps_credit_every_reply_to_its_own(lab):
    """127.0.96.0 - 127.0.159.255: the first half answers (the "% 7" addresses unreachable),
    the second half is the silent dead block, which keeps the first sweep's cooldown going."""
    box = lab(drop=True, unreach=True)
    done = box.run([sys.executable, "-c", OVERLAP, "127.0.96.0", 16384], cwd=HERE)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["overlapped"]
    span = box.alive("127.0.96.0/19") | box.alive("127.0.128.0/19")
    unreachable = box.unreachable("127.0.96.0/19")
    base = addr("127.0.96.0")
    for sweep in report["sweeps"]:
        assert found(sweep, "1", base) == span and len(span) == 32 * 219   # exact, both of them
        assert found(sweep, "2", base) == unreachable and unreachable
        stats = sweep["stats"]
        assert (stats["duplicates"], stats["bad_payload"], stats["wrong_source"]) == (0, 0, 0)


def test_lab_unprivileged_dgram_socket_for_real(lab):
    box = lab(drop=True, unreach=True)
    python = _python_for_nobody(box)
    with _world_readable_copy() as script:
        box.run(["sysctl", "-qw", "net.ipv4.ping_group_range=1 0"], check=True)
        refused = box.run(as_user(NOBODY, [python, script, "127.0.0.0/24", "--allow", "127.0.0.0/8"]))
        assert refused.returncode == 1
        assert 'sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"' in refused.stderr
        assert "sudo" in refused.stderr.split("sysctl")[0]
        box.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
        # flat out into a datagram socket's unprivileged buffer (net.core.rmem_max): on a busy
        # machine a reply can overflow it, so a second round re-probes what stayed silent
        report = run_sweep(box, "127.0.0.0/16", "--cooldown", "0.5", "--probes", "2",
                           user=NOBODY, python=python, script=script)
    assert report["stats"]["kind"] == "dgram"
    assert found(report, "1") == box.alive("127.0.0.0/16")
    assert found(report, "2") == box.unreachable("127.0.0.0/16")   # from the error queue


def _python_for_nobody(box) -> str:
    """An interpreter user nobody may run (a pyenv one under /root usually is not)."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        probe = box.run(as_user(NOBODY, [python, "-c", "import sys; assert sys.version_info >= (3, 9)"]))
        if probe.returncode == 0:
            return python
    pytest.fail("no python3 >= 3.9 that user nobody (65534) can run; install one outside /root")


class _world_readable_copy:
    """icmp.py copied to a fresh 0755 folder, so user nobody can read it."""

    def __enter__(self) -> str:
        self.folder = tempfile.mkdtemp(prefix="icmp-nobody-")
        os.chmod(self.folder, 0o755)
        script = os.path.join(self.folder, "icmp.py")
        shutil.copyfile(os.path.join(HERE, "icmp.py"), script)
        os.chmod(script, 0o644)
        return script

    def __exit__(self, *exc):
        shutil.rmtree(self.folder, ignore_errors=True)


def test_a_signal_inside_a_sweeps_thread_start_leaves_close_quiet(monkeypatch):
    """Ctrl-C or SIGTERM raised in the main thread while Thread.start() runs leaves a thread
    that join() refuses; closing the sweeper must still end in the KeyboardInterrupt alone."""
    real_start = threading.Thread.start

    def interrupted(thread):
        if thread.name == "icmp-sweep":
            raise KeyboardInterrupt          # as the signal handler would, before it started
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with icmp.Sweeper(FakeSocket()) as sweeper:
            sweeper.start(range(LOOP, LOOP + 256), cooldown=0.1, allow=ALLOW)
