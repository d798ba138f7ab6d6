#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""elasticrun against torchrun, same scripts, same machine, one run.

    python3 bench/bench_launcher.py [--torch-python PATH] [--runs N]

Measures, for both launchers (`--standalone --nproc-per-node 2`), ours by two routes: the modules
with their bytecode cached (`python3 -m elastic`, what `pip install` gives) and the one-file bundle
(`python3 elasticrun.pyz`, built by tools/make_bundle.py with bytecode for this Python), and the
modules with script workers forked by the fork server (ELASTICRUN_FORKSERVER=1, "fork server"):
  launch   wall time of a whole run of a trivial 2-worker script (median of N; the routes take
           turns round by round, and the bundle is also launched built without bytecode, as it
           was before issue 19, to show what the bytecode buys)
  restart  a worker's last act (it prints a timestamp, then exits 1) to the first line of its
           restarted copy (--max-restarts 1)
  exit     a worker's last act before failing to the launcher's exit (the other worker sleeps and
           must be torn down)
  rss      the launcher process's peak RSS (VmHWM) while its workers run
Targets (issue 4): launch >= 20x faster, restart < 100 ms, exit < 100 ms, rss < 20 MiB; (issue 19)
the bundle launches as fast as the modules.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRIVIAL = "import os\nos.environ['RANK']\n"
STAMP = r'''
import os, sys, time
rank, restart = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
print("start %.6f %s %s" % (time.time(), rank, restart), flush=True)
mode = sys.argv[1]
if rank == "0" and (mode == "fail" or (mode == "fail-once" and restart == "0")):
    print("fail %.6f" % time.time(), flush=True)
    os._exit(1)
if mode in ("fail", "sleep"):
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
'''


def launchers(torch_python, folder):
    # `python3 -m elastic` is what the `elasticrun` console script runs: the module from its .pyc
    # (a script path would be compiled from source on every start)
    ours = [sys.executable, "-m", "elastic"]
    theirs = [torch_python, "-m", "torch.distributed.run"] if torch_python else None
    # script workers forked by the fork server (opt-in) instead of a new interpreter each (`env`
    # sets the variable and execs, so the launcher keeps the pid the RSS probe reads)
    forked = ["env", "ELASTICRUN_FORKSERVER=1"] + ours
    return {"elasticrun": ours, "elasticrun.pyz": [sys.executable, build_bundle(folder, "elasticrun.pyz")],
            "fork server": forked, "torchrun": theirs}


def build_bundle(folder, name, *options):
    """The one-file bundle as a user builds it (by default with bytecode for this Python)."""
    path = os.path.join(folder, name)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_bundle.py"), "-o", path] + list(options),
                   check=True, stdout=subprocess.PIPE)
    return path


def run(cmd, args, env=None):
    t0 = time.time()
    p = subprocess.run(cmd + ["--standalone", "--nproc-per-node", "2"] + args, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=120)
    return time.time() - t0, p


