"""Pictures of the census as PNG, drawn with the standard library only (zlib + struct).

    block_png(result_data, not_probed)   /block.png?id=i: 256x256, one pixel per address of a /16
    CensusMap(size).render(store)        /map.png: one pixel per /24 (4,096 x 4,096), or smaller

Both lay addresses out on the Hilbert curve the dashboard draws its map with (xkcd 195): index d
of the curve of order n goes to (x, y) by ``hilbert_xy``, 0 at the top left and the last index at
the top right. The curve of order 12 (one point per /24) seen in 16x16 squares is the curve of
order 8 (one point per /16), so block i of /map.png is the 16x16 square at the dashboard's cell
of block i; inside it the /24s follow the order-4 curve, turned one of four ways (a square's
orientation comes from the flips and swaps the curve applies above it: see ``_orientations``).

    block.png pixel (x, y)  =  address k of the /16 with hilbert_xy(k, 8) == (x, y)
    map.png   pixel (x, y)  =  /24 number j (= address >> 8) with hilbert_xy(j, 12) == (x, y)

Why /map.png stays cheap. The picture is kept in memory as 256 bands, one per row of blocks
(16 pixel rows at full size), each with its own raw-deflate stream ended by a sync flush, so
that the streams can simply be joined into the one zlib stream of the PNG (header, bands, an
empty final block, the Adler-32 of all rows). A new version of the census redraws and
recompresses only the bands holding blocks whose state or answer share changed (what /map's
bytes say), so a volunteer's result costs the picture one band: about 10 ms of CPU. The first
build after a start reads every result once (bench/pictures.py --real: about 2 s of CPU for a
full census of 65,536 blocks on our shared machine, ~0.9 s of it the store reading results),
once per process; blocks with no answer at all are neither counted nor shaded. Every step works
on whole buffers, not per /24 or per pixel in Python: the answers per /24 come from a popcount
table (bytes.translate) and byte lanes added as big integers, the squares are turned by strided
slices per batch of blocks, a band's rows are copied in 8-byte units.
"""

import functools
import itertools
import ipaddress
import operator
import struct
import threading
import zlib

BLOCK_SIDE = 256                    # /block.png: 256 x 256 addresses
MAP_SIZES = (256, 512, 1024, 2048, 4096)
SHADES = 251                        # /map.png palette entries 0..250: share of a /24 answering

# Classes of an address in /block.png (palette indexes) and their colours.
ANSWERED, UNREACHABLE, NO_ANSWER, NOT_PROBED = range(4)
BLOCK_PALETTE = ((0x1f, 0x9e, 0x89), (0xe8, 0x59, 0x0c), (0x24, 0x28, 0x30), (0xb8, 0xbf, 0xc8))
BLOCK_CLASSES = ("answered", "unreachable", "no answer", "not probed")

# States of a block (store.State) on /map.png: palette indexes after the shades. A done block
# is drawn in shades, its /24s that were never probed (opted out) in MAP_NOT_PROBED.
MAP_AVAILABLE, MAP_IN_PROGRESS, MAP_ERROR, MAP_EXCLUDED, MAP_NOT_PROBED = range(SHADES, SHADES + 5)
_STATE_INDEX = {0: MAP_AVAILABLE, 1: MAP_IN_PROGRESS, 3: MAP_ERROR, 4: MAP_EXCLUDED}
_STATE_RGB = ((0xc5, 0xcd, 0xd8), (0xff, 0x7f, 0x0e), (0xd6, 0x27, 0x28), (0xf4, 0xf5, 0xf7),
              (0xe4, 0xe7, 0xeb))
# The dashboard's ramp: viridis, taken at the square root of the share (so small shares show).
VIRIDIS = ("440154", "482878", "3e4989", "31688e", "26828e", "1f9e89", "35b779", "6ece58",
           "b5de2b", "fde725")


def hilbert_xy(d: int, order: int) -> tuple[int, int]:
    """Point d of the Hilbert curve of side 2**order (the dashboard's curve, line for line)."""
    x = y = 0
    s = 1
    while s < 1 << order:
        rx = (d >> 1) & 1
        ry = (d ^ rx) & 1
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        d >>= 2
        s <<= 1
    return x, y


