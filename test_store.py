"""Tests of store.py: scope, hand-out order, leases on a fake clock, submissions, persistence."""

import errno
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib

import pytest

from conftest import Clock, result_string
from ping_client import decode_rtt, encode_rtt
from store import (LOG_FILE, remembered_scope, SNAPSHOT_FILE, TASKS, Refused, State, Store,
                   StoreError, network_of, parse_blocklist, plan_scope)

HERE = os.path.dirname(os.path.abspath(__file__))

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


# -- one owner, start-up errors -------------------------------------------------------------------

def test_a_second_store_on_the_folder_refuses_to_start(open_store, tmp_path):
    open_store()
    with pytest.raises(StoreError, match=f"in use by another server \\(PID {os.getpid()}\\)"):
        Store(tmp_path / "data", scope=SCOPE8)


def test_start_up_problems_are_one_line_store_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for directory, message in ((tmp_path / "file", "is a file, not a folder"),
                               (tmp_path / "file" / "sub", "a part of that path is a file")):
        with pytest.raises(StoreError, match=message) as caught:
            Store(directory, scope=SCOPE8)
        assert "\n" not in str(caught.value)
    (tmp_path / "scoped").mkdir()
    (tmp_path / "scoped" / "census.scope").write_text("127.0.0.0/8\nnot-a-network\n")
    with pytest.raises(StoreError, match="census.scope is unreadable .*start with --scope"):
        remembered_scope(tmp_path / "scoped")
    loop = [ipaddress.IPv4Network("127.0.0.0/16")]
    assert remembered_scope(tmp_path / "scoped", loop) == (loop, None)   # an explicit one wins
    assert remembered_scope(tmp_path / "scoped") == (loop, loop)
    (tmp_path / "old").mkdir()                          # a log of the unframed format
    line = b'{"q":1}\n'
    (tmp_path / "old" / LOG_FILE).write_bytes(struct.pack("<III", 0, len(line),
                                                          zlib.crc32(line)) + line)
    with pytest.raises(StoreError, match="earlier version"):
        Store(tmp_path / "old", scope=SCOPE8)


@pytest.mark.needs_root
def test_an_unwritable_folder_is_a_store_error(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                   check=True)
    try:
        for directory in (readonly, readonly / "new"):
            with pytest.raises(StoreError, match="not writable|cannot create") as caught:
                Store(directory, scope=SCOPE8)
            assert str(directory) in str(caught.value) and "\n" not in str(caught.value)
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_a_corrupt_or_missing_snapshot_is_rebuilt_from_the_log(open_store, tmp_path, capsys):
    store = open_store()
    handout = store.get_task("h")
    store.submit(handout.task, result_string([3]), holder="h")
    store.close()
    for damage in (b"{not json", None):
        snapshot = tmp_path / "data" / SNAPSHOT_FILE
        if damage is None:
            snapshot.unlink()
        else:
            snapshot.write_bytes(damage)
        again = open_store()
        assert again.result(handout.task)["result_data"] == result_string([3])
        assert "rebuilding the state from census.log" in capsys.readouterr().err
        again.close()


def test_files_are_private_and_a_new_folder_is_0700(open_store, tmp_path):
    store = open_store()
    store.get_task("h")
    store.close()
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    remembered_scope(tmp_path / "data", SCOPE8)
    for path in (tmp_path / "data").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path.name


# -- damage ---------------------------------------------------------------------------------------

def test_a_result_failing_its_crc_is_never_served(open_store):
    store = open_store()
    handout = store.get_task("h")
    store.submit(handout.task, result_string([1, 2, 3]), holder="h")
    meta = store._results[handout.task]
    with open(store.dir / LOG_FILE, "r+b") as log:            # one flipped byte in its bitmap
        log.seek(meta.offset + 100)
        byte = log.read(1)
        log.seek(meta.offset + 100)
        log.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(Refused) as caught:
        store.result(handout.task)
    assert caught.value.status == 404
    assert list(store.bitmaps()) == []
    assert store.counters()["damaged_results"] == 1
    assert store.state_of(handout.task) == State.AVAILABLE
    assert "failed its CRC" in dict(store.errors())[handout.task]


