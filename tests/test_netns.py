"""Multi-host scenarios on simulated hosts (network namespaces, veth, a bridge): see tests/netns.py."""
import subprocess
import sys

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
