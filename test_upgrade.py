"""Tests of upgrade.py: a data folder written by the earlier, unframed store (commit 10c2256)
opens with today's store, nothing lost, the old files kept aside."""

import base64
import ipaddress
import zlib

import pytest

from conftest import Clock, result_string
from ping_client import decode_rtt
from store import LOG_FILE, SNAPSHOT_FILE, Refused, State, Store

SCOPE8 = [ipaddress.IPv4Network("127.0.0.0/8")]

# Golden bytes: census.log and census.json made by the store of commit 10c2256 (snapshot every 7
# records, left as kill -9 leaves it: records after the snapshot), zlib'd and base64'd:
#   32512 done by alice (10.0.0.1, token) with rtt [11, 22, 33] for addresses 1, 2, 3
#   32640 done by 10.0.0.2 (no token), address 5    32576 in error (bad data)
#   32704 leased to 10.0.0.4 (token below)        32544 done, revised to 0, done again by bob: 9
LEASED, LEASE_TOKEN = 32704, "_4ZAXsX7mh8oiJcgy45mMQ"
OLD_LOG = (
    "eNrt3c9r02Acx/EMRVA8TG9eZni8SZTnyc+2XuzqOladddNtdXNsafpjHenaJencEC8q7ubBk4gX/wIRcaAIXgYexZM3Lwri"
    "f2H6pC1NjbTdrfB5jZQw1vb7DWWnN40gCMJT/3h+kLzwgGyTBJPIDn/cIgkqEY8kFFljskRc/lubJFZIOuvMUM1Jzaa3C7Va"
    "VqmkC2U2RyRGKdUpvew/j/mP/g8jqxKpkcRWw7YlUmyfOO0Tq31SJ4mSabvFh6fOiILwxZ/o9fdj43UBAAAAAAAAAAAAAAAA"
    "AAAARt3uq5+l9fXxY/kp8YQwdiikeKIg80RB5okC60kUZJ4oBE1BZHewwrSYFGNxWWKGREy7YhWDcIHycEGRdE1TdIlK/60c"
    "Qm2D1ewh2q/Seq7S9Xqds9XuxqG5W7O6OHvFushXUvhKSmglXaWh6qKUX/BK7JpnlYuV0qSaZznXqiajqgt5+OpCEAXhgz9R"
    "bkL6cxwfPAAAAAAAAAAAAAAAAAAAgJHHiwSVFwkqLxLkniKhf2QRM2Q1qCy6q4TuLqLTWQRP6i4XeFPR9aTWn7KBs4oXE8++"
    "8iU0voQWWkIz9FBWka1ri9s0t7i0kZufT9lObvpSJvrLLJQjZBW+A/+4ZXqf+EQ6n0iPnEgJX9aVIWdb5TMRp+g2bG+tYHqm"
    "WG24npgviqboek5lqyzWSiK/mKK1YTqm5RUdl/TfoHlND3eW9/kGBt/ACG1gUDV0TdfU5WTOzRnVjVitkrHKe6pWnY2cWz3a"
    "NW1OdPrN+V98ohifKBa+pmp4ot1CfSpZ0ac311K35zJ7C+qdu/GZyHhGO1o889Gf6PHvz0/G8P8DAAAAAAAAAAAAAAAAAABg"
    "5PEiIc6LhDgvEpSeImGAbygxDFXrrWe0AeoZrbee0YatZ+75x6N3P2aDW8HQ4F4wNHIP2m+Pf3MJz2m03mffP76dPBd8nwtr"
    "3XOGRb5Pu+DIW9l0bS5jby4uVW/s3fQyk9fv08iCQx+i4GiNJArC2+bqL5Pvhav4EAMAAAAAAAAAAAAAAAAAAIy6IEkI7jHD"
    "gpvMqEMnHLKuxPROwpGv5QeoN/ROvRH8ff9wI4gX/gLN3/gg")