def ramp_rgb(t: float) -> tuple:
    """The dashboard's rampAt(): viridis at t in [0, 1], linearly between its 10 stops."""
    stops = [tuple(bytes.fromhex(h)) for h in VIRIDIS]
    pos = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(len(stops) - 2, int(pos))
    f = pos - i
    return tuple(round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1]))


def shade_of(answered: int, probed: int) -> int:
    """The palette index of a /24 (or group of them): the share answering, 0..250 rounded up
    so that any answer shows; MAP_NOT_PROBED when nothing was probed."""
    if probed <= 0:
        return MAP_NOT_PROBED
    return -(-(SHADES - 1) * min(answered, probed) // probed)


@functools.cache
def map_palette() -> tuple:
    """The /map.png palette: SHADES shades, then available, in progress, error, excluded and
    not probed."""
    return tuple(ramp_rgb((k / (SHADES - 1)) ** 0.5) for k in range(SHADES)) + _STATE_RGB


def png(width: int, height: int, pixels: bytes, palette) -> bytes:
    """An 8-bit palette PNG of ``pixels`` (one palette index a pixel, rows top to bottom)."""
    rows = bytearray((width + 1) * height)          # filter byte 0 (None) before each row
    for y in range(height):
        rows[y * (width + 1) + 1:(y + 1) * (width + 1)] = pixels[y * width:(y + 1) * width]
    return png_from_zlib(width, height, zlib.compress(bytes(rows), 6), palette)


def png_from_zlib(width: int, height: int, idat: bytes, palette) -> bytes:
    """A PNG around an already compressed zlib stream of filtered rows (RFC 2083)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, palette, no interlace
    plte = b"".join(bytes(rgb) for rgb in palette)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"PLTE", plte)
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def block_pixels(result_data, not_probed=(), unreachable=()) -> bytes:
    """The 65,536 class bytes of /block.png in picture order. ``result_data``: the result's
    '0'/'1' (str or bytes), char k for address k of the block; ``not_probed``: ranges of k
    (start, stop) never probed (opted-out parts); ``unreachable``: k that answered ICMP
    unreachable (none until results carry them)."""
    digits = result_data.encode() if isinstance(result_data, str) else bytes(result_data)
    classes = bytearray(digits.translate(_DIGIT_CLASS))
    for start, stop in not_probed:
        classes[start:stop] = bytes([NOT_PROBED]) * (stop - start)
    for k in unreachable:
        classes[k] = UNREACHABLE
    return bytes(_block_layout()(classes))


def block_png(result_data, not_probed=(), unreachable=()) -> bytes:
    """/block.png: the block's addresses as 256x256 pixels of BLOCK_PALETTE."""
    pixels = block_pixels(result_data, not_probed, unreachable)
    return png(BLOCK_SIDE, BLOCK_SIDE, pixels, BLOCK_PALETTE)


def excluded_ranges(block: int, networks) -> list:
    """The (start, stop) address offsets within ``block`` of the CIDRs in ``networks``."""
    base = block << 16
    ranges = []
    for net in map(ipaddress.IPv4Network, networks):
        first = max(int(net.network_address), base)
        last = min(int(net.broadcast_address), base + 0xFFFF)
        if first <= last:
            ranges.append((first - base, last - base + 1))
    return ranges


def answers_per_24(bitmaps: bytes) -> bytes:
    """Bitmaps of blocks joined (8,192 bytes each, address 0 the top bit) -> the answer count of
    each of their /24s, as little-endian uint16s (512 bytes a block)."""
    ones = bitmaps.translate(_POPCOUNT)             # answers per 8 addresses
    count = len(ones) // 32
    if not count:
        return b""
    # Byte lanes added as big integers (no Python loop over /24s), kept below 256 so that no
    # lane carries into the next: eight strided slices -> answers per 64 addresses (<= 64),
    # two of those -> per half /24 (<= 128), then the halves as uint16 lanes.
    per64 = _lanes_added(ones, 8)
    halves = bytearray(4 * count)
    halves[0:2 * count:2] = _lanes_added(per64[0::4] + per64[1::4], 2, count)
    halves[2 * count::2] = _lanes_added(per64[2::4] + per64[3::4], 2, count)
    return _lanes_added(halves, 2, 2 * count)


def shades(counts: bytes, group: int = 1) -> bytes:
    """uint16 answer counts of /24s (all probed) -> the palette index of each ``group`` of them
    (a power of two up to 256): the share answering, taken to 1/256 rounded up, then shaded."""
    n = len(counts) // 2
    slots = bytearray(4 * n)                        # uint32 slots: room to add up a group
    slots[0::4], slots[1::4] = counts[0::2], counts[1::2]
    x = int.from_bytes(slots, "little")
    step = 1
    while step < group:                             # slot j += slot j+step: slot g*m sums group m
        x += x >> (32 * step)
        step *= 2
    # ceil(sum / group): add group-1, shift; the bits shifted in from the next slot land above
    # bit 16, and only bits 0..8 (0..256) are read
    x = (x + (group - 1) * _ones32(n)) >> (group.bit_length() - 1)
    data = x.to_bytes(4 * n + 8, "little")
    low, high = data[0:4 * n:4 * group], data[1:4 * n:4 * group]
    if any(high):                                   # 256 of 256: shown as 255 (same shade)
        low = (int.from_bytes(low) | int.from_bytes(high.translate(_ONE_TO_FF))).to_bytes(len(low))
    return low.translate(_SHADE_OF_COUNT)


class CensusMap:
    """/map.png at one size (a power of two, 256..4096), redrawn band by band as blocks change.

    ``render(store)`` -> (version, PNG bytes), built at most once per store version; thread-safe.
    Changes are found in /map's bytes (state and answer share of each block), as the dashboard
    finds them; a done block's per-/24 counts are read from its result once.
    """

    def __init__(self, size: int = 4096):
        if size not in MAP_SIZES:
            raise ValueError(f"size must be one of {', '.join(map(str, MAP_SIZES))}")
        self.size = size
        self.side = size // 256                     # pixels of a block's square
        self.group = 256 // (self.side * self.side)  # /24s a pixel stands for
        self._lock = threading.Lock()
        self._drawn = None                          # the /map bytes last drawn
        blank = bytes([MAP_AVAILABLE]) * self.side ** 2
        self._tiles = [blank] * 65536               # each block's square, row by row
        self._bands = [b""] * 256                   # raw rows (filter byte, pixels) of a band
        self._packed = [b""] * 256                  # a band's raw-deflate stream
        self._version = None
        self._png = b""
        self._palette = map_palette()

    def render(self, store) -> tuple[int, bytes]:
        with self._lock:
            version, states = store.map_bytes()
            if version != self._version:
                changed = _changed(self._drawn, states)
                self._draw(store, states, changed)
                self._drawn = states
                self._version, self._png = version, self._encode()
            return version, self._png

    def _draw(self, store, states, changed):
        area = self.side ** 2
        plain = {s: bytes([i]) * area for s, i in _STATE_INDEX.items()}
        for task in changed:
            self._tiles[task] = plain.get(states[2 * task], plain[0])  # done: drawn below
        done = [t for t in changed if states[2 * t] == 2 and states[2 * t + 1]]
        silent = [t for t in changed if states[2 * t] == 2 and not states[2 * t + 1]]
        nothing = bytes(area)                       # shade 0 everywhere: no /24 answered
        for task in silent:                         # not read, not counted
            self._tiles[task] = nothing
        self._redraw_excluded(store, silent, itertools.repeat(bytes(512)))
        for tasks, counts in _counts_of(store, done, whole=self._drawn is None):
            squares = _squares(shades(counts, self.group), area, [_orientations()[t] for t in tasks])
            for task, square in zip(tasks, squares):
                self._tiles[task] = square
            self._redraw_excluded(store, tasks, _slices(counts, 512))
        for band in sorted({_tile_origin()[t][1] for t in changed}):
            self._bands[band] = raw = self._band_rows(band)
            packer = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15)
            self._packed[band] = packer.compress(raw) + packer.flush(zlib.Z_SYNC_FLUSH)

    def _redraw_excluded(self, store, tasks, counts):
        """Redraw, exactly, the squares of the tasks with opted-out parts, from each task's
        per-/24 answer counts (``counts``, in the order of ``tasks``)."""
        for task, count in zip(tasks, counts):
            if exclude := store.exclude_of(task):
                colours = _shades_excluding(count, task, exclude, self.group)
                self._tiles[task] = _squares(colours, self.side ** 2, [_orientations()[task]])[0]

    def _band_rows(self, band) -> bytes:
        """The band's pixel rows, each after its filter byte 0, from its 256 squares. Row r of
        square x is ``side`` bytes at area*x + side*r of the joined squares: copied with strided
        slices of up to 8-byte units (one slice per row and unit, not per square)."""
        side, size, area = self.side, self.size, self.side ** 2
        unit = min(side, 8)
        per = side // unit                          # units in a square's row
        code = {1: "B", 2: "H", 4: "I", 8: "Q"}[unit]
        squares = memoryview(b"".join(self._tiles[t] for t in _band_tasks()[band])).cast(code)
        pixels = bytearray(side * size)
        rows = memoryview(pixels).cast(code)
        for r in range(side):
            for h in range(per):
                start = r * size // unit + h
                rows[start:start + 256 * per:per] = squares[r * per + h::area // unit]
        return b"\x00" + b"\x00".join(pixels[r * size:(r + 1) * size] for r in range(side))

    def _encode(self) -> bytes:
        checksum = 1
        for band in self._bands:
            checksum = zlib.adler32(band, checksum)
        end = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15).flush()   # an empty final block
        idat = b"\x78\x9c" + b"".join(self._packed) + end + struct.pack(">I", checksum)
        return png_from_zlib(self.size, self.size, idat, self._palette)


