"""A census over HTTP with many holders, each a distinct loopback address (127.0.0.x): honest
volunteers whose results differ by realistic noise (loss, hosts coming and going), one liar of
each kind, and an original client sending the string form. Results are simulated (no packet
is sent); the server, store, verifier and journal are the real ones."""
import array
import base64
import http.client
import ipaddress
import random
import zlib

import icmp
import ping_client
import trust
from conftest import Clock, Running, answer
from store import Store

BLOCK = 65536
ALL = (1 << BLOCK) - 1
LOOP = 32512                                   # task of 127.0.0.0/16
BLOCKS = 64                                    # the scope 127.0.0.0/10


class World:
    """The truth of every block, and what each kind of holder claims it saw."""

    def __init__(self, seed=10):
        self.rng = random.Random(seed)
        self.density = {t: self.rng.choice((1, 4, 8)) for t in range(LOOP, LOOP + BLOCKS)}
        self.truth = {t: self.sparse(ands) for t, ands in self.density.items()}

    def sparse(self, ands: int) -> int:
        """Random bits, each set with probability 2**-ands."""
        value = ALL
        for _ in range(ands):
            value &= self.rng.getrandbits(BLOCK)
        return value

    def honest(self, task: int, loss_ands: int) -> int:
        """The truth less lost replies (2**-loss_ands of them), plus hosts that came up (as
        many as 1/64 of those that answer)."""
        return (self.truth[task] & ~self.sparse(loss_ands)) | self.sparse(self.density[task] + 6)

    def lie(self, kind: str, task: int) -> int:
        neighbour = LOOP + (task - LOOP + 1) % BLOCKS
        return {"zeros": 0, "ones": ALL, "random": self.sparse(self.density[task]),
                "copy": self.honest(neighbour, 6),
                "half": self.honest(task, 6) & (ALL >> (BLOCK // 2))}[kind]


class Holder:
    """One volunteer at its own loopback address, on a keep-alive connection."""

    def __init__(self, port, address, name, claim, compact=True):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                               source_address=(address, 0))
        self.address, self.name, self.claim, self.compact = address, name, claim, compact
        self.submitted = 0

    def turn(self) -> int | None:
        """Get a task, claim a result for it, submit it; the task, or None if none was given."""
        path = f"/get_task?name={self.name}" if self.compact else "/get_task"
        status, _, task = answer(self.conn, "GET", path)
        assert status == 200, task
        if "task_index" not in task:
            return None
        bits = self.claim(task["task_index"])
        status, _, reply = answer(self.conn, "POST", "/submit_result", self.body(task, bits))
        assert (status, reply) == (200, {"success": True}), (self.name, reply)
        self.submitted += 1
        return task["task_index"]

    def body(self, task, bits: int) -> dict:
        if not self.compact:             # the original client: string form, no name, no lease
            return {"task_index": str(task["task_index"]),
                    "result": {"success": True, "result_data": format(bits, "065536b")}}
        packed = base64.b64encode(zlib.compress(bits.to_bytes(BLOCK // 8, "big"))).decode()
        return {"task_index": task["task_index"], "lease": task["lease"], "name": self.name,
                "result": {"success": True, "bitmap": packed}}


def test_a_census_with_liars_ends_with_honest_results(census_server):
    world = World()
    srv = census_server("127.0.0.0/10", store_kw={"verify": 0.05, "rng": random.Random(1).random})
    honest = [Holder(srv.port, f"127.0.0.{11 + n}", f"honest{n}",
                     (lambda ands: lambda t: world.honest(t, ands))(4 + n % 4)) for n in range(10)]
    honest.append(Holder(srv.port, "127.0.0.10", "seed", lambda t: world.honest(t, 6),
                         compact=False))
    liars = [Holder(srv.port, f"127.0.0.{21 + n}", kind, (lambda k: lambda t: world.lie(k, t))(kind))
             for n, kind in enumerate(("zeros", "ones", "random", "copy", "half"))]
    touched, flagged_after = set(), {}
    store = srv.store
    everyone = honest + liars
    for _ in range(400):
        gave = False
        world.rng.shuffle(everyone)              # who asks next is anybody's guess
        for holder in everyone:
            task = holder.turn()
            gave |= task is not None
            if holder in liars and task is not None:
                touched.add(task)
            if holder in liars and holder.name not in flagged_after and store.standing(holder.name)["flagged"]:
                flagged_after[holder.name] = holder.submitted
        if not gave:
            break
    progress = srv.call("GET", "/get_progress")[2]
    assert (progress["done_tasks"], progress["available_tasks"], progress["in_progress"]) == (BLOCKS, 0, 0)
    assert progress["checks_waiting"] == 0 and progress["verified_tasks"] > 0
    people = {c["name"]: c for c in srv.call("GET", "/contributors")[2]["contributors"]}
    flagged = {name for name, person in people.items() if person["flagged"]}
    assert flagged == {liar.name for liar in liars}            # no honest one, the seed included
    assert sorted(flagged_after) == sorted(liar.name for liar in liars)
    assert max(flagged_after.values()) <= 4, flagged_after       # flagged within a few blocks
    for task in range(LOOP, LOOP + BLOCKS):
        status, _, info = srv.call("GET", f"/task?id={task}")
        kept = info["verification"]["kept"]
        assert kept not in {liar.name for liar in liars}, (task, info)
        result = srv.call("GET", f"/result?id={task}")[2]
        stored = int(result["result_data"], 2).to_bytes(BLOCK // 8, "big")
        truth = world.truth[task].to_bytes(BLOCK // 8, "big")
        assert trust.agreement(stored, truth).agrees
    assert touched and all(people[liar.name]["tasks_done"] == 0 for liar in liars)
    metrics = srv.call("GET", "/metrics")[2].decode()
    assert "census_verification_disputes_total" in metrics and "census_contributors_flagged 5" in metrics


def test_verification_state_survives_a_restart_and_a_compaction(tmp_path):
    """A check handed out, a dispute, a flag: the same after reopening, and after a compaction."""
    clock = Clock()

    def open_store():
        return Store(tmp_path / "data", scope=[ipaddress.IPv4Network("127.0.0.0/15")], clock=clock,
                     verify=0.05)

    store = open_store()
    honest, lie = bitmap_b64(range(0, 65536, 3)), bitmap_b64(())
    first = store.get_task("127.0.0.11", name="a")
    store.submit(first.task, None, bitmap=honest, holder="127.0.0.11", token=first.lease.token, name="a")
    check = store.get_task("127.0.0.12", name="liar")
    assert check.task == first.task                       # the check comes first
    store.submit(check.task, None, bitmap=lie, holder="127.0.0.12", token=check.lease.token, name="liar")
    leased = store.get_task("127.0.0.13", name="b")       # the dispute, leased
    assert leased.task == first.task
    before = (store._verifier.blocks, store._verifier.standings, store.standing("liar"),
              store.task_info(first.task)["verification"])
    store.close()
    for compact in (False, True):
        store = open_store()
        if compact:
            with store._lock:
                store._journal.compact()
        after = (store._verifier.blocks, store._verifier.standings, store.standing("liar"),
                 store.task_info(first.task)["verification"])
        assert after == before and before[3]["status"] == "disputed" and before[3]["checking"]
        store.close()
    store = open_store()
    store.submit(leased.task, None, bitmap=honest, holder="127.0.0.13", token=leased.lease.token, name="b")
    assert store.task_info(first.task)["verification"]["status"] == "verified"
    assert store.standing("liar") == {"verified": 0, "disputed": 1, "unverified": 0, "flagged": False}
    assert [c.name for c in store.contributors()] == ["a", "b", "liar"]
    assert store.contributors()[2].tasks_done == 0          # its credit taken back
    store.close()


def bitmap_b64(ones) -> str:
    value = 0
    for k in ones:
        value |= 1 << (BLOCK - 1 - k)
    return base64.b64encode(zlib.compress(value.to_bytes(BLOCK // 8, "big"))).decode()


def test_concurrent_holders_with_checks_never_deadlock(census_server):
    """Checks and first results from eight holders at once (a check once waited for the
    journal holding the store's lock)."""
    import threading
    world = World(seed=3)
    srv = census_server("127.0.0.0/10", store_kw={"verify": 0.05})
    holders = [Holder(srv.port, f"127.0.0.{31 + n}", f"h{n}", lambda t: world.honest(t, 6))
               for n in range(8)]
    threads = [threading.Thread(target=lambda h=h: [None for _ in iter(h.turn, None)], daemon=True)
               for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    progress = srv.call("GET", "/get_progress")[2]
    assert progress["done_tasks"] == BLOCKS and progress["verified_tasks"] > 8


# -- a block several sweeps built (a first result with holes, the holes swept by another) --------

SWEEPERS = {"a": "127.0.0.51", "b": "127.0.0.52"}
LOWER, UPPER = "127.0.0.0/17", "127.0.128.0/17"
THIRDS = range(0, BLOCK, 3)                    # the truth; each half its responders
LOW, HIGH = range(0, BLOCK // 2, 3), range(BLOCK // 2 + 1, BLOCK, 3)


def ask(srv, name, address, within=None) -> dict:
    """/get_task's answer to `name` at `address` (asking for blocks `within`, if given)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10, source_address=(address, 0))
    query = f"name={name}" + (f"&within={within}" if within else "")
    handout = answer(conn, "GET", f"/get_task?{query}")[2]
    conn.close()
    return handout


def send(srv, name, address, handout, ones, skipped=None):
    """Submit `ones` (and `skipped`, a CIDR or a list of them) for `handout`: (status, reply)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10, source_address=(address, 0))
    body = {"task_index": handout["task_index"], "lease": handout["lease"], "name": name,
            "result": {"success": True, "bitmap": bitmap_b64(ones)},
            "skipped": [skipped] if isinstance(skipped, str) else skipped or []}
    status, _, reply = answer(conn, "POST", "/submit_result", body)
    conn.close()
    return status, reply


def sweep(srv, name, address, ones, skipped=None, within=None):
    """`name` at `address` takes the next hand-out and sweeps it (but `skipped`)."""
    handout = ask(srv, name, address, within)
    assert send(srv, name, address, handout, ones, skipped) == (200, {"success": True})
    return handout


def offered(srv, address, name):
    """What /get_task hands `name` at `address`: a task index, or None."""
    return ask(srv, name, address).get("task_index")


def never_offered_to_its_sweepers(srv):
    """Neither sweeper is handed the check, by its name (from another address) nor by its
    address (under another name); all 127.0.0.0/16 holds is that check."""
    for name, address in SWEEPERS.items():
        assert offered(srv, "127.0.0.53", name) is None, name          # by name
        assert offered(srv, address, "someone") is None, address       # by address
        assert offered(srv, address, name) is None


def test_a_block_built_from_holes_is_never_checked_by_any_of_its_sweepers(tmp_path):
    """a sweeps the lower half, b the upper (the holes a left): neither may check the block,
    nor after a restart from the log alone, nor after a compaction; a third holder may, and its
    agreement verifies it, each sweeper credited and trusted for its own half."""
    def restart(srv, from_log=False):
        srv.stop()
        if from_log:                                 # the state from the log's records alone
            (tmp_path / "data" / "census.json").unlink()
        return Running(tmp_path / "data", "127.0.0.0/16", clock, 60, {"verify": 0.05},
                       static_dir=tmp_path)

    clock = Clock()
    srv = Running(tmp_path / "data", "127.0.0.0/16", clock, 60, {"verify": 0.05},
                  static_dir=tmp_path)
    try:
        assert sweep(srv, "a", SWEEPERS["a"], LOW, UPPER)["task_index"] == LOOP
        assert sweep(srv, "b", SWEEPERS["b"], HIGH, LOWER)["exclude"] == [LOWER]  # the holes
        info = srv.call("GET", f"/task?id={LOOP}")[2]
        assert (info["state"], info["not_probed"], info["contributor"]) == (2, [], "b")
        assert info["verification"]["status"] == "waiting"
        assert info["verification"]["kept_sweepers"] == ["a", "b"]
        never_offered_to_its_sweepers(srv)
        srv = restart(srv, from_log=True)
        never_offered_to_its_sweepers(srv)
        with srv.store._lock:
            srv.store._journal.compact()
        srv = restart(srv)
        never_offered_to_its_sweepers(srv)
        assert sweep(srv, "c", "127.0.0.54", THIRDS)["task_index"] == LOOP    # the check
        assert srv.call("GET", f"/task?id={LOOP}")[2]["verification"]["status"] == "verified"
        people = {c["name"]: c for c in srv.call("GET", "/contributors")[2]["contributors"]}
        for name in "ab":
            assert (people[name]["tasks_done"], people[name]["addresses_probed"]) == (1, BLOCK // 2)
            assert srv.store.standing(name)["verified"] == 1
    finally:
        srv.stop()


def test_a_liar_filling_holes_loses_the_dispute_not_the_sweeper_before_it(tmp_path):
    """An honest lower half by a, the upper half (its holes) filled with zeros by b: the
    honest checks outvote the block, b loses the dispute and b's credit, a keeps both."""
    store = Store(tmp_path / "data", scope=[ipaddress.IPv4Network("127.0.0.0/16")], clock=Clock())
    for name, ones, skipped in (("a", LOW, UPPER), ("b", (), LOWER), ("c", THIRDS, None),
                                ("d", THIRDS, None)):
        address = f"127.0.0.{ord(name)}"
        handout = store.get_task(address, name=name)
        assert handout.task == LOOP, name
        store.submit(LOOP, None, bitmap=bitmap_b64(ones), holder=address, token=handout.lease.token,
                     name=name, skipped=[skipped] if skipped else None)
    verification = store.task_info(LOOP)["verification"]
    assert (verification["status"], verification["kept"]) == ("verified", "d")
    assert store.standing("a") == {"verified": 1, "disputed": 0, "unverified": 0, "flagged": False}
    assert store.standing("b")["disputed"] == 1
    people = {c.name: c for c in store.contributors()}
    assert (people["a"].tasks_done, people["b"].tasks_done) == (1, 0)
    assert people["b"].addresses_probed == 0
    store.close()


def test_a_single_sweep_block_is_checked_as_before(census_server):
    """One sweep, one contributor: not offered to it by name nor address, offered to another;
    credited for the whole block."""
    srv = census_server("127.0.0.0/16", store_kw={"verify": 0.05})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10,
                                      source_address=("127.0.0.51", 0))
    handout = answer(conn, "GET", "/get_task?name=a")[2]
    body = {"task_index": handout["task_index"], "lease": handout["lease"], "name": "a",
            "result": {"success": True, "bitmap": bitmap_b64(THIRDS)}}
    assert answer(conn, "POST", "/submit_result", body)[::2] == (200, {"success": True})
    verification = srv.call("GET", f"/task?id={LOOP}")[2]["verification"]
    assert verification["kept_sweepers"] == ["a"] and verification["contributors"] == ["a"]
    assert offered(srv, "127.0.0.53", "a") is None and offered(srv, "127.0.0.51", "z") is None
    assert offered(srv, "127.0.0.54", "c") == LOOP
    person = srv.call("GET", "/contributors")[2]["contributors"][0]
    assert (person["name"], person["tasks_done"], person["addresses_probed"]) == ("a", 1, BLOCK)


# census.log as main at cebe4f2 wrote it (verify 0.05, scope 127.0.0.0/15, no snapshot: as kill -9
# leaves it): 32512 swept whole by "solo" (127.0.0.61), waiting for its check; 32513 swept by "a"
# (127.0.0.51) in its lower half, the upper half a hole (records then had no earlier sweeps).
OLD_LOG = (
    "eNrt2j1v01AUBmAXEDNsCJboiAGh23C/7NiWGEq6tEUwAFWlKw8OtCWqlUDchEhRVIEQMCI2xNqBhYkNBv4LAz8AKSOCe20X2Uj5"
    "AVTvqydyvs65SZTx7d65J7wqv23c9Yq9fb727YZZ3NyaUTbcp7hFusdVFD1SvUhLLbmkedeOrpzMHpWX2/a29fXn4kvnA5tRTrFg"
    "lFFsaG81O7g7PZBP5eP+dnqrn+Ybm501YiLkLgHnbc5IyE7b3mkHgthemuW7CaOJXVKcdaZ+VsvzLtrDH4y6n95cePn63cZVAAAA"
    "AAAAAAAAAAAAAAAA+M/NXMtgMM4y5koHktEhxcYYyofZkJq9AilCHbDA91XADkfjXebGkoSZhHEmEkbPKJ6Vg7Hh9rmyiDBn9DB3"
    "S6udolpRrqtqDLyoMdQf2MU0smMiilgoImn3nSyoj9Q/lH3HsrZE44uIwNdKCh66EeMOGhR9i4n9AYrCxNmqL7FSK2d8fP7+eHz+"
    "xXGjnLG2sz9Z3ZxOtwdPUtUL7/fXd/rjpeUMv1nOUMVZ5+pntTzvrb28uvT9x/XF5V/4gwIAAAAAAACcfh6CIAiCIAiCIAiCIKc+"
    "zXIGLwsRYcj130ZE+k8dQvBIKqZkJwjdy8v6CY1KgpBSc19L5bs6hCmHXaPCT6puhCz6Cnr+B3CfqJ0=")


def test_a_folder_written_before_sweeps_were_recorded_still_loads(tmp_path):
    """Its single-sweep block keeps its check from "solo"; its half-done block, filled by b,
    knows both sweepers, and keeps the check from either."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "census.log").write_bytes(zlib.decompress(base64.b64decode(OLD_LOG)))
    store = Store(folder, scope=[ipaddress.IPv4Network("127.0.0.0/15")], clock=Clock())
    assert store.task_info(LOOP)["verification"]["status"] == "waiting"
    assert store.get_task("127.0.0.99", name="solo", within=[ipaddress.IPv4Network("127.0.0.0/16")]) is None
    assert store.task_info(LOOP + 1)["not_probed"] == ["127.1.128.0/17"]
    handout = store.get_task("127.0.0.52", name="b", within=[ipaddress.IPv4Network("127.1.0.0/16")])
    assert handout.task == LOOP + 1 and handout.exclude == ["127.1.0.0/17"]
    store.submit(LOOP + 1, None, bitmap=bitmap_b64(HIGH), holder="127.0.0.52",
                 token=handout.lease.token, name="b", skipped=["127.1.0.0/17"])
    assert store.task_info(LOOP + 1)["verification"]["kept_sweepers"] == ["a", "b"]
    for address, name in (("127.0.0.51", "z"), ("127.0.0.98", "a"), ("127.0.0.52", "y")):
        check = store.get_task(address, name=name)          # solo's block's check, or none
        assert check is None or check.task == LOOP, (address, name)
    assert store.get_task("127.0.0.99", name="c").task == LOOP + 1       # to another holder
    store.close()


# -- checks and volunteers that sweep part of a block (--only, sent as within=; their own --exclude)

def verification(srv, task) -> dict:
    return srv.call("GET", f"/task?id={task}")[2]["verification"]


def test_a_check_goes_only_to_a_holder_whose_within_covers_the_block(census_server):
    """A /17 of a block waiting for its check: never handed the check, still handed ordinary
    work in its range; a within covering the block (by two /17s, or with the operator's own
    exclusion) is handed it."""
    srv = census_server("127.0.0.0/14", store_kw={
        "verify": 0.05, "exclude": [ipaddress.IPv4Network("127.1.128.0/17")]})
    sweep(srv, "a", "127.0.0.51", THIRDS, within="127.0.0.0/16")
    assert sweep(srv, "a", "127.0.0.51", LOW, "127.1.128.0/17",
                 within="127.1.0.0/16")["exclude"] == ["127.1.128.0/17"]     # the operator's
    assert [verification(srv, t)["status"] for t in (LOOP, LOOP + 1)] == ["waiting", "waiting"]
    assert ask(srv, "only", "127.0.0.52", LOWER) == {"error": "No tasks available"}
    handout = ask(srv, "only", "127.0.0.52", f"{LOWER},127.2.0.0/17")
    assert handout["task_index"] == LOOP + 2                     # ordinary work, in its range
    assert srv.call("GET", f"/task?id={LOOP + 2}")[2]["state"] == 1
    assert not any(verification(srv, t)["checking"] for t in (LOOP, LOOP + 1))
    assert ask(srv, "half", "127.0.0.53", "127.1.0.0/17")["task_index"] == LOOP + 1   # a check
    assert ask(srv, "both", "127.0.0.54", f"{LOWER},{UPPER}")["task_index"] == LOOP  # a check
    assert all(verification(srv, t)["checking"] for t in (LOOP, LOOP + 1))


def test_a_check_with_holes_is_refused_not_judged_and_goes_to_another(census_server):
    """A plain holder with its own --exclude is handed a check (it does not say what it skips):
    the result with holes is refused 422 and judged against nobody; it is handed other work,
    and another holder's check verifies the block."""
    srv = census_server("127.0.0.0/15", store_kw={"verify": 0.05})
    sweep(srv, "a", "127.0.0.51", THIRDS)
    check = ask(srv, "x", "127.0.0.52")
    assert check["task_index"] == LOOP and verification(srv, LOOP)["checking"]
    status, reply = send(srv, "x", "127.0.0.52", check, range(0, BLOCK // 2, 3), UPPER)
    assert status == 422 and reply["success"] is False
    assert "127.0.128.0/17 was not probed: not judged" in reply["error"]
    assert verification(srv, LOOP) == {"status": "waiting", "opinions": 1, "contributors": ["a"],
                                       "kept": "a", "checking": False, "kept_sweepers": ["a"]}
    assert srv.store.standing("x") == {"verified": 0, "disputed": 0, "unverified": 0,
                                       "flagged": False}
    assert ask(srv, "x", "127.0.0.52")["task_index"] == LOOP + 1        # not the check again
    assert sweep(srv, "c", "127.0.0.53", THIRDS)["task_index"] == LOOP   # another's check
    assert verification(srv, LOOP)["status"] == "verified"


def test_an_honest_only_volunteer_is_never_flagged_while_checks_wait(census_server):
    """A small census: three plain honest holders and one --only volunteer (the lower /17 of
    every block) taking turns while checks wait. The volunteer is never handed a check, sweeps
    its halves, is never disputed nor flagged; every block ends verified."""
    srv = census_server("127.0.0.0/13", store_kw={"verify": 0.05, "rng": random.Random(3).random})
    blocks = range(LOOP, LOOP + 8)
    only = ",".join(f"127.{t - LOOP}.0.0/17" for t in blocks)
    holders = [(f"h{n}", f"127.0.0.{61 + n}", None) for n in range(3)]
    holders.append(("only", "127.0.0.60", only))
    rng, swept, checks, waited = random.Random(1), 0, 0, False
    for _ in range(40):
        rng.shuffle(holders)
        gave = False
        for name, address, within in holders:
            if within is not None:
                waited |= srv.call("GET", "/get_progress")[2]["checks_waiting"] > 0
            handout = ask(srv, name, address, within)
            if "task_index" not in handout:
                continue
            gave, task = True, handout["task_index"]
            net = f"127.{task - LOOP}"
            if within is None:           # the whole block, or the holes the volunteer left
                holes = handout["exclude"] == [f"{net}.0.0/17"]
                assert holes or handout["exclude"] == []
                ones, skipped = (HIGH, handout["exclude"]) if holes else (THIRDS, None)
            else:                        # its half, whatever it was handed
                checks += bool(verification(srv, task))
                ones, skipped = LOW, [f"{net}.128.0/17"]
            status, reply = send(srv, name, address, handout, ones, skipped)
            assert (status, reply) == (200, {"success": True}), (name, task, reply)
            swept += within is not None
        if not gave:
            break
    assert waited and swept > 0 and checks == 0
    assert srv.store.standing("only")["disputed"] == 0
    people = {c["name"]: c for c in srv.call("GET", "/contributors")[2]["contributors"]}
    assert not any(person["flagged"] for person in people.values())
    assert people["only"]["tasks_done"] == swept and people["only"]["verified"] == swept
    assert all(verification(srv, t)["status"] == "verified" for t in blocks)


def test_plain_holders_are_handed_and_judged_checks_as_before(census_server):
    """No within, no holes: an original client (string form, no name) is handed the check and
    its disagreement is judged; a check skipping only the operator's exclusion is judged too."""
    srv = census_server("127.0.0.0/15", store_kw={
        "verify": 0.05, "exclude": [ipaddress.IPv4Network("127.1.128.0/17")]})
    sweep(srv, "a", "127.0.0.51", THIRDS)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10,
                                      source_address=("127.0.0.70", 0))
    check = answer(conn, "GET", "/get_task")[2]
    assert check["task_index"] == LOOP
    body = {"task_index": str(LOOP), "result": {"success": True, "result_data": "0" * BLOCK}}
    assert answer(conn, "POST", "/submit_result", body)[::2] == (200, {"success": True})
    conn.close()
    assert verification(srv, LOOP)["status"] == "disputed"              # judged, as before
    assert sweep(srv, "c", "127.0.0.53", THIRDS)["task_index"] == LOOP
    assert verification(srv, LOOP)["status"] == "verified"
    assert sweep(srv, "a", "127.0.0.51", LOW, "127.1.128.0/17")["task_index"] == LOOP + 1
    assert sweep(srv, "d", "127.0.0.54", LOW, "127.1.128.0/17")["task_index"] == LOOP + 1
    assert verification(srv, LOOP + 1)["status"] == "verified"


# -- halves swept by the real client: its stats count its own --only as excluded, and its skipped
# lists it (both), so a part's addresses probed are counted on the server, on the spans it probed

def client_sweep(srv, name, address, ones, only=(), handout=None):
    """`name` at `address` runs ping_client --only `only` on `handout` (by default its next
    one), `ones` answering:
    the sweep's status has the client's own exclusions EXCLUDED (ping_client.check_task), the
    body is ping_client.submission_body's. The task index."""
    handout = handout or ask(srv, name, address, ",".join(only) or None)
    task = ping_client.parse_task(handout)
    options = ping_client.SweepOptions(0, 1, 0.0, None, (ipaddress.IPv4Network("127.0.0.0/8"),),
                                       (), tuple(map(ipaddress.IPv4Network, only)))
    base, status = int(task.network.network_address), bytearray(BLOCK)
    icmp._mark_excluded(range(base, base + BLOCK), icmp._spans(ping_client.check_task(task, options)), status)
    for k in ones:
        status[k] = icmp.Status.ECHO_REPLY
    counts = dict.fromkeys(icmp.SweepStats._fields, 0)
    counts.update(excluded=status.count(icmp.Status.EXCLUDED), replies=len(ones), rounds=1,
                  elapsed=1.0, kind="fake")
    counts["sent"] = BLOCK - counts["excluded"]
    result = icmp.SweepResult(range(base, base + BLOCK), status, bytearray(BLOCK),
                              array.array("I", bytes(4 * BLOCK)), icmp.SweepStats(**counts))
    body = ping_client.submission_body(task, result, name)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10, source_address=(address, 0))
    assert answer(conn, "POST", "/submit_result", body)[::2] == (200, {"success": True}), name
    conn.close()
    return task.index


def thirds(first, last):
    """THIRDS (the truth) on offsets first..last."""
    return range(first + -first % 3, last + 1, 3)


def test_halves_swept_with_the_real_clients_stats_are_each_credited_and_trusted(census_server):
    """a and b each sweep half of what a block leaves to probe, with ping_client --only (its
    stats: probed 32,768, excluded 32,768): in 127.0/16, and in 127.1/16 where the operator
    excludes the upper /17. Each is credited half of each block's addresses, the blocks count
    all they probed, and once c checks them each of a and b has gained trust for both."""
    srv = census_server("127.0.0.0/15", store_kw={
        "verify": 0.05, "exclude": [ipaddress.IPv4Network("127.1.128.0/17")]})
    assert client_sweep(srv, "a", "127.0.0.51", LOW, [LOWER]) == LOOP
    assert client_sweep(srv, "b", "127.0.0.52", HIGH, [UPPER]) == LOOP         # a's holes
    assert client_sweep(srv, "a", "127.0.0.51", thirds(0, 16383), ["127.1.0.0/18"]) == LOOP + 1
    assert client_sweep(srv, "b", "127.0.0.52", thirds(16384, 32767), ["127.1.64.0/18"]) == LOOP + 1
    for task, probed in ((LOOP, BLOCK), (LOOP + 1, BLOCK // 2)):
        info = srv.call("GET", f"/task?id={task}")[2]
        assert (info["probed"], info["verification"]["kept_sweepers"]) == (probed, ["a", "b"])
    people = {c["name"]: c for c in srv.call("GET", "/contributors")[2]["contributors"]}
    for name in "ab":
        assert (people[name]["tasks_done"], people[name]["addresses_probed"]) == (2, 32768 + 16384)
    truth = {LOOP: THIRDS, LOOP + 1: thirds(0, 32767)}
    for _ in truth:                                              # c checks both, whole
        handout = ask(srv, "c", "127.0.0.53")
        client_sweep(srv, "c", "127.0.0.53", truth[handout["task_index"]], handout=handout)
    assert all(verification(srv, task)["status"] == "verified" for task in truth)
    for name in "ab":
        assert srv.store.standing(name) == {"verified": 2, "disputed": 0, "unverified": 0,
                                            "flagged": False}, name
