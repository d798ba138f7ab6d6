#!/usr/bin/env python3
"""Hostile clients against the store: server memory and a well-behaved client's latency under attack.

    python3 bench/bench_hostile.py [--torch-python PATH] [--clients N] [--seconds S] [--impl ours|torch|both]

For each attack, a fresh server (ours, then torch's TCPStore, each hosted in its own process by a
master client, as the rank-0 agent does) holds a 1 MiB value; N bad clients attack it for S seconds
while a guard client does set+get round trips, and we report the server's peak RSS, the guard's
round trips, p50, p99 and worst latency and errors, the lines the server wrote to stderr, and
whether it survived. Attacks (raw sockets, each implementation's own wire format):

  pipeline  gets of the 1 MiB value pipelined as fast as the socket takes them, replies never read
  parked    gets (torch: waits) of keys that never appear, pipelined, never read
  garbage   connect, send 64 random bytes, close, as fast as possible

Bounded: 127.0.0.1 only; a server whose RSS passes --memory-cap MiB is killed (and reported so)
before it can take the machine's memory. Figures are for one run on a shared machine: compare
the implementations side by side, not with other days.
"""
import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
ATTACKS = ("pipeline", "parked", "garbage")

# A master client hosting the server in this process, the 1 MiB value set, the port printed.
_SERVER = {
    "ours": r"""
import logging, sys, threading
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.WARNING)
import store
master = store.TCPStore("127.0.0.1", 0, is_master=True, bind="127.0.0.1", timeout=60)
master.set("big", b"x" * (1 << 20))
print(master.port, flush=True)
threading.Event().wait()
""",
    "torch": r"""
import datetime, threading
import torch.distributed as dist
master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
master.set("big", b"x" * (1 << 20))
print(master.port, flush=True)
threading.Event().wait()
""",
}

# set+get round trips until the deadline; prints one JSON line of latencies
_GUARD = r"""
import datetime, json, sys, time
impl, port, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if impl == "ours":
    sys.path.insert(0, sys.argv[1])
    import store
    connect = lambda: store.TCPStore("127.0.0.1", port, timeout=10)
else:
    import torch.distributed as dist
    connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
lat, errors, first_error, connects = [], 0, None, []
end = time.monotonic() + seconds
c = None
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        if c is None:
            c = connect()
            connects.append(time.monotonic() - t0)
            t0 = time.monotonic()
        c.set("guard", str(len(lat)))
        c.get("guard")
        lat.append(time.monotonic() - t0)
    except Exception as e:
        errors += 1
        first_error = first_error or "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:100])
        c = None
        time.sleep(0.1)
lat.sort()
pick = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
print(json.dumps({"ops": len(lat), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0),
                  "connect_ms": 1000 * max(connects) if connects else float("nan"),
                  "errors": errors, "first_error": first_error}))
"""


def _frames(impl, attack, n, tag=b""):
    """`n` requests of `attack` in `impl`'s wire format, and the handshake that goes first."""
    if impl == "ours":
        hello = struct.pack(">I", 5) + b"EKVS\x01"

        def get(rid, key):
            body = struct.pack(">BIqI", 2, rid, -1, 1) + struct.pack(">I", len(key)) + key
            return struct.pack(">I", len(body)) + body
        if attack == "pipeline":
            return hello, b"".join(get(i, b"big") for i in range(n))
        return hello, b"".join(get(i, b"never-%s-%d" % (tag, i)) for i in range(n))
    hello = b"\x00" + struct.pack("<I", 0x3C85F7CE)   # VALIDATE and torch's magic number

    def string(data):
        return struct.pack("<Q", len(data)) + data
    if attack == "pipeline":
        return hello, (b"\x03" + string(b"/big")) * n                  # GET
    return hello, b"".join(b"\x06" + struct.pack("<Q", 1) + string(b"/never-%s-%d" % (tag, i)) for i in range(n))   # WAIT


def _attacker(impl, attack, port, end, counts, index):
    if attack == "garbage":
        n = 0
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(os.urandom(64))
                n += 1
            except OSError:
                time.sleep(0.01)
        counts[index] = n
        return
    hello, batch = _frames(impl, attack, 1000)
    per_batch = 1000
    sent = 0
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(hello)
        if impl == "ours":
            s.recv(64)   # the welcome
        if attack == "parked":   # fresh keys for every batch, made ahead (the attacker must not be the bottleneck)
            batches = [_frames(impl, attack, per_batch, b"%d.%d" % (index, k))[1] for k in range(64)]
        else:
            batches = [batch]
        s.settimeout(0.2)
        k = 0
        while time.monotonic() < end:
            try:
                s.sendall(batches[k % len(batches)])
                sent += per_batch
                k += 1
            except socket.timeout:   # the server stopped reading us: keep the pressure on
                pass
            except OSError:
                break
    except OSError:
        pass
    counts[index] = sent
    # keep the connection (unread) until the run ends: the sampler is still measuring
    time.sleep(max(0.0, end - time.monotonic()))
    try:
        s.close()
    except Exception:
        pass


