"""What a volunteer submits for one /16, checked and packed for the store (server side only).

A result comes in one of two forms, side by side in the /submit_result body:

    original   "result": {"success": true, "result_data": "0110..."}   65,536 '0'/'1'
    compact    "result": {"success": true, "bitmap": "<base64 of zlib of 8,192 bytes>"}

Bit k of the bitmap (address .k//256.k%256, the top bit of byte 0 first) is character k of the
string. Beside either, all optional:

    "rtt_us"       base64 of zlib of little-endian uint32s, one per responder, in address order
    "icmp_errors"  base64 of zlib of 4-byte entries (offset: uint16 big-endian, ICMP type, code),
                   offsets ascending: the unreachable (type 3) and time exceeded (type 11)
                   answers, credited to the address their quote names; never a responder
    "skipped"      CIDRs inside the block the client did not probe (its own --exclude, --only,
                   reserved space it would not open): NOT probed, which is not "no answer"

Both forms are checked without a Python loop over the 65,536 addresses (int(), bit counts,
slice assignments); the compact one is never unpacked to a string. The client (which cannot
import this file) has the encoders: ping_client.compact_bitmap, encode_icmp_errors.
"""
import array
import base64
import binascii
import ipaddress
import struct
import sys
import zlib
from typing import NamedTuple

RESULT_LEN = 65536                     # addresses in a /16, characters in a result string
BITMAP_LEN = RESULT_LEN // 8
ERROR_ENTRY = struct.Struct("!HBB")    # offset in the block, ICMP type, ICMP code
ICMP_ERROR_TYPES = {3: "unreach", 11: "timxceed"}   # ZMap's classification of each
ECHO_REPLY = "echoreply"


class Packed(NamedTuple):
    """A checked result, ready for the log."""
    bitmap: bytes          # 8,192 bytes, one bit per address, address 0 the top bit
    rtt: bytes             # the client's zlib'd uint32 array, or b""
    responders: int
    errors: bytes = b""    # ERROR_ENTRY entries, raw (not zlib'd), offsets ascending
    skipped: tuple = ()    # (first, last) offsets, inclusive, sorted and merged


class Invalid(ValueError):
    """A submission that cannot be stored; the message says why (answered 400)."""


def pack(result_data=None, bitmap=None, *, block: ipaddress.IPv4Network, rtt=None,
         icmp_errors=None, skipped=None) -> Packed:
    """Check a result in either form (`result_data` or `bitmap`, as the body has them) and
    the optional parts beside it, and pack it; raises Invalid."""
    if result_data is not None:
        bitmap = bitmap_of_string(result_data)
    elif bitmap is not None:
        bitmap = _bitmap(bitmap)
    else:
        raise Invalid("result needs result_data (65,536 '0'/'1') or bitmap (base64 of zlib)")
    value = int.from_bytes(bitmap, "big")
    responders = value.bit_count()
    rtt_z = _check_rtt(rtt, responders) if rtt else b""
    errors, error_mask = _check_errors(icmp_errors) if icmp_errors else (b"", 0)
    spans = skipped_spans(skipped, block) if skipped else ()
    skipped_mask = span_mask(spans)
    if value & error_mask or (value | error_mask) & skipped_mask:
        raise Invalid("an address is more than one of responder, ICMP error and skipped")
    return Packed(bitmap, rtt_z, responders, errors, spans)


def bitmap_of_string(result_data) -> bytes:
    """The original 65,536-character string as 8,192 bytes; raises Invalid."""
    try:
        digits = result_data if isinstance(result_data, bytes) else result_data.encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        digits = b""
    if len(digits) != RESULT_LEN:
        raise Invalid(f"result_data must be a string of {RESULT_LEN} characters")
    # int() checks the digits as it converts (a separate pass would cost 16 us more), but it
    # also takes blanks around, a sign, a 0b prefix and '_' between digits: refuse those first.
    try:
        if digits[:2].strip(b"01") or digits[-1:].strip(b"01") or b"_" in digits:
            raise ValueError
        return int(digits, 2).to_bytes(BITMAP_LEN, "big")   # character k is bit k from the top
    except ValueError:
        raise Invalid("result_data may hold only '0' and '1'") from None


def skipped_spans(cidrs, block: ipaddress.IPv4Network) -> tuple:
    """CIDRs inside `block` as sorted, merged (first, last) offsets; raises Invalid."""
    if not isinstance(cidrs, list) or len(cidrs) > 4096:
        raise Invalid("skipped must be a list of CIDR strings (at most 4,096)")
    spans = []
    for cidr in cidrs:
        try:
            net = ipaddress.IPv4Network(cidr)
        except (TypeError, ValueError):
            raise Invalid(f"skipped: {str(cidr)[:40]!r} is not a CIDR") from None
        if not net.subnet_of(block):
            raise Invalid(f"skipped: {net} is not inside {block}")
        base = int(block.network_address)
        spans.append((int(net.network_address) - base, int(net.broadcast_address) - base))
    return merge(spans)


def merge(spans) -> tuple:
    """Sorted, merged, inclusive (first, last) spans."""
    merged = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def answered_offsets(bitmap: bytes) -> list:
    """The offsets k (0..65535) whose bit is set, in order."""
    return [8 * j + bit for j, byte in enumerate(bitmap) if byte for bit in _BITS[byte]]


