"""Multi-host scenarios on simulated hosts (network namespaces, veth, a bridge): see tests/netns.py."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, need
from agent_scripts.harness import wait_for
from netns import RDZV_CONF, Job, Network, netns_problem

HANG_GUARD = 60.0


@pytest.fixture(scope="module")
def netns_ok():
    problem = netns_problem()
    need(problem is None, problem or "")


def _listening(proc):
    """The port from the store server's first line, 'listening on H:P'."""
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line
    return int(line.rsplit(":", 1)[1])


def test_network_has_private_addresses_and_cleans_up(netns_ok):
    with Network(2) as net:
        names = list(net.names)
        out = net.run(0, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        assert net.addr(0) + "/24" in out.stdout.decode()
        sleeper = net.popen(1, ["sleep", "600"])
        # `ip netns exec` enters the namespace, then execs: until then the pid is not listed there
        wait_for(lambda: sleeper.pid in net.pids(1), 30, "the sleeper to show up in host 1")
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE).stdout.decode()
    assert not any(name in listed for name in names)
    assert sleeper.poll() is not None


CLIENT = r"""
import sys, time
import store
c = store.TCPStore(sys.argv[1], int(sys.argv[2]), timeout=10)
c.set("from-host2", "hello")
print("ok", c.get("from-host1").decode(), c._sock.family.name, flush=True)   # another host: TCP
sys.stdin.readline()                 # the test takes our link down meanwhile
started = time.monotonic()
try:
    c.set_timeout(0.5)
    c.get("never-set")
    print("no error", flush=True)
except store.StoreError as e:
    print("error", type(e).__name__, round(time.monotonic() - started, 1), flush=True)
sys.stdin.readline()                 # link is back up
c.set_timeout(10)
c.set("again", "1")                  # the same client, the same connection, still usable
print("again", c.get("again").decode(), flush=True)
"""


