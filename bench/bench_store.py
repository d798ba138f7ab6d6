#!/usr/bin/env python3
"""Our store against torch's TCPStore (libuv server), side by side in one run, same client counts.

    python3 bench/bench_store.py [--torch-python PATH] [--quick] [--rounds N]

Each measurement runs the same harness code twice, once per implementation: the server in its own
process, clients in their own processes. The torch half runs this very script under an interpreter
that has torch (default: .venv-torch/bin/python, else /work/.torchvenv/bin/python). Prints a table of
ratios (ours / torch; above 1 is better for ops/s, below 1 is better for times), and for ops/s the
range of the ratios within single rounds.

Our clients on this host move from TCP to the server's same-host Unix socket (see store.py), which
torch's TCPStore has no equivalent of; "ours, TCP only" runs our get and add figures again with
``StoreServer(local_socket=False)``, so that both the default and the plain TCP ratios are printed.

For get and add it also measures the floor for any pure-Python store on this machine: a bare epoll
loop that only knows those frames, driven by clients that send a prebuilt frame and read one reply,
over TCP. A ratio to torch that the floor itself cannot reach says how much is the language, not our
code.
"""
import argparse
import json
import multiprocessing
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _client_class(impl):
    if impl == "floor":
        return _BareClient
    if impl == "torch":
        import datetime

        import torch.distributed as dist

        def make(port):
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
        return make
    sys.path.insert(0, ROOT)
    import store

    def make(port):
        return store.TCPStore("127.0.0.1", port, timeout=120)
    return make


class _BareClient:
    """The floor of a Python client: one prebuilt frame out, one recv in, no checks, no threads."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.frames = {}

    def _ask(self, op, key, tail=b""):
        frame = self.frames.get((op, key, tail))
        if frame is None:
            body = struct.pack(">BII", op, 0, len(key)) + key.encode() + tail
            frame = self.frames[op, key, tail] = struct.pack(">I", len(body)) + body
        self.sock.send(frame)
        return self.sock.recv(65536)

    def set(self, key, value):
        return self._ask(1, key, struct.pack(">I", len(value)) + value.encode())

    def get(self, key):
        return self._ask(2, key)[13:]

    def add(self, key, amount):
        return struct.unpack_from(">q", self._ask(3, key, struct.pack(">q", amount)), 9)[0]


def _serve_floor(port_pipe, stop_event):
    """The floor of a Python server: a bare epoll loop that knows SET, GET of an existing key and
    ADD, trusts every frame to arrive whole, and does nothing else (no handshake, limits, parking)."""
    import select
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    threading.Thread(target=lambda: (stop_event.wait(), wake_w.send(b"x")), daemon=True).start()
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    epoll.register(wake_r.fileno(), select.EPOLLIN)
    port_pipe.send(listener.getsockname()[1])
    socks, data = {}, {}
    while True:
        for fd, _ in epoll.poll():
            sock = socks.get(fd)
            if sock is None:
                if fd == wake_r.fileno():
                    return
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks[conn.fileno()] = conn
                epoll.register(conn.fileno(), select.EPOLLIN)
                continue
            frame = sock.recv(65536)
            if not frame:
                epoll.unregister(fd)
                del socks[fd]
                sock.close()
                continue
            op, rid, klen = struct.unpack_from(">BII", frame, 4)
            key = frame[13:13 + klen]
            if op == 3:
                value = int(data.get(key, 0)) + struct.unpack_from(">q", frame, 13 + klen)[0]
                data[key] = b"%d" % value
                sock.send(struct.pack(">IBIq", 13, 0, rid, value))
            elif op == 2:
                value = data[key]
                sock.send(struct.pack(">IBII", 9 + len(value), 0, rid, len(value)) + value)
            else:
                data[key] = frame[17 + klen:]
                sock.send(struct.pack(">IBI", 5, 0, rid))


def _serve(impl, port_pipe, stop_event):
    """Host the implementation's server in this process until told to stop."""
    if impl == "floor":
        _serve_floor(port_pipe, stop_event)
    elif impl == "torch":
        import datetime

        import torch.distributed as dist
        master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=300),
                               wait_for_workers=False)
        port_pipe.send(master.port)
        stop_event.wait()
    else:
        sys.path.insert(0, ROOT)
        import store
        server = store.StoreServer("127.0.0.1", 0, local_socket=impl != "ours-tcp")
        port_pipe.send(server.port)
        import threading
        threading.Thread(target=lambda: (stop_event.wait(), server.stop()), daemon=True).start()
        server.serve_forever()