def _rss_mib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run(impl, python, attack, clients, seconds, cap_mib):
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([python, "-c", _SERVER[impl], ROOT], stdout=subprocess.PIPE, stderr=log)
    try:
        port = int(server.stdout.readline())
        base = _rss_mib(server.pid)
        end = time.monotonic() + seconds
        counts = [0] * clients
        threads = [threading.Thread(target=_attacker, args=(impl, attack, port, end, counts, i), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(min(1.0, seconds / 4))   # let the attack build up before the guard starts
        guard = subprocess.Popen([python, "-c", _GUARD, ROOT, impl, str(port), str(max(1.0, end - time.monotonic()))],
                                 stdout=subprocess.PIPE)
        peak, killed, stuck = base or 0.0, False, False
        while guard.poll() is None or time.monotonic() < end:
            if time.monotonic() > end + 20:   # the guard is stuck inside a connect or a request
                guard.kill()
                stuck = True
                break
            rss = _rss_mib(server.pid)
            if rss is None:
                break
            peak = max(peak, rss)
            if rss > cap_mib:
                server.kill()
                killed = True
                break
            time.sleep(0.02)
        out = guard.communicate(timeout=60)[0].decode().strip().splitlines()
        result = json.loads(out[-1]) if out else {
            "ops": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"),
            "connect_ms": float("nan"), "errors": 1,
            "first_error": "still not served 20 s after the attack ended (killed)" if stuck else "no output"}
        for t in threads:
            t.join(10)
        alive = server.poll() is None
        log.seek(0)
        stderr = log.read()
        return {
            "impl": impl, "attack": attack, "base_rss": base, "peak_rss": peak, "killed": killed, "alive": alive,
            "guard_ops": result["ops"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "max_ms": result["max_ms"], "connect_ms": result["connect_ms"], "guard_errors": result["errors"],
            "first_error": result["first_error"], "log_lines": stderr.count(b"\n"), "log_bytes": len(stderr),
            "attack_volume": sum(counts),
        }
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        log.close()


def _torch_python(explicit):
    for path in (explicit, os.path.join(ROOT, ".venv-torch", "bin", "python"), "/work/venv-torch/bin/python",
                 "/work/.torchvenv/bin/python"):
        if path and os.path.exists(path):
            return path
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("ours", "torch", "both"), default="both")
    parser.add_argument("--attack", choices=ATTACKS + ("all",), default="all")
    parser.add_argument("--clients", type=int, default=4, help="bad clients (default 4)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each attack (default 6)")
    parser.add_argument("--memory-cap", type=float, default=1536, help="MiB of server RSS at which it is killed")
    parser.add_argument("--torch-python")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 60:
        parser.error("--clients must be 1-64 and --seconds 1-60")
    impls = ["ours", "torch"] if args.impl == "both" else [args.impl]
    pythons = {"ours": sys.executable}
    if "torch" in impls:
        pythons["torch"] = _torch_python(args.torch_python)
        if pythons["torch"] is None:
            sys.exit("no interpreter with torch found; pass --torch-python")
    attacks = ATTACKS if args.attack == "all" else (args.attack,)
    print("%d bad clients, %.0f s each; guard: set+get round trips" % (args.clients, args.seconds))
    print("%-9s %-6s %16s %10s %9s %7s %7s %9s %6s %9s %8s" % (
        "attack", "impl", "server RSS MiB", "connect ms", "guard ops", "p50 ms", "p99 ms", "worst ms", "errors",
        "log lines", "attack"))
    for attack in attacks:
        for impl in impls:
            r = run(impl, pythons[impl], attack, args.clients, args.seconds, args.memory_cap)
            rss = "%.0f -> %.0f%s" % (r["base_rss"] or 0, r["peak_rss"], " KILLED" if r["killed"] else
                                       "" if r["alive"] else " DIED")
            print("%-9s %-6s %16s %10.1f %9d %7.2f %7.2f %9.1f %6d %9d %8d" % (
                attack, impl, rss, r["connect_ms"], r["guard_ops"], r["p50_ms"], r["p99_ms"], r["max_ms"],
                r["guard_errors"], r["log_lines"], r["attack_volume"]), flush=True)
            if r["first_error"]:
                print("          guard's first error: %s" % r["first_error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
