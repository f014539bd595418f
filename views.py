"""What the census shows people, apart from the dashboard: the original system's pages (/list,
/details/<id>), the about page, the CSV export and the progress history. Every function here
reads the store through its public methods and returns text or bytes; ping_server.py routes
requests to them. Everything that comes from data or from the operator is HTML-escaped.

    csv_chunks(store, fields, network)  /export.csv rows, streamed a block at a time
    list_page / details_page / about_page   the HTML pages
    history(finished_at, now)           blocks done per hour since the first result

Export rows carry ZMap's field names. What kind of answer an address gave comes from
``answers_of``: a responder is ``echoreply``, type 0, code 0; an export that asks for
classification, type or code also has a row for each negative answer the result carries
(``unreach`` type 3, ``timxceed`` type 11, with their code), in address order.
"""

import array
import base64
import bisect
import html
import ipaddress
import sys
import time
import zlib
from typing import NamedTuple

import pictures
from results import answered_offsets, icmp_error_rows

EXPORT_FIELDS = ("saddr", "rtt_ms", "classification", "type", "code")
LIST_PAGE = 1024                    # blocks a /list page shows
ROW_BYTES = 14                      # about the length of an "a.b.c.d\n" row, for size estimates
HISTORY_BINS = 2000                 # at most this many bars: past that, a bar is more than an hour
STATE_NAMES = ("available", "in progress", "done", "error", "excluded")
# Reserved ranges of /16 or wider (only those can hold a whole block), with what they are.
RESERVED_NAMES = {
    "0.0.0.0/8": "this network", "10.0.0.0/8": "private use", "100.64.0.0/10": "shared address space",
    "127.0.0.0/8": "loopback", "169.254.0.0/16": "link local", "172.16.0.0/12": "private use",
    "192.168.0.0/16": "private use", "198.18.0.0/15": "benchmarking", "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved for future use"}
RTT_BUCKETS_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Answer(NamedTuple):
    """What an address answered, in ZMap's terms."""
    classification: str
    type: int
    code: int


ECHOREPLY = Answer("echoreply", 0, 0)


class Site(NamedTuple):
    """What the operator says about the census (--about, --contact), its opt-out list and its
    scope."""
    about: str = ""
    contact: str | None = None
    opt_out: tuple = ()             # IPv4Networks (--exclude)
    scope: tuple = ()               # IPv4Networks (--scope); empty: the whole space


def answers_of(result: dict, negative: bool = False):
    """(address offset k in the block, rtt in microseconds or None, Answer) of every address of
    a /result that answered, in address order; `negative`: its ICMP errors too (/result's
    "icmp_errors": [offset, classification, type, code] each). The one place a per-address
    classification is read."""
    data = result["result_data"]
    bitmap = int(data, 2).to_bytes(8192, "big") if isinstance(data, str) else data
    rtts = decode_rtt(result.get("rtt_us"))
    offsets = answered_offsets(bitmap)
    if rtts is None or len(rtts) != len(offsets):
        rtts = [None] * len(offsets)
    echoes = zip(offsets, rtts, [ECHOREPLY] * len(offsets))
    errors = result.get("icmp_errors") if negative else None
    if not errors:
        return echoes
    return sorted([*echoes, *((k, None, Answer(kind, icmp_type, code))
                              for k, kind, icmp_type, code in errors)], key=lambda row: row[0])


def decode_rtt(text):
    """The result's rtt_us (base64 of zlib'd little-endian uint32s) as an array, or None."""
    if not text:
        return None
    try:
        values = array.array("I", zlib.decompress(base64.b64decode(text)))
    except (ValueError, zlib.error):
        return None
    if sys.byteorder == "big":
        values.byteswap()
    return values


def parse_fields(text: str | None) -> tuple:
    """?fields=a,b,c -> the tuple; ValueError naming the fields known."""
    if not text:
        return ("saddr",)
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in fields if f not in EXPORT_FIELDS]
    if unknown or not fields:
        raise ValueError(f"unknown field {', '.join(unknown) or '(none)'}: "
                         f"fields are {','.join(EXPORT_FIELDS)}")
    return fields


def parse_network(text: str | None):
    """?network=CIDR -> IPv4Network or None; ValueError when it is not one."""
    if text is None or not text.strip():
        return None
    try:
        return ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"network must be an IPv4 CIDR such as 1.2.0.0/16, not {text!r}") from None


