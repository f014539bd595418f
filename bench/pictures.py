"""Benchmark: CPU time to build /map.png for a full census of 65,536 done blocks, the first
time (every result read) and after one block changes (one band redrawn), and /block.png.

    python3 bench/pictures.py [--blocks 65536]

A stand-in store serves synthetic results from memory (the real store reads them from its log
with pread: add that on top). Nothing is probed. The machine is shared: figures are noisy,
compare runs made at the same time.
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


def cpu(fn):
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=65536)
    args = parser.parse_args()
    store = FakeStore(args.blocks)
    warm, _ = cpu(lambda: (pictures._tiles(16), pictures._tile_origin(), pictures._block_layout()))
    print(f"curve tables (once per process): {warm:.2f} s CPU")
    painter = pictures.CensusMap(4096)
    first, (_, data) = cpu(lambda: painter.render(store))
    print(f"/map.png 4096x4096, {args.blocks:,} done blocks, first build: {first:.2f} s CPU, "
          f"{len(data) / 1e6:.1f} MB")
    store.map[2 * 12345] = 1
    store.version += 1
    again, _ = cpu(lambda: painter.render(store))
    print(f"/map.png after one block changed: {again * 1000:.1f} ms CPU")
    same, _ = cpu(lambda: painter.render(store))
    print(f"/map.png, same version (cached): {same * 1e6:.0f} us CPU")
    small = pictures.CensusMap(1024)
    took, (_, data) = cpu(lambda: small.render(store))
    print(f"/map.png?size=1024 first build: {took:.2f} s CPU, {len(data) / 1e3:.0f} kB")
    took, data = cpu(lambda: pictures.block_png(store.result(0)["result_data"]))
    print(f"/block.png: {took * 1000:.1f} ms CPU, {len(data):,} bytes")


if __name__ == "__main__":
    main()
