"""Tests of results.py (the server's decoder) against ping_client.py's encoders: the compact
and the original form of one sweep pack to the same result; ICMP errors and skipped ranges
round-trip; anything malformed is refused with a reason."""
import array
import base64
import ipaddress
import random
import zlib

import pytest

import icmp
import ping_client
import results
from results import Invalid

BLOCK = ipaddress.IPv4Network("127.0.0.0/16")
Status = icmp.Status


def sweep_like(seed=16):
    """A SweepResult of 127.0.0.0/16 as icmp.sweep makes it: replies, unreachables, time
    exceeded, silence, and an excluded first /24 and last /20."""
    rng = random.Random(seed)
    status, code = bytearray(65536), bytearray(65536)
    for k in range(65536):
        draw = rng.random()
        if draw < 0.3:
            status[k] = Status.ECHO_REPLY
        elif draw < 0.32:
            status[k], code[k] = Status.UNREACHABLE, rng.choice((1, 3, 10, 13))
        elif draw < 0.33:
            status[k] = Status.TIME_EXCEEDED
    status[:256] = bytes([Status.EXCLUDED]) * 256
    status[-4096:] = bytes([Status.EXCLUDED]) * 4096
    rtt = array.array("I", (rng.randrange(1, 10 ** 6) if s == Status.ECHO_REPLY else 0 for s in status))
    stats = icmp.SweepStats(sent=65536 - 4352, replies=status.count(Status.ECHO_REPLY),
                            unreachable=status.count(Status.UNREACHABLE), excluded=4352, stray=0,
                            wrong_source=0, bad_payload=0, duplicates=0, rounds=1, elapsed=1.0,
                            kind="raw", time_exceeded=status.count(Status.TIME_EXCEEDED))
    return icmp.SweepResult(range(int(BLOCK.network_address), int(BLOCK.broadcast_address) + 1),
                            status, code, rtt, stats)


def task():
    return ping_client.Task(32512, "lease", BLOCK, str(BLOCK), ())


def packed(body):
    return results.pack(body["result"].get("result_data"), body["result"].get("bitmap"),
                        block=BLOCK, rtt=body.get("rtt_us"),
                        icmp_errors=body.get("icmp_errors"), skipped=body.get("skipped"))


def test_compact_and_string_forms_of_one_sweep_pack_the_same():
    sweep = sweep_like()
    string = ping_client.submission_body(task(), sweep, "me", compact=False)
    compact = ping_client.submission_body(task(), sweep, "me")
    assert "result_data" not in compact["result"] and compact["result"]["bitmap"]
    assert packed(string) == packed(compact)
    result = packed(compact)
    assert result.responders == sweep.status.count(Status.ECHO_REPLY)
    assert result.skipped == ((0, 255), (65536 - 4096, 65535))
    assert compact["skipped"] == ["127.0.0.0/24", "127.0.240.0/20"]
    assert len(compact["result"]["bitmap"]) < len(string["result"]["result_data"]) // 6
    rows = list(results.icmp_error_rows(result.errors))
    expected = [(k, "unreach" if s == Status.UNREACHABLE else "timxceed",
                 3 if s == Status.UNREACHABLE else 11, sweep.code[k])
                for k, s in enumerate(sweep.status) if s in (Status.UNREACHABLE, Status.TIME_EXCEEDED)]
    assert rows == expected and len(rows) > 1000
    digits = format(int.from_bytes(result.bitmap, "big"), "065536b")
    assert digits == string["result"]["result_data"]


def test_a_seed_shaped_result_packs_as_before():
    data = "01" * 32768
    result = results.pack(data, block=BLOCK)
    assert result.responders == 32768 and result.errors == b"" and result.skipped == ()
    assert result.bitmap == b"\x55" * 8192


def b64z(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data)).decode()


ONE = "1" + "0" * 65535


