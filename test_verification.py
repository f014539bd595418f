"""A census over HTTP with many holders, each a distinct loopback address (127.0.0.x): honest
volunteers whose results differ by realistic noise (loss, hosts coming and going), one liar of
each kind, and an original client sending the string form. Results are simulated (no packet
is sent); the server, store, verifier and journal are the real ones."""
import base64
import http.client
import ipaddress
import random
import zlib

import trust
from conftest import Clock, answer
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
