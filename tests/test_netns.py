"""Multi-host scenarios on simulated hosts (network namespaces, veth, a bridge): see tests/netns.py."""
import subprocess
import sys
import time

import pytest

from conftest import ROOT, need
from netns import Network, netns_problem

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
        assert sleeper.pid in net.pids(1)
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE).stdout.decode()
    assert not any(name in listed for name in names)
    assert sleeper.poll() is not None


CLIENT = r"""
import sys, time
import store
c = store.TCPStore(sys.argv[1], int(sys.argv[2]), timeout=10)
c.set("from-host2", "hello")
print("ok", c.get("from-host1").decode(), flush=True)
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
        # host 1's own client, on host 1's address
        net.run(0, [sys.executable, "-c",
                    "import store, sys; store.TCPStore(sys.argv[1], int(sys.argv[2])).set('from-host1', 'hi')",
                    net.addr(0), str(port)], cwd=ROOT)
        assert client.stdout.readline() == b"ok hi\n", client.stderr.read().decode()
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
from _etcd_part import EtcdStore
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
    from _etcd_part import EtcdStore
    with Network(4, root_link=True) as net:
        members = EtcdCluster(etcd_binary, tmp_path, size=3, hosts=net.addrs[:3],
                              prefixes=[net.argv(i, []) for i in range(3)], ports=[(2379, 2380)] * 3)
        with members:
            client = net.popen(3, [sys.executable, "-c", ETCD_CLIENT, ",".join(members.endpoints)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert client.stdout.readline() == b"ready\n", client.stderr.read().decode()
            # the client's blocked get watches on member 0 (its first endpoint): cut that host off
            deadline = time.monotonic() + HANG_GUARD
            while members.metric("etcd_debugging_mvcc_watcher_total", 0) < 1:
                assert time.monotonic() < deadline, "no watch on member 0"
                time.sleep(0.05)
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