# -- private helpers ------------------------------------------------------------------------------

_POPCOUNT = bytes(bin(b).count("1") for b in range(256))
_DIGIT_CLASS = bytes.maketrans(b"01", bytes([NO_ANSWER, ANSWERED]))
# A /24's count capped at 255 (255 and 256 both shade 250) -> its shade.
_SHADE_OF_COUNT = bytes(shade_of(c, 256) if c < 255 else SHADES - 1 for c in range(256))
_ONE_TO_FF = bytes.maketrans(b"\x01", b"\xff")
_LEVEL = 3                          # /map.png bands: 4x less CPU than 6, ~15% larger
_BATCH = 512                        # blocks whose per-/24 counts are taken at once


def _lanes_added(data: bytes, parts: int, width: int = 0) -> bytes:
    """``data`` cut into ``parts`` equal runs (``width`` bytes each), or taken every ``parts``-th
    byte when no width is given, added lane by lane as little-endian integers."""
    if width:
        runs = (data[k * width:(k + 1) * width] for k in range(parts))
    else:
        runs = (data[k::parts] for k in range(parts))
    total = sum(int.from_bytes(run, "little") for run in runs)
    return total.to_bytes(width or len(data) // parts, "little")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _changed(drawn, states) -> list:
    """The blocks whose two /map bytes differ (all, when nothing was drawn yet): compared a
    /8 at a time, so an unchanged census costs 256 comparisons."""
    if drawn is None:
        return list(range(65536))
    out = []
    for octet in range(0, 2 * 65536, 512):
        if drawn[octet:octet + 512] != states[octet:octet + 512]:
            out += [t for t in range(octet // 2, octet // 2 + 256)
                    if drawn[2 * t:2 * t + 2] != states[2 * t:2 * t + 2]]
    return out


def _counts_of(store, tasks, whole):
    """(tasks, their per-/24 counts joined) in batches, for done ``tasks``: every result read
    in one pass on a first build, else one by one (a task whose result is gone meanwhile is
    left out: it is drawn by its state)."""
    wanted = set(tasks)
    if whole:
        source = ((t, bitmap) for t, bitmap in store.bitmaps() if t in wanted)
    else:
        source = _bitmaps_of(store, tasks)
    batch = []
    for item in source:
        batch.append(item)
        if len(batch) == _BATCH:
            yield [t for t, _ in batch], answers_per_24(b"".join(b for _, b in batch))
            batch = []
    if batch:
        yield [t for t, _ in batch], answers_per_24(b"".join(b for _, b in batch))


def _bitmaps_of(store, tasks):
    for task in tasks:
        try:
            data = store.result(task)["result_data"]
        except Exception as exc:                    # not done any more: drawn by its state
            if getattr(exc, "status", None) != 404:
                raise
            continue
        yield task, int(data, 2).to_bytes(8192, "big")


def _shades_excluding(counts: bytes, task, exclude, group) -> bytes:
    """The shades of a block with opted-out parts (or one pixel a block), exactly: each group's
    answers over the addresses of it that were probed."""
    answered = memoryview(counts).cast("H")
    probed = [256] * 256
    for start, stop in excluded_ranges(task, exclude):
        for k in range(start, stop):
            probed[k >> 8] -= 1
    return bytes(shade_of(sum(answered[k:k + group]), sum(probed[k:k + group]))
                 for k in range(0, 256, group))


@functools.cache
def _ones32(n: int) -> int:
    """n uint32 slots holding 1."""
    return int.from_bytes(b"\x01\x00\x00\x00" * n, "little")


@functools.cache
def _band_tasks():
    """The 256 blocks of each band (row of squares), left to right."""
    bands = [[0] * 256 for _ in range(256)]
    for task, (x, y) in enumerate(_tile_origin()):
        bands[y][x] = task
    return bands


@functools.cache
def _block_layout():
    """An itemgetter taking a block's 65,536 class bytes (address order) to picture order."""
    at = [0] * 65536
    for k in range(65536):
        x, y = hilbert_xy(k, 8)
        at[y * 256 + x] = k
    return operator.itemgetter(*at)


@functools.cache
def _tile_origin():
    """(x, y) of each block's square on the map, in squares: the dashboard's cells."""
    return [hilbert_xy(t, 8) for t in range(65536)]


@functools.cache
def _orientations() -> bytes:
    """How each block's square is turned: bit 0 set = flipped (x, y -> side-1-x, side-1-y),
    bit 1 = swapped (x <-> y). The curve applies those to everything below a level where
    ry == 0; both are their own inverse and commute, so only their parity counts."""
    turns = bytearray(65536)
    for task in range(65536):
        d, flips, swaps = task, 0, 0
        for _ in range(8):
            rx = (d >> 1) & 1
            if (d ^ rx) & 1 == 0:
                flips ^= rx
                swaps ^= 1
            d >>= 2
        turns[task] = flips | swaps << 1
    return bytes(turns)


def _squares(colours: bytes, area: int, turns) -> list:
    """Blocks' shades in curve order (``area`` bytes a block) -> each block's square, row by
    row, turned as ``turns`` says: one strided slice per pixel and orientation, not per block."""
    turned = {}
    for turn in set(turns):
        out = turned[turn] = bytearray(len(colours))
        for pixel, q in enumerate(_square_order(area)[turn]):
            out[pixel::area] = colours[q::area]
    return [bytes(turned[turn][k * area:(k + 1) * area]) for k, turn in enumerate(turns)]


def _slices(data: bytes, size: int):
    return (data[i:i + size] for i in range(0, len(data), size))


@functools.cache
def _square_order(area: int) -> list:
    """For each orientation, the curve index of each pixel of a square, row by row."""
    side = 1 << (area.bit_length() - 1) // 2
    order = side.bit_length() - 1
    orders = []
    for turn in range(4):
        at = [0] * area
        for q in range(area):
            x, y = hilbert_xy(q, order)
            if turn & 1:
                x, y = side - 1 - x, side - 1 - y
            if turn & 2:
                x, y = y, x
            at[y * side + x] = q
        orders.append(at)
    return orders

