#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Detection and recovery times of node failures, on simulated hosts (issues 6 and 18), ours beside torchrun's.

    sudo python3 bench/bench_recovery.py [--repeat N] [--only NAME,NAME] [--no-torch]

Builds the multi-host setup of tests/test_netns.py (tests/netns.py: one network namespace per
"host", veth pairs on a bridge; tests/etcd_cluster.py: real etcd members inside the hosts), runs
one agent per host (`elastic.py --nnodes 2:3 --nproc-per-node 1`, one worker each, the tests' agent
options and --rdzv-conf), injects a fault and reads the times off two clocks the processes write
themselves: every agent's output line, stamped by this script the moment it arrives through a pipe,
and every worker's markers (the worker writes `start HOST RANK WORLD RESTART PID TIME` on start and
`term HOST RANK PID TIME` when SIGTERM reaches it).

    scenario       fault                                            backends
    sigkill        host 2's agent SIGKILLed (not the store's host)  c10d, etcd (one etcd member, host 0)
    link-down      host 2's link taken down at the bridge           c10d, etcd
    scale-up       a third agent started beside 2 running           c10d, etcd
    stop-signal    SIGTERM to host 2's agent (a node preempted)     c10d
    etcd-member    etcd member 0 of 3 SIGKILLed (every              etcd
                   client's first endpoint)
    etcd-leader    the raft leader of the 3 members SIGKILLed       etcd
    store-host     the agent serving the c10d store SIGKILLed;      c10d
                   the workers then fail, as a real job's would
    store-host-wk  the same, the workers left alone                 c10d

    detection  fault -> the first line any survivor prints about it (e.g. "member ... is dead",
               "restarting the worker group", "lost the store"; stop-signal: or the first SIGTERM
               to another node's worker); "-" when no survivor said anything
    recovery   fault -> every survivor's worker started again at the new world size (scale-up: the
               third agent's start -> all three running at world size 3; etcd-*: the kill ->
               a write through EtcdStore answered again; store-host: the kill -> both surviving
               agents exited, their workers made to fail once both noticed; store-host-wk: the
               kill -> every worker of hosts 1 and 2 gone; stop-signal: the signal -> all three
               agents exited, the note says when every node's worker had SIGTERM)

torchrun (torch.distributed.run from ELASTIC_TEST_TORCH_PYTHON, default /work/venv-torch/bin/python)
runs the same job on the same hosts with its c10d rendezvous, the same timeouts where it has them,
for every c10d scenario it can take part in (its etcd backend speaks etcd's v2 API only). Where it
does not act at all it is watched TORCH_BOUND seconds and the note says what it did meanwhile
(e.g. "workers still running"); its recovery is then "-" and the ratio ">N": at least N times ours.

Figures are medians over --repeat runs. A scenario of ours that hangs past the guard is reported and
the others still run; the exit status is then 1. Needs root, iproute2 and etcd: without them it says
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
from netns import AGENT_OPTIONS, RDZV_CONF, WORKER, Job  # noqa: E402
from agent_scripts.harness import wait_for  # noqa: E402

TORCH_PYTHON = os.environ.get("ELASTIC_TEST_TORCH_PYTHON", "/work/venv-torch/bin/python")
# torchrun's c10d rendezvous with the same timeouts where it has them (its keys take whole seconds:
# a keep-alive every 1 s, 2 missed = 2 s, as our heartbeat_timeout=2). is_host is per agent: torch
# recognises its own address only among the machine's names, never a namespace's 10.x address.
TORCH_CONF = ("join_timeout=60,last_call_timeout=1,read_timeout=10,close_timeout=5,keep_alive_interval=1,"
              "keep_alive_max_attempt=2")
# where torchrun is not expected to act at all, how long we watch before writing down what it did
TORCH_BOUND = 20.0

# the tests' worker, which also writes `term HOST RANK PID TIME` when SIGTERM reaches it (then dies of it)
_TERM = r"""
import signal
def _on_term(signum, frame):
    with open(log, "a") as f:
        f.write("term %s %s %d %.3f\n" % (e["TEST_HOST"], e["RANK"], os.getpid(), time.time()))
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
signal.signal(signal.SIGTERM, _on_term)
"""
_START = 'with open(log, "a") as f:'   # the handler is in place before the worker says it started
assert WORKER.count(_START) == 1
BENCH_WORKER = WORKER.replace(_START, _TERM + _START)


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
    """The tests' job, with each agent's output lines timed as they arrive; `impl` "ours" runs
    elastic.py, "torch" the same job under torchrun (c10d only)."""

    def __init__(self, net, tmp, backend, endpoint, nnodes="2:3", max_restarts=0, impl="ours"):
        super().__init__(net, tmp, backend, endpoint, nnodes, max_restarts=max_restarts, job_id="benchjob")
        self.impl = impl
        with open(self.worker, "w") as f:
            f.write(BENCH_WORKER)

    def argv(self, i):
        if self.impl == "ours":
            return super().argv(i)
        return ([TORCH_PYTHON, "-m", "torch.distributed.run", "--nnodes", self.nnodes, "--nproc-per-node", "1",
                 "--rdzv-backend", self.backend, "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.job_id,
                 "--rdzv-conf", TORCH_CONF + ",is_host=%d" % (i == 0), "--local-addr", self.net.addr(i),
                 "--max-restarts", str(self.max_restarts), "--monitor-interval", "0.1",
                 self.worker, self.log, str(self.finish_at), self.release])

    def env(self, i):
        env = super().env(i)
        if self.impl == "torch":
            env["LOGLEVEL"] = "INFO"  # torchrun's agent says what it does only at INFO
        return env

    def start(self, i):
        self.agents[i] = _Agent(self.net, i, self.argv(i), self.env(i))
        return self.agents[i]

    def terms(self):
        """[(host, rank, pid, wall time)] of every worker that got SIGTERM."""
        try:
            with open(self.log) as f:
                rows = [line.split() for line in f if line.startswith("term ")]
        except FileNotFoundError:
            return []
        return [(int(r[1][1:]), int(r[2]), int(r[3]), float(r[4])) for r in rows]

    def current_workers(self, hosts):
        """{host: pid} of the last worker each of `hosts` started."""
        last = {}
        for host, _, _, _, pid, _ in self.starts():
            if int(host[1:]) in hosts:
                last[int(host[1:])] = pid
        return last

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
        seen = [(ts, i, text) for i in hosts if i in self.agents for ts, text in self.agents[i].lines_after(after)
                if text.strip()]
        return min(seen) if seen else None

    def last_errors(self, after):
        """"hN: <last line naming an error>" for every agent that printed one after `after`."""
        found = []
        for i, agent in sorted(self.agents.items()):
            errors = [text for _, text in agent.lines_after(after) if "Error" in text or "ERROR" in text]
            if errors:
                found.append("h%d: %s" % (i, _short(errors[-1].split("] ", 1)[-1], 110)))
        return "; ".join(found)

    def outputs(self):
        return "\n".join("--- agent %d\n%s" % (i, a.text()[-3000:]) for i, a in sorted(self.agents.items()))

    def close(self):
        for agent in self.agents.values():
            agent.close()


@contextlib.contextmanager
def _setup(backend, etcd_binary, etcd_members=1, impl="ours"):
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
            job = _Job(net, tmp, backend, endpoint, impl=impl)
            yield net, etcd, job  # leaving the blocks SIGKILLs every process, deletes the namespaces
    finally:
        if job is not None:
            job.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _start_all(job):
    for i in range(3):
        job.start(i)
    wait_for(lambda: job.running_at({0, 1, 2}, 3), HANG_GUARD, "3 workers at world size 3", explain=job.outputs)


def _within(impl, predicate, what, job, bound=TORCH_BOUND):
    """predicate's value once true; ours must get there (else the scenario failed), torchrun may
    not: for it, None after `bound` seconds."""
    if impl == "ours":
        return wait_for(predicate, HANG_GUARD, what, explain=job.outputs)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def _gone(pid):
    """Whether process `pid` is gone (a zombie counts as gone: it runs nothing)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _lose_host_2(impl, backend, etcd_binary, how):
    """Host 2 (not the c10d store's host) lost: its agent SIGKILLed or its link cut."""
    with _setup(backend, etcd_binary, impl=impl) as (net, etcd, job):
        _start_all(job)
        if how == "sigkill":
            os.kill(job.agents[2].proc.pid, signal.SIGKILL)
            fault = time.time()
        else:
            fault = time.time()
            net.link_down(2)
        first = _within(impl, lambda: job.running_at({0, 1}, 2, after=fault), "survivors at world size 2", job)
        notice = job.first_notice({0, 1}, fault)
        if first is None:
            alive = [h for h, pid in job.current_workers({0, 1}).items() if not _gone(pid)]
            return _row(notice, fault, None, "no new round in %.0f s; workers still running on h%s" % (
                TORCH_BOUND, ",h".join(map(str, alive)) or "-"))
        return _row(notice, fault, max(first.values()) - fault)


def _scale_up(impl, backend, etcd_binary):
    with _setup(backend, etcd_binary, impl=impl) as (net, etcd, job):
        job.start(0)
        job.start(1)
        wait_for(lambda: job.running_at({0, 1}, 2), HANG_GUARD, "2 workers at world size 2", explain=job.outputs)
        joined = time.time()
        job.start(2)
        first = _within(impl, lambda: job.running_at({0, 1, 2}, 3, after=joined), "3 workers at world size 3", job,
                        bound=HANG_GUARD)
        notice = job.first_notice({0, 1}, joined)
        if first is None:
            restarted = len([row for row in job.starts() if row[5] > joined])
            return _row(notice, joined, None, "no world of 3 in %.0f s (%d worker starts after the join); %s" % (
                HANG_GUARD, restarted, job.last_errors(joined) or "no error printed"))
        return _row(notice, joined, max(first.values()) - joined, "from the third agent's exec")


def _stop_signal(impl, backend, etcd_binary):
    """SIGTERM to host 2's agent (a scheduler preempting one node): recovery = every agent exited,
    the note says when the workers of all 3 nodes had SIGTERM."""
    with _setup(backend, etcd_binary, impl=impl) as (net, etcd, job):
        _start_all(job)
        os.kill(job.agents[2].proc.pid, signal.SIGTERM)
        fault = time.time()
        exits = {}

        def all_exited():
            for i in range(3):
                if i not in exits and job.agents[i].proc.poll() is not None:
                    exits[i] = time.time()
            return len(exits) == 3
        done = _within(impl, all_exited, "every agent to exit", job)
        terms = {}
        for host, _, _, ts in job.terms():
            terms.setdefault(host, ts)
        others = [ts for host, ts in terms.items() if host != 2]
        # detection: the first sign on another node (its worker's SIGTERM or its agent's first line)
        notice = job.first_notice({0, 1}, fault)
        if others and (notice is None or min(others) < notice[0]):
            notice = (min(others), min(h for h, ts in terms.items() if ts == min(others)), "worker got SIGTERM")
        term_note = ("workers of all 3 nodes had SIGTERM at %.2f s" % (max(terms.values()) - fault)
                     if len(terms) == 3 else "SIGTERM reached the workers of h%s only" % ",h".join(map(str, sorted(terms))))
        codes = [job.agents[i].proc.returncode for i in range(3)]
        if not done:
            alive = [h for h, pid in job.current_workers({0, 1}).items() if not _gone(pid)]
            return _row(notice, fault, None, "after %.0f s: %s; workers still running on h%s; exit codes %s" % (
                TORCH_BOUND, term_note, ",h".join(map(str, alive)) or "-", ",".join(map(str, codes))))
        return _row(notice, fault, max(exits.values()) - fault, "%s; exit codes %s" % (term_note, ",".join(map(str, codes))),
                    ok=impl != "ours" or (len(terms) == 3 and all(c == 143 for c in codes)))


def _store_host_workers(impl, backend, etcd_binary):
    """The agent serving the c10d store SIGKILLed, workers left as they are: recovery = every worker
    of the other nodes gone (nothing makes them fail: the agents must stop them)."""
    with _setup(backend, etcd_binary, impl=impl) as (net, etcd, job):
        _start_all(job)
        workers = job.current_workers({1, 2})
        os.kill(job.agents[0].proc.pid, signal.SIGKILL)
        fault = time.time()
        gone = {}

        def all_gone():
            for host, pid in workers.items():
                if host not in gone and _gone(pid):
                    gone[host] = time.time()
            return len(gone) == len(workers)
        done = _within(impl, all_gone, "the other nodes' workers to be gone", job)
        notice = job.first_notice({1, 2}, fault)
        if not done:
            alive = sorted(set(workers) - set(gone))
            return _row(notice, fault, None, "after %.0f s workers still running on h%s" % (
                TORCH_BOUND, ",h".join(map(str, alive))))
        return _row(notice, fault, max(gone.values()) - fault)


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


def _etcd_member_killed(impl, backend, etcd_binary, which="first"):
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


def _store_host_killed(impl, backend, etcd_binary):
    with _setup(backend, etcd_binary, impl=impl) as (net, etcd, job):
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
    """recovery None: it did not happen within the bound (torchrun)."""
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


_V2 = "n/a: torchrun's etcd backend speaks the v2 API only"
# (scenario, backend, function(impl, backend, etcd binary), None when torchrun runs it too, else why not)
SCENARIOS = [
    ("sigkill", "c10d", lambda i, b, e: _lose_host_2(i, b, e, "sigkill"), None),
    ("sigkill", "etcd", lambda i, b, e: _lose_host_2(i, b, e, "sigkill"), _V2),
    ("link-down", "c10d", lambda i, b, e: _lose_host_2(i, b, e, "link-down"), None),
    ("link-down", "etcd", lambda i, b, e: _lose_host_2(i, b, e, "link-down"), _V2),
    ("scale-up", "c10d", _scale_up, None),
    ("scale-up", "etcd", _scale_up, _V2),
    ("stop-signal", "c10d", _stop_signal, None),
    ("etcd-member", "etcd", _etcd_member_killed, _V2),
    ("etcd-leader", "etcd", lambda i, b, e: _etcd_member_killed(i, b, e, "leader"), _V2),
    ("store-host", "c10d", _store_host_killed, "n/a: it waits for our \"lost the store\" (see store-host-wk)"),
    ("store-host-wk", "c10d", _store_host_workers, None),
]


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


def _ratio(ours, theirs, bound):
    """torchrun's recovery over ours: "-" when either is missing, ">N" when torchrun did not recover
    within `bound` seconds."""
    ours = [v for v in ours if v is not None]
    if not ours or not theirs:
        return "-"
    mine = statistics.median(ours)
    done = [v for v in theirs if v is not None]
    if not done:
        return ">%.0fx" % (bound / mine) if mine > 0 else "-"
    return "%.1fx" % (statistics.median(done) / mine) if mine > 0 else "-"


def _measure(impl, name, backend, fn, etcd_binary, repeat):
    """(detections, recoveries, last note, failed) over `repeat` runs."""
    detections, recoveries, notes, failed = [], [], [], False
    for k in range(repeat):
        print("%s %s %s, run %d/%d ..." % (name, backend, impl, k + 1, repeat), file=sys.stderr, flush=True)
        try:
            row = fn(impl, backend, etcd_binary)
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
        print("  detection %s s, recovery %s s; %s" % (
            "-" if row["detection"] is None else "%.2f" % row["detection"],
            "-" if row["recovery"] is None else "%.2f" % row["recovery"], row["note"]), file=sys.stderr, flush=True)
    return detections, recoveries, notes[-1] if notes else "", failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (median reported)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--no-torch", action="store_true", help="skip torchrun's side")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    problem = _problem()
    if problem:
        print("bench_recovery: cannot run: %s" % problem)
        return 2
    torch_problem = "skipped (--no-torch)" if args.no_torch else None
    if torch_problem is None and not os.path.exists(TORCH_PYTHON):
        torch_problem = "n/a: no torch python at %s (ELASTIC_TEST_TORCH_PYTHON)" % TORCH_PYTHON
    # a SIGTERM (or a `kill` from a shell whose background jobs ignore SIGINT) still runs the finally
    # blocks: every process killed, every namespace deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    etcd_binary = shutil.which("etcd")
    only = set(filter(None, args.only.split(",")))
    results = []
    failed = False
    for name, backend, fn, torch_skip in SCENARIOS:
        if only and name not in only:
            continue
        ours = _measure("ours", name, backend, fn, etcd_binary, args.repeat)
        failed = failed or ours[3]
        skip = torch_skip or torch_problem
        theirs = ([], [], skip, False) if skip else _measure("torch", name, backend, fn, etcd_binary, args.repeat)
        results.append((name, backend, ours, theirs))

    print("conf: --rdzv-conf %s" % RDZV_CONF)
    print("      agents %s --nnodes 2:3 --nproc-per-node 1; etcd --heartbeat-interval 50 ms "
          "--election-timeout 500 ms" % " ".join(AGENT_OPTIONS))
    print("      torchrun: --rdzv-conf %s,is_host=0|1 --monitor-interval 0.1; where it does not act, watched "
          "%.0f s" % (TORCH_CONF, TORCH_BOUND))
    print("times in seconds from the fault, median of %d run(s); host 2 is the one lost, host 0 serves the c10d "
          "store" % args.repeat)
    print("%-13s %-7s %8s %8s %8s %8s %7s" % ("scenario", "backend", "ours_det", "ours_rec", "torch_det",
                                               "torch_rec", "ratio"))
    for name, backend, ours, theirs in results:
        print("%-13s %-7s %8s %8s %8s %8s %7s" % (name, backend, _fmt(ours[0]), _fmt(ours[1]), _fmt(theirs[0]),
                                                  _fmt(theirs[1]), _ratio(ours[1], theirs[1], HANG_GUARD if name == "scale-up" else TORCH_BOUND)))
    print("notes (last run):")
    for name, backend, ours, theirs in results:
        print("  %s %s\n    ours:     %s\n    torchrun: %s" % (name, backend, ours[2], theirs[2]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