def test_mid_log_damage_keeps_every_intact_record_and_the_original(open_store, tmp_path,
                                                                    capsys):
    store = open_store(snapshot_every=10**6)
    done = {}
    for n in range(20):
        handout = store.get_task("h")
        store.submit(handout.task, result_string([n]), holder="h", name=f"v{n}")
        done[handout.task] = n
    victim = sorted(done)[7]
    offset = store._results[victim].offset
    crash(store)
    log = tmp_path / "data" / LOG_FILE
    data = bytearray(log.read_bytes())
    data[offset + 4000] ^= 0xFF
    log.write_bytes(bytes(data))
    again = open_store()
    err = capsys.readouterr().err
    assert f"tasks of lost records: {victim}" in err and "kept as census.log.damaged-" in err
    for task, n in done.items():
        if task != victim:
            assert again.result(task)["result_data"] == result_string([n])
    assert again.state_of(victim) == State.AVAILABLE and victim in dict(again.errors())
    assert again.progress()["done_tasks"] == 19
    assert again.counters()["damaged_records"] == 1
    assert [p.read_bytes() for p in log.parent.glob(LOG_FILE + ".damaged-*")] == [bytes(data)]
    again.close()
    third = open_store()                                    # the rebuilt log is clean
    assert third.progress()["done_tasks"] == 19 and third.counters()["damaged_records"] == 0


# -- a full disk ----------------------------------------------------------------------------------