def _timed(cmd):
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def bench_launch(cmds, script, runs):
    """Launch times of every route, taken in turns round by round, so that the machine's load moving
    during the benchmark weighs on all routes alike; torchrun (seconds a launch) takes part in the
    first max(2, runs // 2) rounds only. Returns {name: [seconds per round]}."""
    times = {name: [] for name in cmds}
    for i in range(runs):
        for name, cmd in cmds.items():
            if name == "torchrun" and i >= max(2, runs // 2):
                continue
            dt, p = run(cmd, [script])
            if p.returncode != 0:
                raise RuntimeError("%s launch failed: %s" % (name, p.stderr.decode()[-2000:]))
            times[name].append(dt)
    return times


def stamps(out):
    fail, starts = None, []
    for line in out.decode().splitlines():
        parts = line.split()
        if parts[:1] == ["fail"]:
            fail = float(parts[1])
        elif parts[:1] == ["start"]:
            starts.append((float(parts[1]), parts[2], parts[3]))
    return fail, starts


def bench_restart(cmd, script, runs):
    times = []
    for _ in range(runs):
        for attempt in range(3):   # torchrun on a loaded machine now and then shows no restart
            _, p = run(cmd, ["--max-restarts", "1", script, "fail-once"])
            fail, starts = stamps(p.stdout)
            again = [t for t, rank, restart in starts if rank == "0" and restart == "1"]
            if fail is not None and again:
                break
            sys.stderr.write("no restart seen (try %d of 3): %s\n" % (attempt + 1, p.stderr.decode()[-500:]))
        else:
            raise RuntimeError("no restart seen in 3 tries")
        times.append(again[0] - fail)
    return statistics.median(times)


def bench_exit(cmd, script, runs):
    times = []
    for _ in range(runs):
        t0 = time.time()
        p = subprocess.Popen(cmd + ["--standalone", "--nproc-per-node", "2", script, "fail"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = p.communicate(timeout=120)
        end = time.time()
        fail, _ = stamps(out)
        if fail is None:
            raise RuntimeError("no failure seen")
        times.append(end - fail)
        del t0
    return statistics.median(times)


def bench_rss(cmd, script):
    p = subprocess.Popen(cmd + ["--standalone", "--nproc-per-node", "2", script, "sleep", "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        p.stdout.readline()
        p.stdout.readline()   # both workers started: the launcher is at its working size
        time.sleep(0.5)
        with open("/proc/%d/status" % p.pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    finally:
        p.terminate()   # both launchers tear their workers down on SIGTERM
        p.wait()
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-python", default=os.environ.get("ELASTIC_TEST_TORCH_PYTHON")
                    or os.path.join(ROOT, ".venv-torch", "bin", "python"))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch_python = args.torch_python if os.path.exists(args.torch_python) else None
    import compileall   # what `pip install` does for us; torch's venv has its .pyc files already
    for name in ("store.py", "rendezvous.py", "elastic.py"):
        compileall.compile_file(os.path.join(ROOT, name), quiet=1)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    bare = subprocess.run([sys.executable, "-c", "print([l.split()[1] for l in open('/proc/self/status')"
                           " if l.startswith('VmHWM')][0])"], stdout=subprocess.PIPE).stdout.decode()
    print("bare `python3 -c pass` on this machine: %.1f ms, %.1f MiB RSS (every Python pays these)" % (
        1e3 * statistics.median(_timed([sys.executable, "-c", "pass"]) for _ in range(5)),
        int(bare) / 1024.0))
    tmp = tempfile.mkdtemp(prefix="bench_launcher_")
    trivial, stamp = os.path.join(tmp, "trivial.py"), os.path.join(tmp, "stamp.py")
    with open(trivial, "w") as f:
        f.write(TRIVIAL)
    with open(stamp, "w") as f:
        f.write(STAMP)
    cmds = launchers(torch_python, tmp)
    for name in [n for n, cmd in cmds.items() if cmd is None]:
        print("%s: not available" % name)
        del cmds[name]
    # the bundle as it was before it carried bytecode: every launch compiles the modules (launch only)
    sources_only = [sys.executable, build_bundle(tmp, "sources-only.pyz", "--bytecode-for", "none")]
    launch = bench_launch(dict(cmds, sources_only=sources_only), trivial, args.runs)
    results = {}
    for name, cmd in cmds.items():
        runs = max(2, args.runs // 2) if name == "torchrun" else args.runs
        results[name] = {
            "launch": statistics.median(launch[name]),
            "restart": bench_restart(cmd, stamp, runs),
            "exit": bench_exit(cmd, stamp, runs),
            "rss": bench_rss(cmd, stamp),
        }
        print("%-14s launch %7.1f ms  restart %7.1f ms  exit %7.1f ms  rss %6.1f MiB" % (
            name, results[name]["launch"] * 1e3, results[name]["restart"] * 1e3,
            results[name]["exit"] * 1e3, results[name]["rss"]), flush=True)
    for route in ("elasticrun", "elasticrun.pyz"):
        if "torchrun" not in results:
            break
        ours, theirs = results[route], results["torchrun"]
        print("ratios (torchrun / %s): launch %.1fx  restart %.1fx  exit %.1fx  rss %.1fx" % (
            route, theirs["launch"] / ours["launch"], theirs["restart"] / ours["restart"],
            theirs["exit"] / ours["exit"], theirs["rss"] / ours["rss"]))
    for route in ("elasticrun.pyz", "sources_only"):   # same round, same load: ratios of pairs
        ratios = sorted(b / m for b, m in zip(launch[route], launch["elasticrun"]))
        print("launch %s / modules: %.2fx (rounds %.2f-%.2f; %.1f ms against %.1f ms)" % (
            "bundle" if route == "elasticrun.pyz" else "bundle without bytecode", statistics.median(ratios),
            ratios[0], ratios[-1], statistics.median(launch[route]) * 1e3,
            statistics.median(launch["elasticrun"]) * 1e3))
    ours = results["elasticrun"]
    print("targets: launch >= 20x torchrun, restart < 100 ms (%s), exit < 100 ms (%s), rss < 20 MiB (%s)" % (
        "ok" if ours["restart"] < 0.1 else "MISSED", "ok" if ours["exit"] < 0.1 else "MISSED",
        "ok" if ours["rss"] < 20 else "MISSED"))


if __name__ == "__main__":
    main()