def _ops_worker(impl, port, op, seconds, start, out):
    make = _client_class(impl)
    client = make(port)
    client.set("k", "1")
    fn = client.get if op == "get" else (lambda key: client.add(key, 1))
    start.wait()
    n, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            fn("k")
        n += 100
    out.put(n)


def _barrier_worker(impl, port, nclients, total, start, ready, out):
    make = _client_class(impl)
    clients = [make(port) for _ in range(nclients)]
    ready.put(1)
    start.wait()
    t0 = time.perf_counter()
    for c in clients:
        if c.add("arrived", 1) == total:
            c.set("done", "1")
    for c in clients:
        c.wait(["done"])
    out.put(time.perf_counter() - t0)


def _connections_worker(impl, port, nclients, start, out):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    make = _client_class(impl)
    start.wait()
    errors, clients = 0, []
    deadline = time.monotonic() + 120   # torch's server can stall 5 s per connection on reverse DNS
    for _ in range(nclients):
        if time.monotonic() > deadline:
            errors += 1
            continue
        try:
            c = make(port)
            clients.append(c)
            c.add("connections", 1)
        except Exception as e:  # counted, reported
            errors += 1
            if errors == 1:
                sys.stderr.write("connection error: %r\n" % (e,))
    out.put((errors, len(clients)))


def _barrier(ctx, impl, nprocs=8, total=1024):
    """Milliseconds from the start signal until every one of `total` clients saw the barrier open."""
    server = _Server(ctx, impl)
    try:
        start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_barrier_worker,
                             args=(impl, server.port, total // nprocs, total, start, ready, out))
                 for _ in range(nprocs)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        start.set()
        elapsed = 1000 * max(out.get(timeout=300) for _ in procs)
        for p in procs:
            p.join()
        return elapsed
    finally:
        server.close()


class _Server:
    def __init__(self, ctx, impl):
        self.stop = ctx.Event()
        recv, send = ctx.Pipe(False)
        self.proc = ctx.Process(target=_serve, args=(impl, send, self.stop), daemon=True)
        self.proc.start()
        self.port = recv.recv()

    def close(self):
        self.stop.set()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _run_part(impl, part, quick):
    ctx = multiprocessing.get_context("fork")
    if part == "ops":
        return _run_ops(ctx, impl, 1.0 if quick else 3.0)
    results = {}
    _run_crowds(ctx, impl, quick, results)
    return results


def _run_ops(ctx, impl, seconds):
    results = {}
    for op in ("get", "add"):
        for nproc in (1, 8):
            server = _Server(ctx, impl)
            try:
                start, out = ctx.Event(), ctx.Queue()
                procs = [ctx.Process(target=_ops_worker, args=(impl, server.port, op, seconds, start, out))
                         for _ in range(nproc)]
                for p in procs:
                    p.start()
                time.sleep(0.5)
                start.set()
                total = sum(out.get(timeout=120) for _ in procs)
                for p in procs:
                    p.join()
                results["%s ops/s, %d client%s" % (op, nproc, "s" if nproc > 1 else "")] = total / seconds
            finally:
                server.close()
    return results


def _run_crowds(ctx, impl, quick, results):
    results["1024-client barrier, ms"] = statistics.median(_barrier(ctx, impl) for _ in range(3))

    nprocs, per = 8, (250 if quick else 2000)
    server = _Server(ctx, impl)
    try:
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_connections_worker, args=(impl, server.port, per, start, out))
                 for _ in range(nprocs)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        start.set()
        outcomes = [out.get(timeout=600) for _ in procs]
        elapsed = time.perf_counter() - t0
        errors = sum(e for e, _ in outcomes)
        for p in procs:
            p.join()
        results["%d connections each add, s" % (nprocs * per)] = elapsed
        results["%d connections: errors" % (nprocs * per)] = errors
    finally:
        server.close()


