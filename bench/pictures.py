"""Benchmark: CPU time to build /map.png for a full census of 65,536 done blocks, the first
time (every result read) and after one block changes (one band redrawn), and /block.png.

    python3 bench/pictures.py [--blocks 65536] [--real DIR]

A stand-in store serves synthetic results from memory; with --real DIR a real store.Store in
DIR is filled with the same synthetic results first (about a minute for a full census here:
every result is journalled; kept for the next run) and read from its log. Nothing is probed.
The machine is shared: figures are noisy, compare runs made at the same time.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pictures  # noqa: E402


class FakeStore:
    """The store methods CensusMap uses, over synthetic bitmaps (density varies by block)."""

    def __init__(self, blocks: int, seed=1):
        rng = random.Random(seed)
        self.version = 1
        self.map = bytearray(2 * 65536)
        self.bits = {}
        # a real census: about half the /16s answer nothing at all
        pool = [os.urandom(8192), bytes(8192), bytes(8192), b"\xff" * 8192]
        for task in range(blocks):
            self.map[2 * task] = 2
            bits = self.bits[task] = pool[rng.randrange(len(pool))]
            ones = int.from_bytes(bits).bit_count()
            self.map[2 * task + 1] = -(-255 * ones // 65536)

    def map_bytes(self):
        return self.version, bytes(self.map)

    def bitmaps(self):
        for task in sorted(self.bits):
            yield task, self.bits[task]

    def result(self, task):
        return {"result_data": format(int.from_bytes(self.bits[task], "big"), "065536b")}

    def exclude_of(self, task):
        return []


def real_store(directory, fake: FakeStore, threads=8):
    """A store.Store holding the fake store's results (submitted by ``threads`` at once, so
    that group commit shares the fsyncs)."""
    import ipaddress
    import threading
    from store import Store
    store = Store(directory, scope=[ipaddress.IPv4Network("0.0.0.0/0")])

    def work():
        while True:
            handout = store.get_task("127.0.0.1")
            if handout is None:
                return
            bits = fake.bits.get(handout.task, bytes(8192))
            store.submit(handout.task, format(int.from_bytes(bits, "big"), "065536b"),
                         holder="127.0.0.1", token=handout.lease.token, name="bench")
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return store


def cpu(fn):
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=65536)
    parser.add_argument("--real", metavar="DIR", help="measure over a real store in DIR")
    args = parser.parse_args()
    store = FakeStore(args.blocks)
    if args.real:
        started = time.monotonic()
        store = real_store(args.real, store)
        print(f"real store in {args.real}: {store.progress()['done_tasks']:,} blocks done "
              f"({time.monotonic() - started:.0f} s to fill or load)")
    warm, _ = cpu(lambda: (pictures._square_order(256), pictures._orientations(), pictures._tile_origin(), pictures._block_layout()))
    print(f"curve tables (once per process): {warm:.2f} s CPU")
    painter = pictures.CensusMap(4096)
    first, (_, data) = cpu(lambda: painter.render(store))
    print(f"/map.png 4096x4096, {args.blocks:,} done blocks, first build: {first:.2f} s CPU, "
          f"{len(data) / 1e6:.1f} MB")
    if args.real:
        store.get_task("127.0.0.1")                 # nothing left: changes nothing
        store.revise(12345, 0, force=True)          # one block back to the pool
    else:
        store.map[2 * 12345] = 0
        store.version += 1
    again, _ = cpu(lambda: painter.render(store))
    print(f"/map.png after one block changed: {again * 1000:.1f} ms CPU")
    same, _ = cpu(lambda: painter.render(store))
    print(f"/map.png, same version (cached): {same * 1e6:.0f} us CPU")
    small = pictures.CensusMap(1024)
    took, (_, data) = cpu(lambda: small.render(store))
    print(f"/map.png?size=1024 first build: {took:.2f} s CPU, {len(data) / 1e3:.0f} kB")
    took, data = cpu(lambda: pictures.block_png(store.result(1)["result_data"]))
    print(f"/block.png: {took * 1000:.1f} ms CPU, {len(data):,} bytes")


if __name__ == "__main__":
    main()
