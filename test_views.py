"""Tests of the census's pictures and pages: /block.png, /map.png, /list, /details/<id>, /about,
/history and the /export.csv fields, filter and gzip.

Each test runs a real CensusServer on ('127.0.0.1', 0) over a tmp_path store scoped to
127.0.0.0/14 (tasks 32512..32515) with one opted-out /24 (127.1.200.0/24); results are
submitted through the store, as data only: nothing is probed. PNGs are read back by a small
decoder here (signature, chunk CRCs, sizes, palette, rows).
"""

import gzip
import http.client
import ipaddress
import json
import random
import struct
import threading
import zlib

import pytest

import pictures
import ping_server
import views
from conftest import Clock, result_string
from ping_client import encode_rtt
from store import Store

EVIL = "<script>alert(1)</script>"
OPTED_OUT = ipaddress.IPv4Network("127.1.200.0/24")
T0, T1, T2, T3 = range(32512, 32516)         # 127.0/16 .. 127.3/16


class Census:
    """A server in a thread over a store of its own (so the test picks scope and opt-outs)."""

    def __init__(self, path, site=views.Site(), clock=None, scope="127.0.0.0/14"):
        self.clock = clock or Clock()
        self.store = Store(path, scope=[ipaddress.IPv4Network(scope)], exclude=[OPTED_OUT],
                           clock=self.clock)
        self.server = ping_server.CensusServer(("127.0.0.1", 0), self.store, site=site,
                                               static_dir=ping_server.HERE)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def get(self, path, headers=None):
        """(status, headers, body bytes) on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def json(self, path):
        status, _, body = self.get(path)
        assert status == 200, (path, body)
        return json.loads(body)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.store.close()


@pytest.fixture
def census(tmp_path):
    made = []

    def make(**kw) -> Census:
        made.append(Census(tmp_path / f"data{len(made)}", **kw))
        return made[-1]

    yield make
    for running in made:
        running.stop()


def put_result(store, task, ones, name="alice", rtts=None):
    """Lease ``task`` (taking the others the hand-out order gives first back) and submit a
    result with '1' at the offsets ``ones``; rtts (us) one per '1', in address order."""
    taken = []
    while True:
        handout = store.get_task("127.0.0.1")
        assert handout is not None, f"task {task} is not available"
        if handout.task == task:
            break
        taken.append(handout)
    for other in taken:
        store.release(other.task, holder="127.0.0.1", token=other.lease.token)
    ones = sorted(ones)
    rtt = encode_rtt(rtts if rtts is not None else [1000 + k % 500 for k in ones])
    store.submit(task, result_string(ones), holder="127.0.0.1", token=handout.lease.token,
                 name=name, rtt=rtt)
    return ones


def read_png(data: bytes):
    """(width, height, palette, pixel bytes) of an 8-bit palette PNG, every chunk checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        at += 12 + length
    assert at == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"PLTE" in kinds
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 3)
    plte = dict(chunks)[b"PLTE"]
    palette = [tuple(plte[k:k + 3]) for k in range(0, len(plte), 3)]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (width + 1)
    rows = [raw[y * (width + 1):(y + 1) * (width + 1)] for y in range(height)]
    assert all(row[0] == 0 for row in rows)          # filter None throughout
    pixels = b"".join(row[1:] for row in rows)
    assert max(pixels) < len(palette)
    return width, height, palette, pixels


# -- the PNG writer and the curve -----------------------------------------------------------------

def test_a_png_reads_back_exactly():
    rng = random.Random(3)
    pixels = bytes(rng.randrange(4) for _ in range(7 * 5))
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9), (250, 251, 252)]
    assert read_png(pictures.png(7, 5, pixels, palette)) == (7, 5, palette, pixels)


def test_the_curve_is_the_dashboards_and_a_24_square_sits_in_its_16s_cell():
    assert pictures.hilbert_xy(0, 8) == (0, 0)
    assert pictures.hilbert_xy(65535, 8) == (255, 0)          # 0/8 top left, 255/8 top right
    assert pictures.hilbert_xy(1, 8) == (1, 0)
    page = (ping_server.HERE / "dashboard.html").read_text()
    assert "const rx = (t >> 1) & 1, ry = (t ^ rx) & 1;" in page
    assert "if (rx === 1) { x = s - 1 - x; y = s - 1 - y; }" in page
    rng = random.Random(5)
    turns = pictures._orientations()
    for task in rng.sample(range(65536), 200) + [0, 32512, 65535]:
        ox, oy = pictures._tile_origin()[task]
        square = pictures._squares(bytes(range(256)), 256, [turns[task]])[0]
        for c in rng.sample(range(256), 4):
            x, y = pictures.hilbert_xy(task * 256 + c, 12)
            assert (x >> 4, y >> 4) == (ox, oy) == pictures.hilbert_xy(task, 8)
            assert square[(y & 15) * 16 + (x & 15)] == c


