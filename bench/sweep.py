"""Benchmark of icmp.sweep against fping and zmap on a loopback-only lab (not a test).

    sudo python3 bench/sweep.py [--runs 3] [--paced-runs 3] [--skip-rate] [--skip-census]

Builds its own network namespaces (only `lo`, only 127.0.0.1/8; torn down whatever happens)
and measures, the tools taking turns run by run so that a busy moment hits all alike:

1. Flat out: 127.0.0.0/16 --runs times with icmp.py at rate=0, fping and zmap (where
   installed): wall seconds (from outside, interpreter start-up included), probes/s, replies
   matched, peak RSS (GNU time), the medians and our ratios to the peers.
2. At a volunteer's rate: 127.0.0.0/16 --paced-runs times with icmp.py --rate 10000 and
   `fping -i 0.1` (fping's 0.1 ms between probes, the same 10,000/s asked): CPU seconds per
   /16 (user + system, GNU time, the whole process), the ratio ours / fping, the measured
   rate and its worst one-second deviation. Beside them, what a volunteer's running client
   pays: one process sweeps the /16 RUNNING_SWEEPS times in a row on one Sweeper, and its
   CPU per /16 is the median of the sweeps after the first (getrusage before and after
   each), without the ~0.1 s of interpreter start-up and imports a one-/16 process pays.
3. A volunteer at work: ping_server.py scoped to three /16s and one ping_client.py looping
   at --rate 10000 in a lab where a seventh of every /24 and 127.0.128.0/17 stay silent (so a
   cooldown runs to its end, as on the Internet), at the default cooldown and at --cooldown 1:
   tasks per minute over the census, and start to start (the steady state).

The machine is shared (2 cores, several engineers): CPU and rate figures are noisy; compare
the peers of one run (the ratios), not runs of different days.

probes/s is measured the same way for every tool: echo requests received by the namespace's
kernel (Icmp InEchos), divided by the send window seen on the namespace's `lo` (its packet counter
sampled every 5 ms; the window runs from the first to the last 5 ms slice above 1,000
packets/s, so it includes the last replies). Our own figure (sent / time spent sending, from
SweepStats) is printed beside it.
"""
import argparse
import bisect
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
TIME = shutil.which("time", path="/usr/bin:/bin")   # GNU time(1), for every tool's peak RSS and CPU
PACED_RATE = 10000
CENSUS_SCOPE = "127.0.0.0/15,127.2.0.0/16"   # three /16s: tasks 32512, 32513, 32514
RUNNING_SWEEPS = 3
# one process sweeping TARGET RUNNING_SWEEPS times: the CPU of each sweep, as a JSON list
RUNNING = f"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import icmp
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
spent = []
with icmp.Sweeper() as sweeper:
    for _ in range({RUNNING_SWEEPS}):
        before = cpu()
        result = sweeper.start("{TARGET}", rate={PACED_RATE}, cooldown=1, allow=["127.0.0.0/8"]).result()
        spent.append(cpu() - before)