def _torch_python(explicit):
    for path in (explicit, os.path.join(ROOT, ".venv-torch", "bin", "python"), "/work/.torchvenv/bin/python"):
        if path and os.path.exists(path):
            return path
    return None


def _median_of(runs):
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("ours", "ours-tcp", "torch", "floor", "both"), default="both")
    parser.add_argument("--part", choices=("ops", "crowds"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the ops/s figures (median)")
    parser.add_argument("--torch-python")
    parser.add_argument("--quick", action="store_true", help="shorter runs, 2,000 connections instead of 16,000")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl != "both":
        results = {}
        ops_only = args.impl in ("floor", "ours-tcp")
        for part in ([args.part] if args.part else ["ops"] if ops_only else ["ops", "crowds"]):
            results.update(_run_part(args.impl, part, args.quick))
        print(json.dumps(results) if args.json else results)
        return 0
    torch_py = _torch_python(args.torch_python)
    if torch_py is None:
        sys.exit("no interpreter with torch found; pass --torch-python")

    def torch_part(part):
        cmd = [torch_py, os.path.abspath(__file__), "--impl", "torch", "--part", part, "--json"]
        out = subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, stdout=subprocess.PIPE)
        return json.loads(out.stdout.decode().splitlines()[-1])

    # ops/s from one client depend on where the scheduler puts the two processes, which changes
    # from run to run: the implementations take turns, and each figure is a median
    runs = {"ours": [], "ours-tcp": [], "floor": [], "torch": []}
    for _ in range(max(1, args.rounds)):
        runs["ours"].append(_run_part("ours", "ops", args.quick))
        runs["ours-tcp"].append(_run_part("ours-tcp", "ops", args.quick))
        runs["floor"].append(_run_part("floor", "ops", args.quick))
        runs["torch"].append(torch_part("ops"))
    ours, tcp, floor, theirs = (_median_of(runs[impl]) for impl in ("ours", "ours-tcp", "floor", "torch"))
    ours.update(_run_part("ours", "crowds", args.quick))
    theirs.update(torch_part("crowds"))

    def spread(impl, name):
        """The lowest and highest ratio to torch's figure of the same round: how much one run can say."""
        ratios = [mine[name] / other[name] for mine, other in zip(runs[impl], runs["torch"])]
        return "rounds %.2f-%.2fx" % (min(ratios), max(ratios))

    print("%-34s %14s %14s %8s" % ("store benchmark", "ours", "torch", "ratio"))
    for name, value in ours.items():
        other = theirs.get(name)
        ratio = "" if not other else "%.2fx" % (value / other)
        print("%-34s %14.1f %14s %8s  %s" % (name, value, "%.1f" % other if other is not None else "-", ratio,
                                             spread("ours", name) if name in runs["ours"][0] else ""))
    print("\nours, TCP only (no same-host socket), run the same way")
    for name, value in tcp.items():
        print("  %-32s %14.1f ops/s = %.2fx torch  %s" % (name, value, value / theirs[name], spread("ours-tcp", name)))
    print("\nthe floor for pure Python over TCP: a bare epoll loop and raw-socket clients, "
          "run the same way")
    for name, value in floor.items():
        other = theirs.get(name)
        print("  %-32s %14.1f ops/s = %.2fx torch, ours over TCP %.2fx of it"
              % (name, value, value / other, tcp[name] / value))
    print("(ops/s: median of %d alternating rounds; barrier: median of 3)" % max(1, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
