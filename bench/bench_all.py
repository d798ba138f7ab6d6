#!/usr/bin/env python3
"""Every benchmark in one command, one table of ratios against torch.

    python3 bench/bench_all.py [--quick] [--only store,rendezvous,launcher] [--timeout SECONDS]

Runs bench/bench_store.py, bench/bench_rendezvous.py and bench/bench_launcher.py (those present),
one after the other, each as its own process under this Python, `--quick` passed to those that take
it. Their own progress goes to stderr as they run; their tables are read back and printed as one:

    bench       measurement                      ours       torch   ours better by
    store       get ops/s, 1 client           14000.0      7600.0   1.84x
    rendezvous  64 nodes, ms                     12.0        95.0   7.92x
    launcher    launch, ms                      160.0      1750.0  10.94x

"ours better by" is always above 1 when ours wins: torch/ours for times, sizes and memory,
ours/torch for rates (a measurement named with "/s"). A benchmark that fails or overruns
`--timeout` is reported, the others still run, and the exit status is 1.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("store", "rendezvous", "launcher")
_VALUE = r"(-?\d+(?:\.\d+)?|-|n/a)"


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def parse_store(text):
    """Rows `NAME  OURS  TORCH  RATIO [range of single rounds]` of bench_store.py (the unit is part
    of NAME)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(.*?\S)\s+%s\s+%s(\s+\S+)?(\s+rounds \S+)?\s*$" % (_VALUE, _VALUE), line)
        if m:
            rows.append((m.group(1), _number(m.group(2)), _number(m.group(3))))
    return rows


def _ms_value(text):
    """'12.3ms' -> 12.3; '>90s' (ran past the benchmark's cap) -> 90000.0; anything else -> None."""
    m = re.match(r"^(>?)(\d+(?:\.\d+)?)(ms|s)$", text)
    if not m:
        return None
    value = float(m.group(2)) * (1000.0 if m.group(3) == "s" else 1.0)
    return _AtLeast(value) if m.group(1) else value


class _AtLeast(float):
    """A figure the benchmark only bounds from below (it gave up waiting)."""


def parse_rendezvous(text):
    """Rows `NODES  RANKED  ...  TORCH` of bench_rendezvous.py (times as 12.3ms or >90s)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\S+)\s.*\s(\S+)\s*$", line)
        if m and _ms_value(m.group(2)) is not None:
            rows.append(("%s nodes, ms" % m.group(1), _ms_value(m.group(2)), _ms_value(m.group(3))))
    return rows


def parse_launcher(text):
    """Lines `elasticrun launch 160.0 ms  restart ...` and `torchrun launch ...` of bench_launcher.py."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^(elasticrun|torchrun)\s+(.*)$", line)
        if m:
            found[m.group(1)] = dict((k, (float(v), unit)) for k, v, unit in
                                     re.findall(r"(\w+)\s+(-?\d+(?:\.\d+)?)\s*(ms|MiB|s)\b", m.group(2)))
    ours, theirs = found.get("elasticrun", {}), found.get("torchrun", {})
    return [("%s, %s" % (k, unit), value, theirs.get(k, (None,))[0]) for k, (value, unit) in ours.items()]


PARSERS = {"store": parse_store, "rendezvous": parse_rendezvous, "launcher": parse_launcher}


def advantage(name, ours, theirs):
    """How many times better ours is (above 1: ours wins) as text, or "-" when it can't be said."""
    if not ours or not theirs or "error" in name or isinstance(ours, _AtLeast):
        return "-"
    ratio = ours / theirs if "/s" in name else theirs / ours
    return "%s%.2fx" % (">" if isinstance(theirs, _AtLeast) else "", ratio)


def _fmt(value):
    return "-" if value is None else "%s%.1f" % (">" if isinstance(value, _AtLeast) else "", value)


def run_bench(name, quick, timeout):
    """Run one benchmark (its stderr goes straight through); returns (stdout text, error or None, seconds)."""
    path = os.path.join(HERE, "bench_%s.py" % name)
    cmd = [sys.executable, path]
    with open(path) as f:
        if quick and "--quick" in f.read():
            cmd.append("--quick")
    started = time.monotonic()
    # its own session, so a timeout takes the benchmark's helper processes down with it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=os.path.dirname(HERE), start_new_session=True)
    error = None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        error = "no result after %d s" % timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if error is None and proc.returncode != 0:
        error = "exit %d" % proc.returncode
    return out.decode(errors="replace"), error, time.monotonic() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every benchmark that takes it")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHES))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)")
    args = parser.parse_args(argv)
    wanted = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(wanted) - set(BENCHES))
    if unknown:
        parser.error("unknown benchmark(s): %s" % ",".join(unknown))

    table, failed = [], []
    for name in wanted:
        if not os.path.exists(os.path.join(HERE, "bench_%s.py" % name)):
            print("bench_%s.py: not present, skipped" % name, file=sys.stderr)
            continue
        print("== bench_%s.py" % name, file=sys.stderr, flush=True)
        out, error, seconds = run_bench(name, args.quick, args.timeout)
        rows = PARSERS[name](out)
        if error is None and not rows:
            error = "no figures found in its output"
        print("== bench_%s.py: %.0f s%s" % (name, seconds, "" if error is None else ", FAILED: " + error),
              file=sys.stderr, flush=True)
        if error is not None:
            failed.append(name)
            sys.stderr.write(out)
        table.extend((name,) + row for row in rows)

    if table:
        width = max(len(r[1]) for r in table)
        fmt = "%-11s %-*s %12s %12s   %s"
        print(fmt % ("bench", width, "measurement", "ours", "torch", "ours better by"))
        for bench, what, ours, theirs in table:
            print(fmt % (bench, width, what, _fmt(ours), _fmt(theirs), advantage(what, ours, theirs)))
    if failed:
        print("failed: %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