@pytest.mark.parametrize("result, extra, reason", [
    ({}, {}, "result_data"),
    ({"result_data": "0" * 65535}, {}, "65536 characters"),
    ({"result_data": " " + "0" * 65535}, {}, "only '0' and '1'"),
    ({"bitmap": "not base64!"}, {}, "bitmap"),
    ({"bitmap": b64z(bytes(8191))}, {}, "bitmap"),
    ({"bitmap": b64z(bytes(8193))}, {}, "bitmap"),
    ({"bitmap": base64.b64encode(zlib.compress(bytes(8192))[:-2]).decode()}, {}, "bitmap"),
    ({"bitmap": 12}, {}, "bitmap"),
    ({"result_data": ONE}, {"rtt_us": ping_client.encode_rtt([1, 2])}, "rtt_us"),
    ({"result_data": ONE}, {"icmp_errors": b64z(b"\x00\x05\x03")}, "4-byte entries"),
    ({"result_data": ONE}, {"icmp_errors": b64z(b"\x00\x05\x08\x00")}, "types 3"),
    ({"result_data": ONE}, {"icmp_errors": b64z(b"\x00\x05\x03\x01\x00\x04\x03\x01")}, "ascending"),
    ({"result_data": ONE}, {"icmp_errors": b64z(b"\x00\x00\x03\x01")}, "more than one"),
    ({"result_data": ONE}, {"skipped": ["127.0.0.0/24"]}, "more than one"),
    ({"result_data": ONE}, {"skipped": ["127.1.0.0/24"]}, "not inside"),
    ({"result_data": ONE}, {"skipped": ["garbage"]}, "not a CIDR"),
    ({"result_data": ONE}, {"skipped": "127.0.0.0/24"}, "list"),
])
def test_malformed_submissions_are_refused_with_a_reason(result, extra, reason):
    with pytest.raises(Invalid, match=reason):
        results.pack(result.get("result_data"), result.get("bitmap"), block=BLOCK,
                     rtt=extra.get("rtt_us"),
                     icmp_errors=extra.get("icmp_errors"), skipped=extra.get("skipped"))


def test_a_bomb_is_cut_at_the_limit():
    bomb = b64z(bytes(8192 * 1000))
    with pytest.raises(Invalid, match="bitmap"):
        results.pack(bitmap=bomb, block=BLOCK)


def test_both_forms_of_one_sweep_store_the_same_result_over_http(census_server):
    skipped = [ipaddress.IPv4Network(n) for b in ("127.0", "127.1")   # explained: no holes
               for n in (f"{b}.0.0/24", f"{b}.240.0/20")]
    srv = census_server("127.0.0.0/15", store_kw={"verify": 0.0, "exclude": skipped})
    sweep = sweep_like()
    stored = []
    for compact in (True, False):
        _, _, handout = srv.call("GET", "/get_task")
        task_ = ping_client.Task(handout["task_index"], handout["lease"],
                                 ipaddress.IPv4Network(handout["network"]), handout["network"], ())
        shifted = sweep._replace(addresses=range(int(task_.network.network_address),
                                                 int(task_.network.broadcast_address) + 1))
        body = ping_client.submission_body(task_, shifted, "me", compact=compact)
        assert srv.call("POST", "/submit_result", body)[::2] == (200, {"success": True})
        result = srv.call("GET", f"/result?id={task_.index}")[2]
        stored.append({k: result[k] for k in ("result_data", "rtt_us", "icmp_errors")})
    assert stored[0] == stored[1] and len(stored[0]["icmp_errors"]) > 1000
    assert stored[0]["icmp_errors"][0][1] in ("unreach", "timxceed")
    csv = srv.call("GET", "/export.csv?fields=saddr,classification,type,code")[2].decode()
    rows = csv.splitlines()
    assert rows[0] == "saddr,classification,type,code"
    kinds = {row.split(",")[1] for row in rows[1:]}
    assert kinds == {"echoreply", "unreach", "timxceed"}
    errors = stored[0]["icmp_errors"]
    offset, kind, icmp_type, code = errors[0]
    assert f"127.{task_.index & 255}.{offset >> 8}.{offset & 255},{kind},{icmp_type},{code}" in rows
    assert len(rows) - 1 == 2 * (sweep.status.count(Status.ECHO_REPLY) + len(errors))
    plain = srv.call("GET", "/export.csv")[2].decode().splitlines()   # the original: responders
    assert len(plain) - 1 == 2 * sweep.status.count(Status.ECHO_REPLY)


