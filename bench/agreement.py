"""How far two honest sweeps of one block agree, and how far each kind of liar does (not a test).

    sudo python3 bench/agreement.py [--loss 0.02,0.10] [--gap 2]

For each loss rate it builds a sealed lab namespace (conftest.Lab: only `lo`, only 127.0.0.1/8;
the dead set of 127.0.128.0/17 and every last octet % 7, so 28,032 of 127.0.0.0/16 answer; that
fraction of echo requests dropped at random on top), sweeps 127.0.0.0/16 twice with icmp.py,
`--gap` seconds apart, and 127.1.0.0/16 once (the block a copying liar copies), then scores:

    honest vs honest      the two sweeps of 127.0.0.0/16
    all zeros             a liar who says nothing answered
    all ones              ... that everything answered
    random bits           ... random bits of the block's density
    copy of 127.1/16      ... another block's honest result
    skipping half         ... an honest sweep of a random half, the rest reported silent

against the first honest sweep, printing trust.agreement()'s score (the smaller share of each
side's responders the other confirms), Jaccard beside it, and whether they agree at
trust.AGREE_AT. Only 127.0.0.0/16 and 127.1.0.0/16 are ever probed, inside the namespace.
"""
import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import conftest  # noqa: E402  (the lab lives beside the tests)
import trust     # noqa: E402

BLOCK = "127.0.0.0/16"
OTHER = "127.1.0.0/16"
ICMP_PY = os.path.join(ROOT, "icmp.py")
ALL = (1 << 65536) - 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="0.02,0.10", help="loss rates, comma-separated")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between honest sweeps")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    why = conftest.lab_missing()
    if why:
        print(f"bench/agreement.py: {why}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    print(f"threshold: agree when score >= {trust.AGREE_AT} or at most {trust.SLACK} "
          f"addresses differ", flush=True)
    for loss in (float(x) for x in args.loss.split(",")):
        box = conftest.Lab(conftest.new_lab_name(), drop=True, loss=loss)
        try:
            box.up()
            first = sweep(box, BLOCK)
            time.sleep(args.gap)
            second, other = sweep(box, BLOCK), sweep(box, OTHER)
        finally:
            box.down()
        print(f"\nloss {loss:.0%}: {first.bit_count():,} and {second.bit_count():,} responders "
              f"in two sweeps of {BLOCK} (the lab's truth: 28,032), {other.bit_count():,} in {OTHER}")
        for label, claimed in liars(first, second, other, rng):
            show(label, first, claimed)
    return 0


def liars(first: int, second: int, other: int, rng):
    """(label, the claimed responders as an int bitmap) for the honest peer and each liar."""
    density = first.bit_count() / 65536
    random_bits = sum(1 << k for k in range(65536) if rng.random() < density)
    half = sum(1 << k for k in range(65536) if rng.random() < 0.5)
    return [("honest vs honest", second), ("all zeros", 0), ("all ones", ALL),
            ("random bits", random_bits), (f"copy of {OTHER}", other),
            ("skipping half", second & half)]


def show(label: str, honest: int, claimed: int) -> None:
    score = trust.agreement(honest.to_bytes(8192, "big"), claimed.to_bytes(8192, "big"))
    union = (honest | claimed).bit_count()
    jaccard = score.shared / union if union else 1.0
    print(f"  {label:>20}: score {score.score:.3f}  Jaccard {jaccard:.3f}  "
          f"responders {score.ones:,}/{score.other_ones:,} shared {score.shared:,}  "
          f"{'AGREE' if score.agrees else 'disagree'}", flush=True)


def sweep(box, network: str) -> int:
    """The responders of one icmp.py sweep inside the lab, as an int bitmap (address 0 the top bit)."""
    done = box.run([sys.executable, ICMP_PY, network, "--allow", "127.0.0.0/8", "--cooldown", "1"])
    if done.returncode != 0:
        raise RuntimeError(f"icmp.py failed: {done.stderr.strip()}")
    status = json.loads(done.stdout)["status"]
    return int(status.replace("2", "0").replace("3", "0").replace("4", "0"), 2)


if __name__ == "__main__":
    sys.exit(main())