print(json.dumps({{"cpu": spent, "replies": result.stats.replies}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool at full speed")
    parser.add_argument("--paced-runs", type=int, default=3, help="runs of each tool at 10,000/s")
    parser.add_argument("--skip-rate", action="store_true", help="skip the runs at 10,000/s")
    parser.add_argument("--skip-census", action="store_true", help="skip the census runs (~1 min)")
    args = parser.parse_args(argv)
    why = conftest.lab_missing()
    if why:
        print(f"bench/sweep.py: {why}", file=sys.stderr)
        return 2
    box = conftest.Lab(conftest.new_lab_name(), drop=False)
    try:
        box.up()
        bench = Bench(box)
        rows = run_all(bench, args)
        paced, startups = ([], []) if args.skip_rate else run_paced(bench, args.paced_runs)
    finally:
        box.down()
    census = [] if args.skip_census else run_census()
    print_summary(rows)
    print_paced(paced, startups)
    print_census(census)
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
        """measure() without the `lo` samples."""
        return self.measure(argv, timeout)[:6]

    def measure(self, argv, timeout=120):
        """(wall s, requests seen, send window s, stdout, peak RSS kB, CPU s (user + system), the
        `lo` samples [(t, packets)]) of one command in the lab."""
        if TIME:
            argv = [TIME, "-f", "maxrss_kb=%M cpu_s=%U+%S", *argv]
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
        times = [line.split() for line in done.stderr.splitlines() if line.startswith("maxrss_kb=")]
        rss = int(times[-1][0].split("=")[1]) if times else 0
        cpu = sum(map(float, times[-1][1].split("=")[1].split("+"))) if times else 0.0
        return wall, self.requests() - before, send_window(samples), done.stdout, rss, cpu, samples

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
    wall, requests, window, out, rss, cpu = bench.time_run(argv)
    report = json.loads(out)
    stats = report["stats"]
    own_pps = stats["sent"] / stats["send_seconds"] if stats["send_seconds"] else 0.0
    row = row_of(f"icmp.py rate={rate:g}", run, wall, requests, window, stats["replies"],
                 rss or report["max_rss_kb"], cpu)
    row["own_pps"] = own_pps
    print_row(row, f"own sent/send_s {own_pps:,.0f}/s  stray {stats['stray']} "
                   f"bad {stats['bad_payload']} dup {stats['duplicates']} kind {stats['kind']}")
    return row


def run_fping(bench: Bench, run: int) -> dict:
    argv = ["fping", "-a", "-q", "-r", "0", "-i", "0", "-t", "500", "-g", TARGET]
    wall, requests, window, out, rss, cpu = bench.time_run(argv)
    found = sum(1 for line in out.splitlines() if line.startswith("127."))
    row = row_of("fping", run, wall, requests, window, found, rss, cpu)
    print_row(row, "(fping -g skips the network and broadcast address: 65,534 probed)")
    return row


def run_zmap(bench: Bench, tmp: str, run: int) -> dict:
    blocklist, out_file = os.path.join(tmp, "empty_blocklist"), os.path.join(tmp, "zmap.out")
    open(blocklist, "w").close()
    argv = ["zmap", "-q", "--disable-syslog", "-M", "icmp_echoscan", "-i", "lo", "-G", "00:00:00:00:00:00",
            "--source-mac", "02:00:00:00:00:01", "-S", "127.0.0.1", "-b", blocklist, "-r", "0",
            "-P", "1", "-c", "2", "-o", out_file, TARGET]
    wall, requests, window, _, rss, cpu = bench.time_run(argv)
    with open(out_file) as fh:
        found = len({line.strip() for line in fh if line.startswith("127.")})
    row = row_of("zmap", run, wall, requests, window, found, rss, cpu)
    print_row(row, "(zmap waits its fixed -c 2 s cooldown)")
    return row


def run_paced(bench: Bench, runs: int) -> list:
    """Ours and fping at 10,000 probes/s, taking turns: CPU per /16, rate, worst second."""
    ours = [sys.executable, ICMP_PY, TARGET, "--allow", "127.0.0.0/8", "--rate", PACED_RATE, "--cooldown", 1]
    fping = ["fping", "-a", "-q", "-r", "0", "-i", 1000 / PACED_RATE, "-t", "500", "-g", TARGET]
    tools = [("icmp.py --rate 10000", ours)] + ([("fping -i 0.1", fping)] if shutil.which("fping") else [])
    rows = []
    startup, startups = [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import icmp"], []
    for k in range(runs):
        rows.append(run_running(bench, k + 1))
        startups.append(bench.measure(startup)[5])
        for tool, argv in tools:
            wall, requests, window, out, _, cpu, samples = bench.measure(argv)
            rate, worst = rate_and_worst_second(samples)
            row = {"tool": tool, "run": k + 1, "cpu": cpu, "cpu_per_16": cpu * 65536 / max(requests, 1),
                   "requests": requests, "rate": rate, "worst": worst, "wall": wall}
            if out.startswith("{"):
                row["own_cpu"] = json.loads(out)["stats"]["cpu_seconds"]
            rows.append(row)
            print(f"{tool:<22} run {k + 1}: CPU {cpu:.2f} s for {requests:,} probes "
                  f"({row['cpu_per_16']:.2f} s per /16, {cpu / max(requests, 1) * 1e6:.1f} us a probe"
                  f"{', own count %.2f s' % row['own_cpu'] if 'own_cpu' in row else ''}); "
                  f"rate {rate:,.0f}/s, worst second {worst:+.1%} of {PACED_RATE:,}; wall {wall:.1f} s", flush=True)
    return rows, startups


def run_running(bench: Bench, run: int) -> dict:
    """CPU per /16 in a running process (RUNNING): the median of its sweeps after the first."""
    wall, requests, _, out, _, cpu, _ = bench.measure([sys.executable, "-c", RUNNING, ROOT], timeout=300)
    report = json.loads(out)
    per_16 = statistics.median(report["cpu"][1:])
    print(f"{'icmp.py, running':<22} run {run}: CPU per sweep {', '.join('%.2f' % c for c in report['cpu'])} s "
          f"({per_16:.2f} s per /16 after the first; {cpu:.2f} s for the whole process); "
          f"{report['replies']:,} replies in the last", flush=True)
    return {"tool": "icmp.py, running", "run": run, "cpu": cpu, "cpu_per_16": per_16, "requests": requests,
            "rate": 0.0, "worst": 0.0, "wall": wall}


def rate_and_worst_second(samples: list) -> tuple[float, float]:
    """(probes/s over the send window, the one-second window furthest from PACED_RATE as a
    signed fraction), from `lo`'s packet counter: each probe and its reply cross `lo` once
    each, so probes are half the packets. Windows start at every sample of the send window."""
    busy = [k for k, ((t0, n0), (t1, n1)) in enumerate(zip(samples, samples[1:]))
            if t1 > t0 and (n1 - n0) / (t1 - t0) > 1000]
    if not busy:
        return 0.0, 0.0
    first, last = busy[0], busy[-1] + 1
    (t_first, n_first), (t_last, n_last) = samples[first], samples[last]
    rate = (n_last - n_first) / 2 / (t_last - t_first)
    worst, ends = 0.0, [t for t, _ in samples]
    for k in range(first, last):
        end = bisect.bisect_left(ends, samples[k][0] + 1.0, k, last + 1)
        if end > last:
            break
        (t0, n0), (t1, n1) = samples[k], samples[end]
        deviation = (n1 - n0) / 2 / (t1 - t0) / PACED_RATE - 1
        worst = deviation if abs(deviation) > abs(worst) else worst
    return rate, worst


def run_census() -> list:
    """Tasks per minute of one looping client through a three-block census, at the default
    cooldown and at --cooldown 1, taking turns (a fresh lab and server each run)."""
    rows = []
    for cooldown in (None, 1):
        box = conftest.Lab(conftest.new_lab_name(), drop=True)
        try:
            box.up()
            rows.append(census_run(box, cooldown))
        finally:
            box.down()
        row = rows[-1]
        print(f"census, cooldown {row['cooldown']}: {row['tasks']} tasks in {row['wall']:.1f} s "
              f"({row['per_min']:.1f} tasks/min), start to start {row['steady']:.1f} s a task "
              f"({row['steady_per_min']:.1f} tasks/min; the rate limit allows "
              f"{60 / (65536 / PACED_RATE):.1f})", flush=True)
    return rows


def census_run(box, cooldown) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = box.popen([sys.executable, "-u", os.path.join(ROOT, "ping_server.py"), "--host", "127.0.0.1",
                            "--port", "0", "--scope", CENSUS_SCOPE, "--data", os.path.join(tmp, "data")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = next(line for line in server.stdout if "listening on http://" in line)
        url = url.split("listening on ", 1)[1].strip().rstrip("/")
        argv = [sys.executable, "-u", os.path.join(ROOT, "ping_client.py"), "--server", url,
                "--allow", "127.0.0.0/8", "--only", "127.0.0.0/8", "--rate", PACED_RATE, "--name", "bench",
                "--spool", os.path.join(tmp, "spool"), *(["--cooldown", cooldown] if cooldown is not None else [])]
        started = time.monotonic()
        client = box.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        starts = [time.monotonic() for line in client.stdout if ": sweeping 127." in line]
        code, wall = client.wait(timeout=300), time.monotonic() - started
        server.kill()
        server.wait()
    if code != 0:
        raise RuntimeError(f"the census client exited {code}")
    steady = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else 0.0
    return {"cooldown": "default" if cooldown is None else f"{cooldown} s", "tasks": len(starts), "wall": wall,
            "per_min": 60 * len(starts) / wall, "steady": steady, "steady_per_min": 60 / steady if steady else 0.0}


def row_of(tool, run, wall, requests, window, found, rss_kb, cpu) -> dict:
    return {"tool": tool, "run": run, "wall": wall, "requests": requests, "window": window,
            "pps": requests / window if window else 0.0, "found": found, "rss_mb": rss_kb / 1024, "cpu": cpu}


def send_window(samples: list) -> float:
    """First to last 5 ms slice in which lo moved more than 1,000 packets/s."""
    busy = [(t0, t1) for (t0, n0), (t1, n1) in zip(samples, samples[1:])
            if t1 > t0 and (n1 - n0) / (t1 - t0) > 1000]
    return busy[-1][1] - busy[0][0] if busy else 0.0


def print_row(row: dict, note: str = "") -> None:
    print(f"{row['tool']:<20} run {row['run']}: wall {row['wall']:.3f} s  requests {row['requests']:,}  "
          f"window {row['window']:.3f} s  {row['pps']:,.0f} probes/s  found {row['found']:,}  "
          f"rss {row['rss_mb']:.1f} MB  CPU {row['cpu']:.2f} s  {note}", flush=True)


def print_summary(rows: list) -> None:
    print("\nmedians (127.0.0.0/16 on a lossless lab; 65,536 addresses answer):")
    medians = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        med = {key: statistics.median(r[key] for r in mine) for key in ("wall", "pps", "found", "rss_mb", "cpu")}
        medians[tool] = med
        print(f"  {tool:<20} wall {med['wall']:.3f} s  {med['pps']:,.0f} probes/s  found {med['found']:,.0f}  "
              f"rss {med['rss_mb']:.1f} MB  CPU {med['cpu']:.2f} s  ({len(mine)} runs)")
    ours = medians.get("icmp.py rate=0")
    paced = [r for r in rows if r["tool"] == "icmp.py rate=10000"]
    if paced:
        achieved = paced[0]["own_pps"]
        print(f"  rate=10000: achieved {achieved:,.1f} probes/s ({(achieved / 10000 - 1) * 100:+.2f} %)")
    for peer, key, what in (("zmap", "pps", "probes/s"), ("fping", "pps", "probes/s"), ("fping", "wall", "wall")):
        if ours and peer in medians and medians[peer][key]:
            print(f"  icmp.py / {peer} {what}: {ours[key] / medians[peer][key]:.2f}")



def print_paced(rows: list, startups: list) -> None:
    if not rows:
        return
    print(f"\nat {PACED_RATE:,} probes/s (medians; CPU = user + system of the whole process, per /16):")
    medians = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        medians[tool] = {key: statistics.median(r[key] for r in mine) for key in ("cpu_per_16", "rate")}
        worst = max((r["worst"] for r in mine), key=abs)
        rate = (f"rate {medians[tool]['rate']:,.0f}/s ({medians[tool]['rate'] / PACED_RATE - 1:+.1%})  "
                f"worst second {worst:+.1%}" if medians[tool]["rate"] else "")
        print(f"  {tool:<22} CPU {medians[tool]['cpu_per_16']:.2f} s per /16  {rate}  ({len(mine)} runs)")
    if startups:
        print(f"  {'python3 + import icmp':<22} CPU {statistics.median(startups):.2f} s "
              f"(start-up alone, inside the one-/16 process's figure)")
    fping = medians.get("fping -i 0.1")
    for tool, what in (("icmp.py --rate 10000", "a one-/16 process"), ("icmp.py, running", "a running client")):
        if tool in medians and fping and fping["cpu_per_16"]:
            print(f"  CPU ours / fping, {what}: {medians[tool]['cpu_per_16'] / fping['cpu_per_16']:.2f} (goal: <= 0.5); "
                  f"run by run: {' '.join('%.2f' % ratio for ratio in run_ratios(rows, tool, 'fping -i 0.1'))}")


def run_ratios(rows: list, tool: str, peer: str) -> list:
    """CPU per /16 of `tool` over that of `peer` in the same run, run by run: how far one busy
    moment moves the ratio."""
    per_16 = {(r["tool"], r["run"]): r["cpu_per_16"] for r in rows}
    return [per_16[tool, run] / per_16[peer, run] for t, run in per_16
            if t == tool and per_16.get((peer, run))]


def print_census(rows: list) -> None:
    if rows:
        print("\na client through a three-block census at 10,000 probes/s:")
    for row in rows:
        print(f"  cooldown {row['cooldown']:<8} {row['per_min']:.1f} tasks/min over the census ({row['wall']:.1f} s, "
              f"the last cooldown included), {row['steady_per_min']:.1f} tasks/min start to start")


if __name__ == "__main__":
    sys.exit(main())
