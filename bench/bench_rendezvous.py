#!/usr/bin/env python3
"""Rendezvous at scale: join-to-ranked time, store work per node, store CPU and memory; torch beside.

    python3 bench/bench_rendezvous.py [--quick] [--nodes 8,64,256,1024,4096] [--procs 16] [--repeat 1]
                                      [--steady 15] [--conf k=v,...] [--timeline]
                                      [--cap 90] [--torch-max 256] [--torch-python PATH]

For each node count N, one store server runs in its own process (``python3 store.py``, as
``elasticrun`` users run it, or as the rank-0 agent serves it) and N simulated nodes run in --procs
processes, each node a ``RendezvousHandler`` with its own store connection, its own join thread and,
once ranked, its own heartbeat thread (default conf: heartbeat_interval 5 s, timeout 15 s); the fd
limit is raised as far as the hard limit allows. Every node connects first; then all are released at
once (min_nodes = max_nodes = N). Printed per N:

    ranked     seconds from the moment the LAST node called next_rendezvous() to the moment EVERY
               node holds its rank (best of --repeat runs)
    ops/node   store operations one node made until every node was ranked, its heartbeat's first
               beats included (mean; the closer's is the max)
    join cpu   store server CPU seconds from the release to the last rank
    hb ops     store operations per node per heartbeat interval, steady state
    hb load    store server CPU, % of one core, over --steady seconds of heartbeats
    KiB/conn   store server RSS growth per connected client (connections only, before any join)

torch: its c10d dynamic rendezvous (C++ TCPStore server) for N <= --torch-max, under the torch venv
(``ELASTIC_TEST_TORCH_PYTHON``), threads in one process as before; a run that has not finished after
--cap seconds shows ">CAP". Every process started is killed in a ``finally``.
"""
import argparse
import collections
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
_STORE_OPS = ("set", "get", "add", "compare_set", "wait", "check", "delete_key", "multi_get", "multi_set",
              "append", "set_ephemeral", "wait_gone", "beat", "num_keys")
_TICK = os.sysconf("SC_CLK_TCK")


def _raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Counting:
    """The store API of `store`, counting each call (the handler takes any object with the API)."""

    def __init__(self, store, counts):
        self._store, self._counts = store, counts

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name not in _STORE_OPS:
            return attr
        counts = self._counts

        def counted(*args, **kwargs):
            counts[name] += 1
            return attr(*args, **kwargs)
        return counted


# ------------------------------------------------------------------------------------- one node process

def _emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def child(port, count, total, run_id, conf):
    """`count` of the `total` nodes, as threads; driven by lines on stdin (go, stats, exit)."""
    sys.path.insert(0, ROOT)
    import logging
    logging.basicConfig(level=logging.ERROR)
    import rendezvous
    import store
    _raise_fd_limit()
    # threads here stand for separate processes, which would not share a GIL: a long switch
    # interval keeps a thousand runnable threads from handing it around every 5 ms (measured at 1,024
    # nodes in 16 processes: 1.5 s to rank them at 50 ms, 35 s at 0.5 ms)
    sys.setswitchinterval(0.05)
    params = rendezvous.RendezvousParameters("c10d", "127.0.0.1:%d" % port, run_id, total, total,
                                             local_addr="127.0.0.1", is_host=0, join_timeout=600, **conf)
    counts = [collections.Counter() for _ in range(count)]
    handlers = [rendezvous.RendezvousHandler(_Counting(store.TCPStore("127.0.0.1", port, timeout=600), c), params)
                for c in counts]
    _emit(event="connected")
    start, end, ranks, errors = [0.0] * count, [0.0] * count, [None] * count, []
    go = threading.Event()

    def node(i):
        go.wait()
        start[i] = time.monotonic()     # CLOCK_MONOTONIC: one clock for every process on this host
        try:
            ranks[i] = handlers[i].next_rendezvous().rank
        except Exception as e:  # reported, not raised
            errors.append(repr(e))
        end[i] = time.monotonic()

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for line in sys.stdin:
        command = line.strip()
        if command == "go":
            go.set()
            for t in threads:
                t.join()
            joined = [sum(c.values()) for c in counts]
            _emit(event="ranked", start=max(start), first=min(start), end=max(end), ranks=ranks,
                  errors=errors[:3], ops=joined, kinds=dict(sum(counts, collections.Counter())))
        elif command == "stats":
            _emit(event="stats", ops=sum(sum(c.values()) for c in counts), at=time.monotonic())
        elif command == "exit":
            break
    os._exit(0)   # no orderly leave: N nodes marking the round broken is not what is measured


