"""Tests of store.py: scope, hand-out order, leases on a fake clock, submissions, persistence."""

import ipaddress
import json
import os
import threading

import pytest

from conftest import Clock, result_string
from ping_client import decode_rtt, encode_rtt
from store import (LOG_FILE, remembered_scope, SNAPSHOT_FILE, TASKS, Refused, State, Store, network_of,
                   parse_blocklist, plan_scope)

LOOP = 32512                                   # 127.0.0.0/16
SCOPE8 = [ipaddress.IPv4Network("127.0.0.0/8")]


def crash(store):
    """Leave `store` as kill -9 would: no final snapshot, the log as it stands."""
    store._journal.release()
    store._closing = True


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def open_store(tmp_path, clock):
    stores = []

    def make(**kw):
        kw.setdefault("scope", SCOPE8)
        kw.setdefault("clock", clock)
        store = Store(tmp_path / "data", **kw)
        stores.append(store)
        return store

    yield make
    for store in stores:
        if not store._closing:
            store.close()


# -- scope ----------------------------------------------------------------------------------------

def test_default_scope_excludes_only_blocks_wholly_in_reserved_space():
    inside, parts = plan_scope()
    assert not inside[10 << 8] and not inside[LOOP] and not inside[224 << 8]
    assert not inside[(100 << 8) + 64] and inside[(100 << 8) + 128]
    assert inside[(192 << 8) + 0] and inside[(8 << 8) + 8]   # 192.0/16 only has reserved /24s
    assert not inside[(172 << 8) + 16] and inside[(172 << 8) + 32]
    assert parts == {}
    assert TASKS - sum(inside) == 256 * (1 + 1 + 1 + 16 + 16) + 64 + 1 + 16 + 1 + 2


def test_scope_naming_reserved_space_is_an_allowance():
    inside, _ = plan_scope([ipaddress.IPv4Network("127.0.0.0/16")])
    assert sum(inside) == 1 and inside[LOOP]
    inside, _ = plan_scope(SCOPE8)
    assert sum(inside) == 256


def test_exclude_whole_and_partial_blocks():
    exclude = parse_blocklist("# opt-outs\n127.1.0.0/16\n127.2.3.0/24  # a lab\n"
                              "127.2.4.5\n\n127.3.0.0/17\n127.3.128.0/17\n")
    inside, parts = plan_scope(SCOPE8, exclude)
    assert not inside[LOOP + 1] and not inside[LOOP + 3]        # wholly covered, even in halves
    assert [str(n) for n in parts[LOOP + 2]] == ["127.2.3.0/24", "127.2.4.5/32"]
    with pytest.raises(ValueError, match="line 2"):
        parse_blocklist("10.0.0.0/8\nnot-a-network\n")


def test_narrow_scope_sends_the_rest_of_its_block_as_exclude(open_store):
    store = open_store(scope=[ipaddress.IPv4Network("127.0.0.0/17")])
    handout = store.get_task("127.0.0.1")
    assert handout.task == LOOP and handout.exclude == ["127.0.128.0/17"]


# -- hand-out -------------------------------------------------------------------------------------

def test_handout_is_spread_and_complete(open_store):
    store = open_store()
    tasks = [store.get_task("127.0.0.1").task for _ in range(256)]
    assert sorted(tasks) == list(range(LOOP, LOOP + 256))
    assert tasks[:3] == [LOOP, LOOP + 128, LOOP + 64]          # far apart, not 0, 1, 2
    assert store.get_task("127.0.0.1") is None