def test_answers_per_24_count_exactly():
    rng = random.Random(7)
    bits = [rng.getrandbits(65536) for _ in range(3)] + [(1 << 65536) - 1, 0]
    bitmaps = b"".join(b.to_bytes(8192, "big") for b in bits)
    counts = memoryview(pictures.answers_per_24(bitmaps)).cast("H")
    for n, b in enumerate(bits):
        text = format(b, "065536b")
        assert list(counts[256 * n:256 * (n + 1)]) == [text.count("1", 256 * c, 256 * c + 256)
                                                       for c in range(256)]


# -- /block.png -----------------------------------------------------------------------------------

def test_block_png_is_the_result_pixel_for_pixel(census):
    srv = census()
    rng = random.Random(11)
    ones = set(range(256, 512)) | set(rng.sample(range(65536), 3000))   # 127.1.1.0/24 and more
    ones -= {k for k in range(200 * 256, 201 * 256)}                      # opted out: not probed
    put_result(srv.store, T1, ones)
    status, headers, body = srv.get(f"/block.png?id={T1}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    width, height, palette, pixels = read_png(body)
    assert (width, height) == (256, 256)
    assert palette == [tuple(c) for c in pictures.BLOCK_PALETTE]
    data = srv.json(f"/result?id={T1}")["result_data"]
    for k in range(65536):
        x, y = pictures.hilbert_xy(k, 8)
        expected = (pictures.NOT_PROBED if 200 * 256 <= k < 201 * 256 else
                    pictures.ANSWERED if data[k] == "1" else pictures.NO_ANSWER)
        assert pixels[y * 256 + x] == expected, k
    # 127.1.1.0/24 is the 16x16 square of the order-8 curve's points 256..511: all answered
    x0, y0 = (v & ~15 for v in pictures.hilbert_xy(256, 8))
    assert all(pixels[(y0 + dy) * 256 + x0 + dx] == pictures.ANSWERED
               for dy in range(16) for dx in range(16))
    assert pixels.count(pictures.ANSWERED) == len(ones)
    assert srv.get(f"/block.png?id={T1}", {"If-None-Match": headers["ETag"]})[0] == 304


def test_block_png_of_a_block_not_done_is_404(census):
    srv = census()
    assert srv.get(f"/block.png?id={T0}")[0] == 404
    assert srv.get("/block.png?id=x")[0] == 400
    assert srv.get("/block.png?id=65536")[0] == 404


# -- /map.png -------------------------------------------------------------------------------------

def map_pixel(pixels, size, slash24):
    """The pixel of /24 number ``slash24`` (address >> 8) on a 4096 map."""
    x, y = pictures.hilbert_xy(slash24, 12)
    return pixels[y * size + x]


def test_map_png_shades_each_24_by_its_share_and_colours_the_states(census):
    srv = census()
    full, half = T0 << 8, (T0 << 8) + 1                     # 127.0.0.0/24, 127.0.1.0/24
    put_result(srv.store, T0, list(range(256)) + list(range(256, 384)) + [512])
    put_result(srv.store, T1, [5])                          # 127.1/16: one answer, one /24 opted out
    leased = srv.store.get_task("127.0.0.1").task           # in progress
    status, headers, body = srv.get("/map.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    size, _, palette, pixels = read_png(body)
    assert size == 4096 and palette == list(pictures.map_palette())
    assert map_pixel(pixels, size, full) == pictures.SHADES - 1          # all answered
    assert map_pixel(pixels, size, half) == pictures.shade_of(128, 256) == 125
    assert map_pixel(pixels, size, full + 2) == 1                        # 1 of 256: still shows
    assert map_pixel(pixels, size, full + 3) == 0                        # none
    assert map_pixel(pixels, size, (T1 << 8) + 200) == pictures.MAP_NOT_PROBED
    assert map_pixel(pixels, size, T1 << 8) == pictures.shade_of(1, 256)
    assert map_pixel(pixels, size, leased << 8) == pictures.MAP_IN_PROGRESS
    free = ({T2, T3} - {leased}).pop()
    assert map_pixel(pixels, size, (free << 8) + 77) == pictures.MAP_AVAILABLE
    assert map_pixel(pixels, size, 0) == pictures.MAP_EXCLUDED          # 0.0.0.0/24
    assert srv.get("/map.png", {"If-None-Match": headers["ETag"]})[0] == 304
    # one pixel per /16: the share of the whole block
    _, _, _, small = read_png(srv.get("/map.png?size=256")[2])
    x, y = pictures.hilbert_xy(T0, 8)
    assert small[y * 256 + x] == pictures.shade_of(385, 65536)


def test_map_png_redrawn_by_bands_equals_one_drawn_afresh(census):
    srv = census()
    painter = pictures.CensusMap(1024)
    put_result(srv.store, T0, range(0, 65536, 3))
    painter.render(srv.store)
    put_result(srv.store, T2, range(0, 30000), name="bob")
    srv.store.get_task("127.0.0.1")
    version, again = painter.render(srv.store)
    assert version == srv.store.version
    assert read_png(again) == read_png(pictures.CensusMap(1024).render(srv.store)[1])


@pytest.mark.parametrize("size", ["123", "8192", "x", "-1"])
def test_map_png_refuses_other_sizes(census, size):
    status, _, body = census().get(f"/map.png?size={size}")
    assert status == 400 and b"4096" in body


# -- /list, /details, /task, /history --------------------------------------------------------------

def test_list_names_every_block_in_scope_with_its_state(census):
    srv = census()
    put_result(srv.store, T2, [1, 2, 3])
    listing = srv.json("/list?format=json")
    assert listing["total"] == 4 and dict(map(tuple, listing["blocks"])) == {
        T0: 0, T1: 0, T2: 2, T3: 0}
    status, headers, page = srv.get("/list")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = page.decode()
    for task in (T0, T1, T2, T3):
        assert f"<a href='/details/{task}'>{task}</a>" in text
    assert "127.2.0.0/16</td><td class='s2'>done" in text
    assert srv.json("/list?format=json&state=2")["blocks"] == [[T2, 2]]
    assert srv.json("/list?format=json&state=4")["total"] == 65536 - 4
    assert srv.get("/list?page=0")[0] == 400 and srv.get("/list?state=9")[0] == 400


def test_details_of_a_done_block(census):
    srv = census()
    put_result(srv.store, T1, list(range(256, 512)) + [7], name=EVIL,
               rtts=[50] + [2500] * 256)
    status, _, page = srv.get(f"/details/{T1}")
    assert status == 200
    text = page.decode()
    for needle in ("127.1.0.0/16", "done", "&lt;script&gt;", f"/block.png?id={T1}",
                   f"/result?id={T1}", "/export.csv?network=127.1.0.0/16&amp;fields=saddr,rtt_ms",
                   "<td title='127.1.1.0/24' style='background:#fde725;color:#1b1f24'>256</td>",
                   "<td title='127.1.0.0/24' style='background:#461768;color:#fff'>1</td>",
                   "<td title='127.1.2.0/24'>0</td>",
                   "127.1.200.0/24", "257 of 65,280 probed", "median 2.500", "min 0.050",
                   "2–5 ms</td><td>256"):
        assert needle in text, needle
    assert EVIL not in text


def test_details_of_excluded_and_unknown_blocks(census):
    srv = census(site=views.Site(scope=(ipaddress.IPv4Network("127.0.0.0/14"),)))
    text = srv.get("/details/2560")[2].decode()              # 10.0.0.0/16
    assert "excluded because" in text and "out of the census&#x27;s scope" in text
    assert srv.json("/task?id=2560")["reason"] == "out of the census's scope"
    assert "reason" not in srv.json(f"/task?id={T0}")
    assert srv.get("/details/abc")[0] == 400
    assert srv.get("/details/65536")[0] == 404
    assert srv.get(f"/details/{T0}")[0] == 200               # available: no picture
    assert b"block.png" not in srv.get(f"/details/{T0}")[2]


def test_exclusion_reasons():
    site = views.Site(opt_out=(ipaddress.IPv4Network("44.0.0.0/8"),),
                      scope=(ipaddress.IPv4Network("1.0.0.0/8"), ipaddress.IPv4Network("10.0.0.0/8")))
    assert views.exclusion_reason(44 << 8, site) == "opted out (44.0.0.0/8)"
    assert views.exclusion_reason(2 << 8, site) == "out of the census's scope"
    assert views.exclusion_reason(127 << 8, views.Site()) == "reserved space (127.0.0.0/8, loopback)"


def test_history_counts_blocks_done_per_hour(census):
    clock = Clock(1_800_000_000.0)          # a whole hour
    srv = census(clock=clock)
    assert srv.json("/history")["done"] == []
    put_result(srv.store, T0, [1])
    clock.now += 60
    put_result(srv.store, T1, [1])
    clock.now += 2 * 3600
    put_result(srv.store, T2, [1])
    clock.now += 100
    answer = srv.json("/history")
    assert answer == {"start": 1_800_000_000.0, "bin_seconds": 3600, "done": [2, 0, 1], "total": 3}


def test_history_bins_widen_on_a_long_census():
    times = [0.0, 10 * 86400.0, 400 * 86400.0]
    answer = views.history(times, 400 * 86400.0 + 5)
    assert len(answer["done"]) <= views.HISTORY_BINS and sum(answer["done"]) == 3
    assert answer["bin_seconds"] % 3600 == 0 and answer["bin_seconds"] > 3600


# -- /export.csv ----------------------------------------------------------------------------------

def test_export_fields_filter_and_gzip(census):
    srv = census()
    put_result(srv.store, T0, [1, 300], rtts=[1234, 5])
    put_result(srv.store, T2, [65535], rtts=[999000])
    status, headers, body = srv.get("/export.csv")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert body.decode() == "saddr\n127.0.0.1\n127.0.1.44\n127.2.255.255\n"
    fields = "saddr,rtt_ms,classification,type,code"
    _, _, body = srv.get(f"/export.csv?fields={fields}")
    assert body.decode() == (f"{fields}\n127.0.0.1,1.234,echoreply,0,0\n"
                             "127.0.1.44,0.005,echoreply,0,0\n127.2.255.255,999.000,echoreply,0,0\n")
    _, _, body = srv.get("/export.csv?network=127.0.1.0/24&fields=rtt_ms,saddr")
    assert body.decode() == "rtt_ms,saddr\n0.005,127.0.1.44\n"
    assert srv.get("/export.csv?network=127.2.0.0/15")[2] == b"saddr\n127.2.255.255\n"
    assert srv.get("/export.csv?network=10.0.0.0/8")[2] == b"saddr\n"
    status, headers, packed = srv.get("/export.csv", {"Accept-Encoding": "br, gzip;q=0.5"})
    assert headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in headers["Vary"]
    assert gzip.decompress(packed) == b"saddr\n127.0.0.1\n127.0.1.44\n127.2.255.255\n"
    assert "Content-Encoding" not in srv.get("/export.csv", {"Accept-Encoding": "gzip;q=0"})[1]
    for bad in ("fields=saddr,ttl", "fields=", "network=127.0.0.300/24", "network=::1/128"):
        status, _, body = srv.get(f"/export.csv?{bad}")
        assert status == (400 if bad != "fields=" else 200), bad
    assert b"saddr,rtt_ms,classification,type,code" in srv.get("/export.csv?fields=ttl")[2]


def test_gzip_is_read_from_accept_encoding():
    assert views.wants_gzip("gzip") and views.wants_gzip("deflate, gzip;q=1.0")
    assert views.wants_gzip("*") and not views.wants_gzip("gzip;q=0")
    assert not views.wants_gzip(None) and not views.wants_gzip("br") and not views.wants_gzip("gzip;q=x")


# -- about and contact ----------------------------------------------------------------------------

def test_about_and_contact_are_escaped_everywhere(census):
    srv = census(site=views.Site(about=EVIL + "\nline two & more", contact=EVIL))
    status, headers, page = srv.get("/about")
    text = page.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\nline two &amp; more" in text
    assert EVIL not in text and "alert(1)</script>" not in text
    assert srv.json("/about.json") == {"about": EVIL + "\nline two & more", "contact": EVIL,
                                       "scope": "all"}
    put_result(srv.store, T0, [1], name=EVIL)
    assert srv.json("/get_task")["contact"] == EVIL
    for path in ("/", "/list", f"/details/{T0}", "/errors", "/about"):
        assert EVIL not in srv.get(path)[2].decode(), path


@pytest.mark.parametrize("contact, shown", [
    ("https://census.example/opt-out?a=1&b=2",
     "<a href='https://census.example/opt-out?a=1&amp;b=2' rel='nofollow'>"),
    ("ops@census.example", "<a href='mailto:ops@census.example'>ops@census.example</a>"),
    ("call 555 'x'", "call 555 &#x27;x&#x27;"),
])
def test_a_contact_is_a_link_when_it_is_a_web_or_mail_address(contact, shown):
    assert shown in views.contact_html(contact)


def test_no_contact_no_field(census):
    srv = census()
    assert "contact" not in srv.json("/get_task")
    assert "No contact was given" in srv.get("/about")[2].decode()


def test_the_contact_and_about_flags(tmp_path):
    about = tmp_path / "about.txt"
    about.write_text("Run by the lab <3\n")
    args = ping_server._parse_args(["--contact", " ops@census.example ", "--about", str(about)])
    assert (args.contact, args.about) == ("ops@census.example", "Run by the lab <3\n")
    assert ping_server._parse_args([]).contact is None
    for bad in (["--contact", "x" * 41], ["--contact", "café@example.org"],
                ["--contact", "a\tb"], ["--about", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            ping_server._parse_args(bad)