# ------------------------------------------------------------------------------------- the parent

def _proc_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Child:
    def __init__(self, args):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True,
                                     bufsize=1)

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, event, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("no %r from a node process within %g s" % (event, timeout))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a node process exited early (rc %s)" % self.proc.wait())
        message = json.loads(line)
        if message["event"] != event:
            raise RuntimeError("expected %r, got %r" % (event, message))
        return message


def run_ours(nodes, procs, run_id, steady, cap, conf, timeline=False):
    """One run at `nodes` nodes; a dict of the figures."""
    limit = _raise_fd_limit()
    if nodes + 64 > limit:
        raise SystemExit("bench_rendezvous: %d nodes need about %d file descriptors in the store process; "
                         "the limit is %d" % (nodes, nodes + 64, limit))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "store.py"), "--host", "127.0.0.1", "--port", "0"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    children = []
    try:
        port = int(server.stdout.readline().split(":")[-1])
        procs = max(1, min(procs, nodes))
        shares = [nodes // procs + (1 if i < nodes % procs else 0) for i in range(procs)]
        rss0 = _proc_rss_kib(server.pid)
        for share in shares:
            children.append(_Child([sys.executable, os.path.abspath(__file__), "--child", str(port), str(share),
                                    str(nodes), run_id, json.dumps(conf)]))
        for c in children:
            c.expect("connected", cap)
        per_conn = (_proc_rss_kib(server.pid) - rss0) / nodes
        cpu0 = _proc_cpu(server.pid)
        if timeline:   # when the round's keys appear, seen by a client in this (idle) process
            sys.path.insert(0, ROOT)
            import store
            probe = store.TCPStore("127.0.0.1", port, timeout=600)
            marks = {}

            def watch():
                for k in ("node/%d" % nodes, "closer", "frozen", "done"):
                    probe.wait(["elastic/%s/0/%s" % (run_id, k)])
                    marks[k] = time.monotonic()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        t_go = time.monotonic()
        for c in children:
            c.send("go")
        done = [c.expect("ranked", cap) for c in children]
        if timeline:
            watcher.join()
            probe.close()
            print("       timeline from the release (s): last join call %.3f, %s, every node ranked %.3f"
                  % (max(d["start"] for d in done) - t_go,
                     ", ".join("%s %.3f" % (k, v - t_go) for k, v in sorted(marks.items(), key=lambda kv: kv[1])),
                     max(d["end"] for d in done) - t_go))
        cpu_join = _proc_cpu(server.pid) - cpu0
        errors = [e for d in done for e in d["errors"]]
        if errors:
            raise RuntimeError("%d node(s) failed, first: %s" % (len(errors), errors[0]))
        ranks = sorted(r for d in done for r in d["ranks"])
        if ranks != list(range(nodes)):
            raise RuntimeError("ranks are not 0..%d" % (nodes - 1))
        ops = [o for d in done for o in d["ops"]]
        kinds = collections.Counter()
        for d in done:
            kinds.update(d["kinds"])
        result = {"nodes": nodes, "ranked": max(d["end"] for d in done) - max(d["start"] for d in done),
                  "ops_mean": sum(ops) / nodes, "ops_max": max(ops), "kinds": dict(kinds), "join_cpu": cpu_join,
                  "kib_per_conn": per_conn, "hb_ops": None, "hb_load": None}
        if steady > 0:
            interval = float(conf.get("heartbeat_interval", 5.0))
            time.sleep(interval)                       # every heartbeat thread is past its first beats
            for c in children:
                c.send("stats")
            first = [c.expect("stats", cap) for c in children]
            cpu1 = _proc_cpu(server.pid)
            time.sleep(steady)
            for c in children:
                c.send("stats")
            last = [c.expect("stats", cap) for c in children]
            cpu2 = _proc_cpu(server.pid)
            window = max(b["at"] for b in last) - min(a["at"] for a in first)
            beats = sum(b["ops"] - a["ops"] for a, b in zip(first, last))
            result["hb_ops"] = beats / nodes / (window / interval)
            result["hb_load"] = 100.0 * (cpu2 - cpu1) / window
        return result
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
            c.proc.wait()
        server.kill()
        server.wait()


# ------------------------------------------------------------------------------------- torch, for reference

def _measure(handlers, join):
    """Release every node at once; seconds from the last join() call to the last rank in hand."""
    n = len(handlers)
    start, end, errors = [0.0] * n, [0.0] * n, []
    gate = threading.Barrier(n + 1)

    def node(i):
        gate.wait()
        start[i] = time.perf_counter()
        try:
            join(handlers[i])
        except Exception as e:  # reported, not raised: one failure must not hang the others' join
            errors.append(repr(e))
        end[i] = time.perf_counter()

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("%d node(s) failed, first: %s" % (len(errors), errors[0]))
    return max(end) - max(start)


def run_torch(nodes, run_id):
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    params = RendezvousParameters("c10d", "127.0.0.1:%d" % server.port, run_id, nodes, nodes,
                                  local_addr="127.0.0.1", is_host=False, join_timeout=600)
    handlers = [get_rendezvous_handler(params) for _ in range(nodes)]
    seconds = _measure(handlers, lambda h: h.next_rendezvous())
    for h in handlers:
        h.shutdown()
    return seconds


def _torch_best(nodes, repeat, python, cap):
    """Best time of `repeat` fresh child processes; None when one did not finish within `cap` s."""
    best = None
    for i in range(repeat):
        try:
            out = subprocess.run([python, os.path.abspath(__file__), "--torch-child", str(nodes), "--run", str(i)],
                                 stdout=subprocess.PIPE, universal_newlines=True, check=True, timeout=cap).stdout
        except subprocess.TimeoutExpired:
            return None
        seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
        best = seconds if best is None else min(best, seconds)
    return best


def _ms(seconds, cap):
    if seconds is None:
        return ">%ds" % cap
    return "%.1fms" % (seconds * 1e3) if seconds < 0.1 else "%.0fms" % (seconds * 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="8,64,256,1024,4096")
    parser.add_argument("--procs", type=int, default=16, help="processes the nodes run in (default 16)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--steady", type=float, default=15.0,
                        help="seconds of steady-state heartbeats measured (0: skip; default 15)")
    parser.add_argument("--conf", default="", help="rdzv conf for the nodes, k=v,... (default: the defaults)")
    parser.add_argument("--quick", action="store_true", help="8, 64 and 256 nodes, no steady state")
    parser.add_argument("--timeline", action="store_true", help="print when the round's keys appeared")
    parser.add_argument("--torch-python", default=os.environ.get("ELASTIC_TEST_TORCH_PYTHON", DEFAULT_TORCH_PYTHON))
    parser.add_argument("--torch-max", type=int, default=256, help="largest N torch is run at (default 256)")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds allowed per run (default 90)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        port, count, total, run_id, conf = args.child
        return child(int(port), int(count), int(total), run_id, json.loads(conf))
    if args.torch_child:
        import logging
        logging.basicConfig(level=logging.ERROR)
        print(json.dumps({"seconds": run_torch(args.torch_child, "bench%d" % args.run)}))
        return 0
    conf = dict(item.split("=", 1) for item in args.conf.split(",") if item)
    if args.quick:
        args.nodes, args.steady = "8,64,256", 0
    counts = [int(n) for n in args.nodes.split(",")]
    have_torch = os.path.exists(args.torch_python)
    print("rendezvous at scale: nodes in %d processes, each with its own store connection and heartbeat; "
          "store in its own process; %d CPU(s); fd limit %d; conf %s"
          % (args.procs, os.cpu_count(), _raise_fd_limit(), conf or "defaults (heartbeat 5 s / 15 s)"))
    print("%6s %9s %9s %8s %9s %7s %8s %9s %11s" % ("nodes", "ranked", "ops/node", "(max)", "join cpu",
                                                     "hb ops", "hb load", "KiB/conn", "torch c10d"))
    for n in counts:
        runs = [run_ours(n, args.procs, "bench%d" % i, args.steady if i == 0 else 0, max(args.cap, 60.0), conf,
                         args.timeline) for i in range(args.repeat)]
        best = min(runs, key=lambda r: r["ranked"])
        first = runs[0]
        theirs = "n/a"
        if have_torch and n <= args.torch_max:
            theirs = _ms(_torch_best(n, args.repeat, args.torch_python, args.cap), args.cap)
        print("%6d %9s %9.1f %8d %8.2fs %7s %8s %9.1f %11s" % (
            n, _ms(best["ranked"], 0), best["ops_mean"], best["ops_max"], best["join_cpu"],
            "%.2f" % first["hb_ops"] if first["hb_ops"] is not None else "-",
            "%.1f%%" % first["hb_load"] if first["hb_load"] is not None else "-",
            first["kib_per_conn"], theirs), flush=True)
        print("       join ops by kind (all nodes): %s" % ", ".join(
            "%s %d" % kv for kv in sorted(best["kinds"].items(), key=lambda kv: -kv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