OLD_SNAPSHOT = (
    "eNrt0lFL21AYBuC/Us51NpI2abveDcExQWReuLJSJNaohbbRJB0M8b/v1OrWC+96+zyB5Bw433u+k+Q53NXNuuzCJEvCqr6/"
    "ru/u2mo3HRXjURLa6ilM4vN31bTLevM6brc362W7m7Zh0o/zruyqOAw5AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AET99DiDI+uP3T87st4fAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB5HpKwqsq2asPkOQz6ozQPk1m4zn99nbbT"
    "0fphXC/PFvd/8mJ9/iMkWZqmwzT9nCYhi/d45WH+koR6dbuvL0bDWD8LF4/F1VM6vfr5ML28PFk102+fzrIPAwZhvkuomqZu"
    "2oOQ0FTtdtVd35Zd2Vtv2653U/XKXts1y819r77rDYtiMOwtHsqmXHRVrI0p+5r3mKwfe8mKcTLOvvSTbJSEcrVcVPsu0tcu"
    "BslrTBL7Ob1ovqdFc3J++nRb1xeD5ent/a7l90azME9i6jBPY+p41M/3sf9P0j8Mzv4Fb7ar1cGa3WEX9SYe42bbvR45vq73"
    "vt6KBodB76N5Mjvc6W1p9uHS2OnjcrOp4leZzV/+Ap0xlHc=")


def old_folder(directory):
    directory.mkdir()
    for name, data in ((LOG_FILE, OLD_LOG), (SNAPSHOT_FILE, OLD_SNAPSHOT)):
        (directory / name).write_bytes(zlib.decompress(base64.b64decode("".join(data))))
    return directory


def check(store, leased_done=False):
    first = store.result(32512)
    assert first["result_data"] == result_string([1, 2, 3]) and first["contributor"] == "alice"
    assert list(decode_rtt(first["rtt_us"])) == [11, 22, 33]
    assert store.result(32640)["result_data"] == result_string([5])
    assert store.result(32544)["result_data"] == result_string([9])
    assert store.state_of(32576) == State.ERROR
    assert store.state_of(LEASED) == (State.DONE if leased_done else State.IN_PROGRESS)
    assert store.progress()["done_tasks"] == 3 + leased_done
    assert {c.name: c.tasks_done for c in store.contributors()} == {
        "alice": 1, "10.0.0.2": 1, "bob": 1, "10.0.0.5": 1, **({"10.0.0.4": 1} if leased_done
                                                               else {})}
    assert store.counters()["damaged_records"] == 0


def test_an_old_folder_is_upgraded_with_nothing_lost(tmp_path, capsys):
    data = old_folder(tmp_path / "data")
    old_log = (data / LOG_FILE).read_bytes()
    clock = Clock(1e6 + 60)                           # the old leases are still live
    store = Store(data, scope=SCOPE8, clock=clock)
    assert "upgraded" in capsys.readouterr().err
    check(store)
    with pytest.raises(Refused):                      # the old lease still means its token
        store.submit(LEASED, result_string([1]), holder="10.0.0.9", token="forged")
    store.submit(LEASED, result_string([4]), holder="10.0.0.4", token=LEASE_TOKEN)
    store.close()
    kept = [p.name for p in data.iterdir() if ".unframed-" in p.name]
    assert sorted(n.split(".unframed-")[0] for n in kept) == [SNAPSHOT_FILE, LOG_FILE]
    assert (data / next(n for n in kept if n.startswith(LOG_FILE))).read_bytes() == old_log
    store = Store(data, scope=SCOPE8, clock=clock)    # today's format now: opened as is
    assert "upgraded" not in capsys.readouterr().err
    check(store, leased_done=True)
    assert store.result(LEASED)["result_data"] == result_string([4])
    store.close()


def test_a_crash_mid_upgrade_leaves_the_old_folder_to_upgrade_again(tmp_path, monkeypatch):
    import upgrade
    data = old_folder(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in data.iterdir()}

    def crash(*args):
        raise KeyboardInterrupt                       # stands for the kill: nothing after runs
    monkeypatch.setattr(upgrade.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        Store(data, scope=SCOPE8, clock=Clock(1e6))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != "census.lock"} == before
    store = Store(data, scope=SCOPE8, clock=Clock(1e6 + 60))
    check(store)
    store.close()
