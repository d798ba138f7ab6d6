#!/usr/bin/env python3
"""Rendezvous latency: ours against torch's c10d dynamic rendezvous, same machine, same script run.

    python3 bench/bench_rendezvous.py [--nodes 8,64,256] [--repeat 3] [--cap 90] [--torch-python PATH]

For each node count N, N nodes (threads in one process, each with its own store connection, as N
agents would have) are created and connected first; then all call next_rendezvous() at once
(min_nodes = max_nodes = N). Measured: from the moment the LAST node called next_rendezvous() to the
moment EVERY node holds its rank (best of --repeat runs). Ours talks to a store server in its own
process (``python3 store.py``); torch's to a C++ TCPStore server. Torch runs under the torch venv's
interpreter (the launcher never imports torch), in a subprocess of this script. Every run is a fresh
process; a run that has not finished after --cap seconds is stopped and shown as ">CAP".
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")


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


def run_ours(nodes, run_id):
    sys.path.insert(0, ROOT)
    import rendezvous
    import store
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "store.py"), "--host", "127.0.0.1", "--port", "0"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        port = int(server.stdout.readline().split(":")[-1])
        params = rendezvous.RendezvousParameters("c10d", "127.0.0.1:%d" % port, run_id, nodes, nodes,
                                                 local_addr="127.0.0.1", is_host=0, join_timeout=600)
        handlers = [rendezvous.RendezvousHandler(store.TCPStore("127.0.0.1", port, timeout=600), params)
                    for _ in range(nodes)]
        seconds = _measure(handlers, lambda h: h.next_rendezvous())
        for h in handlers:
            h.close()
        return seconds
    finally:
        server.kill()
        server.wait()


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


def _child(impl, nodes, repeat, python, cap):
    """Best time of `repeat` fresh child processes; None when one did not finish within `cap` s."""
    best = None
    for i in range(repeat):
        try:
            out = subprocess.run([python, os.path.abspath(__file__), "--child", impl, "--nodes", str(nodes),
                                  "--run", str(i)], stdout=subprocess.PIPE, universal_newlines=True,
                                 check=True, timeout=cap).stdout
        except subprocess.TimeoutExpired:
            return None
        seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
        best = seconds if best is None else min(best, seconds)
    return best


def _ms(seconds, cap):
    return "%.1fms" % (seconds * 1e3) if seconds is not None else ">%ds" % cap


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="8,64,256")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch-python", default=os.environ.get("ELASTIC_TEST_TORCH_PYTHON", DEFAULT_TORCH_PYTHON))
    parser.add_argument("--cap", type=float, default=90.0, help="seconds allowed per run (default 90)")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    if args.child:
        import logging
        logging.basicConfig(level=logging.ERROR)
        run = run_ours if args.child == "ours" else run_torch
        print(json.dumps({"seconds": run(counts[0], "bench%d" % args.run)}))
        return 0
    have_torch = os.path.exists(args.torch_python)
    print("rendezvous, last join -> every node has its rank (threads as nodes, best of %d, cap %gs)"
          % (args.repeat, args.cap))
    print("%6s %12s %12s %8s" % ("nodes", "ours", "torch c10d", "speedup"))
    for n in counts:
        ours = _child("ours", n, args.repeat, sys.executable, args.cap)
        theirs = _child("torch", n, args.repeat, args.torch_python, args.cap) if have_torch else None
        if ours is None or not have_torch:
            ratio = "n/a"
        elif theirs is None:
            ratio = ">%.0fx" % (args.cap / ours)
        else:
            ratio = "%.1fx" % (theirs / ours)
        print("%6d %12s %12s %8s" % (n, _ms(ours, args.cap), _ms(theirs, args.cap) if have_torch else "n/a",
                                     ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
