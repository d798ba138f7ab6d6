"""Simulated hosts for multi-host tests: Linux network namespaces joined by veth pairs to a bridge.

    from netns import Network, netns_problem
    need(netns_problem() is None, netns_problem())
    with Network(3) as net:                      # hosts 0..2, addresses net.addr(0) .. net.addr(2)
        server = net.popen(0, [sys.executable, "store.py", "--host", net.addr(0)], stdout=PIPE)
        out = net.run(1, [sys.executable, "-c", "..."])   # subprocess.run inside host 1
        net.link_down(1)                         # host 1's cable is cut: packets vanish silently
        net.link_up(1)

Layout (all names carry a per-run tag, so concurrent runs never collide)::

    netns <tag>h0  eth0 10.N.0.1/24 --veth-- p0 -+
    netns <tag>h1  eth0 10.N.0.2/24 --veth-- p1 -+- br0   (in netns <tag>br: nothing else lives there)
    netns <tag>h2  eth0 10.N.0.3/24 --veth-- p2 -+

With ``Network(n, root_link=True)`` the test process itself is also on the bridge, at 10.N.M.254
(an extra veth in the current namespace, removed on close).

The bridge has a namespace of its own, so nothing touches the machine's real network and the test
addresses can't clash with it. `link_down` takes the bridge-side end of the host's veth down: the
host keeps its address and routes and its packets are simply lost, as with a pulled cable or a dead
switch port (`side="host"` takes the host's own eth0 down instead: sends then fail at once).

Every process started with `popen` runs in its own session; `close()` (also on leaving the block)
SIGKILLs them and anything else still inside the namespaces, then deletes the namespaces (which
destroys the veths and the bridge). Needs root and iproute2.
"""
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

from agent_scripts.harness import wait_for

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD = 60.0

_counter = itertools.count()