def test_concurrent_handouts_are_distinct(open_store):
    store = open_store()
    got, barrier = [], threading.Barrier(32)

    def take():
        barrier.wait()
        got.append(store.get_task("127.0.0.1").task)

    threads = [threading.Thread(target=take) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 32


# -- leases ---------------------------------------------------------------------------------------

def test_lease_expires_lazily_and_goes_back_to_the_pool(open_store, clock):
    store = open_store(scope=[ipaddress.IPv4Network("127.0.0.0/16")], lease_seconds=60)
    first = store.get_task("a")
    assert store.get_task("b") is None
    clock.now += 59
    assert store.get_task("b") is None
    clock.now += 2
    second = store.get_task("b")
    assert second.task == LOOP and second.lease.token != first.lease.token
    assert store.counters()["leases_expired"] == 1


def test_old_lease_never_cuts_a_newer_one_short(open_store, clock):
    store = open_store(scope=[ipaddress.IPv4Network("127.0.0.0/16")], lease_seconds=60)
    first = store.get_task("a")
    store.release(LOOP, holder="a", token=first.lease.token)
    clock.now += 30
    second = store.get_task("b")
    clock.now += 40                    # the first lease's deadline has passed, not the second's
    assert store.get_task("c") is None
    assert store.pending() == [LOOP]
    assert second.lease.deadline == clock.now - 40 + 60


def test_late_result_accepted_when_nobody_else_finished(open_store, clock):
    store = open_store(scope=[ipaddress.IPv4Network("127.0.0.0/16")], lease_seconds=60)
    first = store.get_task("a")
    clock.now += 61
    second = store.get_task("b")                          # re-leased to b
    assert store.submit(LOOP, result_string([1]), holder="a", token=first.lease.token) is False
    with pytest.raises(Refused) as caught:
        store.submit(LOOP, result_string([2]), holder="b", token=second.lease.token)
    assert caught.value.status == 409
    assert store.result(LOOP)["result_data"] == result_string([1])


def test_forged_wrong_and_anonymous_submissions(open_store):
    store = open_store()
    handout = store.get_task("127.9.9.9")
    for token, holder, status in (("forged", "127.9.9.9", 403), (None, "127.1.1.1", 409)):
        with pytest.raises(Refused) as caught:
            store.submit(handout.task, result_string(), holder=holder, token=token)
        assert caught.value.status == status
    with pytest.raises(Refused) as caught:
        store.submit(handout.task + 1, result_string(), holder="x", token=None)
    assert caught.value.status == 409                      # never leased to x
    with pytest.raises(Refused) as caught:
        store.submit(TASKS + 5, result_string(), holder="x")
    assert caught.value.status == 404
    assert store.submit(handout.task, result_string(), holder="127.9.9.9") is False  # by address


def test_done_task_is_never_overwritten_and_retries_land_once(open_store):
    store = open_store()
    handout = store.get_task("a")
    token = handout.lease.token
    assert store.submit(handout.task, result_string([5]), holder="a", token=token) is False
    assert store.submit(handout.task, result_string([5]), holder="a", token=token) is True
    for data in (result_string([6]), "bad"):                  # the holder, other data
        with pytest.raises(Refused) as caught:
            store.submit(handout.task, data, holder="a", token=token)
        assert (caught.value.status, caught.value.message) == (
            409, "task already done with different data")
    for data in (result_string([6]), "x" * 65536):
        with pytest.raises(Refused) as caught:
            store.submit(handout.task, data, holder="b", token=None)
        assert caught.value.status == 409
    assert store.state_of(handout.task) == State.DONE
    assert store.result(handout.task)["result_data"] == result_string([5])
    assert store.counters()["submissions"] == 1


def test_bad_data_errors_the_task_only_for_the_lease_holder(open_store):
    store = open_store(lease_seconds=60)
    handout = store.get_task("a")
    for bad in ("01" * 10, "2" * 65536, None, 5):
        with pytest.raises(Refused):
            store.submit(handout.task, bad, holder="b", token=None)
        assert store.state_of(handout.task) == State.IN_PROGRESS
    with pytest.raises(Refused) as caught:
        store.submit(handout.task, "0" * 65535 + "x", holder="a", token=handout.lease.token)
    assert caught.value.status == 400
    assert store.state_of(handout.task) == State.ERROR
    assert store.errors() == [(handout.task, "result_data may hold only '0' and '1'")]
    assert store.reset_errors(-1) == 1 and store.state_of(handout.task) == State.AVAILABLE


def test_release_only_by_the_holder(open_store):
    store = open_store()
    handout = store.get_task("a")
    with pytest.raises(Refused) as caught:
        store.release(handout.task, holder="a", token="nope")
    assert caught.value.status == 403
    with pytest.raises(Refused) as caught:
        store.release(handout.task, holder="b")
    assert caught.value.status == 409
    store.release(handout.task, holder="a", token=handout.lease.token)
    assert store.state_of(handout.task) == State.AVAILABLE


# -- results, contributors, map -------------------------------------------------------------------

def test_result_rtt_contributors_and_map(open_store, clock):
    store = open_store()
    ones = [1, 2, 300]
    for name in ("alice", "bob", "alice"):
        handout = store.get_task("h")
        stats = {"probed": 65000, "excluded": 536, "unreachable": 3, "sent": 65000}
        store.submit(handout.task, result_string(ones), holder="h", token=handout.lease.token,
                     name=name, rtt=encode_rtt([10, 20, 30]), stats=stats)
        clock.now += 1
    got = store.result(handout.task)
    assert got["result_data"] == result_string(ones) and got["contributor"] == "alice"
    assert list(decode_rtt(got["rtt_us"])) == [10, 20, 30]
    people = store.contributors()
    assert [(c.name, c.tasks_done, c.addresses_probed, c.responders) for c in people] == [
        ("alice", 2, 130000, 6), ("bob", 1, 65000, 3)]
    version, data = store.map_bytes()
    assert len(data) == 2 * TASKS and data[2 * handout.task] == State.DONE
    assert data[2 * handout.task + 1] == 1                # 3 of 65,000, rounded up
    assert data[2 * 0] == State.EXCLUDED and data[2 * (LOOP + 255)] == State.AVAILABLE
    with pytest.raises(Refused):
        store.submit(LOOP + 255, result_string(ones), holder="h", rtt="!!")


def test_bad_rtt_is_refused(open_store):
    store = open_store()
    handout = store.get_task("h")
    with pytest.raises(Refused) as caught:
        store.submit(handout.task, result_string([1]), holder="h", rtt=encode_rtt([1, 2]))
    assert caught.value.status == 400


def test_progress_numbers(open_store):
    store = open_store()
    handout = store.get_task("h")
    store.submit(handout.task, result_string([1, 2]), holder="h")
    store.get_task("h")
    got = store.progress()
    assert (got["done_tasks"], got["in_progress"], got["total_tasks"]) == (1, 1, 256)
    assert got["excluded_tasks"] == TASKS - 256 and got["available_tasks"] == 254
    assert got["responders"] == 2 and got["addresses_probed"] == 65536
    assert got["tasks_per_min"] == 0.2 and got["eta_seconds"] == 255 * 300.0
    assert store.rate()["submissions_last_hour"] == 1


def test_admin_actions(open_store):
    store = open_store()
    handout = store.get_task("h")
    with pytest.raises(Refused) as caught:
        store.revise(handout.task, 0)
    assert caught.value.status == 409
    store.revise(handout.task, 3, force=True)
    assert store.state_of(handout.task) == State.ERROR
    store.revise(handout.task, 0)
    assert store.state_of(handout.task) == State.AVAILABLE


def test_add_task_brings_the_lowest_out_of_scope_block_in(open_store):
    store = open_store()                                  # scope 127.0.0.0/8
    first = store.add_task(0, "127.0.0.1")                # 0.x.0.0/16 is reserved: skipped
    assert (first, network_of(first)) == (256, "1.0.0.0/16")
    assert store.state_of(first) == State.AVAILABLE
    assert store.add_task(1, "127.0.0.1") == 257 and 257 in store.pending()
    assert store.progress()["total_tasks"] == 258
    assert store.add_task(0, "127.0.0.1", task=9 << 8) == 9 << 8    # picked by number
    for task, why in ((10 << 8, "wholly reserved"), (257, "in progress"), (TASKS, "unknown")):
        with pytest.raises(Refused) as caught:
            store.add_task(0, "127.0.0.1", task=task)
        assert caught.value.status == (404 if task == TASKS else 409), why
    available = store.get_task("h").task
    store.release(available, holder="h")
    assert store.add_task(1, "127.0.0.1", task=available) == available  # available: leased
    with pytest.raises(Refused) as caught:
        store.add_task(2, "127.0.0.1")
    assert caught.value.status == 400


def test_add_task_skips_opted_out_blocks_and_keeps_their_parts(open_store):
    exclude = [ipaddress.IPv4Network(n) for n in ("1.0.0.0/16", "1.1.2.0/24")]
    store = open_store(exclude=exclude)
    assert store.add_task(0, "127.0.0.1") == 257          # 1.0/16 is opted out
    assert store.exclude_of(257) == ["1.1.2.0/24"]


def test_add_task_when_none_is_left(open_store):
    store = open_store(scope=None)                        # default scope: all but reserved
    with pytest.raises(Refused) as caught:
        store.add_task(0, "127.0.0.1")
    assert caught.value.status == 409


def test_added_and_revised_tasks_survive_a_restart(open_store):
    store = open_store()
    added = store.add_task(0, "127.0.0.1")
    store.revise(LOOP, 4)                                 # in scope, taken out by hand
    store.revise(1 << 8 | 7, 0)                           # out of scope, brought in by hand
    store.close()
    again = open_store()
    assert again.state_of(added) == State.AVAILABLE
    assert again.state_of(LOOP) == State.EXCLUDED
    assert again.state_of(1 << 8 | 7) == State.AVAILABLE
    crash(again)                                          # and from the log alone, no snapshot
    (again.dir / SNAPSHOT_FILE).unlink()
    third = open_store()
    assert [third.state_of(t) for t in (added, LOOP, 1 << 8 | 7)] == [0, 4, 0]
    assert third.add_task(0, "127.0.0.1") == 257


# -- persistence ----------------------------------------------------------------------------------

def test_restart_resumes_exactly_leases_included(open_store, clock):
    store = open_store(lease_seconds=60)
    done = store.get_task("a")
    store.submit(done.task, result_string([7]), holder="a", name="alice", token=done.lease.token)
    held = store.get_task("b")
    bad = store.get_task("c")
    with pytest.raises(Refused):
        store.submit(bad.task, "junk", holder="c", token=bad.lease.token)
    before = (store.progress(), store.map_bytes(), store.contributors(), store.errors())
    crash(store)                                          # no clean shutdown: the log only
    again = open_store(lease_seconds=60)
    assert (again.progress(), again.map_bytes(), again.contributors(), again.errors()) == before
    assert again.result(done.task)["result_data"] == result_string([7])
    assert again.submit(held.task, result_string(), holder="b", token=held.lease.token) is False
    clock.now += 61
    assert again.pending() == []                          # the deadline was kept too


def test_snapshot_then_journal_and_torn_tail(open_store, tmp_path):
    store = open_store(snapshot_every=3)
    tasks = []
    for _ in range(5):
        handout = store.get_task("h")
        store.submit(handout.task, result_string([1]), holder="h")
        tasks.append(handout.task)
    store.close()
    assert (tmp_path / "data" / SNAPSHOT_FILE).exists()
    snapshot = json.loads((tmp_path / "data" / SNAPSHOT_FILE).read_bytes())
    assert snapshot["states"].count("2") == 5
    again = open_store(snapshot_every=1000)
    handout = again.get_task("h")
    again.submit(handout.task, result_string([2]), holder="h")
    crash(again)
    log = tmp_path / "data" / LOG_FILE
    size = log.stat().st_size
    with open(log, "ab") as torn:
        torn.write(b"\x10\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\x00{\"q\": 9")  # cut short
    third = open_store()
    assert third.progress()["done_tasks"] == 6
    assert third.result(handout.task)["result_data"] == result_string([2])
    assert log.stat().st_size == size                     # the torn tail was cut off
    crash(third)
    data = bytearray(log.read_bytes())
    data[-5] ^= 1                                         # a flipped bit fails the CRC
    log.write_bytes(bytes(data))
    fourth = open_store()
    assert fourth.progress()["done_tasks"] == 5           # that last result is dropped ...
    assert fourth.state_of(handout.task) == State.AVAILABLE   # ... and its task handed out again
    assert "lost to damage" in dict(fourth.errors())[handout.task]
    assert [p.read_bytes() for p in log.parent.glob(LOG_FILE + ".damaged-*")] == [bytes(data)]


def test_scope_change_on_restart(open_store):
    store = open_store()
    handout = store.get_task("h")
    store.submit(handout.task, result_string(), holder="h")
    store.close()
    again = open_store(scope=[ipaddress.IPv4Network("127.0.0.0/16")])
    got = again.progress()
    assert (got["done_tasks"], got["available_tasks"]) == (1, 0 if handout.task == LOOP else 1)


def test_scope_is_remembered_so_a_restart_never_widens_the_census(tmp_path):
    loop = [ipaddress.IPv4Network("127.0.0.0/16")]
    assert remembered_scope(tmp_path, None) == (None, None)          # new folder: everything
    assert remembered_scope(tmp_path, loop) == (loop, None)
    assert remembered_scope(tmp_path, None) == (loop, loop)          # restart without --scope
    assert remembered_scope(tmp_path, []) == ([], loop)              # 'all', said explicitly
    assert remembered_scope(tmp_path, None) == ([], [])