def test_store_across_hosts_and_a_cut_link_times_out_cleanly(netns_ok):
    with Network(2) as net:
        server = net.popen(0, [sys.executable, ROOT + "/store.py", "--host", net.addr(0), "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port = _listening(server)
        client = net.popen(1, [sys.executable, "-c", CLIENT, net.addr(0), str(port)], cwd=ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # host 0's own client, on host 0's address: it moves to the same-host socket
        local = net.run(0, [sys.executable, "-c",
                            "import store, sys; c = store.TCPStore(sys.argv[1], int(sys.argv[2])); "
                            "c.set('from-host1', 'hi'); print(c._sock.family.name)",
                            net.addr(0), str(port)], cwd=ROOT)
        assert local.stdout == b"AF_UNIX\n"
        assert client.stdout.readline() == b"ok hi AF_INET\n", client.stderr.read().decode()
        net.link_down(1)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        result = client.stdout.readline().decode().split()
        assert result[:2] == ["error", "StoreTimeout"], (result, client.stderr.read().decode())
        assert float(result[2]) < HANG_GUARD
        net.link_up(1)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"again 1\n", client.stderr.read().decode()
        client.stdin.close()
        assert client.wait(HANG_GUARD) == 0


ETCD_CLIENT = r"""
import sys, threading, time
from rendezvous import EtcdStore
s = EtcdStore(sys.argv[1], prefix="nx", timeout=60)
s.set("a", "1")
def blocked():
    print("late", s.get("late").decode(), flush=True)
waiter = threading.Thread(target=blocked)
waiter.start()
print("ready", flush=True)
sys.stdin.readline()                 # the test cuts off the member we talk to meanwhile
started = time.monotonic()
s.set("b", "2")
print("set", round(time.monotonic() - started, 1), flush=True)
print("add", s.add("n", 1), s.get("a").decode(), flush=True)
waiter.join()
s.close()
"""


def test_etcd_client_fails_over_when_its_members_host_is_cut_off(netns_ok, etcd_binary, tmp_path):
    from etcd_cluster import EtcdCluster
    from rendezvous import EtcdStore
    with Network(4, root_link=True) as net:
        members = EtcdCluster(etcd_binary, tmp_path, size=3, hosts=net.addrs[:3],
                              prefixes=[net.argv(i, []) for i in range(3)], ports=[(2379, 2380)] * 3)
        with members:
            client = net.popen(3, [sys.executable, "-c", ETCD_CLIENT, ",".join(members.endpoints)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert client.stdout.readline() == b"ready\n", client.stderr.read().decode()
            # the client's blocked get watches on member 0 (its first endpoint): cut that host off
            wait_for(lambda: members.metric("etcd_debugging_mvcc_watcher_total", 0) >= 1, HANG_GUARD,
                     "a watch on member 0")
            net.link_down(0)
            client.stdin.write(b"go\n")
            client.stdin.flush()
            with EtcdStore(members.endpoints[1:], prefix="nx", timeout=60) as other:
                other.set("late", "after-the-cut")
            lines = sorted(client.stdout.readline().decode().split() for _ in range(3))
            assert [line[0] for line in lines] == ["add", "late", "set"], (lines, client.stderr.read().decode())
            assert lines[0][1:] == ["1", "1"] and lines[1][1:] == ["after-the-cut"]
            print("write failover after the cut took %s s" % lines[2][1])
            client.stdin.close()
            assert client.wait(HANG_GUARD) == 0, client.stderr.read().decode()


# ------------------------------------------------------------------ the agent on several hosts
#
def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def agent_ok(netns_ok):
    need(os.path.exists(os.path.join(ROOT, "elastic.py")), "elastic.py is not there yet")


@pytest.mark.parametrize("backend", ["c10d", "etcd"])
@pytest.mark.parametrize("fault", ["sigkill", "link-down"])
def test_survivors_reform_without_a_lost_node(agent_ok, request, tmp_path, fault, backend):
    from etcd_cluster import EtcdCluster
    with Network(3, root_link=True) as net, contextlib.ExitStack() as stack:
        if backend == "etcd":  # one member, on host 0: the node we lose is host 2
            etcd_binary = request.getfixturevalue("etcd_binary")
            etcd = stack.enter_context(EtcdCluster(etcd_binary, tmp_path, hosts=net.addrs[:1],
                                                   prefixes=[net.argv(0, [])], ports=[(2379, 2380)]))
            job = Job(net, tmp_path, "etcd", etcd.endpoints[0], "2:3", finish_at=2)
        else:
            job = Job(net, tmp_path, "c10d", net.addr(0) + ":29400", "2:3", finish_at=2)
        for i in range(3):
            job.start(i)
        first = job.wait_starts(3, 3)
        lost_worker = [s[4] for s in first if s[0] == "h2"][0]
        fault_at = time.time()
        if fault == "sigkill":
            os.kill(job.agents[2].pid, signal.SIGKILL)
        else:
            net.link_down(2)
        again = job.wait_starts(2, 2)
        assert sorted(s[0] for s in again) == ["h0", "h1"] and sorted(s[1] for s in again) == [0, 1]
        assert job.wait(0) == 0 and job.wait(1) == 0, job.outputs()
        print("%s %s: fault to survivors running at world size 2: %.2f s"
              % (backend, fault, min(s[5] for s in again) - fault_at))
        if fault == "sigkill":  # the killed agent's worker must not outlive it
            wait_for(lambda: not _pid_alive(lost_worker), 20, "the SIGKILLed agent's worker to die")


def test_a_late_node_scales_the_job_up(agent_ok, tmp_path):
    with Network(3) as net:
        job = Job(net, tmp_path, "c10d", net.addr(0) + ":29400", "2:3", finish_at=3)
        job.start(0)
        job.start(1)
        job.wait_starts(2, 2)
        joined_at = time.time()
        job.start(2)
        grown = job.wait_starts(3, 3)
        assert sorted(s[1] for s in grown) == [0, 1, 2]
        assert [job.wait(i) for i in range(3)] == [0, 0, 0], job.outputs()
        print("scale-up: join to running at world size 3: %.2f s" % (max(s[5] for s in grown) - joined_at))


def test_job_rides_out_the_death_of_one_etcd_member(agent_ok, etcd_binary, tmp_path):
    from etcd_cluster import EtcdCluster
    with Network(3, root_link=True) as net:
        etcd = EtcdCluster(etcd_binary, tmp_path, size=3, hosts=net.addrs,
                           prefixes=[net.argv(i, []) for i in range(3)], ports=[(2379, 2380)] * 3)
        with etcd:
            # the heartbeat timeout must outlast etcd's failover (a leader election, then a retry on
            # another member: about 2 s here), as it does with the default of 15 s; 2 s would not
            job = Job(net, tmp_path, "etcd", ",".join(etcd.endpoints), "3",
                       conf=RDZV_CONF.replace("heartbeat_timeout=2", "heartbeat_timeout=5"))
            for i in range(3):
                job.start(i)
            job.wait_starts(3, 3)
            etcd.kill(0)  # every client talks to member 0 first: the worst one to lose
            # nothing to wait on: the job must simply go on for longer than a heartbeat timeout
            time.sleep(6)
            job.release_workers()
            assert [job.wait(i) for i in range(3)] == [0, 0, 0], job.outputs()
            assert len(job.starts()) == 3, job.outputs()  # no restart, no re-rendezvous


def test_losing_the_c10d_store_host_fails_fast_with_a_clear_error(agent_ok, tmp_path):
    with Network(3) as net:
        job = Job(net, tmp_path, "c10d", net.addr(0) + ":29400", "2:3", max_restarts=3)
        for i in range(3):
            job.start(i)
        job.wait_starts(3, 3)
        killed_at = time.monotonic()
        os.kill(job.agents[0].pid, signal.SIGKILL)  # the agent that hosts the store, store and all
        wait_for(lambda: all("lost the store" in job.output(i) for i in (1, 2)), HANG_GUARD, "both agents to notice")
        noticed = time.monotonic() - killed_at
        # a real job's workers now fail too (their peer on host 0 is gone): the agents want to
        # restart, and must give up at once with a clear error instead of waiting for a store
        job.release_workers("fail")
        failed_at = time.monotonic()
        codes = [job.wait(1), job.wait(2)]
        took = time.monotonic() - failed_at
        assert all(code not in (0, None) for code in codes), job.outputs()
        assert len(job.starts()) == 3, job.outputs()  # no restart got anywhere
        print("store host killed: noticed after %.2f s; workers' failure to agents' exit %s: %.2f s"
              % (noticed, codes, took))
