"""Start a real etcd for the tests: one member or a cluster, on free loopback ports, in temp dirs.

    with EtcdCluster(etcd_binary, tmp_path, size=3) as cluster:
        cluster.endpoints          # ["http://127.0.0.1:P1", ...] (client URLs)
        cluster.kill(1)            # SIGKILL member 1; the others keep quorum
        cluster.start(1)           # bring it back with its data dir

Every member runs in its own session and is SIGKILLed and reaped on `stop()` / leaving the block,
whatever happened. `prefix` (an argv prefix such as ``["ip", "netns", "exec", "h1"]``) and `hosts`
(one address per member) let the multi-host tests put members inside network namespaces.
"""
import http.client
import json
import os
import signal
import subprocess
import time

from ports import free_port


class EtcdCluster:
    def __init__(self, binary, workdir, size=1, hosts=None, prefixes=None, ports=None,
                 start_timeout=30.0):
        self.binary = binary
        self.workdir = str(workdir)
        self.size = size
        self.hosts = list(hosts or ["127.0.0.1"] * size)
        self.prefixes = list(prefixes or [[]] * size)
        self.start_timeout = start_timeout
        if ports is None:  # in namespaces the ports are free anyway; on loopback pick free ones
            ports = [(free_port(), free_port()) for _ in range(size)]
        self.client_ports = [p[0] for p in ports]
        self.peer_ports = [p[1] for p in ports]
        self.token = "t%d-%d" % (os.getpid(), int(time.monotonic() * 1000))
        self.procs = [None] * size
        self.logs = [os.path.join(self.workdir, "etcd%d.log" % i) for i in range(size)]

    @property
    def endpoints(self):
        return ["http://%s:%d" % (h, p) for h, p in zip(self.hosts, self.client_ports)]

    def _argv(self, i):
        cluster = ",".join("m%d=http://%s:%d" % (j, self.hosts[j], self.peer_ports[j]) for j in range(self.size))
        client = "http://%s:%d" % (self.hosts[i], self.client_ports[i])
        peer = "http://%s:%d" % (self.hosts[i], self.peer_ports[i])
        return self.prefixes[i] + [
            self.binary, "--name", "m%d" % i, "--data-dir", os.path.join(self.workdir, "m%d.etcd" % i),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            # fast elections keep failover tests short; loopback round trips are microseconds
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn",
        ]

    def start(self, i=None):
        """Start every member (or member `i`) and wait until the cluster answers."""
        members = range(self.size) if i is None else [i]
        for j in members:
            log = open(self.logs[j], "ab")
            try:
                self.procs[j] = subprocess.Popen(self._argv(j), stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
        for j in members:
            self.wait_healthy(j)
        return self

    def wait_healthy(self, i):
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while True:
            proc = self.procs[i]
            if proc.poll() is not None:
                raise RuntimeError("etcd member %d exited with %s:\n%s" % (i, proc.returncode, self.log_text(i)))
            if self._healthy(i):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("etcd member %d not healthy after %.0f s:\n%s"
                                   % (i, self.start_timeout, self.log_text(i)))
            time.sleep(delay)  # nothing to wait on but the member's HTTP port
            delay = min(delay * 2, 0.2)

    def _healthy(self, i):
        conn = http.client.HTTPConnection(self.hosts[i], self.client_ports[i], timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read()
            return resp.status == 200 and json.loads(body.decode()).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()

    def metric(self, name, i=0):
        """The value of one of member `i`'s Prometheus metrics (e.g. etcd_debugging_mvcc_watcher_total)."""
        conn = http.client.HTTPConnection(self.hosts[i], self.client_ports[i], timeout=5)
        try:
            conn.request("GET", "/metrics")
            for line in conn.getresponse().read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        finally:
            conn.close()
        raise KeyError(name)

    def log_text(self, i):
        try:
            with open(self.logs[i], "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self, i):
        """SIGKILL member `i` and reap it."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
        if proc is not None:
            proc.wait()

    def stop(self):
        for i in range(self.size):
            self.kill(i)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