def test_holes_are_handed_out_again_for_those_parts_alone_and_covered(census_server):
    """A volunteer probing only the lower half (its --only) leaves the upper half NOT probed:
    the block comes back for that half alone, to someone else, until it is covered."""
    import http.client
    from conftest import answer
    srv = census_server("127.0.0.0/16", store_kw={"verify": 0.0})
    lower, upper = "127.0.0.0/17", "127.0.128.0/17"
    a, b = (http.client.HTTPConnection("127.0.0.1", srv.port, source_address=(ip, 0))
            for ip in ("127.0.0.41", "127.0.0.42"))

    def submit(conn, handout, ones, skipped):
        bits = sum(1 << (65535 - k) for k in ones).to_bytes(8192, "big")
        body = {"task_index": handout["task_index"], "lease": handout["lease"], "name": "x",
                "result": {"success": True, "bitmap": base64.b64encode(zlib.compress(bits)).decode()},
                "skipped": skipped}
        assert answer(conn, "POST", "/submit_result", body)[::2] == (200, {"success": True})

    first = answer(a, "GET", "/get_task")[2]
    assert first["exclude"] == []
    submit(a, first, range(0, 32768, 3), [upper])
    info = srv.call("GET", f"/task?id={first['task_index']}")[2]
    assert (info["state"], info["not_probed"]) == (0, [upper])           # back in the pool
    csv = srv.call("GET", "/export.csv")[2].decode().splitlines()
    assert len(csv) - 1 == len(range(0, 32768, 3))                      # the probed part only
    assert answer(a, "GET", "/get_task")[2] == {"error": "No tasks available"}   # not to a again
    again = answer(b, "GET", "/get_task")[2]
    assert again["task_index"] == first["task_index"] and again["exclude"] == [lower]
    submit(b, again, range(32769, 65536, 5), [lower])
    info = srv.call("GET", f"/task?id={first['task_index']}")[2]
    assert (info["state"], info["not_probed"], info["probed"]) == (2, [], 65536)
    data = srv.call("GET", f"/result?id={first['task_index']}")[2]["result_data"]
    assert {k for k, c in enumerate(data) if c == "1"} == {*range(0, 32768, 3), *range(32769, 65536, 5)}


def _holed_census(census_server):
    import http.client
    srv = census_server("127.0.0.0/15", store_kw={"verify": 0.0})          # two blocks
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, source_address=("127.0.0.43", 0))
    return srv, conn


def _compact(handout, ones, skipped):
    bits = sum(1 << (65535 - k) for k in ones).to_bytes(8192, "big")
    return {"task_index": handout["task_index"], "lease": handout["lease"], "name": "x",
            "result": {"success": True, "bitmap": base64.b64encode(zlib.compress(bits)).decode()},
            "skipped": skipped}


def test_within_does_not_hand_a_volunteer_the_holes_it_left_itself(census_server):
    """A volunteer whose --only covers half a block leaves the other half as a hole; asking
    again with the same `within` it gets the next block, not its own holes (no livelock)."""
    from conftest import answer
    srv, conn = _holed_census(census_server)
    path = "/get_task?within=127.0.0.0/17,127.1.0.0/17"
    first = answer(conn, "GET", path)[2]
    assert answer(conn, "POST", "/submit_result",
                  _compact(first, range(0, 32768, 3), ["127.0.128.0/17"]))[0] == 200
    second = answer(conn, "GET", path)[2]
    assert second["task_index"] == first["task_index"] + 1
    holder = srv.call("GET", "/contributors")[2]["contributors"]
    assert holder == [] or holder[0]["tasks_done"] == 0     # no credit for half a block


def test_a_submission_that_probed_nothing_is_refused(census_server):
    from conftest import answer
    srv, conn = _holed_census(census_server)
    handout = answer(conn, "GET", "/get_task")[2]
    status, _, body = answer(conn, "POST", "/submit_result",
                             _compact(handout, (), [f"127.{handout['task_index'] & 255}.0.0/16"]))
    assert status == 400 and "nothing probed" in body["error"]


def test_a_lease_token_with_a_lone_surrogate_is_refused_not_a_500(census_server):
    from conftest import answer
    srv, conn = _holed_census(census_server)
    handout = answer(conn, "GET", "/get_task?lease=required")[2]
    body = _compact(handout, (), [])
    body["lease"] = "\ud800"
    assert answer(conn, "POST", "/submit_result", body)[0] == 403
    assert answer(conn, "POST", "/release", {"task_index": handout["task_index"],
                                              "lease": "\ud800"})[0] == 403
