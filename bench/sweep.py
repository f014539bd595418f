"""Benchmark of icmp.sweep against fping and zmap on a loopback-only lab (not a test).

    sudo python3 bench/sweep.py [--runs 3] [--skip-rate]

Builds its own network namespace (only `lo`, only 127.0.0.1/8, every address answers; torn
down whatever happens), then sweeps 127.0.0.0/16 inside it --runs times with icmp.py at
rate=0, fping and zmap (where installed; the flags of ../shared/lab/peer_bench.sh), taking
turns, then once with icmp.py at rate=10000. For every run it prints wall seconds (from
outside, interpreter start-up included), probes/s, replies matched and peak RSS (GNU time),
then the medians and our ratios to the peers. The machine is shared: run it when idle.

probes/s is measured the same way for every tool: echo requests received by the namespace's
kernel (Icmp InEchos), divided by the send window seen on the namespace's `lo` (its packet counter
sampled every 5 ms; the window runs from the first to the last 5 ms slice above 1,000
packets/s, so it includes the last replies). Our own figure (sent / time spent sending, from
SweepStats) is printed beside it.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import conftest  # noqa: E402  (the lab lives beside the tests)

TARGET = "127.0.0.0/16"   # the only block this bench ever probes
ICMP_PY = os.path.join(ROOT, "icmp.py")
TIME = shutil.which("time", path="/usr/bin:/bin")   # GNU time(1), for every tool's peak RSS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool at full speed")
    parser.add_argument("--skip-rate", action="store_true", help="skip the 6.5 s rate=10000 run")
    args = parser.parse_args(argv)
    why = conftest.lab_missing()
    if why:
        print(f"bench/sweep.py: {why}", file=sys.stderr)
        return 2
    box = conftest.Lab(conftest.new_lab_name(), drop=False)
    try:
        box.up()
        rows = run_all(Bench(box), args)
    finally:
        box.down()
    print_summary(rows)
    return 0


class Bench:
    """Runs commands in the lab, timing them and watching its `lo` and ICMP counters."""

    def __init__(self, box):
        self.box = box
        # zmap injects Ethernet frames into lo through a packet socket; the kernel calls such
        # 127/8 traffic martian unless route_localnet/accept_local are set (namespace only)
        box.run(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.lo.route_localnet=1",
                 "net.ipv4.conf.all.accept_local=1", "net.ipv4.conf.lo.accept_local=1"], check=True)
        # its /proc/PID/net/* are the lab's, once it has said so from inside
        self.anchor = box.popen(["sh", "-c", "echo ready; exec sleep 3600"],
                                stdout=subprocess.PIPE, text=True)
        self.anchor.stdout.readline()

    def time_run(self, argv, timeout=120):
        """(wall s, requests seen, send window s, stdout, peak RSS kB) of one command in the lab."""
        if TIME:
            argv = [TIME, "-f", "maxrss_kb=%M", *argv]
        before = self.requests()
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=self._sample, args=(samples, stop), daemon=True)
        sampler.start()
        started = time.monotonic()
        done = self.box.run(argv, timeout=timeout)
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        if done.returncode not in (0, 1):   # fping exits 1 when some target is silent
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        rss = [int(line.split("=")[1]) for line in done.stderr.splitlines() if line.startswith("maxrss_kb=")]
        return wall, self.requests() - before, send_window(samples), done.stdout, (rss or [0])[-1]

    def requests(self) -> int:
        """Echo requests the lab's kernel has received (the Icmp InEchos counter)."""
        with open(f"/proc/{self.anchor.pid}/net/snmp") as fh:
            names, values = [line.split() for line in fh if line.startswith("Icmp:")]
        return int(values[names.index("InEchos")])

    def _sample(self, samples, stop) -> None:
        path = f"/proc/{self.anchor.pid}/net/dev"
        while not stop.is_set():
            with open(path) as fh:
                line = next(row for row in fh if row.strip().startswith("lo:"))
            samples.append((time.monotonic(), int(line.split(":")[1].split()[1])))
            stop.wait(0.005)


def run_all(bench: Bench, args) -> list:
    """The tools take turns, run by run, so that a busy moment of the machine hits all alike."""
    peers = [tool for tool in ("fping", "zmap") if shutil.which(tool)]
    for tool in {"fping", "zmap"} - set(peers):
        print(f"{tool}: not installed, skipped")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            rows.append(run_ours(bench, rate=0, run=k + 1))
            if "fping" in peers:
                rows.append(run_fping(bench, run=k + 1))
            if "zmap" in peers:
                rows.append(run_zmap(bench, tmp, run=k + 1))
    if not args.skip_rate:
        rows.append(run_ours(bench, rate=10000, run=1))
    return rows