def wants_gzip(accept_encoding: str | None) -> bool:
    """Does an Accept-Encoding header take gzip (RFC 9110 12.5.3: q=0 refuses it)?"""
    for item in (accept_encoding or "").lower().split(","):
        name, _, params = item.partition(";")
        if name.strip() in ("gzip", "x-gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if "q=" in params else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


def csv_chunks(store, fields=("saddr",), network=None):
    """The CSV header, then the rows of every answering address (in ``network`` if given), one
    chunk per block, in address order."""
    yield (",".join(fields) + "\n").encode()
    for task, result in _results(store, fields, network):
        base = task << 16
        lo, hi = _offset_range(task, network)
        negative = bool({"classification", "type", "code"} & set(fields))
        rows = [_row(fields, base + k, rtt, answer)
                for k, rtt, answer in answers_of(result, negative) if lo <= k < hi]
        if rows:
            yield "".join(rows).encode()


def gzipped(chunks):
    """A stream of chunks, gzip-compressed as it goes."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    try:
        for chunk in chunks:
            out = packer.compress(chunk)
            if out:
                yield out
        yield packer.flush()
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()


def exclusion_reason(task: int, site: Site) -> str:
    """Why a block is excluded: opted out, reserved space, or outside the census's scope."""
    block = ipaddress.IPv4Network((task << 16, 16))
    for net in site.opt_out:
        if block.subnet_of(net):
            return f"opted out ({net})"
    if site.scope and not any(block.overlaps(net) for net in site.scope):
        return "out of the census's scope"
    for text, name in RESERVED_NAMES.items():
        if block.subnet_of(ipaddress.IPv4Network(text)):
            return f"reserved space ({text}, {name})"
    return "out of the census's scope"


def history(finished_at: list, now: float) -> dict:
    """Blocks done per hour (or per wider bin on a long census) since the first result."""
    if not finished_at:
        return {"start": None, "bin_seconds": 3600, "done": [], "total": 0}
    start = finished_at[0] - finished_at[0] % 3600
    span = max(now, finished_at[-1]) - start
    width = 3600 * max(1, -(-int(span) // (3600 * HISTORY_BINS)))
    bins = int(span // width) + 1
    edges = [start + width * (k + 1) for k in range(bins)]
    done, previous = [], 0
    for edge in edges:
        upto = bisect.bisect_left(finished_at, edge)
        done.append(upto - previous)
        previous = upto
    return {"start": start, "bin_seconds": width, "done": done, "total": len(finished_at)}


# -- pages ----------------------------------------------------------------------------------------

def list_page(states: bytes, version: int, page: int, state: int | None) -> str:
    """/list: the blocks in scope (or those in one state) with their state, LIST_PAGE a page."""
    wanted = [t for t in range(65536)
              if (states[2 * t] == state if state is not None else states[2 * t] != 4)]
    pages = max(1, -(-len(wanted) // LIST_PAGE))
    shown = wanted[(page - 1) * LIST_PAGE:page * LIST_PAGE]
    rows = "".join(f"<tr><td><a href='/details/{t}'>{t}</a></td><td>{_network(t)}</td>"
                   f"<td class='s{states[2 * t]}'>{STATE_NAMES[states[2 * t]]}</td></tr>\n"
                   for t in shown)
    which = "in scope" if state is None else STATE_NAMES[state]
    filters = " · ".join(f"<a href='/list?state={s}'>{name}</a>" for s, name in enumerate(STATE_NAMES))
    query = "" if state is None else f"state={state}&amp;"
    nav = " ".join(f"<a href='/list?{query}page={p}'>{p}</a>" if p != page else f"<b>{p}</b>"
                   for p in range(1, pages + 1))
    body = (f"<p>{len(wanted):,} blocks {which} (data version {version}); page {page} of {pages}."
            f" Only: {filters} · <a href='/list'>all in scope</a> · "
            f"<a href='/list?format=json'>JSON</a></p>"
            f"<table><tr><th>task</th><th>network</th><th>state</th></tr>\n{rows}</table>"
            f"<p class='pages'>{nav}</p>")
    return _page(f"Blocks {which}", body)


def list_json(states: bytes, version: int, page: int, state: int | None) -> dict:
    wanted = [t for t in range(65536)
              if (states[2 * t] == state if state is not None else states[2 * t] != 4)]
    shown = wanted[(page - 1) * LIST_PAGE:page * LIST_PAGE]
    return {"version": version, "total": len(wanted), "page": page,
            "pages": max(1, -(-len(wanted) // LIST_PAGE)), "page_size": LIST_PAGE,
            "blocks": [[t, states[2 * t]] for t in shown]}


def details_page(info: dict, result: dict | None, reason: str | None) -> str:
    """/details/<id>: one block: state, who and when, counts, its picture, per-/24 counts, the
    RTT distribution and links to its data."""
    task, net = info["task_index"], info["network"]
    facts = [("network", net), ("task", str(task)), ("state", info["state_name"].replace("_", " "))]
    if reason:
        facts.append(("excluded because", reason))
    if info.get("exclude"):
        facts.append(("opted-out parts", ", ".join(info["exclude"])))
    if result is not None:
        probed, answered = info.get("probed") or 0, info.get("responders") or 0
        share = f" ({100 * answered / probed:.2f} %)" if probed else ""
        facts += [("by", info.get("contributor") or "–"),
                  ("finished", _when(info.get("finished_at"))),
                  ("answered", f"{answered:,} of {probed:,} probed{share}")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in facts)
    links = [("/task?id=%d" % task, "task JSON"), ("/list", "all blocks"), ("/", "dashboard")]
    parts = [f"<table class='facts'>{table}</table>"]
    if result is not None:
        csv = f"/export.csv?network={net}&amp;fields=saddr,rtt_ms"
        links = [(f"/result?id={task}", "result JSON"), (csv, "CSV of its responders")] + links
        parts += [_block_picture(task), _per_24_table(task, result), _rtt_table(result)]
    parts.insert(1, "<p>" + " · ".join(f"<a href='{href}'>{text}</a>" for href, text in links) + "</p>")
    return _page(f"Block {net}", "".join(parts))


def about_page(site: Site) -> str:
    """/about: the operator's text (escaped, as written) and contact, and how to opt out."""
    text = (f"<div class='about'>{html.escape(site.about)}</div>" if site.about.strip()
            else "<p>The operator of this census has not written an about text (--about).</p>")
    contact = (f"<p>Contact: {contact_html(site.contact)}</p>" if site.contact
               else "<p>No contact was given (--contact).</p>")
    body = (f"{text}{contact}<h2>What this is</h2><p>Volunteers run a small client that sends "
            f"one ICMP echo request (a ping) to each address of a /16 block and reports which "
            f"addresses answered; this server hands out the blocks and publishes the census.</p>"
            f"<h2>Opting out</h2><p>A network's operator who wants no probes can ask, naming the "
            f"network (CIDR), at the contact above: it goes on the census's exclusion list and no "
            f"block of it is handed out again. Each probe's payload names this census"
            + (" and its contact" if site.contact else "") + ".</p>"
            f"<p><a href='/'>dashboard</a> · <a href='/list'>all blocks</a></p>")
    return _page("About this census", body)


def contact_html(contact: str) -> str:
    """The contact as a link where it is a web or mail address, escaped either way."""
    shown = html.escape(contact)
    if contact.startswith(("https://", "http://")):
        return f"<a href='{html.escape(contact, quote=True)}' rel='nofollow'>{shown}</a>"
    if "@" in contact and " " not in contact and not contact.startswith("mailto:"):
        return f"<a href='mailto:{html.escape(contact, quote=True)}'>{shown}</a>"
    return shown


# -- private helpers ------------------------------------------------------------------------------

_FORMAT = {"saddr": lambda a, rtt, answer: f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}",
           "rtt_ms": lambda a, rtt, answer: "" if rtt is None else f"{rtt / 1000:.3f}",
           "classification": lambda a, rtt, answer: answer.classification,
           "type": lambda a, rtt, answer: str(answer.type),
           "code": lambda a, rtt, answer: str(answer.code)}
_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:12px 16px;
color:#1b1f24;background:#f4f5f7}a{color:#17637f}table{border-collapse:collapse;background:#fff}
th,td{padding:3px 8px;border-bottom:1px solid #e3e6eb;text-align:left;font-variant-numeric:tabular-nums}
.facts th{color:#5f6b7a;font-weight:600}.grid td{text-align:right;font-size:12px;padding:2px 4px}
.about{white-space:pre-wrap;background:#fff;padding:10px 12px;border:1px solid #e3e6eb;border-radius:8px}
img.block{width:512px;height:auto;max-width:100%;image-rendering:pixelated;border:1px solid #e3e6eb}
.bar{display:inline-block;height:10px;background:#21918c}.s1{color:#c25400}.s2{color:#137a6f}
.s3{color:#d62728}.s4{color:#8a94a3}.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
.wide{overflow-x:auto}"""


def _results(store, fields, network):
    """(task, /result-like dict) of the done blocks to export; the whole census without rtt_ms
    is read in one pass of bitmaps, anything else a block at a time."""
    if network is None and "rtt_ms" not in fields:
        for task, bitmap, errors in store.bitmaps(with_errors=True):
            yield task, {"result_data": bitmap, "icmp_errors": list(icmp_error_rows(errors))}
        return
    _, states = store.map_bytes()
    first, last = (0, 65535) if network is None else (
        int(network.network_address) >> 16, int(network.broadcast_address) >> 16)
    for task in range(first, last + 1):
        if states[2 * task] == 2:
            try:
                yield task, store.result(task)
            except Exception as exc:        # undone meanwhile
                if getattr(exc, "status", None) != 404:
                    raise


def _offset_range(task, network):
    if network is None or network.prefixlen <= 16:
        return 0, 65536
    base = task << 16
    return int(network.network_address) - base, int(network.broadcast_address) - base + 1


def _row(fields, address, rtt, answer) -> str:
    return ",".join(_FORMAT[f](address, rtt, answer) for f in fields) + "\n"


def _network(task):
    return f"{task >> 8}.{task & 255}.0.0/16"


def _when(epoch):
    if not epoch:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _block_picture(task) -> str:
    legend = "".join(f"<span style='background:#{bytes(rgb).hex()}'></span>{name}"
                     for rgb, name in zip(pictures.BLOCK_PALETTE, pictures.BLOCK_CLASSES))
    return (f"<h2>Every address</h2><p>One pixel per address on the dashboard's Hilbert curve "
            f"(.0.0 top left, .255.255 top right).</p><p class='legend'>{legend}</p>"
            f"<img class='block' src='/block.png?id={task}' width='256' height='256' "
            f"alt='which addresses of the block answered'>")


def _per_24_table(task, result) -> str:
    data = result["result_data"]
    bitmap = int(data, 2).to_bytes(8192, "big") if isinstance(data, str) else data
    counts = memoryview(pictures.answers_per_24(bitmap)).cast("H")
    prefix = f"{task >> 8}.{task & 255}"
    rows = []
    for hi in range(16):
        cells = "".join(f"<td title='{prefix}.{c}.0/24'{_heat(counts[c])}>{counts[c]}</td>"
                        for c in range(16 * hi, 16 * hi + 16))
        rows.append(f"<tr><th>.{16 * hi}</th>{cells}</tr>")
    head = "".join(f"<th>+{c}</th>" for c in range(16))
    return (f"<h2>Answers per /24</h2><p>Row .c, column +d: addresses of {prefix}.(c+d).0/24 "
            f"that answered, of 256.</p><div class='wide'><table class='grid'><tr><th></th>"
            f"{head}</tr>{''.join(rows)}</table></div>")


def _heat(count) -> str:
    """A cell's background: the /map.png colour of its share, light text on the dark ones."""
    if not count:
        return ""
    rgb = pictures.map_palette()[pictures.shade_of(count, 256)]
    ink = "#fff" if sum(rgb) < 380 else "#1b1f24"
    return f" style='background:#{bytes(rgb).hex()};color:{ink}'"


def _rtt_table(result) -> str:
    rtts = decode_rtt(result.get("rtt_us"))
    if rtts is None:
        return "<h2>Round-trip times</h2><p>This result carries no round-trip times.</p>"
    if not rtts:
        return "<h2>Round-trip times</h2><p>No address answered.</p>"
    ms = sorted(v / 1000 for v in rtts)
    counts = [0] * (len(RTT_BUCKETS_MS) + 1)
    for value in ms:
        counts[bisect.bisect_right(RTT_BUCKETS_MS, value)] += 1
    top = max(counts)
    labels = ([f"< {RTT_BUCKETS_MS[0]:g} ms"]
              + [f"{a:g}–{b:g} ms" for a, b in zip(RTT_BUCKETS_MS, RTT_BUCKETS_MS[1:])]
              + [f"≥ {RTT_BUCKETS_MS[-1]:g} ms"])
    rows = "".join(f"<tr><td>{label}</td><td>{n:,}</td><td><span class='bar' "
                   f"style='width:{round(200 * n / top)}px'></span></td></tr>"
                   for label, n in zip(labels, counts))

    def quantile(q):
        return ms[min(len(ms) - 1, int(q * len(ms)))]
    summary = (f"min {ms[0]:.3f} · median {quantile(0.5):.3f} · 90 % {quantile(0.9):.3f} · "
               f"99 % {quantile(0.99):.3f} · max {ms[-1]:.3f} ms ({len(ms):,} answers)")
    return f"<h2>Round-trip times</h2><p>{summary}</p><table>{rows}</table>"