def _ip(*args, check=True):
    result = subprocess.run(["ip"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if check and result.returncode != 0:
        raise RuntimeError("ip %s: %s" % (" ".join(args), result.stderr.decode().strip()))
    return result


def netns_problem():
    """None when this machine can build namespaces and veths, else why not (for need())."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = "elprobe%d" % os.getpid()
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return "`ip netns add` failed: %s" % made.stderr.decode().strip()
        veth = _ip("-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return "cannot create veth pairs: %s" % veth.stderr.decode().strip()
        return None
    finally:
        _ip("netns", "del", name, check=False)


class Network:
    """`hosts` namespaces on one bridge; see the module docstring."""

    def __init__(self, hosts, subnet=None, root_link=False):
        if hosts < 1 or hosts > 250:
            raise ValueError("hosts must be 1..250, got %r" % hosts)
        n = next(_counter)
        self.tag = "el%d_%d" % (os.getpid() % 100000, n)
        self.bridge_ns = self.tag + "br"
        self.names = ["%sh%d" % (self.tag, i) for i in range(hosts)]
        # the namespaces are private, so any 10.x net works; vary it anyway for readable logs
        self.subnet = subnet or "10.%d.%d" % (100 + os.getpid() % 100, n % 250)
        self.procs = []
        self._made = []
        # root_link: one more veth from the test process's own namespace to the bridge (address .254),
        # so the test itself can reach every host (health checks, a client outside the hosts)
        self.root_link = self.tag + "r" if root_link else None
        self.root_addr = self.subnet + ".254" if root_link else None

    def addr(self, i):
        """Host i's address (10.N.M.i+1)."""
        return "%s.%d" % (self.subnet, i + 1)

    @property
    def addrs(self):
        return [self.addr(i) for i in range(len(self.names))]

    def start(self):
        try:
            _ip("netns", "add", self.bridge_ns)
            self._made.append(self.bridge_ns)
            b = self.bridge_ns
            _ip("-n", b, "link", "set", "lo", "up")
            _ip("-n", b, "link", "add", "br0", "type", "bridge")
            _ip("-n", b, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                _ip("netns", "add", name)
                self._made.append(name)
                _ip("-n", b, "link", "add", "p%d" % i, "type", "veth", "peer", "name", "e%d" % i)
                _ip("-n", b, "link", "set", "e%d" % i, "netns", name)
                _ip("-n", b, "link", "set", "p%d" % i, "master", "br0")
                _ip("-n", b, "link", "set", "p%d" % i, "up")
                _ip("-n", name, "link", "set", "e%d" % i, "name", "eth0")
                _ip("-n", name, "addr", "add", self.addr(i) + "/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
            if self.root_link:
                _ip("-n", b, "link", "add", "pr", "type", "veth", "peer", "name", "er")
                _ip("-n", b, "link", "set", "er", "netns", str(os.getpid()))  # the test's own namespace
                _ip("link", "set", "er", "name", self.root_link)
                _ip("-n", b, "link", "set", "pr", "master", "br0")
                _ip("-n", b, "link", "set", "pr", "up")
                _ip("addr", "add", self.root_addr + "/24", "dev", self.root_link)
                _ip("link", "set", self.root_link, "up")
        except BaseException:
            self.close()
            raise
        return self

    def argv(self, i, argv):
        """`argv` wrapped to run inside host i (also handy as EtcdCluster's per-member prefix)."""
        return ["ip", "netns", "exec", self.names[i]] + list(argv)

    def popen(self, i, argv, **kwargs):
        """Start `argv` inside host i in its own session; killed on close()."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(i, argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, i, argv, timeout=60, **kwargs):
        """subprocess.run inside host i (output captured); the hang guard kills it."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(i, argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            self._kill(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def _link(self, i, state, side):
        if side == "bridge":
            _ip("-n", self.bridge_ns, "link", "set", "p%d" % i, state)
        elif side == "host":
            _ip("-n", self.names[i], "link", "set", "eth0", state)
        else:
            raise ValueError("side is 'bridge' or 'host', got %r" % side)

    def link_down(self, i, side="bridge"):
        """Cut host i off the network (see the module docstring for `side`)."""
        self._link(i, "down", side)

    def link_up(self, i, side="bridge"):
        self._link(i, "up", side)

    def pids(self, i):
        """Every process currently inside host i's namespace."""
        out = _ip("netns", "pids", self.names[i], check=False).stdout.decode().split()
        return [int(p) for p in out]

    @staticmethod
    def _kill(proc):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.kill()
            except OSError:
                pass
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
        proc.wait()

    def close(self):
        """Kill every process in the hosts, delete every namespace (and with them veths and bridge)."""
        for proc in self.procs:
            self._kill(proc)
        for name in self._made:
            for _ in range(50):  # processes we did not start ourselves (grandchildren, daemons)
                pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.decode().split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.02)  # SIGKILL is asynchronous; the kernel reaps them in a moment
        if self.root_link:  # deleting one end of a veth deletes both
            _ip("link", "del", self.root_link, check=False)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# One agent per host (elastic.py), one worker each. The worker appends a line to a log file that every
# host shares (namespaces share the file system), then finishes at once when the world has the size
# the scenario ends at, and otherwise waits for a release file (or to be stopped by its agent).

WORKER = r"""
import os, sys, time
log, finish_at, release = sys.argv[1], int(sys.argv[2]), sys.argv[3]
e = os.environ
with open(log, "a") as f:
    f.write("start %s %s %s %s %d %.3f\n" % (e["TEST_HOST"], e["RANK"], e["WORLD_SIZE"],
                                           e["TORCHELASTIC_RESTART_COUNT"], os.getpid(), time.time()))
if int(e["WORLD_SIZE"]) == finish_at:
    sys.exit(0)
while not os.path.exists(release):
    time.sleep(0.05)
with open(release) as f:  # "fail": act as a real worker whose peer died (its collective errors out)
    sys.exit(3 if f.read() == "fail" else 0)
"""

RDZV_CONF = ("heartbeat_interval=0.5,heartbeat_timeout=2,last_call_timeout=1,join_timeout=60,"
             "read_timeout=10,close_timeout=5")


AGENT_OPTIONS = ["--monitor-interval", "0.1", "--shutdown-timeout", "2", "--exit-barrier-timeout", "20"]


class Job:
    """Agents on the hosts of `net`, all running WORKER; their output goes to files in `tmp`.

    bench/bench_recovery.py runs the same jobs, starting the agents its own way (start()).
    """

    def __init__(self, net, tmp, backend, endpoint, nnodes, finish_at=-1, max_restarts=0, conf=RDZV_CONF,
                 job_id="netjob"):
        self.max_restarts, self.conf, self.job_id = max_restarts, conf, job_id
        self.net, self.tmp = net, str(tmp)
        self.log, self.release = os.path.join(self.tmp, "starts.log"), os.path.join(self.tmp, "release")
        self.worker = os.path.join(self.tmp, "worker.py")
        with open(self.worker, "w") as f:
            f.write(WORKER)
        self.backend, self.endpoint, self.nnodes, self.finish_at = backend, endpoint, nnodes, finish_at
        self.agents = {}

    def argv(self, i):
        return ([sys.executable, os.path.join(_ROOT, "elastic.py"), "--nnodes", self.nnodes, "--nproc-per-node", "1",
                 "--rdzv-backend", self.backend, "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.job_id,
                 "--rdzv-conf", self.conf, "--local-addr", self.net.addr(i), "--max-restarts", str(self.max_restarts)]
                + AGENT_OPTIONS + [self.worker, self.log, str(self.finish_at), self.release])

    def env(self, i):
        return dict(os.environ, TEST_HOST="h%d" % i, PYTHONUNBUFFERED="1")

    def start(self, i):
        out = open(os.path.join(self.tmp, "agent%d.log" % i), "wb")
        try:
            self.agents[i] = self.net.popen(i, self.argv(i), stdout=out, stderr=subprocess.STDOUT, env=self.env(i))
        finally:
            out.close()
        return self.agents[i]

    def release_workers(self, content=""):
        tmp = self.release + ".tmp"
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, self.release)

    def output(self, i):
        with open(os.path.join(self.tmp, "agent%d.log" % i), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def starts(self):
        """[(host, rank, world, restart_count, pid, wall time)] in the order the workers started."""
        try:
            with open(self.log) as f:
                rows = [line.split() for line in f if line.startswith("start ")]
        except FileNotFoundError:
            return []
        return [(r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), float(r[6])) for r in rows]

    def wait_starts(self, world, count):
        """Wait until `count` workers started in a world of `world`; returns those rows."""
        wait_for(lambda: len([s for s in self.starts() if s[2] == world]) >= count, HANG_GUARD,
                 "%d workers at world size %d" % (count, world), explain=self.outputs)
        return [s for s in self.starts() if s[2] == world]

    def outputs(self):
        return "\n".join("--- agent %d\n%s" % (i, self.output(i)) for i in sorted(self.agents))

    def wait(self, i):
        try:
            return self.agents[i].wait(HANG_GUARD)
        except subprocess.TimeoutExpired:
            raise AssertionError("agent %d did not finish:\n%s" % (i, self.outputs())) from None
