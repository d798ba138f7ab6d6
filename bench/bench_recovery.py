#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Detection and recovery times of node failures, on simulated hosts (issue 6).

    sudo python3 bench/bench_recovery.py [--repeat N] [--only NAME,NAME]

Builds the multi-host setup of tests/test_netns.py (tests/netns.py: one network namespace per
"host", veth pairs on a bridge; tests/etcd_cluster.py: real etcd members inside the hosts), runs
one agent per host (`elastic.py --nnodes 2:3 --nproc-per-node 1`, one worker each, the tests' agent
options and --rdzv-conf), injects a fault and reads the times off two clocks the processes write
themselves: every agent's output line, stamped by this script the moment it arrives through a pipe,
and every worker's start marker (the worker writes `start HOST RANK WORLD RESTART PID TIME` on start).

    scenario          fault                                      backends
    sigkill           host 2's agent SIGKILLed                   c10d, etcd (one etcd member, host 0)
    link-down         host 2's link taken down at the bridge     c10d, etcd
    scale-up          a third agent started beside 2 running     c10d, etcd
    etcd-member       etcd member 0 of 3 SIGKILLed (every        etcd
                      client's first endpoint)
    etcd-leader       the raft leader of the 3 members SIGKILLed etcd
    store-host        the agent serving the c10d store killed    c10d

    detection  fault -> the first line any survivor prints about it (e.g. "member ... is dead",
               "restarting the worker group", "lost the store"); "-" when no survivor said anything
    recovery   fault -> every survivor's worker started again at the new world size (scale-up: the
               third agent's start -> all three running at world size 3; etcd-*: the kill ->
               a write through EtcdStore answered again; store-host: the kill -> both surviving
               agents exited, their workers made to fail once both noticed, as a real job's would)

Figures are medians over --repeat runs. A scenario that hangs past the guard is reported and the
others still run; the exit status is then 1. Needs root, iproute2 and etcd: without them it says
why on one line and exits 2. Every process started is SIGKILLed and every namespace deleted in a
`finally` (Network.close()).
"""
import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
for _path in (ROOT, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from netns import Network, netns_problem  # noqa: E402
from etcd_cluster import EtcdCluster  # noqa: E402

HANG_GUARD = 60.0

# The tests' job (worker, rendezvous conf, agent options), so the figures are those of the scenarios
# the tests prove; and the tests' one polling helper.
from netns import AGENT_OPTIONS, RDZV_CONF, Job  # noqa: E402
from agent_scripts.harness import wait_for  # noqa: E402


class ScenarioFailed(Exception):
    """A scenario did not reach the state it waits for within the hang guard."""


class _Agent:
    """One agent's process and its output lines, each stamped with time.time() on arrival."""

    def __init__(self, net, i, argv, env):
        self.i = i
        self.lines = []  # [(wall time, text)]
        rfd, wfd = os.pipe()  # our own raw pipe: os.read never contends with a buffered close
        try:
            self.proc = net.popen(i, argv, stdout=wfd, stderr=wfd, env=env)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        self._rfd = rfd
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        pending = b""
        while True:
            try:
                chunk = os.read(self._rfd, 65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.time()
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                self.lines.append((now, line.decode("utf-8", "replace")))

    def lines_after(self, t):
        return [(ts, text) for ts, text in list(self.lines) if ts > t]

    def text(self):
        return "\n".join(text for _, text in list(self.lines))

    def close(self):
        """After the network is closed (every writer dead): the reader sees EOF."""
        self._reader.join(5)
        try:
            os.close(self._rfd)
        except OSError:
            pass


class _Job(Job):
    """The tests' job, with each agent's output lines timed as they arrive."""

    def __init__(self, net, tmp, backend, endpoint, nnodes="2:3", max_restarts=0):
        super().__init__(net, tmp, backend, endpoint, nnodes, max_restarts=max_restarts, job_id="benchjob")

    def start(self, i):
        self.agents[i] = _Agent(self.net, i, self.argv(i), self.env(i))
        return self.agents[i]

    def running_at(self, hosts, world, after=0.0):
        """{host: first start time at `world` after `after`} once every host in `hosts` has one."""
        first = {}
        for host, _, w, _, _, ts in self.starts():
            host = int(host[1:])   # "h2" -> 2
            if host in hosts and w == world and ts > after and host not in first:
                first[host] = ts
        return first if len(first) == len(hosts) else None

    def first_notice(self, hosts, after):
        """(time, host, text) of the first line any of `hosts` printed after `after`, or None."""
        seen = [(ts, i, text) for i in hosts if i in self.agents for ts, text in self.agents[i].lines_after(after)]
        return min(seen) if seen else None

    def outputs(self):
        return "\n".join("--- agent %d\n%s" % (i, a.text()[-3000:]) for i, a in sorted(self.agents.items()))

    def close(self):
        for agent in self.agents.values():
            agent.close()


@contextlib.contextmanager
def _setup(backend, etcd_binary, etcd_members=1):
    """A 3-host network (the bench on the bridge too), a temp dir, etcd when `backend` is etcd."""
    tmp = tempfile.mkdtemp(prefix="bench_recovery_")
    job = None
    try:
        with Network(3, root_link=True) as net, contextlib.ExitStack() as stack:
            etcd = None
            if backend == "etcd":
                etcd = stack.enter_context(EtcdCluster(
                    etcd_binary, tmp, size=etcd_members, hosts=net.addrs[:etcd_members],
                    prefixes=[net.argv(i, []) for i in range(etcd_members)],
                    ports=[(2379, 2380)] * etcd_members))
                endpoint = ",".join(etcd.endpoints)
            else:
                endpoint = net.addr(0) + ":29400"  # host 0's agent serves the store
            job = _Job(net, tmp, backend, endpoint)
            yield net, etcd, job  # leaving the blocks SIGKILLs every process, deletes the namespaces
    finally:
        if job is not None:
            job.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _start_all(job):
    for i in range(3):
        job.start(i)
    wait_for(lambda: job.running_at({0, 1, 2}, 3), HANG_GUARD, "3 workers at world size 3", explain=job.outputs)


def _lose_host_2(backend, etcd_binary, how):
    with _setup(backend, etcd_binary) as (net, etcd, job):
        _start_all(job)
        if how == "sigkill":
            os.kill(job.agents[2].proc.pid, signal.SIGKILL)
            fault = time.time()
        else:
            fault = time.time()
            net.link_down(2)
        first = wait_for(lambda: job.running_at({0, 1}, 2, after=fault), HANG_GUARD, "survivors at world size 2",
                         explain=job.outputs)
        notice = job.first_notice({0, 1}, fault)
        return _row(notice, fault, max(first.values()) - fault)


def _scale_up(backend, etcd_binary):
    with _setup(backend, etcd_binary) as (net, etcd, job):
        job.start(0)
        job.start(1)
        wait_for(lambda: job.running_at({0, 1}, 2), HANG_GUARD, "2 workers at world size 2", explain=job.outputs)
        joined = time.time()
        job.start(2)
        first = wait_for(lambda: job.running_at({0, 1, 2}, 3, after=joined), HANG_GUARD, "3 workers at world size 3",
                         explain=job.outputs)
        notice = job.first_notice({0, 1}, joined)
        return _row(notice, joined, max(first.values()) - joined, "from the third agent's exec")


def _etcd_leader_is(etcd, i):
    """Whether etcd member `i` is the raft leader (None when it does not say)."""
    conn = http.client.HTTPConnection(etcd.hosts[i], etcd.client_ports[i], timeout=5)
    try:
        conn.request("POST", "/v3/maintenance/status", body=b"{}")
        answer = json.loads(conn.getresponse().read().decode())
        return str(answer["leader"]) == str(answer["header"]["member_id"])
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None
    finally:
        conn.close()


def _etcd_member_killed(backend, etcd_binary, which="first"):
    """Kill etcd member 0 (`which="first"`: every client's first endpoint) or the raft leader."""
    from rendezvous import EtcdStore
    with _setup(backend, etcd_binary, etcd_members=3) as (net, etcd, job):
        _start_all(job)
        starts_before = len(job.starts())
        leaders = [i for i in range(3) if _etcd_leader_is(etcd, i)]
        victim = 0 if which == "first" else (leaders[0] if leaders else 0)
        # the probe talks to the victim first, the worst case for a client
        order = [victim] + [i for i in range(3) if i != victim]
        probe = EtcdStore([etcd.endpoints[i] for i in order], prefix="benchprobe", timeout=HANG_GUARD)
        try:
            probe.set("probe", "before")
            etcd.kill(victim)
            fault = time.time()
            deadline = time.monotonic() + HANG_GUARD
            while True:
                try:
                    probe.set("probe", "after")
                    break
                except Exception as e:  # a failed attempt: try again until the guard
                    if time.monotonic() > deadline:
                        raise ScenarioFailed("etcd did not answer a write after losing a member: %s" % e)
            answered = time.time() - fault
        finally:
            probe.close()
        # nothing to wait on: the job must simply go on for longer than a heartbeat timeout
        time.sleep(max(3.0, 1.5 * _conf_seconds("heartbeat_timeout")))
        restarts = len(job.starts()) - starts_before
        alive = sum(1 for a in job.agents.values() if a.proc.poll() is None)
        notice = job.first_notice({0, 1, 2}, fault)
        note = "killed member %d (%s); restarts: %d%s; agents alive: %d/3" % (
            victim, "leader unknown" if not leaders else ("the leader" if victim in leaders else "not the leader"), restarts,
            " (MUST be 0)" if restarts else "", alive)
        return _row(notice, fault, answered, note, ok=restarts == 0 and alive == 3)


def _store_host_killed(backend, etcd_binary):
    with _setup(backend, etcd_binary) as (net, etcd, job):
        job.max_restarts = 3  # the agents would like to restart: they must give up at once
        _start_all(job)
        starts_before = len(job.starts())
        os.kill(job.agents[0].proc.pid, signal.SIGKILL)  # the agent serving the store, store and all
        fault = time.time()
        survivors = (1, 2)

        def noticed():
            return all("lost the store" in job.agents[i].text() for i in survivors)
        wait_for(noticed, HANG_GUARD, "both surviving agents to report the lost store", explain=job.outputs)
        # a real job's workers fail now too (their peer on host 0 is gone): make ours fail
        job.release_workers("fail")
        failed = time.time()
        exits = {}

        def exited():
            for i in survivors:
                if i not in exits and job.agents[i].proc.poll() is not None:
                    exits[i] = time.time()
            return len(exits) == len(survivors)
        wait_for(exited, HANG_GUARD, "the surviving agents to exit", explain=job.outputs)
        codes = [job.agents[i].proc.returncode for i in survivors]
        notice = job.first_notice(set(survivors), fault)
        restarts = len(job.starts()) - starts_before
        note = "exit codes %s, %.2f s after the workers failed; restarts: %d" % (
            ",".join(map(str, codes)), max(exits.values()) - failed, restarts)
        return _row(notice, fault, max(exits.values()) - fault, note,
                    ok=all(c not in (0, None) for c in codes) and restarts == 0)


def _row(notice, fault, recovery, note="", ok=True):
    detection = None if notice is None else notice[0] - fault
    if notice is not None and not note:
        note = "h%d: %s" % (notice[1], _short(notice[2]))
    elif notice is not None:
        note += "; first: h%d: %s" % (notice[1], _short(notice[2]))
    return {"detection": detection, "recovery": recovery, "note": note, "ok": ok}


def _short(text, width=70):
    text = text.split("[elasticrun] ", 1)[-1].strip()   # the time and the tag go
    return text if len(text) <= width else text[:width - 3] + "..."


def _conf_seconds(name):
    for item in RDZV_CONF.split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return float(value)
    raise KeyError(name)


SCENARIOS = [
    ("sigkill", "c10d", lambda b, e: _lose_host_2(b, e, "sigkill")),
    ("sigkill", "etcd", lambda b, e: _lose_host_2(b, e, "sigkill")),
    ("link-down", "c10d", lambda b, e: _lose_host_2(b, e, "link-down")),
    ("link-down", "etcd", lambda b, e: _lose_host_2(b, e, "link-down")),
    ("scale-up", "c10d", _scale_up),
    ("scale-up", "etcd", _scale_up),
    ("etcd-member", "c10d", None),
    ("etcd-member", "etcd", _etcd_member_killed),
    ("etcd-leader", "c10d", None),
    ("etcd-leader", "etcd", lambda b, e: _etcd_member_killed(b, e, "leader")),
    ("store-host", "c10d", _store_host_killed),
    ("store-host", "etcd", None),
]
NOT_APPLICABLE = {
    ("etcd-member", "c10d"): "n/a: c10d has no etcd members",
    ("etcd-leader", "c10d"): "n/a: c10d has no etcd members",
    ("store-host", "etcd"): "n/a: etcd is the store (see etcd-member)",
}


def _problem():
    problem = netns_problem()
    if problem:
        return problem
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server)"
    return None


def _fmt(values):
    values = [v for v in values if v is not None]
    return "%.2f" % statistics.median(values) if values else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (median reported)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    problem = _problem()
    if problem:
        print("bench_recovery: cannot run: %s" % problem)
        return 2
    etcd_binary = shutil.which("etcd")
    only = set(filter(None, args.only.split(",")))
    results = []
    failed = False
    for name, backend, fn in SCENARIOS:
        if only and name not in only:
            continue
        if fn is None:
            results.append((name, backend, [], [], NOT_APPLICABLE[(name, backend)]))
            continue
        detections, recoveries, notes = [], [], []
        for k in range(args.repeat):
            print("%s %s, run %d/%d ..." % (name, backend, k + 1, args.repeat), file=sys.stderr, flush=True)
            try:
                row = fn(backend, etcd_binary)
            except (ScenarioFailed, AssertionError) as e:   # AssertionError: wait_for's hang guard
                failed = True
                print("  FAILED: %s" % e, file=sys.stderr, flush=True)
                notes.append("FAILED: %s" % _short(str(e).splitlines()[0]))
                continue
            if not row["ok"]:
                failed = True
            detections.append(row["detection"])
            recoveries.append(row["recovery"])
            notes.append(row["note"])
            print("  detection %s s, recovery %.2f s; %s" % (
                "-" if row["detection"] is None else "%.2f" % row["detection"], row["recovery"], row["note"]),
                file=sys.stderr, flush=True)
        results.append((name, backend, detections, recoveries, notes[-1] if notes else ""))

    print("conf: --rdzv-conf %s" % RDZV_CONF)
    print("      agents %s --nnodes 2:3 --nproc-per-node 1; etcd --heartbeat-interval 50 ms "
          "--election-timeout 500 ms" % " ".join(AGENT_OPTIONS))
    print("times in seconds from the fault, median of %d run(s); host 2 is the one lost" % args.repeat)
    print("%-12s %-7s %9s %9s  %s" % ("scenario", "backend", "detect_s", "recover_s", "note (last run)"))
    for name, backend, detections, recoveries, note in results:
        print("%-12s %-7s %9s %9s  %s" % (name, backend, _fmt(detections), _fmt(recoveries), note))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