def no_space(fd, data):
    os.write(fd, data[:len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_in_the_writer_leaves_no_phantom_state_and_recovers_by_itself(open_store):
    store = open_store()
    kept = store.get_task("h")
    store.submit(kept.task, result_string([1]), holder="h", name="alice")
    held = store.get_task("h")
    before = (store.progress(), store.map_bytes(), store.contributors(), store.pending())
    store._journal.write = no_space
    with pytest.raises(Refused) as caught:
        store.submit(held.task, result_string([2]), holder="h", name="bob")
    assert caught.value.status == 503 and "disk full" in caught.value.message
    assert store.degraded.startswith("disk full: ")
    store._journal.check_writable = lambda: None        # the probe would pass: write for real
    for call in (lambda: store.get_task("h"), lambda: store.release(held.task, holder="h"),
                 lambda: store.revise(LOOP + 1, 4)):
        with pytest.raises(Refused) as caught:
            call()
        assert caught.value.status == 503
    assert (store.progress(), store.map_bytes(), store.contributors(), store.pending()) == before
    del store._journal.write, store._journal.check_writable
    assert store.submit(held.task, result_string([2]), holder="h", name="bob") is False
    assert store.degraded is None
    assert store.result(held.task)["result_data"] == result_string([2])
    crash(store)
    again = open_store()
    assert again.progress()["done_tasks"] == 2 and len(again.contributors()) == 2


def test_a_failed_snapshot_fails_no_request_and_leaves_no_temp_file(open_store, monkeypatch):
    store = open_store(snapshot_every=2)
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for _ in range(5):
        handout = store.get_task("h")
        assert store.submit(handout.task, result_string(), holder="h") is False
    assert not list(store.dir.glob("*.tmp")) and store.degraded is None
    monkeypatch.undo()
    crash(store)
    assert open_store().progress()["done_tasks"] == 5


@pytest.mark.needs_root
def test_a_real_full_disk_answers_503_and_recovers_once_space_is_freed(tmp_path, clock):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    opened = []
    try:
        store = Store(disk / "data", scope=SCOPE8, clock=clock, tail_bytes=1 << 30)
        opened.append(store)
        (disk / "ballast").write_bytes(b"\0" * (600 << 10))
        acked, refused = [], 0
        while refused < 3 and len(acked) < 100:
            handout = store.get_task("h") if not refused else None
            try:
                handout = handout or store.get_task("h")
                store.submit(handout.task, result_string([len(acked)]), holder="h")
                acked.append(handout.task)
            except Refused as exc:
                assert exc.status == 503
                refused += 1
        assert refused == 3 and store.degraded.startswith("disk full")
        got = store.progress()
        assert got["done_tasks"] == len(acked)              # nothing shown that is not stored
        (disk / "ballast").unlink()                         # space is back: no restart
        handout = store.get_task("h")
        store.submit(handout.task, result_string([999]), holder="h")
        assert store.degraded is None and store.progress()["done_tasks"] == len(acked) + 1
        crash(store)
        again = Store(disk / "data", scope=SCOPE8, clock=clock)
        opened.append(again)
        assert again.progress()["done_tasks"] == len(acked) + 1
        for n, task in enumerate(acked):
            assert again.result(task)["result_data"] == result_string([n])
    finally:
        for store in opened:
            store._journal.release()
        subprocess.run(["umount", str(disk)], check=True)


# -- the log stays the size of the data -----------------------------------------------------------

def test_churn_keeps_the_log_bounded(open_store, tmp_path):
    store = open_store(tail_bytes=16 << 10)
    handout = store.get_task("h")
    store.submit(handout.task, result_string([1]), holder="h")
    first_log = store._journal._log_id
    for _ in range(2500):                                   # about 430 kB of records
        handout = store.get_task("h")
        store.release(handout.task, holder="h", token=handout.lease.token)
    assert store._journal._log_id != first_log              # compacted on the way
    files = sum(p.stat().st_size for p in (tmp_path / "data").iterdir())
    assert files <= 1.5 * store.live_bytes() + (16 << 10) + store.live_bytes()  # + snapshot
    assert store.result(LOOP)["result_data"] == result_string([1])
    store.close()
    assert open_store().result(LOOP)["result_data"] == result_string([1])


COMPACT_CHILD = r"""
import os, signal, sys
import journal, store
from conftest import result_string
step = sys.argv[2]
real_rewrite, real_replace = journal.Journal._write_copies, os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def write_copies(self, fd, *args):
    if step == "mid-copy":
        os.write(fd, b"CNS1 half a record")
        die()
    return real_rewrite(self, fd, *args)
def replace(src, dst):
    if step == "before-rename" and str(src).endswith(".new"):
        die()
    real_replace(src, dst)
    if step == "after-rename" and str(dst).endswith("census.log"):
        die()
journal.Journal._write_copies, os.replace = write_copies, replace
import ipaddress
s = store.Store(sys.argv[1], scope=[ipaddress.IPv4Network("127.0.0.0/8")], tail_bytes=1 << 14)
while True:
    h = s.get_task("h")
    if h.task % 3 == 0:
        s.submit(h.task, result_string([h.task]), holder="h")
        print(h.task, flush=True)
    else:
        s.release(h.task, holder="h")
"""


@pytest.mark.parametrize("step", ["mid-copy", "before-rename", "after-rename"])
def test_kill_9_during_compaction_loses_nothing_acknowledged(tmp_path, step):
    child = subprocess.run([sys.executable, "-c", COMPACT_CHILD, str(tmp_path / "data"), step],
                           cwd=HERE, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    acked = [int(line) for line in child.stdout.split()]
    store = Store(tmp_path / "data", scope=SCOPE8)
    try:
        for task in acked:
            assert store.result(task)["result_data"] == result_string([task])
        assert not (tmp_path / "data" / (LOG_FILE + ".new")).exists()
        assert store.counters()["damaged_records"] == 0
    finally:
        store.close()


# -- fair and honest hand-out ---------------------------------------------------------------------

def test_lease_cap_per_holder(open_store):
    store = open_store(max_leases=3)
    got = [store.get_task("a") for _ in range(3)]
    with pytest.raises(Refused) as caught:
        store.get_task("a")
    assert caught.value.status == 429 and caught.value.retry_after >= 1
    assert "holds 3 leases" in caught.value.message
    assert store.get_task("b") is not None                  # others are not held back
    store.release(got[0].task, holder="a")
    assert store.get_task("a") is not None


def test_a_lease_required_is_usable_only_with_its_token(open_store):
    store = open_store()
    bound = store.get_task("h", lease_required=True)
    for token in (None, ""):
        for call in (lambda: store.submit(bound.task, result_string(), holder="h", token=token),
                     lambda: store.release(bound.task, holder="h", token=token)):
            with pytest.raises(Refused) as caught:
                call()
            assert caught.value.status == 403 and "only with its token" in caught.value.message
    plain = store.get_task("h")                             # the original client's rule stays
    assert store.submit(plain.task, result_string(), holder="h", token="") is False
    assert store.submit(bound.task, result_string(), holder="h", token=bound.lease.token) is False


def test_within_hands_out_only_overlapping_blocks(open_store):
    store = open_store()
    narrow = [ipaddress.IPv4Network("127.5.0.0/24")]
    assert store.get_task("h", within=narrow).task == LOOP + 5
    assert store.get_task("h", within=narrow) is None
    wide = [ipaddress.IPv4Network("127.9.128.0/17"), ipaddress.IPv4Network("127.20.0.0/15")]
    assert store.get_task("h", within=wide).task == LOOP + 20     # wholly inside first
    assert store.get_task("h", within=[ipaddress.IPv4Network("10.0.0.0/8")]) is None


# -- through HTTP ---------------------------------------------------------------------------------

def test_http_lease_cap_lease_required_and_within(census_server):
    running = census_server()
    running.store.max_leases = 2
    status, _, first = running.call("GET", "/get_task?lease=required")
    assert status == 200
    for path, code in (("/get_task?within=127.3.0.0/16,127.4.0.0/24", 200),
                       ("/get_task?within=not-a-cidr", 400), ("/get_task?lease=maybe", 400)):
        status, _, got = running.call("GET", path)
        assert status == code, got
    assert got["error"] == "lease must be 'required' (or absent)"
    status, response, got = running.call("GET", "/get_task")
    assert status == 429 and int(response.getheader("Retry-After")) >= 1
    assert "holds 2 leases" in got["error"]
    for lease in (None, ""):
        body = {"task_index": first["task_index"], "result": {"success": True, "result_data":
                                                              result_string()}}
        if lease is not None:
            body["lease"] = lease
        status, _, got = running.call("POST", "/submit_result", body)
        assert (status, got["success"]) == (403, False)
    status, _, got = running.call("POST", "/release", {"task_index": first["task_index"],
                                                       "lease": first["lease"]})
    assert status == 200


def test_read_paths_never_write_even_when_leases_expire(open_store, clock):
    store = open_store(lease_seconds=60)
    store.get_task("h")
    size = (store.dir / LOG_FILE).stat().st_size
    store._journal.write = no_space                       # a full disk: reads still answer
    clock.now += 61
    assert store.pending() == [] and store.progress()["in_progress"] == 0
    store.map_bytes(), store.task_info(LOOP), store.latest_available(), store.errors()
    assert store.counters()["leases_expired"] == 1 and store.degraded is None
    assert (store.dir / LOG_FILE).stat().st_size == size
    crash(store)
    assert open_store(lease_seconds=60).pending() == []   # expired again at load


def test_http_a_full_disk_is_503_with_a_reason_and_healthz_says_so(census_server):
    running = census_server()
    running.store._journal.write = no_space
    status, response, got = running.call("GET", "/get_task")
    assert status == 503 and response.getheader("Retry-After") == "5"
    assert "disk full" in got["error"]
    status, _, got = running.call("GET", "/healthz")
    assert status == 503 and "disk full" in got["error"]
    del running.store._journal.write
    assert running.call("GET", "/get_task")[0] == 200
    assert running.call("GET", "/healthz")[0] == 200
