#!/usr/bin/env python3
"""EtcdStore against our TCPStore: the same operations, one client, one script run.

    python3 bench/bench_etcd.py [--ops N] [--etcd PATH] [--clients K]

Starts a single local etcd member (data dir in a temp dir) and a `python3 store.py` server, each in
its own process, then times set, get, add and compare_set from one client (and `--clients`
processes doing add at once), plus the wake-up latency of a blocked get (a watch on etcd, a parked
request on the store). etcd writes go through raft and an fsync per commit, so its write figures
mostly measure this machine's disk; reads and wake-ups measure the JSON gateway.
"""
import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import store  # noqa: E402
from rendezvous import EtcdStore  # noqa: E402
from etcd_cluster import EtcdCluster  # noqa: E402


def _client(kind, where):
    if kind == "etcd":
        return EtcdStore(where, prefix="bench", timeout=120)
    return store.TCPStore("127.0.0.1", where, timeout=120)


def _rate(fn, ops):
    started = time.perf_counter()
    for i in range(ops):
        fn(i)
    return ops / (time.perf_counter() - started)


def _adder(kind, where, ops, go, out):
    s = _client(kind, where)
    go.wait()
    started = time.perf_counter()
    for _ in range(ops):
        s.add("parallel", 1)
    out.put((started, time.perf_counter()))
    s.close()


def _parallel_add(kind, where, clients, ops):
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_adder, args=(kind, where, ops, go, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # let every client connect before the start signal (a bench, not a test)
        go.set()
        spans = [out.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return clients * ops / (max(e for _, e in spans) - min(s for s, _ in spans))


def _wakeup(kind, where, rounds):
    """Median seconds from a set in one client to the return of a get blocked in another."""
    setter, getter = _client(kind, where), _client(kind, where)
    samples = []
    for i in range(rounds):
        got = []
        t = threading.Thread(target=lambda: got.append((getter.get("wake%d" % i), time.perf_counter())))
        t.start()
        time.sleep(0.05)  # the getter must be blocked (watching / parked) before the set
        started = time.perf_counter()
        setter.set("wake%d" % i, "x")
        t.join()
        samples.append(got[0][1] - started)
    setter.close()
    getter.close()
    samples.sort()
    return samples[len(samples) // 2]


def measure(kind, where, ops, clients):
    s = _client(kind, where)
    try:
        s.set("k", "v")
        result = {
            "set": _rate(lambda i: s.set("k%d" % (i % 100), "value"), ops),
            "get": _rate(lambda i: s.get("k"), ops),
            "add": _rate(lambda i: s.add("counter", 1), ops),
            "compare_set": _rate(lambda i: s.compare_set("cas", str(i), str(i + 1)) if i else
                                 s.compare_set("cas", "", "1"), ops),
        }
    finally:
        s.close()
    result["add x%d clients" % clients] = _parallel_add(kind, where, clients, max(ops // clients, 50))
    result["get wake-up ms"] = _wakeup(kind, where, 20) * 1000
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--etcd", default=shutil.which("etcd"))
    args = parser.parse_args()
    if not args.etcd:
        sys.exit("etcd not found (apt-get install etcd-server)")
    workdir = tempfile.mkdtemp(prefix="bench-etcd-")
    server = None
    try:
        with EtcdCluster(args.etcd, workdir, size=1) as cluster:
            server = subprocess.Popen([sys.executable, os.path.join(ROOT, "store.py"), "--host", "127.0.0.1",
                                       "--port", "0"], stdout=subprocess.PIPE, start_new_session=True)
            port = int(server.stdout.readline().decode().rsplit(":", 1)[1])
            etcd = measure("etcd", cluster.endpoints[0], args.ops, args.clients)
            tcp = measure("tcp", port, args.ops, args.clients)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print("%-18s %12s %12s %10s" % ("operation", "EtcdStore", "TCPStore", "tcp/etcd"))
    for name in etcd:
        unit = "" if name.endswith("ms") else " ops/s"
        print("%-18s %12.1f %12.1f %9.1fx%s" % (name, etcd[name], tcp[name],
                                               (etcd[name] / tcp[name]) if unit == "" else (tcp[name] / etcd[name]),
                                               unit))


if __name__ == "__main__":
    main()