def run_ours(bench: Bench, rate: float, run: int) -> dict:
    argv = [sys.executable, ICMP_PY, TARGET, "--allow", "127.0.0.0/8", "--rate", rate, "--cooldown", 1]
    wall, requests, window, out, rss = bench.time_run(argv)
    report = json.loads(out)
    stats = report["stats"]
    own_pps = stats["sent"] / stats["send_seconds"] if stats["send_seconds"] else 0.0
    row = row_of(f"icmp.py rate={rate:g}", run, wall, requests, window, stats["replies"],
                 rss or report["max_rss_kb"])
    row["own_pps"] = own_pps
    print_row(row, f"own sent/send_s {own_pps:,.0f}/s  stray {stats['stray']} "
                   f"bad {stats['bad_payload']} dup {stats['duplicates']} kind {stats['kind']}")
    return row


def run_fping(bench: Bench, run: int) -> dict:
    argv = ["fping", "-a", "-q", "-r", "0", "-i", "0", "-t", "500", "-g", TARGET]
    wall, requests, window, out, rss = bench.time_run(argv)
    found = sum(1 for line in out.splitlines() if line.startswith("127."))
    row = row_of("fping", run, wall, requests, window, found, rss)
    print_row(row, "(fping -g skips the network and broadcast address: 65,534 probed)")
    return row


def run_zmap(bench: Bench, tmp: str, run: int) -> dict:
    blocklist, out_file = os.path.join(tmp, "empty_blocklist"), os.path.join(tmp, "zmap.out")
    open(blocklist, "w").close()
    argv = ["zmap", "-q", "--disable-syslog", "-M", "icmp_echoscan", "-i", "lo", "-G", "00:00:00:00:00:00",
            "--source-mac", "02:00:00:00:00:01", "-S", "127.0.0.1", "-b", blocklist, "-r", "0",
            "-P", "1", "-c", "2", "-o", out_file, TARGET]
    wall, requests, window, _, rss = bench.time_run(argv)
    with open(out_file) as fh:
        found = len({line.strip() for line in fh if line.startswith("127.")})
    row = row_of("zmap", run, wall, requests, window, found, rss)
    print_row(row, "(zmap waits its fixed -c 2 s cooldown)")
    return row


def row_of(tool, run, wall, requests, window, found, rss_kb) -> dict:
    return {"tool": tool, "run": run, "wall": wall, "requests": requests, "window": window,
            "pps": requests / window if window else 0.0, "found": found, "rss_mb": rss_kb / 1024}


def send_window(samples: list) -> float:
    """First to last 5 ms slice in which lo moved more than 1,000 packets/s."""
    busy = [(t0, t1) for (t0, n0), (t1, n1) in zip(samples, samples[1:])
            if t1 > t0 and (n1 - n0) / (t1 - t0) > 1000]
    return busy[-1][1] - busy[0][0] if busy else 0.0


def print_row(row: dict, note: str = "") -> None:
    print(f"{row['tool']:<20} run {row['run']}: wall {row['wall']:.3f} s  requests {row['requests']:,}  "
          f"window {row['window']:.3f} s  {row['pps']:,.0f} probes/s  found {row['found']:,}  "
          f"rss {row['rss_mb']:.1f} MB  {note}", flush=True)


def print_summary(rows: list) -> None:
    print("\nmedians (127.0.0.0/16 on a lossless lab; 65,536 addresses answer):")
    medians = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        med = {key: statistics.median(r[key] for r in mine) for key in ("wall", "pps", "found", "rss_mb")}
        medians[tool] = med
        print(f"  {tool:<20} wall {med['wall']:.3f} s  {med['pps']:,.0f} probes/s  found {med['found']:,.0f}  "
              f"rss {med['rss_mb']:.1f} MB  ({len(mine)} runs)")
    ours = medians.get("icmp.py rate=0")
    paced = [r for r in rows if r["tool"] == "icmp.py rate=10000"]
    if paced:
        achieved = paced[0]["own_pps"]
        print(f"  rate=10000: achieved {achieved:,.1f} probes/s ({(achieved / 10000 - 1) * 100:+.2f} %)")
    for peer, key, what in (("zmap", "pps", "probes/s"), ("fping", "pps", "probes/s"), ("fping", "wall", "wall")):
        if ours and peer in medians and medians[peer][key]:
            print(f"  icmp.py / {peer} {what}: {ours[key] / medians[peer][key]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
