#!/usr/bin/env python3
"""Every benchmark in one command, one table of ratios against torch.

    python3 bench/bench_all.py [--quick] [--only store,rendezvous,launcher]

Runs bench/bench_store.py, bench/bench_rendezvous.py and bench/bench_launcher.py (those present),
each as its own process with the same Python and `--quick` passed through, and collects the rows
of their tables: a row is a line whose last column is a ratio such as `1.73x`. Ratios are ours
over torch's as each benchmark defines them (above 1 is better for rates, below 1 for times and
memory); the row name carries the unit. Each benchmark's own progress goes to stderr as it runs.
A benchmark that fails or overruns `--timeout` is reported and the others still run; the exit
status is 1 if any failed.
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
_RATIO = re.compile(r"^-?\d+(\.\d+)?x$")
_NUMBER = re.compile(r"^-?[\d.,]+$|^-$")


def parse_rows(text):
    """(name, ours, torch, ratio) for every line of `text` that ends in a ratio column."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 2 or not _RATIO.match(cols[-1]):
            continue
        values = []
        rest = cols[:-1]
        while rest and _NUMBER.match(rest[-1]) and len(values) < 2:
            values.insert(0, rest.pop())
        values = [""] * (2 - len(values)) + values
        rows.append((" ".join(rest), values[0], values[1], cols[-1]))
    return rows


def run_bench(name, quick, timeout):
    """Run one benchmark (its stderr goes straight through); returns (rows, error or None, seconds)."""
    path = os.path.join(HERE, "bench_%s.py" % name)
    cmd = [sys.executable, path] + (["--quick"] if quick else [])
    started = time.monotonic()
    # its own session, so a timeout takes the benchmark's helper processes down with it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=os.path.dirname(HERE), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return parse_rows(out.decode(errors="replace")), "no result after %d s" % timeout, timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    rows = parse_rows(out.decode(errors="replace"))
    if proc.returncode != 0:
        return rows, "exit %d" % proc.returncode, seconds
    if not rows:
        return rows, "printed no ratio rows", seconds
    return rows, None, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every benchmark")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHES))
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
        print("running bench_%s.py%s ..." % (name, " --quick" if args.quick else ""), file=sys.stderr, flush=True)
        rows, error, seconds = run_bench(name, args.quick, args.timeout)
        print("  done in %.0f s%s" % (seconds, "" if error is None else " (FAILED: %s)" % error),
              file=sys.stderr, flush=True)
        if error is not None:
            failed.append(name)
        table.extend((name,) + row for row in rows)

    if table:
        width = max(len(r[1]) for r in table)
        print("%-10s %-*s %14s %14s %8s" % ("bench", width, "measurement", "ours", "torch", "ratio"))
        for bench, what, ours, theirs, ratio in table:
            print("%-10s %-*s %14s %14s %8s" % (bench, width, what, ours, theirs, ratio))
    if failed:
        print("failed: %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