def intersect(spans, others) -> tuple:
    """The addresses in both lists of sorted, merged (first, last) spans."""
    out = [(max(a, c), min(b, d)) for a, b in spans for c, d in others if a <= d and c <= b]
    return merge(out)


def fill_holes(old: Packed, holes, new: Packed) -> Packed:
    """`old`, whose `holes` were not probed, with those parts taken from `new` (a sweep of the
    same block that probed them): the bitmap, RTTs (when both have them) and ICMP errors of
    `new` inside the holes, `old`'s elsewhere. The result's skipped: `new`'s, inside the holes."""
    mask = span_mask(holes)
    old_bits, new_bits = int.from_bytes(old.bitmap, "big"), int.from_bytes(new.bitmap, "big")
    bits = old_bits | (new_bits & mask)
    bitmap = bits.to_bytes(BITMAP_LEN, "big")
    inside = lambda k: mask >> (RESULT_LEN - 1 - k) & 1      # noqa: E731
    rtt = b""
    if old.rtt and new.rtt:
        times = dict(zip(answered_offsets(old.bitmap), _values(old.rtt)))
        times.update((k, t) for k, t in zip(answered_offsets(new.bitmap), _values(new.rtt))
                     if inside(k))
        values = array.array("I", (times[k] for k in sorted(times)))
        if sys.byteorder == "big":
            values.byteswap()
        rtt = zlib.compress(values.tobytes())
    entries = [old.errors[i:i + 4] for i in range(0, len(old.errors), 4)]
    entries += [new.errors[i:i + 4] for i in range(0, len(new.errors), 4)
                if inside(int.from_bytes(new.errors[i:i + 2], "big"))]
    return Packed(bitmap, rtt, bits.bit_count(), b"".join(sorted(entries)),
                  intersect(new.skipped, holes))


def span_mask(spans) -> int:
    """The bitmap (as an int, address 0 the top bit) of the addresses in `spans`."""
    mask = 0
    for first, last in spans:
        width = last - first + 1
        mask |= ((1 << width) - 1) << (RESULT_LEN - 1 - last)
    return mask


def icmp_error_rows(errors: bytes):
    """Yield (offset, classification, type, code) of each packed ICMP error entry."""
    for offset, icmp_type, code in ERROR_ENTRY.iter_unpack(errors):
        yield offset, ICMP_ERROR_TYPES[icmp_type], icmp_type, code


def encode_icmp_errors(errors: bytes) -> str:
    """Packed entries as the wire's base64 of zlib (for /result)."""
    return base64.b64encode(zlib.compress(errors)).decode("ascii")


# -- private --------------------------------------------------------------------------------------

def _inflate(text, limit: int) -> tuple[bytes, bytes]:
    """(zlib'd, inflated) of base64 of zlib inflating to at most `limit` bytes; ValueError."""
    if not isinstance(text, (str, bytes)):
        raise ValueError("not a string")
    try:
        raw = base64.b64decode(text, validate=True)
        inflater = zlib.decompressobj()
        data = inflater.decompress(raw, limit + 1)
    except (TypeError, binascii.Error, zlib.error) as exc:
        raise ValueError(str(exc)) from None
    if not inflater.eof or len(data) > limit:
        raise ValueError("too long or cut short")
    return raw, data


def _bitmap(text) -> bytes:
    try:
        _, bitmap = _inflate(text, BITMAP_LEN)
    except ValueError:
        bitmap = b""
    if len(bitmap) != BITMAP_LEN:
        raise Invalid(f"bitmap must be base64 of zlib'd {BITMAP_LEN:,} bytes")
    return bitmap


def _check_rtt(rtt, responders: int) -> bytes:
    """The zlib'd RTT array as sent, once checked to hold one uint32 per responder."""
    try:
        raw, values = _inflate(rtt, 4 * RESULT_LEN)
    except ValueError:
        values = None
    if values is None or len(values) != 4 * responders:
        raise Invalid("rtt_us must be base64 of zlib'd uint32s, one per responder")
    return raw


def _check_errors(text) -> tuple[bytes, int]:
    """(entries, their bitmap as an int): whole entries, known types, offsets ascending."""
    try:
        _, data = _inflate(text, ERROR_ENTRY.size * RESULT_LEN)
    except ValueError:
        raise Invalid("icmp_errors must be base64 of zlib'd 4-byte entries") from None
    if len(data) % ERROR_ENTRY.size:
        raise Invalid("icmp_errors must hold 4-byte entries (offset, type, code)")
    if bytes(data[2::4]).translate(None, bytes(ICMP_ERROR_TYPES)):
        raise Invalid("icmp_errors may hold only types 3 (unreachable) and 11 (time exceeded)")
    offsets = bytearray(data)
    del offsets[2::4]                   # offset high, offset low, code
    del offsets[2::3]                   # offset high, offset low
    values = list(struct.unpack(f"!{len(offsets) // 2}H", offsets))
    if values != sorted(set(values)):
        raise Invalid("icmp_errors offsets must be strictly ascending")
    marks = bytearray(BITMAP_LEN)
    for k in values:                    # one step per error answer, not per address
        marks[k >> 3] |= 0x80 >> (k & 7)
    return data, int.from_bytes(marks, "big")


def _values(rtt_z: bytes) -> array.array:
    values = array.array("I", zlib.decompress(rtt_z))
    if sys.byteorder == "big":
        values.byteswap()
    return values


_BITS = tuple(tuple(bit for bit in range(8) if byte & (0x80 >> bit)) for byte in range(256))
